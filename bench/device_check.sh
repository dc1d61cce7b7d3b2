#!/usr/bin/env bash
# Everything a lent H100 checks, in one run: build (16 cores), GPU tests, compute-sanitizer on the
# kernel tests, and the benchmarks. JSON lands in $OUT (default bench/results/device).
# Usage on the device machine:  bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
export CMAKE_BUILD_PARALLEL_LEVEL=16
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
log "python $(python -V 2>&1), torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)')"
# Wheels the device lacks (transformers 5.23, tokenizers, ...) are carried in wheels/ when needed.
if [ -d wheels ]; then pip install -q --no-index --find-links wheels wheels/*.whl >>"$OUT/install.log" 2>&1; fi
t0=$(date +%s)
pip install -q --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
log "build: $(( $(date +%s) - t0 )) s"

log "GPU tests"
python -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"

log "compute-sanitizer (memcheck) on the kernel tests"
compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q -x -m gpu tests/test_extension.py \
  -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/sanitizer.txt"

log "benchmarks"
for b in bench/bench_*.py; do
  [ -e "$b" ] || continue
  python "$b" --out "$OUT/$(basename "$b" .py | sed 's/^bench_//').json" 2>&1 | tail -20 | tee -a "$OUT/bench.txt"
done
log "done in $(( $(date +%s) - t0 )) s"
