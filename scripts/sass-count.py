#!/usr/bin/env python3
"""Static SASS count of a kernel's hot loop, offline (no GPU).

    python3 scripts/sass-count.py quantize "HEAD_DIM=128 LANE_ELEMS=16 BITS=4 IN_DTYPE=1 VPW=2"
    python3 scripts/sass-count.py decode_attention "K_BITS=4 V_BITS=4 GQA=4 WARPS=8 LUT256=1 TRANS=1"
    python3 scripts/sass-count.py --dump loop.sass decode_attention "..."   # also the loop's SASS

Compiles kernels/common.cu + kernels/<family>.cu with pip's NVRTC (the registry's options:
compute_90a, no FMA contraction, IEEE division and square root, no flush-to-zero), assembles the
PTX with ptxas for sm_90a and disassembles it with nvdisasm (pip packages nvidia-cuda-nvrtc,
nvidia-cuda-nvcc, nvidia-cuda-nvdisasm). Prints the entry's registers and spills, and the
instructions of its grid-stride loop: the widest backward branch before the first unpredicated
EXIT, without the blocks of the divergent-shuffle fallback (WARPSYNC.COLLECTIVE), which
converged warps never run (decode_attention: tq_decode_split's token-tile loop, the smallest
loop holding every HMMA). With -v, the opcode histogram too; with --dump FILE, the loop's SASS
into FILE. The static count includes branches the common tile skips (the ring path, the softcap,
the rescale): ncu's source counters give the executed count (NOTES-decode v11: 322 of 645 at 4/2).
"""
import collections
import ctypes
import os
import re
import subprocess
import sys
import tempfile

import nvidia

# NVRTC and ptxas from pip's nvidia/cu13 (TQ_NVRTC_DIR: another such folder, e.g. the 13.0 wheels
# the device's driver matches; its lib/ must also be on LD_LIBRARY_PATH).
CU = os.environ.get("TQ_NVRTC_DIR") or os.path.join(list(nvidia.__path__)[0], "cu13")
NVDISASM = os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "nvdisasm")
ENTRY = {"quantize": "tq_quantize", "dequantize": "tq_dequantize", "decode_attention": "tq_decode_split"}
# decode_attention.cu stands alone; the codec kernels follow kernels/common.cu.
FILES = {"decode_attention": ("decode_attention.cu",)}


def compile_cubin(root, family, defines, work):
    nvrtc = ctypes.CDLL(os.path.join(CU, "lib", "libnvrtc.so.13"))
    src = "".join("#define %s %s\n" % tuple(d.split("=")) for d in defines)
    for f in FILES.get(family, ("common.cu", family + ".cu")):
        src += open(os.path.join(root, "kernels", f)).read()
    opts = [b"--std=c++17", b"--gpu-architecture=compute_90a", b"--ftz=false", b"--prec-sqrt=true",
            b"--prec-div=true", b"--fmad=false"]
    prog = ctypes.c_void_p()
    nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"k.cu", 0, None, None)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    if rc != 0:
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        log = ctypes.create_string_buffer(n.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        sys.exit(log.value.decode())
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    with open(os.path.join(work, "k.ptx"), "wb") as f:
        f.write(ptx.value)
    cubin = os.path.join(work, "k.cubin")
    res = subprocess.run([os.path.join(CU, "bin", "ptxas"), "-arch=sm_90a", "-v", f.name, "-o", cubin],
                         capture_output=True, text=True, check=True)
    return cubin, res.stderr


def main():
    verbose = "-v" in sys.argv
    args = [a for a in sys.argv[1:] if a != "-v"]
    dump = None
    if "--dump" in args:
        k = args.index("--dump")
        dump = args[k + 1]
        del args[k:k + 2]
    family, defines = args[0], args[1].split()
    entry = ENTRY[family]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as work:
        cubin, info = compile_cubin(root, family, defines, work)
        sass = subprocess.run([NVDISASM, "-c", cubin], capture_output=True,
                              text=True, check=True).stdout
    sass = sass.split(".text.%s:" % entry)[1].split("//----")[0]
    resources = re.search(r"Function properties for %s\n(.*?)\n.*?(Used .*?)\n" % entry, info, re.S)

    is_ins = re.compile(r"\s+/\*([0-9a-f]{4,})\*/").match
    lines = sass.splitlines()
    labels, blocks, cur = {}, [], []
    for i, line in enumerate(lines):
        m = re.match(r"(\.L_x_\d+):", line.strip())
        if m:
            blocks.append(cur)
            cur = []
            nxt = next((l for l in lines[i + 1:] if is_ins(l)), None)
            if nxt:
                labels[m.group(1)] = int(is_ins(nxt).group(1), 16)
        elif is_ins(line):
            cur.append(line)
    blocks.append(cur)
    addr = lambda l: int(is_ins(l).group(1), 16)
    ins = [l for b in blocks for l in b]
    exit_at = min(addr(l) for l in ins if re.search(r"\*/\s+EXIT", l))
    loops = []
    for l in ins:
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", l)
        if m and addr(l) < exit_at and labels.get(m.group(1), 1 << 40) < addr(l):
            loops.append((labels[m.group(1)], addr(l)))
    if family == "decode_attention":
        # the token-tile loop: the smallest loop holding every tensor-core product (it follows
        # the EXIT of empty splits)
        loops = [(labels[m.group(1)], addr(l)) for l in ins
                 for m in [re.search(r"BRA\s+`?\(?(\.L_x_\d+)", l)]
                 if m and labels.get(m.group(1), 1 << 40) < addr(l)]
        hmma = [addr(l) for l in ins if "HMMA" in l]
        loops = [s for s in loops if s[0] <= min(hmma) and max(hmma) <= s[1]]
        lo, hi = min(loops, key=lambda s: s[1] - s[0])
    else:
        lo, hi = max(loops, key=lambda s: s[1] - s[0])
    ops = collections.Counter()
    for b in blocks:
        b = [l for l in b if lo <= addr(l) <= hi]
        if any("WARPSYNC.COLLECTIVE" in l or "ENDCOLLECTIVE" in l for l in b):
            continue
        for l in b:
            op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", l).group(1)
            ops[op] += 1
    print("%s %s: %s; %s; hot loop %d instructions" % (
        entry, " ".join(defines), resources.group(2).strip() if resources else "?",
        resources.group(1).strip() if resources else "?", sum(ops.values())))
    if verbose:
        print(" ".join("%s %d" % kv for kv in ops.most_common()))
    if dump:
        with open(dump, "w") as f:
            f.write("\n".join(l for b in blocks for l in b if lo <= addr(l) <= hi) + "\n")


if __name__ == "__main__":
    main()
