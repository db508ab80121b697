#!/usr/bin/env bash
# GPU runner: versions, the test suite compiled on the GPU, then every benchmark suite.
#
# For an H100 machine with JAX (0.11.2+) already installed and no network; runs from the
# source tree (PYTHONPATH=.) with python3. Everything goes to ${OUT:-/tmp}:
#   gpu_runner.log                       versions, pytest and benchmark output
#   <date>_<device>.json / .md           results and the markdown report
#   <date>_<device>_plots.tar.gz         the PNG plots (or the PNGs themselves if <= 3)
#
# Environment:
#   SJ_BUDGET_S      total wall seconds (default 540); tests get SJ_TEST_SHARE percent
#                    (default 40) of it, the benchmarks the rest
#   SJ_TESTS         test paths / node ids (default: tests)
#   SJ_PYTEST_ARGS   extra pytest arguments (e.g. "-k attention")
#   SJ_SUITES        comma-separated benchmark suites (default: all)
#   SJ_BENCH_ARGS    extra benchmarks.run arguments (e.g. "--quick"); SJ_BACKEND (default gpu)
#   SJ_SKIP_TESTS=1, SJ_SKIP_BENCH=1   skip a phase
#   SJ_PYTHON        interpreter (default python3)
set -o pipefail
cd "$(dirname "$0")/.." || exit 2

OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_runner.log"
BUDGET="${SJ_BUDGET_S:-540}"
TEST_SHARE="${SJ_TEST_SHARE:-40}"
PY="${SJ_PYTHON:-python3}"
RESULTS_DIR="benchmarks/results"
START=$(date +%s)
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # leave GPU memory for the torch peers
export PYTHONUNBUFFERED=1
: > "$LOG"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
log() { echo "[gpu_runner +$(elapsed)s] $*" | tee -a "$LOG"; }

# -- 1. versions and devices ------------------------------------------------------------------
log "budget ${BUDGET}s, python: $(command -v "$PY")"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$LOG"
timeout -k 5 60 "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import platform
import jax, jaxlib
print("python", platform.python_version(), "| jax", jax.__version__, "| jaxlib", jaxlib.__version__)
print("devices:", jax.devices(), "| default backend:", jax.default_backend())
for mod in ("triton", "flax", "numpy", "matplotlib", "tqdm", "torch"):
    try:
        m = __import__(mod)
        extra = ""
        if mod == "torch":
            extra = f" cuda={m.version.cuda} available={m.cuda.is_available()}"
        print(f"{mod} {m.__version__}{extra}")
    except Exception as e:
        print(f"{mod}: not importable ({type(e).__name__}: {e})")
EOF

# -- 2. tests, compiled on the GPU ------------------------------------------------------------
test_rc=0
if [ "${SJ_SKIP_TESTS:-0}" != 1 ]; then
  t_tests=$(( $(left) * TEST_SHARE / 100 ))
  [ "$t_tests" -lt 30 ] && t_tests=30
  log "tests: ${SJ_TESTS:-tests} ${SJ_PYTEST_ARGS:-} (timeout ${t_tests}s)"
  # shellcheck disable=SC2086  # SJ_TESTS / SJ_PYTEST_ARGS are word lists on purpose
  timeout -k 10 "$t_tests" "$PY" -m pytest -q -x -p no:cacheprovider ${SJ_TESTS:-tests} ${SJ_PYTEST_ARGS:-} \
    2>&1 | tee -a "$LOG"
  test_rc=$?
  [ "$test_rc" = 124 ] && log "tests: TIMED OUT after ${t_tests}s"
  log "tests: exit code $test_rc"
fi

# -- 3. benchmarks ----------------------------------------------------------------------------
bench_rc=0
if [ "${SJ_SKIP_BENCH:-0}" != 1 ]; then
  t_bench=$(( $(left) - 15 ))   # keep a few seconds to copy the results out
  if [ "$t_bench" -lt 20 ]; then
    log "benchmarks: skipped, only $(left)s of the budget left"
    bench_rc=124
  else
    mkdir -p "$RESULTS_DIR"
    marker=$(mktemp)
    # run.py gets a softer budget than the hard timeout so it can still write its report.
    soft=$(( t_bench * 85 / 100 ))
    log "benchmarks: suites ${SJ_SUITES:-all} (budget ${soft}s, timeout ${t_bench}s)"
    # shellcheck disable=SC2086
    timeout -k 10 "$t_bench" "$PY" -m benchmarks.run --backend "${SJ_BACKEND:-gpu}" ${SJ_SUITES:+--suite "$SJ_SUITES"} \
      --out "$RESULTS_DIR" --budget-s "$soft" ${SJ_BENCH_ARGS:-} 2>&1 | tee -a "$LOG"
    bench_rc=$?
    [ "$bench_rc" = 124 ] && log "benchmarks: TIMED OUT after ${t_bench}s (results of finished suites are kept)"
    log "benchmarks: exit code $bench_rc"
    for json in $(find "$RESULTS_DIR" -maxdepth 1 -name '*.json' -newer "$marker" 2>/dev/null); do
      stem="${json%.json}"
      [ -f "$stem.md" ] || timeout 60 "$PY" -m benchmarks.report "$json" >>"$LOG" 2>&1
      cp "$json" "$OUT_DIR/"
      [ -f "$stem.md" ] && cp "$stem.md" "$OUT_DIR/"
      if [ -d "$stem" ]; then
        n=$(find "$stem" -name '*.png' | wc -l)
        if [ "$n" -le 3 ]; then
          cp "$stem"/*.png "$OUT_DIR/" 2>/dev/null
        else
          tar -czf "$OUT_DIR/$(basename "$stem")_plots.tar.gz" -C "$(dirname "$stem")" "$(basename "$stem")"
        fi
      fi
      log "copied $(basename "$stem") results to $OUT_DIR"
    done
    rm -f "$marker"
  fi
fi

log "done: tests exit $test_rc, benchmarks exit $bench_rc, $(elapsed)s"
[ "$test_rc" != 0 ] && exit "$test_rc"
exit "$bench_rc"
