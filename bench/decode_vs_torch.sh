#!/usr/bin/env bash
# Decode attention on the GPU machine: PyTorch SDPA (bf16) against tqkv on the same shapes.
#   bash bench/decode_vs_torch.sh [check] [ncu] [bench] [rust]
# check/ncu/bench: the Python prototype harness (kernel launched from Python, needs cupy).
# rust: the PyTorch SDPA baseline (decode_vs_torch.py --sdpa-only), then `tqkv bench decode`
#   (the Rust launch; binary $TQKV, default ../tqkv beside this folder as in gpu-bundle/), then
#   the speed-up table of the two. Same shapes: 32 query heads, 8 kv heads, head_dim 128,
#   batch $BATCHES, context $CONTEXTS, bits 8/8, 4/4, 4/2, L2 flush $FLUSH (write or read).
# Writes logs under $OUT (or ./out-decode).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
OUT=${OUT:-./out-decode}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
VARIANTS=${VARIANTS:-4x2x3,4x3x3,4x4x2}
TQKV=${TQKV:-$here/../tqkv}
BATCHES=${BATCHES:-1,8,32}
CONTEXTS=${CONTEXTS:-4096,16384,65536}
REPS=${REPS:-30}
FLUSH=${FLUSH:-write} # L2 flush before each timed call: write (256 MB memset) or read
status=0
for step in "$@"; do
  case $step in
    check) python3 decode_vs_torch.py --check --out "$OUT" 2>&1 | grep -v " ok  \[" ;;
    ncu)
      for cfg in ${NCU_CFGS:-4/4:4x4x1 8/8:4x4x1}; do
        ncu --clock-control none -k regex:tq_decode_split --launch-skip 3 --launch-count 1 \
          --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
          --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
          python3 decode_vs_torch.py --profile "$cfg" --batches 32 --contexts 16384 --out "$OUT" \
          > "$OUT/ncu_${cfg//[\/:]/_}.txt" 2>&1
        grep -E "Duration|Throughput|Issue|Issued|Eligible|Active Warps|Theoretical Occ|Achieved Occ|Stall|Registers|Bank|No Eligible|One or More" "$OUT/ncu_${cfg//[\/:]/_}.txt" | head -40
      done ;;
    bench) python3 decode_vs_torch.py --bench --variants "$VARIANTS" --out "$OUT" 2>&1 ;;
    rust)
      echo "== PyTorch SDPA baseline"
      python3 decode_vs_torch.py --bench --sdpa-only --flush "$FLUSH" --json "$OUT/sdpa.json" --reps "$REPS" \
        --batches "$BATCHES" --contexts "$CONTEXTS" --out "$OUT" 2>&1 | grep -v "^|" || status=1
      echo "== tqkv bench decode"
      "$TQKV" bench decode --flush "$FLUSH" --json "$OUT/tqkv.json" --reps "$REPS" --batches "$BATCHES" \
        --contexts "$CONTEXTS" --bits 8/8,4/4,4/2 2>&1 || status=1
      echo "== speed-up of tqkv (Rust launch) over the best bf16 SDPA backend"
      python3 decode_vs_torch.py --table "$OUT/sdpa.json" "$OUT/tqkv.json" || status=1 ;;
  esac
done
exit $status
