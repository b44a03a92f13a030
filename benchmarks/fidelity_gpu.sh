#!/usr/bin/env bash
# C2 and C4 at the papers' budget shape (150 and 200 rounds) on one GPU, then one results table.
# Needs only the device keys (device=cuda precision=bf16, set in the grids). Planned to take at most
# 8 minutes on one H200 (not yet measured: no GPU machine was at hand when it was written).
#   bash benchmarks/fidelity_gpu.sh [OUT]        (PY=python MODEL=shared/minilm-bf16 by default)
set -euo pipefail
OUT=${1:-runs/fidelity_gpu}
PY=${PY:-python}
MODEL=${MODEL:-shared/minilm-bf16}
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
