#!/usr/bin/env python3
"""Reference fixtures for SmolLM2-135M-Instruct (GGUF) from an independent
implementation: transformers loading the same GGUF file (gguf-py dequantizes the
Q4_1 / Q8_0 tensors to float32), run in float64 on the CPU.

Run where PyTorch, transformers and gguf are installed (the device machine; gguf
travels as a wheel):
    python3 tools/make_smollm2_fixtures.py MODEL.gguf OUT.safetensors
The output (a few hundred KB) holds, as the dpllm test tests/smollm2_reference.rs reads it:
  text_ids     i64 [T]       token ids of TEXT (no special tokens added)
  seq_ids      i64 [S, L]    a few short sequences (prefixes of TEXT's ids)
  columns      i64 [C]       vocabulary columns kept (seeded random + each row's argmax)
  logits       f32 [S*L, C]  float64 logits of every position, at those columns
  logsumexp    f32 [S*L]     log-sum-exp of every full row (checks all columns at once)
  prompt_ids   i64 [P]       the chat-templated prompt
  greedy_ids   i64 [32]      greedy continuation (do_sample=False), 32 new tokens
and metadata `text` (the sample text) and `prompt` (the user message).
"""
import sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. In 2024, researchers measured "
        "3.14159 units at 12:30 — naïve café résumé, 東京, emoji 🙂 and tabs\tand  double  spaces.\n"
        "def add(a, b):\n    return a + b  # sum\n")
PROMPT = "What is the capital of France?"
SEQS, LEN, COLS, NEW = 3, 6, 2048, 32


def main(gguf_path, out):
    d, f = gguf_path.rsplit("/", 1)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float64, attn_implementation="eager")
    model.eval()
    text_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    print("text ids", len(text_ids), text_ids[:20])
    seqs = [text_ids[i * LEN:(i + 1) * LEN] for i in range(SEQS)]
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    with torch.no_grad():
        rows = torch.cat([model(torch.tensor([s])).logits[0] for s in seqs])
    cols = set(torch.randperm(vocab, generator=g)[:COLS].tolist()) | set(rows.argmax(-1).tolist())
    cols = torch.tensor(sorted(cols))
    msgs = [{"role": "user", "content": PROMPT}]
    prompt_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "input_ids"):
        prompt_ids = prompt_ids["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    greedy = gen[0, len(prompt_ids):]
    print("prompt", len(prompt_ids), "greedy:", repr(tok.decode(greedy)))
    save_file({
        "text_ids": torch.tensor(text_ids, dtype=torch.int64),
        "seq_ids": torch.tensor(seqs, dtype=torch.int64),
        "columns": cols.to(torch.int64),
        "logits": rows[:, cols].to(torch.float32).contiguous(),
        "logsumexp": torch.logsumexp(rows, -1).to(torch.float32),
        "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int64),
        "greedy_ids": greedy.to(torch.int64).contiguous(),
    }, out, metadata={"text": TEXT, "prompt": PROMPT, "transformers": __import__("transformers").__version__, "torch": torch.__version__})
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
