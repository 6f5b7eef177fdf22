# Two targets a newcomer needs: `make demo` (set up, then a real sweep on the embedded SQLite
# store, offline, and its best trial exported) and `make test`. GPU machines: `make setup TORCH=torch` keeps pip's CUDA build.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
JOBS   ?= 2

.PHONY: setup demo test lint bench quality clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(BIN)/tuner demo prepare
	$(BIN)/tuner study create --space quickstart.yaml --load-if-exists
	$(BIN)/tuner study run quickstart --jobs $(JOBS)
	$(BIN)/tuner study best quickstart
	$(BIN)/tuner study export quickstart --out demo/best-model --force

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check tuner trials tests
	$(BIN)/ruff format --check tuner trials tests

bench: setup
	$(BIN)/python tests/benchmarks/trial_overhead.py

# Search quality on the demo LoRA and the simulated workload, 5 seeds × 40 trials (~50 min, 2 cores):
# the table, JSON and plot the README shows, in docs/search-quality/.
quality: setup
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python tests/benchmarks/search_quality.py --out docs/search-quality

clean:
	rm -rf demo tuner.db tuner.db-* tuner_artifacts
