#!/usr/bin/env python3
"""Where the time of one decode call goes: the kernel built with TIMELINE=1 stamps %globaltimer
(and %clock64) at fixed points of every packed block (kernels/decode_attention.cu, "timeline");
this prints, per shape, the median over calls of each mark's time after the first block's entry
(min / median / max over the blocks), beside the call's CUDA-event time. The default variant is
the library's (8 warps, 2 stages, 2 blocks per SM, LUT256, TRANS, MERGE_LAST, VROWS). Diagnostics
only: the marks cost the token loop a few instructions.

  python3 bench/decode_timeline.py --bits 4/4,4/2 --shapes 8x16384,8x16 --flush write
"""
import argparse
import math
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import decode_vs_torch as dv  # noqa: E402

MARKS = ["entry", "len", "prologue", "tile0", "warp0 end", "loop end", "partial", "counted", "merged", "sm", "tables",
         "staged", "states in", "combine", "merge max", "merge rows"]
ORDER = [0, 1, 10, 11, 2, 3, 4, 5, 12, 13, 6, 7, 14, 15, 8]
NM = len(MARKS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="4/4")
    ap.add_argument("--shapes", default="8x16384", help="batch x context, comma-separated")
    ap.add_argument("--flush", choices=("write", "read"), default="write")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--variant", default="8x2x2", help="warps x stages x min_blocks")
    ap.add_argument("--defs", default="LUT256=1,TRANS=1,MERGE_LAST=1,VROWS=1,TIMELINE=1")
    ap.add_argument("--splits", type=int, default=0, help="0: the library's choice")
    ap.add_argument("--l2-first", type=int, default=-1, help="-1: the library's rule (<= 4 L2 sizes)")
    ap.add_argument("--kernel", default=os.path.join(HERE, "..", "kernels", "decode_attention.cu"))
    ap.add_argument("--blocks", action="store_true", help="also print every block of the last call")
    ap.add_argument("--warm-code", action="store_true",
                    help="after each flush, an untimed call on a separate 16-token batch (brings the kernel's code, "
                         "not the timed call's data, back into the L2)")
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--tq4", default="",
                    help="also time each shape with exact segments, comma-separated: tq4 (1 sink, 32-slot window, "
                         "centered keys, spread), exact (the slots, no centering), center (centering only), smem (plain, "
                         "launched with the spread shared memory)")
    args = ap.parse_args()
    dv.FLUSH_MODE = args.flush
    src = open(args.kernel).read()
    w, st, mb = map(int, args.variant.split("x"))
    defs = {k: int(v) for k, v in (x.split("=") for x in args.defs.split(",") if x)}
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(7)
    Hq, Hkv, d = 32, 8, 128
    print(f"device: {torch.cuda.get_device_name(0)}; flush {args.flush}; variant {args.variant} {args.defs}")
    for kv in args.bits.split(","):
        kb, vb = map(int, kv.split("/"))
        k = dv.TqDecode(src, kb, vb, d, Hq // Hkv, torch.bfloat16, warps=w, stages=st, min_blocks=mb, extra=defs)
        cp = k.cp
        tl = k.mod.get_global("tq_timeline") if defs.get("TIMELINE") else None
        tlc = k.mod.get_global("tq_timeline_clk") if defs.get("TIMELINE") else None
        print(f"k{kb}v{vb}: {k.ptxas} occ={k.occ} smem={k.smem}")
        for shape in args.shapes.split(","):
            B, L = map(int, shape.split("x"))
            cache = dv.make_cache(B, Hkv, L, d, kb, vb, gen)
            q = torch.randn((B, Hq, d), device="cuda", dtype=torch.bfloat16, generator=gen)
            lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
            out = torch.empty_like(q)
            nbytes = B * Hkv * L * (dv.row_bytes(kb, d) + dv.row_bytes(vb, d) + 8)
            l2_first = nbytes <= 4 * 50e6 if args.l2_first < 0 else bool(args.l2_first)
            for tq in [""] + [x for x in args.tq4.split(",") if x]:
                seg = tq in ("tq4", "exact")
                run, splits = k.plan(q, cache, lens, out, scale=1.0 / math.sqrt(d), splits=args.splits or None,
                                     l2_evict_first=l2_first, sinks=1 if seg else 0, window_len=32 if seg else 0,
                                     centered=tq in ("tq4", "center"), spread_smem=tq == "smem")
                nblk = splits * Hkv * B
                warm = None
                if args.warm_code:
                    wc = dv.make_cache(8, Hkv, 16, d, kb, vb, gen)
                    wq = torch.randn((8, Hq, d), device="cuda", dtype=torch.bfloat16, generator=gen)
                    wl = torch.full((8,), 16, dtype=torch.int32, device="cuda")
                    wo = torch.empty_like(wq)
                    warm, _ = k.plan(wq, wc, wl, wo, scale=1.0 / math.sqrt(d), l2_evict_first=l2_first)
                rows, clk_rows = [], []

                def read_marks():
                    if tl is not None:
                        rows.append(cp.ndarray((nblk, NM), cp.uint64, tl).get().astype("int64"))
                        clk_rows.append(cp.ndarray((nblk, NM), cp.uint64, tlc).get().astype("int64"))

                ev = dv.timed_calls(run, args.reps, None if args.no_flush else flush, before=warm, after=read_marks)
                print(f"  B{B} L{L} {tq or 'plain'}: splits={splits} blocks={nblk} l2_first={int(l2_first)} event {statistics.median(ev):.1f} us "
                      f"(min {min(ev):.1f}); streamed {nbytes / 1e6:.1f} MB")
                if tl is None:
                    continue
                report(rows, clk_rows, nblk, args.blocks)
            del cache


def report(rows, clk_rows, nblk, blocks):
    """Per mark: median over calls of (min, median, max over blocks) of the mark's ns after the
    call's first entry; marks no block stamped in a call are left out."""
    import numpy as np
    stats = {m: [] for m in ORDER}
    span = []
    ticks = set()
    for r in rows:
        t0 = r[:, 0].min()
        rel = (r - t0) / 1e3
        ticks.update(np.diff(np.unique(r[:, 0])).tolist()[:50])
        end = []
        for m in ORDER:
            v = rel[:, m]
            ok = (r[:, m] >= t0) & (rel[:, m] < 1e5)
            if m == 3 and not ok.any():
                continue
            if ok.any():
                stats[m].append((v[ok].min(), np.median(v[ok]), v[ok].max(), ok.sum()))
                end.append(v[ok].max())
        span.append(max(end))
    print(f"    globaltimer steps seen (ns): {sorted(ticks)[:6]}")
    print(f"    stamped span (first entry -> last stamp): median {statistics.median(span):.1f} us")
    print("    mark        min     med     max   (us after the first entry; blocks)")
    for m in ORDER:
        if not stats[m]:
            continue
        a = np.array(stats[m])
        print(f"    {MARKS[m]:<10} {np.median(a[:, 0]):6.2f}  {np.median(a[:, 1]):6.2f}  {np.median(a[:, 2]):6.2f}   ({int(np.median(a[:, 3]))})")
    # Per-block phase durations (SM clock, cycles -> us at the boost clock read by torch is not
    # exposed; report cycles / 1.755 GHz as an estimate).
    r, c = rows[-1], clk_rows[-1]
    ghz = 1.755
    dur = lambda a, b_: (c[:, b_] - c[:, a]) / ghz / 1e3
    print(f"    per block (last call, SM clock at {ghz} GHz): prologue {np.median(dur(0, 2)):.2f} us, "
          f"loop {np.median(dur(2, 5)):.2f} (min {dur(2, 5).min():.2f}, max {dur(2, 5).max():.2f}), "
          f"warp0->all {np.median(dur(4, 5)):.2f}, merge+store {np.median(dur(5, 6)):.2f}, count {np.median(dur(6, 7)):.2f}")
    last = r[:, 8] >= r[:, 0].min()
    if last.any():
        print(f"    merge_pair (last blocks): {np.median(dur(7, 8)[last]):.2f} us")
    sm = r[:, 9]
    per_sm = {}
    t0 = r[:, 0].min()
    for i in range(nblk):
        per_sm.setdefault(int(sm[i]), []).append(i)
    counts = [len(v) for v in per_sm.values()]
    fin = sorted(((r[v, 5].max() - t0) / 1e3, s) for s, v in per_sm.items())
    print(f"    SMs used {len(per_sm)}, blocks per SM {min(counts)}..{max(counts)}; SM loop-end spread "
          f"{fin[0][0]:.1f} .. {fin[len(fin) // 2][0]:.1f} .. {fin[-1][0]:.1f} us")
    if blocks:
        for i in range(nblk):
            print("     blk", i, "sm", int(sm[i]), " ".join(f"{(r[i, m] - t0) / 1e3:.2f}" if r[i, m] >= t0 else "-" for m in ORDER))


if __name__ == "__main__":
    main()
