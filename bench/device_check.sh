#!/usr/bin/env bash
# Everything a lent H100/H200 checks, in one run, selected by STAGES (default: all, in this order):
#   build     pip install (no isolation); wheels in .whl/ (nvidia-cutlass, transformers) installed first
#   quick     (not in the default) the GPU tests of the newest work first: the scaled dense FP8 GEMM,
#             rms_norm_fp8 and the padded plan (stopping at the first failure), then the whole MoE file (both
#             pipelines: the contiguous expert GEMM and the pointer-array one), every launcher's error paths, the
#             attention (in-kernel split-KV combine), graphs, fused q/k/v, residual norms, batched rows, vision,
#             device-scalar head (both implementations), PDL == plain launches
#   tests     pytest -m gpu tests, one process, nothing deselected
#   sanitize  compute-sanitizer memcheck, racecheck, initcheck, synccheck on every kernel test file (the four tools
#             side by side, each its own process on the GPU; SANITIZE_JOBS=1: one after another)
#   bench     bench/bench_{moe,attention,vocab_head}.py -> $OUT/<name>.json; router tile sweep -> router_<tile>.json;
#             expert GEMM tile sweep -> moe_tile_<tile>.json; the head's statistics GEMM variants ->
#             vocab_head_<variant>.json; the attention under each of ATTENTION_VARIANTS (default: the mma.sync
#             kernel's three-stage pipeline) -> attention_<setting>_<value>.json; the
#             dense FP8 GEMMs in 2 x 2 clusters -> dense_cluster_2x2.json, on the stream-K scheduler ->
#             dense_streamk.json
#   e2e       dgemma bench at the 26B-A4B shapes (FP8) -> $OUT/e2e.json; the same with DGEMMA_PDL=1 (programmatic
#             dependent launch, graphs on) -> $OUT/e2e_pdl.json unless E2E_PDL is set empty; the same with
#             DGEMMA_VOCAB_HEAD=mma_sync (the head's older kernels; wgmma is the default) -> $OUT/e2e_head_mma_sync.json
#             unless E2E_WGMMA is set empty; the same with DGEMMA_ATTENTION=mma_sync (auto is the default) ->
#             $OUT/e2e_attention_mma_sync.json unless E2E_ATTENTION is set empty; and one run per opt-in kernel
#             setting in E2E_VARIANTS (VARIABLE=value, default: the per-warp residual kernel, the router never and
#             always clustered, the FP8 self-conditioning product, the two-pass head statistics; stream-K and 2 x 2
#             clustered dense GEMMs lost at kernel level at c4fb56a, the device stop needs a torch with conditional
#             graph nodes) -> $OUT/e2e_<variable>_<value>.json
#   parity    (not in the default) bench/layer_parity.py at the 26B-A4B shapes -> layer_parity_26b.json,
#             bench/fp8_gemm_precision.py -> fp8_gemm_precision.json, the attention split-KV sweep ->
#             attention_splits.json
#   profile   (not in the default) Nsight Compute on the kernels the step's profile ranks first, one launch each at
#             the model's shapes: the head's statistics GEMM (batch 1 and 4; the two-pass variant's second pass at
#             batch 1), the wgmma attention (sliding decode, batch 1), the tensor-core router (256 tokens), the
#             expert GEMM (256 tokens), and the router, dispatch plan and expert-branch residual of a real 256-row pass
#             (dgemma bench) -> ncu_<name>.txt (every section with its details) and ncu_<name>_sass.txt (the SASS
#             lines with the most stall samples); PROFILES="step_glue_b1 route_t256 ..." runs only those
# The log ($OUT/device_check.log) records the device, driver, torch, commit, every command, its exit
# status and output tail, and each sanitizer's ERROR SUMMARY line. Each command has its own time limit
# (*_S variables), so one slow stage cannot eat the lease. Usage on the device machine:
#   COMMIT=$(git rev-parse HEAD) STAGES="build tests" bash bench/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
STAGES="${STAGES:-build tests sanitize bench e2e}"
KERNEL_TESTS="${KERNEL_TESTS:-tests/test_extension.py tests/test_moe_cuda.py tests/test_vocab_head_cuda.py tests/test_attention_cuda.py tests/test_launcher_errors_cuda.py}"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-16}"
# The result files record COMMIT (bench/common.py): a copied tree's git metadata can lag its files.
[[ -n "${COMMIT:-}" ]] && export DGEMMA_COMMIT="$COMMIT"
PY="${PYTHON:-python3}"
t0=$(date +%s)

want() { [[ " $STAGES " == *" $1 "* ]]; }
log() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
# run LIMIT_S CMD...: the command, the tail of its output, its exit status (124: time limit).
run() {
  local limit=$1; shift
  echo "\$ $*" | tee -a "$LOG"
  timeout "$limit" "$@" >"$OUT/last.txt" 2>&1
  local rc=$?
  tail -n "${TAIL:-30}" "$OUT/last.txt" | tee -a "$LOG"
  echo "-> exit $rc after $(( $(date +%s) - t0 )) s in all" | tee -a "$LOG"
  return $rc
}

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
log "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
log "python: $($PY -V 2>&1); torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
log "nvcc: $(nvcc --version 2>&1 | tail -1); CXX=${CXX:-unset} CUDAHOSTCXX=${CUDAHOSTCXX:-unset}"
log "stages: $STAGES"

if want build; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    run 120 $PY -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
  fi
  if ! TAIL=15 run "${BUILD_S:-300}" $PY -m pip install --no-build-isolation --no-deps -v .; then
    grep -E "error|Error" "$OUT/last.txt" | head -40 | tee -a "$LOG"
    # A compiler newer than the interpreter's C++ runtime (or one linking it statically) fails the
    # runtime check: retry once with the system's compilers.
    if grep -q "shared C++ runtime" "$OUT/last.txt" && [ -x /usr/bin/g++ ]; then
      log "retrying the build with CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++"
      rm -rf build
      CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++ TAIL=15 run "${BUILD_S:-300}" \
        $PY -m pip install --no-build-isolation --no-deps -v . || { log "BUILD FAILED"; exit 1; }
    else
      log "BUILD FAILED"
      exit 1
    fi
  fi
  grep -E "spill stores" "$OUT/last.txt" | sort | uniq -c | sort -rn | head -3 | tee -a "$LOG"
  run 30 $PY -c 'import dgemma._C as C, subprocess, sys; print(C.__file__); sys.exit(subprocess.call([sys.executable, "cmake/check_cxx_runtime.py", C.__file__]))'
fi

if want quick; then
  TAIL=40 run "${QUICK_S:-180}" $PY -m pytest -q -m gpu -p no:cacheprovider -rfE -x tests/test_moe_cuda.py \
    -k "rms_norm_fp8 or prequantised or linear or mlp or padded_plan"
  # The contiguous expert GEMM in its own process: a fault there cannot take the other MoE results with it.
  TAIL=40 run "${QUICK_S:-180}" $PY -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_moe_cuda.py -k "not contiguous"
  TAIL=40 run "${QUICK_S:-180}" $PY -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_moe_cuda.py -k contiguous
  DGEMMA_ERROR_REPEATS=20 TAIL=20 run 120 $PY -m pytest -q -m gpu -p no:cacheprovider -rfE \
    tests/test_launcher_errors_cuda.py
  # The attention with its split-KV combine in the kernel (the splits' last block combines): the mma.sync kernel, then
  # the wgmma kernel in its own process (a fault there cannot take the other results with it), then the engine on it.
  TAIL=20 run 120 $PY -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_attention_cuda.py -k "not wgmma"
  TAIL=20 run 120 $PY -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_attention_cuda.py -k wgmma
  DGEMMA_ATTENTION=wgmma TAIL=20 run 180 $PY -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_engine_cuda.py
  # The vocabulary head, both implementations (mma_sync, wgmma) and the wgmma statistics variants (subprocesses).
  TAIL=30 run "${QUICK_S:-240}" $PY -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_vocab_head_cuda.py
  if ! TAIL=40 run "${QUICK_S:-300}" $PY -m pytest -q -m gpu -p no:cacheprovider -rfE ${QUICK_TESTS:-tests/test_graphs_cuda.py tests/test_engine_cuda.py tests/test_vision_cuda.py tests/test_pdl_cuda.py}; then
    # Triage at once: the engine and graph tests again with the newest feed-forward path off (the MLP on its own
    # GEMMs, the plain router and combine), so one run tells whether that path or an older kernel fails.
    log "engine/graph tests failed: rerunning them with DGEMMA_DISABLE_KERNELS=shared_experts"
    DGEMMA_DISABLE_KERNELS=shared_experts TAIL=30 run "${QUICK_S:-240}" $PY -m pytest -q -m gpu -p no:cacheprovider \
      -rfE tests/test_engine_cuda.py tests/test_graphs_cuda.py
    log "and with DGEMMA_DISABLE_KERNELS=split_kv (no in-kernel split-KV combine)"
    DGEMMA_DISABLE_KERNELS=split_kv TAIL=30 run "${QUICK_S:-240}" $PY -m pytest -q -m gpu -p no:cacheprovider \
      -rfE tests/test_engine_cuda.py tests/test_graphs_cuda.py
  fi
fi

if want tests; then
  # PYTEST_ARGS adds e.g. "-n 4 --dist loadfile" (pytest-xdist: a worker that faults is reported and replaced, the run
  # goes on; loadfile keeps a module in one worker, so the 26B module builds its ~45 GiB engines once).
  TAIL=60 run "${TESTS_S:-420}" $PY -m pytest -q -m gpu tests -p no:cacheprovider -rfE ${PYTEST_ARGS:-}
  cp "$OUT/last.txt" "$OUT/tests.txt"
fi

if want sanitize; then
  # sanitize TOOL: the tool over every kernel test file, one after another, into $OUT/sanitize_TOOL.log (the command,
  # its output tail, exit status and summary line per file). The tools run side by side (SANITIZE_JOBS=1: one at a
  # time): each is a process of its own on the one GPU, and four in a row would take more than a lease.
  sanitize() {
    local tool=$1 f rc out="$OUT/sanitize_$1.txt"
    for f in $KERNEL_TESTS; do
      echo "\$ compute-sanitizer --tool $tool --error-exitcode 9 $PY -m pytest -q -m gpu -p no:cacheprovider $f"
      DGEMMA_ERROR_REPEATS=2 timeout "${SANITIZER_S:-150}" "${SANITIZER:-compute-sanitizer}" --tool "$tool" \
        --error-exitcode 9 $PY -m pytest -q -m gpu -p no:cacheprovider "$f" >"$out" 2>&1
      rc=$?
      # The first three reports whole (kind, kernel, thread, address, host frames): a tail shows only the last one's
      # backtrace, and the output file does not come back.
      grep -E -A16 -m 3 "^========= (Uninitialized|Invalid|Misaligned|Race|Barrier|Program hit|Error|Warning|Out-of-range|Unused|Cuda)" "$out" | head -60
      tail -n 8 "$out"
      echo "-> exit $rc after $(( $(date +%s) - t0 )) s in all"
      echo "$tool $f: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$out" | tail -1)"
    done >"$OUT/sanitize_$tool.log" 2>&1
    rm -f "$out"
  }
  TOOLS="${TOOLS:-memcheck racecheck initcheck synccheck}"
  log "sanitizers: $TOOLS over $KERNEL_TESTS"
  for tool in $TOOLS; do
    if [[ "${SANITIZE_JOBS:-4}" == 1 ]]; then sanitize "$tool"; else sanitize "$tool" & fi
  done
  wait
  # The logs in the tools' order, then every summary line together.
  for tool in $TOOLS; do cat "$OUT/sanitize_$tool.log" >>"$LOG"; done
  for tool in $TOOLS; do
    for f in $KERNEL_TESTS; do grep -F -- "$tool $f: " "$OUT/sanitize_$tool.log" | tail -1; done
    rm -f "$OUT/sanitize_$tool.log"
  done | tee -a "$LOG"
fi

if want bench; then
  for b in ${BENCHES:-moe attention vocab_head}; do
    TAIL=25 run "${BENCH_S:-60}" $PY "bench/bench_$b.py" --out "$OUT/$b.json"
  done
  # The vocabulary head's statistics GEMMs one by one (auto, the default, is pingpong up to 512 rows, else cooperative;
  # read once per process): their wgmma rows against vocab_head.json's.
  if [[ " ${BENCHES:-moe attention vocab_head} " == *" vocab_head "* ]]; then
    for v in ${STATS_VARIANTS:-pingpong cooperative cooperative_cluster2x2 pingpong_cluster2 two_pass two_pass_cooperative}; do
      DGEMMA_VOCAB_HEAD_STATS=$v TAIL=12 run "${BENCH_S:-60}" $PY bench/bench_vocab_head.py --out "$OUT/vocab_head_$v.json"
    done
  fi
  # The attention's process-wide settings (read once per process), one run each (VARIABLE=value ->
  # attention_<variable>_<value>.json, the name lower-cased without DGEMMA_ATTENTION_): its rows against
  # attention.json's. Default: the mma.sync kernel's three-stage key pipeline (the ping-pong A/B,
  # DGEMMA_ATTENTION_PINGPONG=0, was measured at d76e1de: attention_nopingpong.json).
  if [[ " ${BENCHES:-moe attention vocab_head} " == *" attention "* ]]; then
    for setting in ${ATTENTION_VARIANTS-DGEMMA_ATTENTION_STAGES=3}; do
      name="${setting%%=*}"; name="${name#DGEMMA_ATTENTION_}"; name="$(echo "$name" | tr 'A-Z' 'a-z')_${setting#*=}"
      (export "$setting"; TAIL=12 run "${BENCH_S:-60}" $PY bench/bench_attention.py --out "$OUT/attention_$name.json")
    done
  fi
  # The router's compiled tiles, one process each (the tile is read once per process).
  for tile in ${ROUTE_TILES:-tc tc_cluster tc_single 4x8 8x8 2x8 1x8}; do
    DGEMMA_ROUTE_TILE=$tile TAIL=6 run 60 $PY bench/bench_moe.py --router-only --tokens 256,1024,8192 \
      --out "$OUT/router_$tile.json"
  done
  # The dense FP8 GEMMs in 2 x 2 clusters (DGEMMA_DENSE_CLUSTER, read once per process): their rows against moe.json's.
  DGEMMA_DENSE_CLUSTER=2x2 TAIL=20 run 90 $PY bench/bench_moe.py --dense-only --out "$OUT/dense_cluster_2x2.json"
  # The dense FP8 GEMMs on the stream-K scheduler (DGEMMA_DENSE_SCHEDULE, read once per process): against moe.json's.
  DGEMMA_DENSE_SCHEDULE=streamk TAIL=20 run 90 $PY bench/bench_moe.py --dense-only --out "$OUT/dense_streamk.json"
  # The contiguous expert GEMM's token tiles (DGEMMA_MOE_TILE, read once per process).
  for tile in ${MOE_TILES:-32 64 128}; do
    DGEMMA_MOE_TILE=$tile TAIL=8 run 90 $PY bench/bench_moe.py --moe-only --tokens 256,1024,8192 \
      --out "$OUT/moe_tile_$tile.json"
  done
fi

if want e2e; then
  # Rows with and without CUDA graphs (--cuda-graphs auto = both where the step can be captured);
  # E2E_ARGS adds e.g. "--batch 1,4 --baseline transformers" (transformers' wheel in .whl/).
  TAIL=40 run "${E2E_S:-240}" $PY -m dgemma bench --precision fp8 --iters 8 --warmup 2 --steps 16 ${E2E_ARGS:-} \
    --json "$OUT/e2e.json"
  # The A/B rows below each run unless their variable is set empty (E2E_PDL= E2E_WGMMA= E2E_ATTENTION=).
  # The same rows with programmatic dependent launch (DGEMMA_PDL=1, opt-in until measured): the A/B of kernels/pdl.cuh.
  if [[ -n "${E2E_PDL-1}" ]]; then
    DGEMMA_PDL=1 TAIL=25 run "${E2E_S:-240}" $PY -m dgemma bench --precision fp8 --iters 8 --warmup 2 --steps 16 \
      --cuda-graphs on --json "$OUT/e2e_pdl.json"
  fi
  # The vocabulary head on its older mma.sync kernels (wgmma is the default): the A/B of the head's GEMMs.
  if [[ -n "${E2E_WGMMA-1}" ]]; then
    DGEMMA_VOCAB_HEAD=mma_sync TAIL=25 run "${E2E_S:-240}" $PY -m dgemma bench --precision fp8 --iters 8 --warmup 2 \
      --steps 16 --cuda-graphs on --json "$OUT/e2e_head_mma_sync.json"
  fi
  # The attention on the mma.sync kernel only (auto, the default, picks per call): the A/B of the wgmma kernel.
  if [[ -n "${E2E_ATTENTION-1}" ]]; then
    DGEMMA_ATTENTION=mma_sync TAIL=25 run "${E2E_S:-240}" $PY -m dgemma bench --precision fp8 --iters 8 --warmup 2 \
      --steps 16 --cuda-graphs on --json "$OUT/e2e_attention_mma_sync.json"
  fi
  # The opt-in kernels, each in a step of its own (VARIABLE=value -> e2e_<variable>_<value>.json, the variable's name
  # lower-cased without DGEMMA_): what a default change would give end to end.
  for setting in ${E2E_VARIANTS-DGEMMA_RESIDUAL_KERNEL=warp DGEMMA_ROUTE_TILE=tc_single DGEMMA_ROUTE_TILE=tc_cluster DGEMMA_VOCAB_HEAD_SOFT=fp8 DGEMMA_VOCAB_HEAD_STATS=two_pass}; do
    name="${setting%%=*}"; name="${name#DGEMMA_}"; name="$(echo "$name" | tr 'A-Z' 'a-z')_${setting#*=}"
    log "with $setting"
    (export "$setting"; TAIL=25 run "${E2E_S:-240}" $PY -m dgemma bench --precision fp8 --iters 8 --warmup 2 --steps 16 \
      --cuda-graphs on --json "$OUT/e2e_$name.json")
  done
fi
if want parity; then
  TAIL=45 run "${PARITY_S:-200}" $PY bench/layer_parity.py --preset 26b-a4b --prompt 1024 --fp32 \
    --json "$OUT/layer_parity_26b.json"
  TAIL=8 run 60 $PY bench/fp8_gemm_precision.py --json "$OUT/fp8_gemm_precision.json"
  TAIL=6 run 90 $PY bench/bench_attention.py --cases decoder --splits 1,2,4,8,16 --out "$OUT/attention_splits.json"
fi
if want profile; then
  NCU="${NCU:-ncu}"
  # prof NAME KERNEL_REGEX SKIP CMD...: the SKIP+1-th launch whose mangled name matches, every section, and the source
  # view's hottest SASS lines (stall samples); the report file itself stays on the device.
  prof() {
    local name=$1 regex=$2 skip=$3; shift 3
    # PROFILES (names, space-separated) runs only those; unset: every one.
    [[ -z "${PROFILES:-}" || " $PROFILES " == *" $name "* ]] || return 0
    TAIL=12 run "${PROFILE_S:-150}" "$NCU" --kernel-name-base mangled --kernel-name "regex:$regex" --launch-skip "$skip" \
      --launch-count "${COUNT:-1}" --set full --import-source yes -f -o "$OUT/ncu_$name" "$@"
    "$NCU" --import "$OUT/ncu_$name.ncu-rep" --page details --print-details all >"$OUT/ncu_$name.txt" 2>&1
    "$NCU" --import "$OUT/ncu_$name.ncu-rep" --page source --print-source sass --csv >"$OUT/ncu_$name.csv" 2>&1
    $PY bench/ncu_hot_lines.py "$OUT/ncu_$name.csv" --top 60 >"$OUT/ncu_${name}_sass.txt" 2>&1
    rm -f "$OUT/ncu_$name.csv" "$OUT/ncu_$name.ncu-rep"
    grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy" \
      "$OUT/ncu_$name.txt" | head -6 | sed "s|^|$name: |" | tee -a "$LOG"
  }
  prof vocab_stats_b1 VocabStatsEpilogue 1 $PY bench/bench_vocab_head.py --iters 2 --batches 1 --out "$OUT/prof_vh.json"
  prof vocab_stats_b4 VocabStatsEpilogue 1 $PY bench/bench_vocab_head.py --iters 2 --batches 4 --out "$OUT/prof_vh.json"
  # The two-pass statistics' second pass (the first is the logits GEMM with a store-only epilogue).
  DGEMMA_VOCAB_HEAD_STATS=two_pass prof vocab_rows_b1 vocab_head_stats_rows_kernel 1 $PY bench/bench_vocab_head.py \
    --iters 2 --batches 1 --out "$OUT/prof_vh.json"
  DGEMMA_ATTENTION=wgmma prof attention_sliding_b1 attention_wgmma_kernel 2 $PY bench/bench_attention.py \
    --cases decoder_sliding_p1023_b1 --out "$OUT/prof_attn.json"
  prof route_t256 route_tc_kernel 2 $PY bench/bench_moe.py --router-only --tokens 256 --iters 20 --out "$OUT/prof_moe.json"
  prof expert_gemm_t256 ContiguousSchedulerTag 2 $PY bench/bench_moe.py --moe-only --tokens 256 --iters 20 --out "$OUT/prof_moe.json"
  # The glue kernels that took 10 of a batch-1 step's 22.5 GPU ms at c4fb56a (router 211 us, expert-branch residual
  # 99 us, dispatch plan 22 us per layer: tens of times their traffic's worth), at a step's 256 rows: a 256-token prompt
  # (every pass of this run has 256 rows), past its 30 layers (90 launches of the three), one launch of each.
  COUNT=3 prof step_glue_b1 "route_tc_kernel|moe_plan_kernel|residual_branches_row_kernel|residual_norm_kernel" 90 $PY -m dgemma bench \
    --precision fp8 --batch 1 --steps 1 --iters 1 --warmup 0 --cuda-graphs off --prompt-length 256 \
    --prefill-lengths 256 \
    --json "$OUT/prof_e2e.json"
  rm -f "$OUT"/prof_*.json
fi
rm -f "$OUT/last.txt"
log "done in $(( $(date +%s) - t0 )) s"
