#!/usr/bin/env bash
# C2 and C4 at the papers' budget shape (150 and 200 rounds) on one GPU, then one results table.
# Needs only the device keys (device=cuda precision=bf16, set in the grids). Planned to take at most
# 8 minutes on one H200 (not yet measured: no GPU machine was at hand when it was written).
#   bash benchmarks/fidelity_gpu.sh [OUT]        (PY=python3 MODEL=shared/minilm-bf16 by default)
# Like gpu_check.sh it runs from src/ and installs the wheels of benchmarks/gpu_prepare.sh (.whl/, copied with the tree),
# which also makes MODEL.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/fidelity_gpu}
PY=${PY:-python3}
MODEL=${MODEL:-shared/minilm-bf16}
if ! "$PY" -c "import datasets" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -f "$MODEL/config.json" ] || "$PY" benchmarks/fidelity_gpu.py "$MODEL"
mkdir -p "$OUT"
start=$(date +%s)
for grid in configs/fidelity_gpu/C2_*.yaml configs/fidelity_gpu/C4_*.yaml; do
  name=$(basename "$grid" .yaml)
  "$PY" -m declora compare "$grid" "model.name=$MODEL" --out "$OUT/${name%%_*}"
  echo "grid $name $(( $(date +%s) - start )) s" | tee -a "$OUT/times.log"
done
{ echo "# GPU-scale fidelity grids ($(date -Is), $(( $(date +%s) - start )) s)"; echo
  for c in C2 C4; do echo "## $c"; echo; cat "$OUT/$c/comparison.md"; echo; done; } > "$OUT/results.md"
cat "$OUT/results.md"
