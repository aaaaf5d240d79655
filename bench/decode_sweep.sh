#!/usr/bin/env bash
# Decode-kernel variant sweep on the GPU machine, from a gpu-bundle (scripts/gpu-bundle.sh):
#   bash gpu-bundle/bench/decode_sweep.sh
# 1. tests/gpu_decode (TQ_REQUIRE_GPU=1) under each TEST_VARIANTS entry, the other GPU tests once;
# 2. the PyTorch SDPA baseline (decode_vs_torch.py --sdpa-only) once per FLUSHES entry (write,
#    read: the L2 flush before each timed call, `--flush`);
# 3. `tqkv bench decode` under each RUNS entry "VARIANT:BITS[:FLUSH]" (VARIANT goes to
#    `--variant`; the tests take it from TQ_DECODE_VARIANT; `default` = the built-in rule of
#    src/cuda/decode.rs; `old` = the default of the binary $b/tqkv-old, a previous build kept for
#    before/after runs; FLUSH default write);
# 4. ncu of tq_decode_split for each NCU entry "VARIANT:BITS[:BATCH:CONTEXT]" (default batch 32,
#    context 16384), with the memory workload sections and the L2 throughput breakdown;
# 5. one table: µs, speed-up over the best SDPA backend of the same flush and % of the copy
#    bandwidth per variant.
# Logs and JSON under $OUT (all.log, ncu.log, json.tar).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
b="$here/.."
OUT=${OUT:-./out-sweep}
mkdir -p "$OUT/json"
. "$b/env.sh"
export TQ_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
BATCHES=${BATCHES:-1,8,32}
CONTEXTS=${CONTEXTS:-4096,16384,65536}
REPS=${REPS:-30}
log="$OUT/all.log"
variant_env() { [ "$1" = default ] && echo "" || echo "$1"; }
variant_arg() { [ "$1" = default ] || echo "--variant $1"; }

for v in ${TEST_VARIANTS:-default}; do
    echo "== gpu_decode, variant $v" | tee -a "$log"
    TQ_DECODE_VARIANT=$(variant_env "$v") "$b/tests/gpu_decode" --test-threads=8 --show-output \
        >"$OUT/t.log" 2>&1
    rc=$?
    cat "$OUT/t.log" >>"$log"
    echo "exit $rc: $(grep '^test result' "$OUT/t.log")" | tee -a "$log"
    grep -E "FAILED|panicked" "$OUT/t.log" | head -5
    rm -f "$OUT/t.log"
done
for t in "$b"/tests/*; do
    [ "$(basename "$t")" = gpu_decode ] && continue
    echo "== $(basename "$t")" | tee -a "$log"
    "$t" --test-threads=8 >>"$log" 2>&1
    echo "exit $?" | tee -a "$log"
done

for fl in ${FLUSHES:-write}; do
    echo "== SDPA baseline, flush $fl" | tee -a "$log"
    python3 "$here/decode_vs_torch.py" --bench --sdpa-only --flush "$fl" --json "$OUT/json/sdpa_$fl.json" \
        --reps "$REPS" --batches "$BATCHES" --contexts "$CONTEXTS" --out "$OUT" >>"$log" 2>&1 ||
        echo "baseline failed"
done

for run in ${RUNS:-default:8/8,4/4,4/2}; do
    IFS=: read -r v bits fl <<<"$run"
    fl=${fl:-write}
    bin="$b/tqkv"
    varg=$(variant_arg "$v")
    if [ "$v" = old ]; then bin="$b/tqkv-old"; varg=""; fi
    echo "== tqkv bench decode, variant $v, bits $bits, flush $fl" | tee -a "$log"
    SECONDS=0
    flarg="--flush $fl"
    [ "$v" = old ] && [ "$fl" = write ] && flarg=""
    # shellcheck disable=SC2086
    "$bin" bench decode $varg $flarg --json "$OUT/json/tq_$v-$fl.${bits//[\/,]/_}.json" \
        --reps "$REPS" --batches "$BATCHES" --contexts "$CONTEXTS" --bits "$bits" >>"$log" 2>&1 ||
        echo "bench failed" | tee -a "$log"
    echo "($SECONDS s)"
done

for run in ${NCU:-}; do
    IFS=: read -r v bits nb nc <<<"$run"
    echo "== ncu, variant $v, bits $bits, batch ${nb:-32}, context ${nc:-16384}" >>"$OUT/ncu.log"
    # shellcheck disable=SC2046
    timeout 150 ncu --clock-control none -k regex:tq_decode_split \
        --launch-skip 3 --launch-count 1 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats \
        --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
        "$b/tqkv" bench decode $(variant_arg "$v") --reps 20 --batches "${nb:-32}" \
        --contexts "${nc:-16384}" --bits "$bits" >>"$OUT/ncu.log" 2>&1
    # shellcheck disable=SC2046
    timeout 150 ncu --clock-control none -k regex:tq_decode_split --launch-skip 3 --launch-count 1 \
        --metrics breakdown:lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_op_read.sum,lts__t_requests_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_ltcfabric.sum \
        "$b/tqkv" bench decode $(variant_arg "$v") --reps 20 --batches "${nb:-32}" \
        --contexts "${nc:-16384}" --bits "$bits" >>"$OUT/ncu.log" 2>&1
done
grep -E "^== ncu|Duration|DRAM Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|Registers Per|Eligible Warps|Issued Warp|lts__|dram__" "$OUT/ncu.log" 2>/dev/null | head -80

python3 - "$OUT/json" <<'PY'
import glob, json, os, sys
d = sys.argv[1]
base = {}
for f in sorted(glob.glob(os.path.join(d, "sdpa_*.json"))):
    sd = json.load(open(f))
    fl = os.path.basename(f)[5:].split(".")[0]
    base.update({(r["batch"], r["context"], fl): r["us"] for r in sd["rows"]})
    print(f"baseline {sd['device']}, flush {fl}: copy {sd['copy_gbs']:.0f} GB/s")
cells = {}
variants = []
for f in sorted(glob.glob(os.path.join(d, "tq_*.json"))):
    tq = json.load(open(f))
    v = os.path.basename(f)[3:].split(".")[0]
    fl = v.rsplit("-", 1)[1]
    if v not in variants:
        variants.append(v)
    for r in tq["rows"]:
        us = r["us"]
        pct = 100 * r["bytes"] / (us * 1e-6) / 1e9 / tq["copy_gbs"]
        cells[(f"{r['k_bits']}/{r['v_bits']}", r["batch"], r["context"], v)] = (us, pct, r.get("variant", ""), fl)
flushes = sorted({k[2] for k in base})
print("| bits | batch | context | " + " | ".join(f"sdpa {fl} µs" for fl in flushes) + " | "
      + " | ".join(variants) + " |")
for key in sorted({k[:3] for k in cells}, key=lambda k: (k[0], k[1], k[2])):
    row = []
    for v in variants:
        c = cells.get(key + (v,))
        b = base.get(key[1:] + (c[3],)) if c else None
        row.append(f"{c[0]:.1f} {b / c[0]:.2f}x {c[1]:.0f}%" if c and b else "")
    bs = " | ".join(f"{base[key[1:] + (fl,)]:.1f}" if key[1:] + (fl,) in base else "" for fl in flushes)
    print(f"| {key[0]} | {key[1]} | {key[2]} | {bs} | " + " | ".join(row) + " |")
for v in variants:
    regs = sorted({c[2] for k, c in cells.items() if k[3] == v})
    print(f"{v}: {regs}")
PY
tar -C "$OUT" -cf "$OUT/json.tar" json && rm -rf "$OUT/json"
