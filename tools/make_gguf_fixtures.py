#!/usr/bin/env python3
"""GGUF fixtures for dpllm's GGUF reader, made with an independent implementation:
the `gguf` Python package (llama.cpp's gguf-py: `pip install gguf numpy`).

Writes tests/fixtures/gguf/blocks.gguf holding, for every ggml type dpllm reads,
a tensor `q.<TYPE>` of 2 x 256 values and a tensor `want.<TYPE>` (F32) with
gguf-py's dequantization of it. Q4_0..Q8_0 blocks come from gguf-py's quantizer
on random normal data; K-quant blocks are random bytes with random positive f16
scales (decoding is a pure function of the bytes). With --smollm2 GGUF, the first
rows of two real tensors (Q4_1 and Q8_0) are added as `real.<name>` / `want.real.<name>`.
The file also carries metadata of every value type and a 64-byte alignment.

Usage: python3 tools/make_gguf_fixtures.py [--smollm2 PATH.gguf]
"""
import argparse
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf", "blocks.gguf")
ROWS, COLS = 2, 256
# Byte offsets of the f16 scales in each K-quant block (ggml-common.h).
K_SCALES = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf, for real blocks")
    a = ap.parse_args()
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(OUT, "llama")
    w.add_custom_alignment(64)
    w.add_uint8("test.u8", 200)
    w.add_int8("test.i8", -5)
    w.add_uint16("test.u16", 60000)
    w.add_int16("test.i16", -300)
    w.add_uint32("test.u32", 4_000_000_000)
    w.add_int32("test.i32", -7)
    w.add_uint64("test.u64", 2**40 + 3)
    w.add_int64("test.i64", -(2**40))
    w.add_float32("test.f32", 0.5)
    w.add_float64("test.f64", 1e-300)
    w.add_bool("test.bool", True)
    w.add_string("test.string", "héllo")
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_array("test.ints", [1, 2, 3])

    data = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    for ty in [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]:
        raw = quantize(data, ty)
        add(w, ty.name, raw, ty)
    for ty, offsets in K_SCALES.items():
        block, size = gguf.GGML_QUANT_SIZES[ty]
        raw = rng.integers(0, 256, size=(ROWS, COLS // block * size), dtype=np.uint8)
        for r in range(ROWS):
            for b in range(COLS // block):
                for o in offsets:
                    scale = np.array([rng.uniform(0.001, 0.1)], dtype=np.float16).view(np.uint8)
                    raw[r, b * size + o: b * size + o + 2] = scale
        add(w, ty.name, raw, ty)
    if a.smollm2:
        reader = gguf.GGUFReader(a.smollm2)
        for t in reader.tensors:
            if t.name in ("blk.0.attn_q.weight", "token_embd.weight"):
                raw = np.asarray(t.data)[:ROWS].copy()
                add(w, "real." + t.name, raw, T(t.tensor_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print("wrote", os.path.normpath(OUT), os.path.getsize(OUT), "bytes")


def add(w, name, raw, ty):
    """Add tensor `q.NAME` (raw blocks of type ty) and `want.NAME` (gguf-py's dequantization)."""
    want = dequantize(raw, ty).astype(np.float32)
    if ty in (T.F32, T.F16):
        w.add_tensor("q." + name, raw, raw_dtype=ty)
    else:
        w.add_tensor("q." + name, raw, raw_shape=raw.shape, raw_dtype=ty)
    w.add_tensor("want." + name, want)


if __name__ == "__main__":
    main()
