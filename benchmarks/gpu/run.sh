#!/usr/bin/env bash
# One-call GPU check of expanse_fast: environment, CUDA build, GPU tests, benchmarks, report.
#
#   OUT=/some/empty/dir bash benchmarks/gpu/run.sh            # on the GPU machine
#   OUT=/tmp/gpuout bash benchmarks/gpu/run.sh --dry-run      # CPU: tiny sizes, stages skip
#
# Every stage runs under `timeout` with a share of one overall budget (EXPANSE_GPU_BUDGET_S,
# default 355 s), records its exit status, and never stops the stages after it.  Files left
# in $OUT: log.txt, results.json, results.md, junit_cuda.xml, junit.xml, failures_*.txt (each
# failing test's report, written as it fails).  The summary table prints last.
# A shorter second call, after a fix: EXPANSE_GPU_STAGES (default build,tests,bench; without
# build the cuda backend stays off) and EXPANSE_GPU_SECTIONS (default every benchmark section:
# ceilings,linear,conv,mlp,cnn,sweep), e.g. EXPANSE_GPU_STAGES=bench EXPANSE_GPU_SECTIONS=linear.
# The build, the Triton tests and the prewarm (the benchmarks' Triton configs compiled into
# Triton's cache, EXPANSE_GPU_PREWARM=0 skips it) run side by side, then the CUDA tests.
# EXPANSE_GPU_TEST_WORKERS (default half the cores, at most 8): pytest-xdist workers of each
# test stage (the two overlap).  EXPANSE_GPU_SANITIZE=0 skips compute-sanitizer after failed CUDA tests.
# EXPANSE_GPU_DIAG=<pytest -k expression>: those GPU tests again under cuda-gdb (native stack).
# EXPANSE_GPU_TESTS_K=<pytest -k expression>: the test stages run only the GPU tests it
# selects (a rerun of the ones a fix was for).  EXPANSE_GPU_TESTS_RESUME=1: they skip the tests
# an earlier call on the same sources passed (a second call of a warm session).
# EXPANSE_GPU_STAGES=build,ncu: Nsight Compute's counters for the linear layer's kernels
# (cuda, cuda-k128x2, cuda-sw128, triton), in ncu_<variant>.txt.  EXPANSE_GPU_STAGES=build,tma:
# the cuda backend's experimental TMA forward timed and checked (tma_forward.txt, .json).
set -u -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-${TMPDIR:-/tmp}/expanse_gpu_out}"
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --dry-run|--quick) QUICK=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run)"; exit 2 ;;
  esac
done
mkdir -p "$OUT"
BUDGET="${EXPANSE_GPU_BUDGET_S:-355}"
T0=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/expanse_gpu.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT   # only symlinks and logs; rm never follows the symlinks
# The first python that imports torch: on the GPU image that is python3 (its venv's); a
# plain `python` earlier on PATH may be another interpreter without torch.
PY=""
for cand in python3 python; do
  p="$(command -v "$cand")" || continue
  if "$p" -c "import torch" >/dev/null 2>&1; then PY="$p"; break; fi
done
PY="${PY:-$(command -v python3 || command -v python)}"
# coreutils' timeout signals the whole process group (nvcc, ninja too); without it, no limit.
if ! command -v timeout >/dev/null 2>&1; then
  timeout() { while [[ $1 == -* ]]; do shift 2; done; shift; "$@"; }
fi
BENCH="$HERE/bench_gpu.py"
STAGES=",${EXPANSE_GPU_STAGES:-build,tests,bench},"
wanted() { [[ $STAGES == *",$1,"* ]]; }

export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
# Never put the current directory on sys.path (python -m / -c would): the repo root's
# expanse_fast/ has no kernels/ subpackage and would shadow the shim below.
export PYTHONSAFEPATH=1
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"   # ninja jobs of the CUDA build
# The CUDA extension's build, Triton's compiled kernels and the tests' passes in the
# checkout's (ignored) build/ (EXPANSE_GPU_STATE_DIR): the device machine keeps a checkout's
# ignored outputs between calls while it stays warm, so a second call loads them instead of
# building and compiling again.
STATE="${EXPANSE_GPU_STATE_DIR:-$REPO/build}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$STATE/torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$STATE/triton_cache}"
mkdir -p "$TORCH_EXTENSIONS_DIR" "$TRITON_CACHE_DIR"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# Seconds for a stage: at most $1, leaving $2 seconds for the stages after it, at least 10.
stage_limit() {
  local t=$(( $(left) - $2 ))
  (( t > $1 )) && t=$1
  (( t < 10 )) && t=10
  echo "$t"
}
# record_stage NAME RC START LIMIT: one line of stages.tsv (the report's stage table).
record_stage() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(( $(date +%s) - $3 ))" "$4" >> "$WORK/stages.tsv"
}
# run_stage NAME TIMEOUT CMD...: output to the log and WORK/NAME.log, status to stages.tsv.
run_stage() {
  local name=$1 limit=$2 start rc
  shift 2
  echo
  echo "=== stage $name: timeout ${limit}s, $(left)s of the budget left ==="
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  record_stage "$name" "$rc" "$start" "$limit"
  echo "=== stage $name: exit $rc after $(( $(date +%s) - start ))s ==="
  return "$rc"
}
# run_stage_bg NAME TIMEOUT NICENESS CMD...: the same in the background at a lower priority,
# its output to WORK/NAME.log only (finish_bg prints it); sets BG_PID.
run_stage_bg() {
  local name=$1 limit=$2 niceness=$3
  shift 3
  echo
  echo "=== stage $name (in the background, nice $niceness): timeout ${limit}s, $(left)s of" \
       "the budget left ==="
  (
    start=$(date +%s)
    nice -n "$niceness" timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1 &
    echo $! > "$WORK/$name.pid"   # timeout's (nice execs it), for finish_bg's stop
    wait $!
    rc=$?
    record_stage "$name" "$rc" "$start" "$limit"
    echo "$rc" > "$WORK/$name.rc"
  ) &
  BG_PID=$!
}
# finish_bg NAME PID [stop]: wait for a background stage (with "stop": end it now: timeout
# passes the TERM on), then print its log.
finish_bg() {
  local name=$1 pid=$2
  [ -n "$pid" ] || return 0
  if [ "${3:-}" = stop ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$(cat "$WORK/$name.pid")" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  echo
  echo "=== stage $name (background) output ==="
  cat "$WORK/$name.log" 2>/dev/null
  echo "=== stage $name: exit $(cat "$WORK/$name.rc" 2>/dev/null || echo '?') ==="
}

# The package is not installed: build a shim package dir whose expanse_fast/ holds links to
# every entry of the repo's expanse_fast/ plus kernels/ and csrc/ as setup.py's package_dir
# maps them (expanse_fast.kernels, expanse_fast.csrc).
make_shim() {
  local pkg="$WORK/pypath/expanse_fast" e
  mkdir -p "$pkg"
  for e in "$REPO"/expanse_fast/* "$REPO"/expanse_fast/.[!.]*; do
    [ -e "$e" ] || continue
    [ "$(basename "$e")" = "__pycache__" ] && continue
    ln -s "$e" "$pkg/$(basename "$e")"
  done
  [ -e "$pkg/kernels" ] || ln -s "$REPO/kernels" "$pkg/kernels"
  [ -e "$pkg/csrc" ] || ln -s "$REPO/csrc" "$pkg/csrc"
  export PYTHONPATH="$WORK/pypath${PYTHONPATH:+:$PYTHONPATH}"
}

main() {
  cd "$REPO" || return 0
  echo "expanse_fast GPU run: repo $REPO, out $OUT, budget ${BUDGET}s, quick=$QUICK, $(date -u)"
  make_shim

  # ---- 1. environment ----------------------------------------------------------------
  echo; echo "=== nvidia-smi ==="
  HAVE_GPU=0
  if command -v nvidia-smi >/dev/null 2>&1 && timeout 30 nvidia-smi; then
    timeout 20 nvidia-smi --format=csv \
      --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,power.limit
    HAVE_GPU=1
  else
    echo "nvidia-smi not available: no GPU, CPU dry run"
  fi
  # torch takes CUDA_HOME as nvcc's grandparent; a wrapper script (/usr/local/bin/nvcc) would
  # give a directory without the toolkit's headers, and the build would fail.
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    guess="$(dirname "$(dirname "$(command -v nvcc)")")"
    if [ ! -e "$guess/include/cuda_runtime_api.h" ] \
        && [ -e /usr/local/cuda/include/cuda_runtime_api.h ]; then
      export CUDA_HOME=/usr/local/cuda
      echo "CUDA_HOME=$CUDA_HOME (nvcc at $(command -v nvcc) is outside the toolkit)"
    fi
  fi
  if (( HAVE_GPU )); then
    unset TRITON_INTERPRET   # real kernels on the GPU, never the interpreter
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # build for this GPU only: faster
      cap="$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
             | head -n1 | tr -d ' ')"
      [ -n "$cap" ] && export TORCH_CUDA_ARCH_LIST="$cap"
    fi
  fi
  run_stage env 60 "$PY" "$BENCH" env --out "$WORK/env.json"
  if grep -q '"import_error": "ModuleNotFoundError' "$WORK/env.json" 2>/dev/null; then
    echo "shim import failed: falling back to an editable install"
    run_stage install 90 "$PY" -m pip install --no-deps --no-build-isolation -e "$REPO"
    export PYTHONPATH="${PYTHONPATH#"$WORK/pypath"}"; PYTHONPATH="${PYTHONPATH#:}"
    run_stage env2 60 "$PY" "$BENCH" env --out "$WORK/env.json"
  fi
  DEV=cpu
  grep -q '"cuda_available": true' "$WORK/env.json" 2>/dev/null && DEV=cuda
  [ "$DEV" = cuda ] || QUICK=1   # nothing to measure on a CPU but the plumbing
  [ "$DEV" = cuda ] && unset TRITON_INTERPRET

  # ---- 2. build, tests and the benchmarks' compiles, side by side -----------------------
  # The CUDA build keeps 2-3 of the 16 cores busy for about 30 s, and the Triton tests and the
  # benchmarks' Triton tuning are mostly compiles, one core each: so the Triton tests (which
  # never load the extension) and the prewarm (every Triton config the benchmarks will tune,
  # compiled into Triton's cache) run in the background from the start, at a lower priority
  # (both nice 5: the build, then the CUDA tests, come first), and the CUDA tests follow
  # the build.  All of it within one window, which leaves the benchmarks and the report at
  # least 215 s in a default call (on the H200 on 2026-12-01 the six sections needed about
  # 270 s with their own compiles) and a tests-only call (EXPANSE_GPU_STAGES=build,tests) all
  # but the report's.
  local want_ncu=0
  wanted ncu && (( HAVE_GPU )) && want_ncu=1   # (its 160 s are kept from the stages before)
  local keep=$(( 215 + 160 * want_ncu ))
  wanted bench || keep=$(( 15 + 160 * want_ncu ))
  local window_end=$(( $(date +%s) + $(stage_limit 100000 "$keep") ))
  window_left() { local t=$(( window_end - $(date +%s) )); (( t < 10 )) && t=10; echo "$t"; }
  # Half the cores each: the two test stages overlap (with the build and the prewarm), and
  # more compiling workers than cores only add memory (each holds torch, a CUDA context and
  # Triton: 128 GiB of host memory for all of them on the H200 machine).
  TEST_WORKERS="${EXPANSE_GPU_TEST_WORKERS:-$(( $(nproc 2>/dev/null || echo 4) / 2 ))}"
  (( TEST_WORKERS > 8 )) && TEST_WORKERS=8
  (( TEST_WORKERS < 1 )) && TEST_WORKERS=1
  # gpu_tests fg|bg NAME LIMIT JUNIT PYTEST-ARGS...
  # -p gpu_tests_plugin: past the deadline the remaining tests skip, so pytest ends by itself and
  # writes its junit file; bfloat16 cases and the kernels' own tests run first, the
  # float32/float16 sweeps (which CI also runs under the interpreter) last.
  # EXPANSE_FAST_AUTOTUNE=0: one tile per kernel, no tuning compiles.  Worker processes
  # compile Triton kernels side by side (most of these tests' time on a cold cache), and a
  # crash (a segfault in an extension kernel) takes one worker, not the stage: the run goes
  # on and junit names the test.
  gpu_tests() {
    local mode=$1 name=$2 limit=$3 junit=$4
    shift 4
    local args=(-q -m gpu tests --maxfail=60 -rfE -p no:cacheprovider -p gpu_tests_plugin
                --junitxml="$OUT/$junit" -o junit_family=xunit1 "$@")
    "$PY" -c "import pytest_timeout" 2>/dev/null && args+=(--timeout=100)
    (( HAVE_GPU )) && "$PY" -c "import xdist" 2>/dev/null && args+=(-n "$TEST_WORKERS")
    local runner=(run_stage "$name" "$limit")
    [ "$mode" = bg ] && runner=(run_stage_bg "$name" "$limit" 5)
    # Each pass is noted under build/ (kept between warm calls), per source fingerprint and
    # stage: EXPANSE_GPU_TESTS_RESUME=1 deselects what passed in an earlier call of the same
    # sources, so a second call goes on where the first one's deadline stopped.
    EXPANSE_TESTS_DEADLINE=$(( $(date +%s) + limit - 20 )) EXPANSE_FAST_AUTOTUNE=0 \
      EXPANSE_TESTS_FAILURES="$OUT/failures_$name.txt" \
      EXPANSE_TESTS_PASSED="$PASSED_DIR/${SOURCE_ID}_$name.txt" \
      EXPANSE_TESTS_SKIP_PASSED="${EXPANSE_GPU_TESTS_RESUME:-0}" \
      PYTHONPATH="$HERE:$PYTHONPATH" "${runner[@]}" "$PY" -m pytest "${args[@]}"
  }
  PASSED_DIR="$STATE/gpu_tests_passed"
  mkdir -p "$PASSED_DIR"
  SOURCE_ID="$(sed -n 's/.*"source_sha256_16": "\([0-9a-f]*\)".*/\1/p' "$WORK/env.json" \
               2>/dev/null | head -n1)"
  SOURCE_ID="${SOURCE_ID:-unknown}"
  local only="${EXPANSE_GPU_TESTS_K:+ and (${EXPANSE_GPU_TESTS_K})}"
  local tests_pid="" prewarm_pid=""
  if wanted tests; then
    # The Triton tests (and the rest but the extension's), two processes: a sticky CUDA
    # error from a faulty extension kernel cannot fail them.  EXPANSE_FAST_CUDA=0: they never
    # load the extension, which the build below is writing.
    EXPANSE_FAST_CUDA=0 gpu_tests bg tests "$(window_left)" junit.xml -k "not cuda$only"
    tests_pid=$BG_PID
  fi
  if wanted bench && (( HAVE_GPU )) && [ "${EXPANSE_GPU_PREWARM:-1}" != 0 ]; then
    local sections="${EXPANSE_GPU_SECTIONS:-ceilings,linear,conv,mlp,cnn,sweep}"
    local pw_args=(prewarm --device "$DEV" --work "$WORK" --budget "$(( $(window_left) - 5 ))"
                   --sections "$sections")
    (( QUICK )) && pw_args+=(--quick)
    run_stage_bg prewarm "$(window_left)" 5 "$PY" "$BENCH" "${pw_args[@]}"
    prewarm_pid=$BG_PID
  fi

  if ! wanted build; then
    echo; echo "=== stage build: not asked for (EXPANSE_GPU_STAGES): the cuda backend stays off ==="
    export EXPANSE_BENCH_SKIP_CUDA="build stage not run" EXPANSE_FAST_CUDA=0
  # leaving the CUDA tests 30 s of the window, where they are asked for
  elif run_stage build "$(stage_limit 150 $(( keep + $(wanted tests && echo 30 || echo 0) )))" \
      "$PY" "$BENCH" build --device "$DEV"; then
    :
  else
    rc=$(grep '^build' "$WORK/stages.tsv" | tail -n1 | cut -f2)
    export EXPANSE_BENCH_SKIP_CUDA="build stage exit $rc"
    if [ "$rc" != 124 ] && [ "$rc" != 137 ]; then
      # A failed (not timed-out) build would only fail again in every later process,
      # each paying for it out of its own stage's time: the backend stays off.
      export EXPANSE_FAST_CUDA=0
    else
      # A build killed mid-way leaves torch's file lock behind; the next load would wait on
      # it forever.
      for d in "${TORCH_EXTENSIONS_DIR:-}" "$HOME/.cache/torch_extensions" "$REPO/build"; do
        [ -n "$d" ] && [ -d "$d" ] && find "$d" -maxdepth 4 -type f -name lock -print -delete
      done
    fi
  fi

  # ---- 3. the CUDA extension's tests, what is left of the window -------------------------
  if wanted tests && ! gpu_tests fg tests_cuda "$(window_left)" junit_cuda.xml -k "cuda$only"
  then
    # Only when the extension's tests failed: a few small bf16 cases under compute-sanitizer
    # (memcheck), so that one run also says whether a kernel reads or writes out of bounds.
    # It works on some runtimes only (device README); its budget comes out of the benchmarks.
    # Not when pytest found no test to run (exit 5: EXPANSE_GPU_TESTS_K chose none of them).
    if (( HAVE_GPU )) && [ "${EXPANSE_GPU_SANITIZE:-1}" != 0 ] \
        && [ "$(grep '^tests_cuda' "$WORK/stages.tsv" | tail -n1 | cut -f2)" != 5 ] \
        && command -v compute-sanitizer >/dev/null 2>&1; then
      EXPANSE_FAST_AUTOTUNE=0 run_stage sanitize "$(stage_limit 60 170)" compute-sanitizer \
        --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -m gpu -p no:cacheprovider \
        --maxfail=4 tests/backends/test_cuda_backend.py \
        -k "bfloat16 and auto and (three_groups or wide_coupled or coupled_three)"
    fi
  fi
  finish_bg tests "$tests_pid"
  # The timed run must have the device and the host to itself: a prewarm still compiling
  # stops here (what it compiled stays in the cache).
  finish_bg prewarm "$prewarm_pid" stop

  # ---- 4. benchmarks ---------------------------------------------------------------------
  local blim want_diag=0
  [ -n "${EXPANSE_GPU_DIAG:-}" ] && (( HAVE_GPU )) && command -v cuda-gdb >/dev/null 2>&1 \
    && want_diag=1
  # All the budget left (about 205 s in a default call): a larger EXPANSE_GPU_BUDGET_S goes
  # to the sections, which share it out (a 420 s call left 137 s unused under a 190 s cap).
  local want_tma=0
  wanted tma && (( HAVE_GPU )) && want_tma=1
  blim=$(stage_limit 100000 $(( 10 + 30 * want_diag + 160 * want_ncu + 60 * want_tma )))
  BENCH_ARGS=(bench --device "$DEV" --work "$WORK" --budget $(( blim - 8 )))
  (( QUICK )) && BENCH_ARGS+=(--quick)
  [ -n "${EXPANSE_GPU_SECTIONS:-}" ] && BENCH_ARGS+=(--sections "$EXPANSE_GPU_SECTIONS")
  if wanted bench; then
    run_stage bench "$blim" "$PY" "$BENCH" "${BENCH_ARGS[@]}"
  else
    echo; echo "=== stage bench: not asked for (EXPANSE_GPU_STAGES) ==="
  fi

  # Opt-in (EXPANSE_GPU_STAGES=build,ncu): Nsight Compute's counters for the linear layer's
  # kernels, the cuda backend's and the Triton ones (one tile), from the last of two calls.
  if (( want_ncu )); then
    local ncu v names swz pipe b reserve
    ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)"
    if [ -z "$ncu" ]; then
      echo; echo "=== stage ncu: no ncu on this machine ==="
    else
      # the cuda kernels as they are, with two stages of 128-wide k-tiles and with 128-byte
      # swizzled tiles, then Triton's
      for v in cuda cuda-k128x2 cuda-sw128 triton; do
        names='regex:linear_(fwd|dw|dx)_kernel' swz=0 pipe=k64x4 b=cuda
        [ "$v" = cuda-sw128 ] && swz=1
        [ "$v" = cuda-k128x2 ] && pipe=k128x2
        [ "$v" = triton ] && { names='regex:_(fwd|dw|dx)_tma_kernel'; b=triton; }
        # (about 30 s for each cuda run, 50 with Triton's cold compiles: 160 s kept)
        reserve=$(( 10 + 30 * want_diag + 60 * want_tma ))
        [ "$v" = cuda-sw128 ] && reserve=$(( reserve + 40 ))
        [ "$v" = cuda-k128x2 ] && reserve=$(( reserve + 70 ))
        [ "$v" = cuda ] && reserve=$(( reserve + 100 ))
        EXPANSE_FAST_AUTOTUNE=0 EXPANSE_FAST_CUDA_SWIZZLE=$swz EXPANSE_FAST_CUDA_PIPELINE=$pipe \
          run_stage "ncu_$v" "$(stage_limit 90 "$reserve")" "$ncu" \
          --clock-control none --target-processes all --kernel-name "$names" \
          --launch-skip 3 --launch-count 3 --section SpeedOfLight \
          --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
          --section WarpStateStats --section SchedulerStats --section Occupancy \
          --section LaunchStats "$PY" "$HERE/ncu_linear.py" --backend "$b"
        cp "$WORK/ncu_$v.log" "$OUT/ncu_$v.txt" 2>/dev/null
      done
    fi
  fi

  # Opt-in (EXPANSE_GPU_STAGES=build,tma): the cuda backend's experimental TMA forward
  # beside its default and Triton, in a process of its own (tma_forward.py).
  if (( want_tma )) && [ "${EXPANSE_FAST_CUDA:-1}" != 0 ]; then
    run_stage tma "$(stage_limit 90 $(( 10 + 30 * want_diag )))" "$PY" "$HERE/tma_forward.py" \
      --out "$OUT"
    cp "$WORK/tma.log" "$OUT/tma_forward.txt" 2>/dev/null
  fi

  # EXPANSE_GPU_DIAG="pytest -k expression": those tests once more under cuda-gdb, which
  # prints the native stack of a crash (no gdb on the GPU image; cuda-gdb debugs host code).
  if (( want_diag )); then
    EXPANSE_FAST_AUTOTUNE=0 run_stage diag "$(stage_limit 30 8)" cuda-gdb -q -batch \
      -ex "set pagination off" -ex run -ex bt -ex "info sharedlibrary expanse" \
      --args "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -x -k "$EXPANSE_GPU_DIAG"
  fi

  # ---- 5. report: results.json, results.md, the table last ------------------------------
  echo; echo "=== report ($(left)s of the budget left, $(( $(date +%s) - T0 ))s used) ==="
  if ! timeout 60 "$PY" "$BENCH" report --work "$WORK" --out "$OUT" > "$WORK/report.txt" 2>&1; then
    cat "$WORK/report.txt"
    echo "report failed; stage status:"; cat "$WORK/stages.tsv" 2>/dev/null
    return 0
  fi
  cat "$WORK/report.txt"
}

main 2>&1 | tee "$OUT/log.txt"
exit 0
