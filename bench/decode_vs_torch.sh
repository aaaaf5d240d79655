#!/usr/bin/env bash
# Runs on the GPU machine from the repo root of /work/main with the device folder carried:
#   bash devrun-decode/decode_vs_torch.sh [check] [ncu] [bench]
# Writes logs under $OUT (or ./out-decode).
set -u
cd "$(dirname "$0")"
OUT=${OUT:-./out-decode}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
VARIANTS=${VARIANTS:-4x2x3,4x3x3,4x4x2}
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
  esac
done
