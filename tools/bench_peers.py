#!/usr/bin/env python3
"""Decode speed of dpllm against llama.cpp on the same model, back to back.

Runs `llama-bench` (tg128 from an empty context) on GGUF files and `dpllm bench
decode` on a dpllm any-precision model quantized from the same checkpoint,
alternating the engines for several rounds so that both see the same machine
state, and prints a table (tokens/s, median of the rounds) and writes JSON.

    tools/bench_peers.py --dpllm target/release/dpllm --model work/smol-ap \
        --gguf models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf:4 \
        --gguf work/smollm2-q8_0.gguf:8 --threads 2 --rounds 3 --json peers.json

`--gguf FILE:BITS` pairs each GGUF with the dpllm precision it is compared to
(Q4_1 with 4 bits, Q8_0 with 8). llama-bench is taken from --llama-bench, the
LLAMA_BENCH variable or PATH; without it only dpllm runs, and the table says so.
llama.cpp's worker threads spin: compare only on a quiet machine (a process
holding a core halves its speed).

To build llama-bench (and llama-quantize, which makes the Q8_0 file with
`llama-quantize --allow-requantize IN.gguf OUT.gguf Q8_0`) from the sources
vendored in the package llama-cpp-python:

    curl -L -o llama.tgz <sdist URL of llama-cpp-python from pypi.org/pypi/llama-cpp-python/json>
    tar xzf llama.tgz && cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build --target llama-bench llama-quantize -j
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile


def llama_bench(exe, gguf, threads, tokens):
    out = subprocess.run(
        [exe, "-m", gguf, "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    rows = [r for r in json.loads(out) if r.get("n_gen", 0) > 0]
    return rows[0]["avg_ts"], rows[0].get("build_commit", "?")


def dpllm_bench(exe, model, bits, threads, tokens):
    with tempfile.TemporaryDirectory() as d:
        j = os.path.join(d, "r.json")
        subprocess.run(
            [exe, "bench", "decode", model, "--bits", str(bits), "--threads", str(threads),
             "--prompt-tokens", "1", "--tokens", str(tokens), "--bandwidth-mib", "64", "--json", j],
            check=True, capture_output=True, text=True,
        )
        return json.load(open(j))["decode_tokens_per_sec"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dpllm", default="target/release/dpllm", help="dpllm binary")
    ap.add_argument("--model", required=True, help="dpllm any-precision model directory")
    ap.add_argument("--gguf", action="append", default=[], metavar="FILE:BITS", help="GGUF and the dpllm bits it is compared to")
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    pairs = []
    for g in a.gguf:
        path, _, bits = g.rpartition(":")
        if not path or not bits.isdigit():
            sys.exit(f"error: --gguf {g}: expected FILE:BITS")
        if not os.path.isfile(path):
            sys.exit(f"error: --gguf {path}: no such file")
        pairs.append((path, int(bits)))
    if not pairs:
        sys.exit("error: give at least one --gguf FILE:BITS")
    have_llama = a.llama_bench is not None and os.access(a.llama_bench, os.X_OK)
    runs = {}
    commit = None
    for r in range(a.rounds):
        for path, bits in pairs:
            if have_llama:
                ts, commit = llama_bench(a.llama_bench, path, a.threads, a.tokens)
                runs.setdefault(("llama.cpp", os.path.basename(path)), []).append(ts)
            runs.setdefault(("dpllm", f"any-precision {bits}-bit"), []).append(dpllm_bench(a.dpllm, a.model, bits, a.threads, a.tokens))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    rows = [{"engine": e, "weights": w, "tokens_per_sec_median": statistics.median(v), "tokens_per_sec": v} for (e, w), v in runs.items()]
    print(f"decode, {a.tokens} tokens from an empty context, {a.threads} threads, median of {a.rounds} alternating rounds")
    print(f"{'engine':<10} {'weights':<40} {'tok/s':>8}   runs")
    for r in rows:
        print(f"{r['engine']:<10} {r['weights']:<40} {r['tokens_per_sec_median']:>8.1f}   {', '.join(f'{v:.1f}' for v in r['tokens_per_sec'])}")
    if not have_llama:
        print("llama-bench not found (--llama-bench, LLAMA_BENCH or PATH): dpllm only")
    if a.json:
        meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": a.threads,
                "tokens": a.tokens, "rounds": a.rounds, "llama_cpp_commit": commit, "model": a.model}
        json.dump({"producer": "dpllm tools/bench_peers.py", "meta": meta, "results": rows}, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
