#!/usr/bin/env python3
"""A random Llama-shaped checkpoint in the Hugging Face layout, for timing
dpllm's stages on shapes no model here has (no model hub is reachable).

    python3 tools/make_synthetic_llama.py --shape llama3-8b --out DIR \
        --tokenizer ../shared/models/docs-llama-12m/tokenizer.json

Writes DIR/config.json, bf16 safetensors shards of at most 5 GB with their
index, and a copy of the tokenizer (its ids must be below the vocabulary
size). Linear weights are N(0, 0.02²), norms 1: the model says nothing, but
every stage does the work of the real shape. Tensors are drawn in parallel
(one process a tensor). Needs numpy.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import struct

import numpy as np

SHAPES = {
    # Llama-3-8B: 32 blocks, GQA 32/8, head 128, untied 128256-token vocabulary.
    "llama3-8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256,
                      theta=500000.0, tied=False),
    # A few MB, for checking this script and the commands it feeds.
    "tiny": dict(hidden=256, inter=640, layers=2, heads=4, kv=2, vocab=8192,
                 theta=10000.0, tied=False),
}
SHARD_BYTES = 5 << 30


def tensors(s):
    """(name, shape) of every tensor, in file order."""
    h, i, hd = s["hidden"], s["inter"], s["hidden"] // s["heads"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for l in range(s["layers"]):
        p = f"model.layers.{l}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (s["heads"] * hd, h)),
            (p + "self_attn.k_proj.weight", (s["kv"] * hd, h)),
            (p + "self_attn.v_proj.weight", (s["kv"] * hd, h)),
            (p + "self_attn.o_proj.weight", (h, s["heads"] * hd)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not s["tied"]:
        out.append(("lm_head.weight", (s["vocab"], h)))
    return out


def bf16(x):
    """float32 array to bf16 bits (round to nearest even), as uint16."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_one(job):
    """Draw one tensor and write it at its offset of its shard."""
    path, offset, name, shape, seed = job
    if len(shape) == 1:
        v = np.ones(shape, dtype=np.float32)
    else:
        v = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        v *= 0.02
    data = bf16(v).tobytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return name


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="a tokenizer.json to copy")
    ap.add_argument("--layers", type=int, help="fewer blocks than the shape has (timing by depth)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    s = dict(SHAPES[a.shape])
    if a.layers:
        s["layers"] = a.layers
    os.makedirs(a.out, exist_ok=True)
    # Shards: consecutive tensors up to SHARD_BYTES each.
    shards, cur, size = [], [], 0
    for name, shape in tensors(s):
        n = 2 * int(np.prod(shape))
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, n))
        size += n
    shards.append(cur)
    jobs, weight_map = [], {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, n in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        path = os.path.join(a.out, fname)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            f.truncate(8 + len(hb) + off)
        base = 8 + len(hb)
        for name, shape, n in shard:
            start = header[name]["data_offsets"][0]
            jobs.append((path, base + start, name, shape, a.seed * 1_000_003 + len(jobs)))
            weight_map[name] = fname
    with multiprocessing.Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
        for _ in pool.imap_unordered(write_one, jobs):
            pass
    total = sum(n for shard in shards for _, _, n in shard)
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv"],
        "head_dim": s["hidden"] // s["heads"],
        "vocab_size": s["vocab"],
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": s["theta"],
        "hidden_act": "silu",
        "tie_word_embeddings": s["tied"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.copy(a.tokenizer, os.path.join(a.out, "tokenizer.json"))
    print(f"{a.out}: {a.shape}, {s['layers']} blocks, {total / 1e9:.2f} GB in {len(shards)} shard(s)")


if __name__ == "__main__":
    main()
