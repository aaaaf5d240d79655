#!/usr/bin/env python3
"""Speed of light of a decode call's byte count: the fastest single-kernel read (a Triton
streaming sum, one contiguous chunk per program, swept over block shapes) of exactly the bytes
`tqkv bench decode` counts for a shape, timed like bench/decode_vs_torch.py (CUDA events around one launch, the same
256 MB write or read L2 flush before each call, median of `--reps`, better of two rounds). With
the L2 evict-first hint (what the decode kernel streams under) and without.

    python3 bench/decode_sol.py --batch 8 --contexts 16384,65536 --bits 4/4,4/2,8/8

Bytes per (sequence, KV head, token): K row + V row + one f32 norm per side (head_dim 128).
Prints, per shape, flush and L2 policy, µs, GB/s and % of the device-to-device copy bandwidth measured in
the same process (read + written bytes of a 1 GiB copy, as decode_vs_torch.py does).
"""
import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_vs_torch as dv  # noqa: E402


@triton.jit
def stream_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr, EP: tl.constexpr,
               CM: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0, cache_modifier=CM, eviction_policy=EP)
    tl.store(out_ptr + pid, tl.sum(acc))


SHAPES = [(1024, 4, 4), (2048, 4, 8), (2048, 8, 8), (4096, 4, 8), (4096, 8, 16), (8192, 2, 16)]


def best_read(x, policy, flush, reps):
    """(µs, shape) of the fastest stream_sum over x (int32) among SHAPES."""
    n = x.numel()
    best = None
    for block, iters, warps in SHAPES:
        grid = triton.cdiv(n, block * iters)
        out = torch.empty(grid, dtype=torch.int32, device="cuda")
        cm = "" if policy else ".cg"

        def f():
            stream_sum[(grid,)](x, out, n, BLOCK=block, ITERS=iters, EP=policy, CM=cm, num_warps=warps)

        f()
        torch.cuda.synchronize()
        if int(out.sum()) != int(x.sum()):
            raise SystemExit("decode_sol: the read kernel's sum is wrong")
        t = min(statistics.median(dv.timed_calls(f, reps, flush)) for _ in range(2))
        if best is None or t < best[0]:
            best = (t, f"{block}x{iters}, {warps} warps")
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", default="16384,65536")
    ap.add_argument("--bits", default="4/4,4/2,8/8")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--flushes", default="write,read")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    d = args.head_dim
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    dv.FLUSH_MODE = "write"
    copy_gbs = dv.copy_bandwidth(flush)
    print(f"device: {torch.cuda.get_device_name(0)}; copy bandwidth {copy_gbs:.0f} GB/s (1 GiB device-to-device, "
          f"read + write, write flush)")
    print("| batch | context | bits | MB | flush | L2 policy | read µs | GB/s | % of copy | 80% of copy needs µs | block shape |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for ctx in (int(c) for c in args.contexts.split(",")):
        for kv in args.bits.split(","):
            kb, vb = map(int, kv.split("/"))
            nbytes = args.batch * args.kv_heads * ctx * (dv.row_bytes(kb, d) + dv.row_bytes(vb, d) + 8)
            x = torch.randint(0, 100, (nbytes // 4,), dtype=torch.int32, device="cuda")
            for fl in args.flushes.split(","):
                dv.FLUSH_MODE = fl
                for policy in ("", "evict_first"):
                    t, shape = best_read(x, policy, flush, args.reps)
                    gbs = nbytes / t / 1e3
                    print(f"| {args.batch} | {ctx} | {kv} | {nbytes / 1e6:.1f} | {fl} | {policy or 'none'} | {t:.1f} | "
                          f"{gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {nbytes / (0.8 * copy_gbs * 1e3):.1f} | {shape} |",
                          flush=True)
            del x


if __name__ == "__main__":
    main()
