#!/usr/bin/env python3
"""The SASS of dpllm's CUDA kernels on a machine with no GPU and no CUDA toolkit.

Compiles CUDA C with the NVRTC that tools/fetch-nvrtc.sh caches (models/nvrtc)
straight to a cubin for one architecture, then prints each kernel's registers
and instruction count, the opcode mix of its loops that hold tensor-core
instructions (HMMA), or a kernel's whole SASS. The disassembler, nvdisasm,
comes from the Python package index (nvidia-cuda-nvdisasm, checked by sha256)
into the git-ignored models/nvdisasm on first use.

  tools/kernel_sass.py                         # every bit-plane kernel: registers, instructions
  tools/kernel_sass.py --loops 'gemv_b3_t4s$'  # the opcode mix of its HMMA loops
  tools/kernel_sass.py --dump bitplane_gemv_b3_t4s
  tools/kernel_sass.py --out old.cubin ...     # keep the cubin (to compare builds)

Sources default to the bit-plane module as the engine builds it (common.cuh,
bitplane_gemv.cu, bitplane_levels.cu, in that order); give other files to
read another module. Static counts only: what the loop costs per trip, not
how often it stalls (for that, Nsight Compute on the device).
"""
import argparse
import collections
import ctypes
import functools
import hashlib
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "crates/dpllm-engine/src/backend/cuda/kernels")
DEFAULT_SOURCES = [os.path.join(KERNELS, f) for f in ("common.cuh", "bitplane_gemv.cu", "bitplane_levels.cu")]
NVDISASM_VERSION = "13.5.37"
NVDISASM_SHA = "d3fdbdd49fa53e2e4aacd3db8259d052bd2b049ececdcb69e92e083c6728e7ca"
NVDISASM_DIR = os.path.join(ROOT, "models", "nvdisasm")
# Opcodes issued to the integer/logic (ALU) pipe, half the FMA pipe's rate on sm_80+.
ALU_OPS = {"PRMT", "LOP3", "SHF", "IADD3", "LEA", "ISETP", "SEL", "VIADDMNMX", "MOV", "IABS", "VIADD", "PLOP3"}


def die(msg):
    sys.exit(f"error: {msg}")


def nvdisasm():
    exe = os.path.join(NVDISASM_DIR, "nvdisasm")
    if os.path.exists(exe):
        return exe
    with tempfile.TemporaryDirectory() as tmp:
        pkg = f"nvidia-cuda-nvdisasm=={NVDISASM_VERSION}"
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", pkg, "-d", tmp])
        if r.returncode:
            die(f"cannot download {pkg} from the Python package index (no network, or no pip?)")
        whl = os.path.join(tmp, os.listdir(tmp)[0])
        if hashlib.sha256(open(whl, "rb").read()).hexdigest() != NVDISASM_SHA:
            die(f"{os.path.basename(whl)} does not have the expected sha256 {NVDISASM_SHA}")
        with zipfile.ZipFile(whl) as z:
            name = next(n for n in z.namelist() if n.endswith("/bin/nvdisasm"))
            os.makedirs(NVDISASM_DIR, exist_ok=True)
            part = exe + ".part"
            with open(part, "wb") as f:
                f.write(z.read(name))
            os.chmod(part, 0o755)
            os.replace(part, exe)
    return exe


def compile_cubin(sources, arch):
    lib_dir = os.path.join(ROOT, "models", "nvrtc")
    if not os.path.exists(os.path.join(lib_dir, "libnvrtc.so")):
        die("no NVRTC in models/nvrtc: run tools/fetch-nvrtc.sh")
    # NVRTC loads its builtins library by name, from the loader's path.
    os.environ["LD_LIBRARY_PATH"] = lib_dir + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    ctypes.CDLL(os.path.join(lib_dir, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(os.path.join(lib_dir, "libnvrtc.so"))
    src = b"".join(open(f, "rb").read() for f in sources)
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None):
        die("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-lineinfo"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        die("NVRTC:\n" + log.value.decode(errors="replace"))
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
    cubin = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw


def kernel_facts(data):
    """{kernel: (instructions, registers)} from the cubin's ELF sections."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def cstr(off):
        return data[off:data.index(b"\0", off)].decode()

    names = [cstr(secs[shstrndx][4] + s[0]) for s in secs]
    symbols = {}
    for s in secs:
        if s[1] == 2:  # SHT_SYMTAB
            strtab = secs[s[6]][4]
            for i in range(s[5] // 24):
                symbols[i] = cstr(strtab + struct.unpack_from("<I", data, s[4] + i * 24)[0])
    regs = {}
    for s, name in zip(secs, names):
        if name != ".nv.info":
            continue
        off, end = s[4], s[4] + s[5]
        while off < end:
            fmt, attr = data[off], data[off + 1]
            size = struct.unpack_from("<H", data, off + 2)[0] if fmt == 4 else 0
            if fmt == 4 and attr == 0x2F:  # EIATTR_REGCOUNT: (symbol, count)
                sym, count = struct.unpack_from("<II", data, off + 4)
                regs[symbols.get(sym)] = count
            off += 4 + size
    return {
        name[6:]: (s[5] // 16, regs.get(name[6:]))
        for s, name in zip(secs, names)
        if name.startswith(".text.")
    }


@functools.lru_cache(maxsize=None)
def disassembly(cubin_path):
    """The whole cubin's SASS (disassembled once, however many kernels are read)."""
    return subprocess.run([nvdisasm(), "-c", cubin_path], capture_output=True, text=True, check=True).stdout


def sass(cubin_path, kernel):
    """[(label or None, instruction text)] of one kernel."""
    body = disassembly(cubin_path).split(f".text.{kernel}:\n", 1)
    if len(body) < 2:
        die(f"no kernel {kernel} in the cubin")
    lines, label = [], None
    for line in body[1].splitlines():
        if line.startswith("//---") or line.startswith("\t.section"):
            break
        m = re.match(r"(\.L_x_\d+):", line.strip())
        if m:
            label = m.group(1)
            continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if m:
            lines.append((label, m.group(1)))
            label = None
    return lines


def opcode(text):
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def hmma_loops(lines):
    """(start, end) of every loop (a backward branch) whose body holds an HMMA."""
    at = {label: i for i, (label, _) in enumerate(lines) if label}
    loops = []
    for i, (_, text) in enumerate(lines):
        m = re.search(r"BRA (?:`\()?(\.L_x_\d+)", text)
        if m and at.get(m.group(1), i + 1) <= i:
            j = at[m.group(1)]
            if any(opcode(t) == "HMMA" for _, t in lines[j:i + 1]):
                loops.append((j, i))
    return loops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*", help="CUDA C files, concatenated in order (default: the bit-plane module)")
    ap.add_argument("--arch", default="sm_90", help="target, e.g. sm_87, sm_89, sm_90 (default sm_90)")
    ap.add_argument("--kernels", default="", help="regex: only kernels whose names match")
    ap.add_argument("--loops", metavar="REGEX", help="opcode mix of the HMMA loops of the matching kernels")
    ap.add_argument("--dump", metavar="KERNEL", help="print one kernel's SASS")
    ap.add_argument("--out", help="write the cubin here (default: a temporary file)")
    a = ap.parse_args()
    sources = a.sources or DEFAULT_SOURCES
    for f in sources:
        if not os.path.exists(f):
            die(f"no source file {f}")
    cubin = compile_cubin(sources, a.arch)
    path = a.out or os.path.join(tempfile.mkdtemp(), "kernels.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    if a.dump:
        for label, text in sass(path, a.dump):
            print(f"{label}:" if label else "", f"\t{text}", sep="")
        return
    facts = kernel_facts(cubin)
    pattern = re.compile(a.loops or a.kernels)
    print(f"{'kernel':40s} {'registers':>9s} {'instructions':>12s}")
    for name in sorted(facts):
        if not pattern.search(name):
            continue
        n, regs = facts[name]
        print(f"{name:40s} {regs if regs is not None else '?':>9} {n:12d}")
        if a.loops:
            lines = sass(path, name)
            spills = sum(opcode(t) in ("LDL", "STL") for _, t in lines)
            if spills:
                print(f"    {spills} local-memory loads and stores (register spills)")
            for start, end in hmma_loops(lines):
                ops = collections.Counter(opcode(t) for _, t in lines[start:end + 1])
                alu = sum(v for k, v in ops.items() if k in ALU_OPS)
                mix = ", ".join(f"{k} {v}" for k, v in ops.most_common(10))
                local = ops["LDL"] + ops["STL"]
                spilled = f", {local} of them spills (LDL/STL)" if local else ""
                print(f"    loop of {end - start + 1} instructions{spilled}, {alu} on the ALU pipe: {mix}")


if __name__ == "__main__":
    main()
