#!/usr/bin/env bash
# Builds the release GPU test binaries (tests/gpu_*.rs) and the tqkv CLI, and gathers them with a
# run.sh into gpu-bundle/ (git-ignored) of this checkout. On the GPU machine, which has no Rust:
#   bash gpu-bundle/run.sh            # every GPU test with TQ_REQUIRE_GPU=1, then the benchmarks
#   TQ_STEPS="tests decode" bash gpu-bundle/run.sh   # a subset (tests, codec, decode)
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bundle
rm -rf "$out"
mkdir -p "$out/tests" "$out/bench"
cp bench/decode_vs_torch.py bench/decode_vs_torch.sh bench/decode_sweep.sh bench/ncu_source.sh bench/decode_timeline.py bench/decode_sol.py "$out/bench/"

cargo build --release --bin tqkv
cp target/release/tqkv "$out/"
cargo test --release --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"].startswith("gpu_") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do cp "$exe" "$out/tests/$name"; done
ls "$out/tests/"* >/dev/null
strip "$out/tqkv" "$out/tests/"* 2>/dev/null || true

cat >"$out/env.sh" <<'ENV'
# Sourced by run.sh: cudarc opens libcuda and libnvrtc by name, so add the toolkit's library
# folders to the loader's path when libnvrtc is not already on it.
if ! ldconfig -p | grep -q 'libnvrtc\.so'; then
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
    done
fi
ENV

cat >"$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs every GPU test (TQ_REQUIRE_GPU=1: a missing GPU fails), the codec benchmark, and the decode
# attention comparison (PyTorch SDPA baseline, `tqkv bench decode`, speed-up table; logs under
# $OUT). TQ_STEPS picks steps (default "tests codec decode"). Extra arguments go to
# `tqkv bench codec`.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/env.sh"
export TQ_REQUIRE_GPU=1
status=0
for step in ${TQ_STEPS:-tests codec decode}; do
    case $step in
    tests)
        for t in "$here"/tests/*; do
            echo "== $(basename "$t")"
            "$t" --test-threads=4 --show-output || status=1
        done ;;
    codec)
        echo "== tqkv bench codec"
        "$here/tqkv" bench codec "$@" || status=1 ;;
    decode)
        echo "== decode attention: PyTorch SDPA vs tqkv bench decode"
        TQKV="$here/tqkv" bash "$here/bench/decode_vs_torch.sh" rust || status=1 ;;
    esac
done
exit $status
RUN
chmod +x "$out/run.sh"
du -sh "$out"
