#!/usr/bin/env python3
"""Summary of an ncu source page (`ncu -i REP --page source --csv --print-source sass`, plain or
gzipped CSV): where the warp stall samples fall (SASS in blocks of N instructions, the hot loop
marked L: the instructions executed the most), their top stall reasons and memory instructions,
and every instruction with excess shared-memory wavefronts (bank conflicts).

    python3 scripts/ncu-source-summary.py out/s16384.csv.gz [--block 60]

bench/ncu_source.sh writes such files on the GPU machine; bench/NOTES-decode.md (v6) shows what
they found (the prologue's codebook loads, 16-way conflicts on the query rows, the 4-bit V
stage's writes).
"""
import argparse
import collections
import csv
import gzip

MEM = ("LDG", "LDS", "STS", "STG", "LDGSTS", "LDGDEPBAR", "DEPBAR", "BAR", "SHFL", "ATOMG", "RED",
       "MEMBAR", "LDL", "STL", "CALL", "HMMA", "MUFU")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--block", type=int, default=60, help="SASS instructions per row")
    a = ap.parse_args()
    opener = gzip.open if a.csv.endswith(".gz") else open
    with opener(a.csv, "rt") as f:
        rows = list(csv.reader(f))
    hdr, data = rows[1], rows[2:]
    col = hdr.index
    i_src, i_smp, i_exe = col("Source"), col("Warp Stall Sampling (All Samples)"), col("Instructions Executed")
    i_xwf = col("L1 Wavefronts Shared Excessive")
    stalls = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    num = lambda r, i: int(r[i] or 0)
    total = sum(num(r, i_smp) for r in data) or 1
    top = max(num(r, i_exe) for r in data)
    hot = [k for k, r in enumerate(data) if num(r, i_exe) >= 0.9 * top]
    lo, hi = (min(hot), max(hot)) if hot else (0, -1)
    print(f"{len(data)} SASS instructions, {total} stall samples; hot loop {lo}-{hi}")
    for a0 in range(0, len(data), a.block):
        blk = range(a0, min(a0 + a.block, len(data)))
        smp = sum(num(data[k], i_smp) for k in blk)
        if smp < max(8, 0.004 * total):
            continue
        reasons = collections.Counter()
        ops = collections.Counter()
        for k in blk:
            for i in stalls:
                reasons[hdr[i][6:]] += num(data[k], i)
            if num(data[k], i_exe):
                t = data[k][i_src].split()
                op = (t[1] if t[0].startswith("@") else t[0]).split(".")[0]
                if op in MEM:
                    ops[op] += 1
        tag = "L" if lo <= a0 <= hi else " "
        xwf = sum(num(data[k], i_xwf) for k in blk)
        print(f"{tag}{a0:6d} {smp:6d} ({100 * smp / total:4.1f}%) excess-wf {xwf:8d} "
              f"{', '.join(f'{n} {c}' for n, c in reasons.most_common(3))} | "
              f"{' '.join(f'{o}x{c}' for o, c in sorted(ops.items()))}")
    print("instructions with excess shared wavefronts (index, executed, excess, wavefronts, ideal, SASS):")
    for k, r in enumerate(data):
        if num(r, i_xwf):
            print(f"  {k:6d} {num(r, i_exe):8d} {num(r, i_xwf):8d} {r[col('L1 Wavefronts Shared')]:>8} "
                  f"{r[col('L1 Wavefronts Shared Ideal')]:>8}  {r[i_src].strip()[:70]}")


if __name__ == "__main__":
    main()
