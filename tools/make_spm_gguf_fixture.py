#!/usr/bin/env python3
"""A tiny GGUF with a SentencePiece ("llama") tokenizer and reference token ids.

Trains a small SentencePiece BPE model (vocabulary 320, byte fallback, no
normalization and extra whitespace kept, as Llama 2's tokenizer is) on
TRAIN_TEXT with the sentencepiece library, writes its pieces, scores and types
into a tensor-free GGUF exactly as llama.cpp's converter does
(tokenizer.ggml.model = "llama"), and records the ids that sentencepiece itself
(the ground truth) gives for SAMPLES. Run where sentencepiece and gguf are
installed (the device machine; gguf travels as a wheel):
    python3 tools/make_spm_gguf_fixture.py OUT_DIR
Writes OUT_DIR/spm.gguf and OUT_DIR/spm-reference.json.
"""
import json, os, sys, tempfile
import sentencepiece as spm
import gguf

TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
To be, or not to be, that is the question. All that glitters is not gold. Numbers like 42, 3.14 and 2024 appear.
Tokenizers split words into pieces: unbelievable, tokenization, preprocessing, re-entrant, naïve café.
""" * 20

SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and  double  spaces",
    "unbelievable tokenization of naïve cafés in 2024!",
    "emoji 🙂 and 東京 need byte fallback",
    "new\nlines\tand tabs",
]


def main(out):
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "train.txt")
        open(src, "w").write(TRAIN_TEXT)
        spm.SentencePieceTrainer.train(input=src, model_prefix=os.path.join(d, "m"), vocab_size=320, model_type="bpe",
                                       byte_fallback=True, character_coverage=1.0, split_digits=True, add_dummy_prefix=True,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False,
                                       bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
        sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "m.model"))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        t = 1  # normal
        if sp.is_unknown(i):
            t = 2
        elif sp.is_control(i):
            t = 3
        elif sp.is_unused(i):
            t = 5
        elif sp.is_byte(i):
            t = 6
        types.append(t)
    w = gguf.GGUFWriter(os.path.join(out, "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = {"samples": [{"text": s, "ids": sp.encode(s)} for s in SAMPLES]}
    json.dump(ref, open(os.path.join(out, "spm-reference.json"), "w"), ensure_ascii=False, indent=1)
    for s in ref["samples"]:
        print(s)


if __name__ == "__main__":
    main(sys.argv[1])
