#!/usr/bin/env bash
# Source-level profile of tq_decode_split for one shape, on the GPU machine:
#   bash bench/ncu_source.sh BITS BATCH CONTEXT [FLUSH]      e.g. 4/4 8 16384 read
# ncu (clock control off) samples warp stalls per SASS instruction and counts shared-memory
# wavefronts (bank conflicts) of one timed launch of `tqkv bench decode` (plain cache, no preset);
# writes $OUT/src_<bits>_<batch>_<context>.csv.gz (the source page as CSV) and prints the kernel's
# duration. Summarize it with `python3 scripts/ncu-source-summary.py FILE`. Binary: $TQKV (default
# ../tqkv beside this folder, as in gpu-bundle/).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
TQKV=${TQKV:-$here/../tqkv}
OUT=${OUT:-./out-ncu}
bits=$1 batch=$2 context=$3 flush=${4:-read}
mkdir -p "$OUT"
name="src_${bits//\//}_${batch}_${context}"
rep="$OUT/$name"
ncu --clock-control none -k regex:tq_decode_split --launch-skip 12 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --metrics gpu__time_duration.sum -o "$rep" \
    "$TQKV" bench decode --flush "$flush" --bits "$bits" --presets "" --batches "$batch" \
    --contexts "$context" --reps 20 >"$rep.log" 2>&1
ncu -i "$rep.ncu-rep" --page details 2>/dev/null | grep -E "gpu__time_duration" || true
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass 2>/dev/null | gzip >"$rep.csv.gz"
rm -f "$rep.ncu-rep"
echo "wrote $rep.csv.gz"
