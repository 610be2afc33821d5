#!/usr/bin/env bash
# The quick GPU check, to run on a GPU machine after any change to the GPU path (engines/,
# pipeline/cuda.py, lanes.py, gpu_letterbox.py, workers.py, stages/): the GPU tests, then the load
# benchmark's quick run (64 NVDEC cameras, one window) under MPS. Logs and the result rows (load.md,
# load.jsonl: copy them into bench/results/) go to OUT_DIR (default: a new temporary folder); the
# commit named in the rows is BENCH_COMMIT when set.
#
#   scripts/gpu_check.sh [OUT_DIR]        # about 8 minutes on an H200
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d -t gpu-check-XXXX)}
echo "gpu_check: logs and rows in $out"
mkdir -p "$out"
python=${PYTHON:-python3}
"$python" -c "import torch; assert torch.cuda.is_available()" || { echo "gpu_check: no CUDA device for PyTorch" >&2; exit 2; }
# the assets first: without them every test fails, after minutes of GPU time
assets=${ASSETS_DIR:-../shared/assets}
for asset in models/yolox_nano.onnx models/coco_classes.txt videos/one-by-one-person-detection.mp4 videos/bottle-detection.mp4; do
  [ -f "$assets/$asset" ] || { echo "gpu_check: $assets/$asset: not found (ASSETS_DIR needs models/ and videos/ as in ../shared/assets)" >&2; exit 2; }
done
nvidia-smi -L | tee "$out/gpus.txt"
"$python" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider >"$out/gpu_tests.log" 2>&1
tests=$?
tail -3 "$out/gpu_tests.log"
mps=0
if command -v nvidia-cuda-mps-control >/dev/null && nvidia-cuda-mps-control -d 2>/dev/null; then mps=1; fi
"$python" bench/load.py --quick --out "$out" >"$out/quick.log" 2>&1
quick=$?
grep -E "^\| rect .*\| (yes|no) \||largest passing" "$out/quick.log" | head -3
[ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control
passed=$(grep -c "| yes |" "$out/load.md" 2>/dev/null || true)
echo "gpu_check: tests exit $tests, quick run exit $quick, quick pass rows ${passed:-0}"
[ "$tests" = 0 ] && [ "$quick" = 0 ] && [ "${passed:-0}" -ge 1 ]
