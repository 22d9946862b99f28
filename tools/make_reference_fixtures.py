#!/usr/bin/env python3
"""Build the reference-logit fixtures that dpllm's exactness tests compare against.

For each supported architecture family this creates a tiny random-weight
checkpoint with transformers (real HF layout: config.json + safetensors, scaled
down shapes), stores its weights in the given dtype, and computes reference
logits with PyTorch in float64 from exactly the stored (rounded) weights, using
the eager attention path. Optionally it also computes reference logits for the
real checkpoint in ../shared/models/docs-llama-12m.

Run on a machine with PyTorch + transformers (the device machine):
    python3 tools/make_reference_fixtures.py OUT_DIR [--docs-model DIR --docs-text FILE]
Outputs OUT_DIR/<family>/{config.json,*.safetensors,reference.safetensors}.
reference.safetensors holds `input_ids` (i64, [T]) and `logits` (f32, [T, vocab]).
"""
import argparse, json, os, sys, traceback
import torch
import transformers
from safetensors.torch import save_file

SEQ = 24


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def common(vocab=256, **kw):
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


FAMILIES = {
    # Llama 3.x with llama3 rope scaling, GQA 2:1, bf16 weights, untied.
    "llama": ("LlamaConfig", common(tie_word_embeddings=False,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 64}), torch.bfloat16, None),
    # Mistral with a sliding window shorter than the sequence, f16, sharded.
    "mistral": ("MistralConfig", common(tie_word_embeddings=False, sliding_window=16,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), torch.float16, "60KB"),
    # Qwen2: q/k/v bias, tied embeddings, bf16.
    "qwen2": ("Qwen2Config", common(tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), torch.bfloat16, None),
    # Qwen3: q/k RMSNorm, head_dim != hidden/heads, tied embeddings, f32.
    "qwen3": ("Qwen3Config", common(tie_word_embeddings=True, head_dim=32,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), torch.float32, None),
    # Phi-3: fused qkv_proj and gate_up_proj, bf16.
    "phi3": ("Phi3Config", common(tie_word_embeddings=False, num_key_value_heads=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), torch.bfloat16, None),
}


def build(family, out, seed):
    cfg_cls, kw, dtype, shard = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    randomize(model, seed)
    model = model.to(dtype)
    d = os.path.join(out, family)
    os.makedirs(d, exist_ok=True)
    if shard:
        model.save_pretrained(d, max_shard_size=shard)
    else:
        model.save_pretrained(d)
    # Reference in float64 from exactly the stored weights.
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager")
    ref.eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, kw["vocab_size"], (SEQ,), generator=g)
    with torch.no_grad():
        logits = ref(ids[None]).logits[0]
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.to(torch.float32).contiguous()},
              os.path.join(d, "reference.safetensors"))
    print(f"{family}: files={sorted(os.listdir(d))} logits absmax={logits.abs().max():.3f} std={logits.std():.3f}")


def docs(model_dir, text_file, out, n_tokens=48):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    text = open(text_file, encoding="utf-8").read()[:4000]
    ids = tok.encode(text, add_special_tokens=False).ids[:n_tokens]
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    with torch.no_grad():
        logits = ref(torch.tensor(ids)[None]).logits[0]
    d = os.path.join(out, "docs-llama-12m")
    os.makedirs(d, exist_ok=True)
    save_file({"input_ids": torch.tensor(ids, dtype=torch.int64), "logits": logits.to(torch.float32).contiguous()},
              os.path.join(d, "reference.safetensors"))
    json.dump({"text_prefix": text[:400], "n_tokens": len(ids)}, open(os.path.join(d, "meta.json"), "w"))
    print(f"docs: {len(ids)} tokens, first ids {ids[:8]}, logits absmax {logits.abs().max():.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--docs-model")
    ap.add_argument("--docs-text")
    ap.add_argument("--only", default=",".join(FAMILIES))
    a = ap.parse_args()
    print("torch", torch.__version__, "transformers", transformers.__version__)
    ok = True
    for i, fam in enumerate(a.only.split(",")):
        try:
            build(fam, a.out, 1234 + 17 * i)
        except Exception:
            ok = False
            traceback.print_exc()
    if a.docs_model:
        try:
            docs(a.docs_model, a.docs_text, a.out)
        except Exception:
            ok = False
            traceback.print_exc()
    sys.exit(0 if ok else 1)
