#!/usr/bin/env bash
# Everything a lent H100 checks, in one run: build (16 cores), GPU tests, compute-sanitizer on the
# kernel tests, the kernel benchmarks and the end-to-end bench. Results land in $OUT (default
# bench/results/device): log.txt plus one JSON per benchmark (at most 8 files come back).
# Usage on the device machine:  bash bench/device_check.sh   (each stage has its own time limit)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
log() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
stage() { local limit=$1; shift; timeout "$limit" "$@" 2>&1 | tail -${TAIL:-40} | tee -a "$LOG"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
log "python $(python3 -V 2>&1), torch $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda)')"
t0=$(date +%s)
if ! python3 -m pip install -q --no-build-isolation --no-deps . >"$OUT/build.txt" 2>&1; then
  log "BUILD FAILED"; grep -E "error|Error" "$OUT/build.txt" | head -40 | tee -a "$LOG"; exit 1
fi
grep -E "spill stores|registers" "$OUT/build.txt" | sort | uniq -c | sort -rn | head -5 >>"$LOG"
rm -f "$OUT/build.txt"
log "build: $(( $(date +%s) - t0 )) s"

log "GPU tests"
stage "${TESTS_S:-150}" python3 -m pytest -q -m gpu tests -p no:cacheprovider -rfE
log "compute-sanitizer memcheck on kernel tests"
TAIL=12 stage "${SANITIZER_S:-60}" compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x -m gpu \
  -p no:cacheprovider tests/test_extension.py tests/test_moe_cuda.py tests/test_vocab_head_cuda.py \
  "tests/test_attention_cuda.py::test_decoder_ragged_batch"
for b in ${BENCHES:-moe attention vocab_head}; do
  log "bench $b"
  TAIL=25 stage "${BENCH_S:-45}" python3 "bench/bench_$b.py" --out "$OUT/$b.json"
done
log "end to end: dgemma bench (26B-A4B shapes, FP8)"
TAIL=30 stage "${E2E_S:-120}" python3 -m dgemma bench --precision fp8 --iters 8 --warmup 2 --steps 16,48 \
  --json "$OUT/e2e.json"
log "done in $(( $(date +%s) - t0 )) s"
