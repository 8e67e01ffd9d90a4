#!/usr/bin/env bash
# Every benchmark on a 2-core machine: several hours, most of it the time-to-quality cells (the
# headline cell alone ~2 h; docs/benchmarks.md):
# optimizer step, data loader (if present), Keras step, convergence, the time-to-quality protocol;
# then the table blocks of README.md and docs/ (`benchmarks/report.py --docs`).
# Results: benchmarks/results/*.json and *.png (or $RESULTS_DIR). `make bench` runs this.
# The time-to-quality benchmark needs root for its simulated network (benchmarks/netsim); without
# it, it says so and runs its distributed contenders over loopback, with no rate limit.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$OUT"

# --out only when RESULTS_DIR is set, so that the commands recorded with the default results
# are the plain ones
out() { if [ -n "${RESULTS_DIR:-}" ]; then echo "--out=$OUT/$1"; fi; }
failed=()
timings=()

run() {
    local name=$1
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    if "$@"; then
        timings+=("$name=$((SECONDS - t0))")
        echo "=== $name: done in $((SECONDS - t0)) s"
    else
        failed+=("$name")
        echo "=== $name: FAILED after $((SECONDS - t0)) s"
    fi
}

cleanup() {
    # namespaces of a time-to-quality run that was killed (only dead netsim processes' ones)
    if [ "$(id -u)" = 0 ]; then "$PY" benchmarks/netsim/netsim.py cleanup >/dev/null 2>&1; fi
}
trap cleanup EXIT

start=$SECONDS
# shellcheck disable=SC2046  # $(out X) is one word or none
run optimizer_step "$PY" benchmarks/optimizer_step.py --threads 2 --repeats 15 $(out optimizer_step.json)
if [ -f benchmarks/data_loader.py ]; then
    run data_loader "$PY" benchmarks/data_loader.py $(out data_loader.json)
fi
if "$PY" -c "import keras" 2>/dev/null; then
    run keras_step "$PY" benchmarks/keras_step.py $(out keras_step.json)
fi
run convergence "$PY" benchmarks/convergence.py $(out convergence.json)
# the time-to-quality protocol's cells (the headline ~2 h), with the learning rates its `tune` stage chose
# (committed in results/ttq_protocol.json; `python benchmarks/ttq_protocol.py tune` redoes them, ~8 min
# per entry)
# shellcheck disable=SC2046
run ttq_protocol "$PY" benchmarks/ttq_protocol.py run --redo \
    --tuning benchmarks/results/ttq_protocol.json $(out ttq_protocol.json)
timings+=("total=$((SECONDS - start))")
# the docs show the default results; results elsewhere are printed
if [ -z "${RESULTS_DIR:-}" ]; then
    "$PY" benchmarks/report.py --docs
else
    "$PY" benchmarks/report.py --results "$OUT"
fi

echo "timings (s): ${timings[*]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
