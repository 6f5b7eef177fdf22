# Two targets a newcomer needs: `make demo` (set up, then a real sweep on the embedded SQLite
# store, offline, and its best trial exported) and `make test`.
#
# setup installs every extra (`.[all,test]`) at the versions the tests pass with (constraints.txt,
# torch included). torch's version comes from there; its build from the index pip reads: PyPI's
# Linux wheel is the CUDA one, and TORCH_INDEX adds PyTorch's index for another build, e.g.
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu     (CPU only, a smaller download)
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128   (CUDA 12.8)
# (a local build label, +cpu or +cu128, satisfies the pin torch==2.13.0). Another torch version
# means changing the pin in constraints.txt: TORCH=torch==2.12.0 alone conflicts with it.

PYTHON      ?= python3
VENV        ?= .venv
TORCH       ?= torch
TORCH_INDEX ?=
BIN         := $(VENV)/bin
JOBS        ?= 2
# Test processes side by side (pytest-xdist): tests wait on servers, subprocesses and sockets as
# much as they compute, so more processes than cores pays. Tests that share a costly server are
# kept in one process by their group (--dist loadgroup).
TEST_JOBS   ?= 4
PIP_C       := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: setup demo test test-fast lint bench quality constraints clean

setup: $(VENV)/.installed

# A venv made before the distribution was renamed `lora-tuner` holds it as `tuner`, over the same
# files: uninstalled first, as removing it later would take the `tuner` command with it.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip uninstall --quiet --yes tuner 2>/dev/null || true
	$(PIP_C) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) '$(TORCH)'
	$(PIP_C) -e '.[all,test]'
	touch $@

demo: setup
	$(BIN)/tuner demo prepare
	$(BIN)/tuner study create --space quickstart.yaml --load-if-exists
	$(BIN)/tuner study run quickstart --jobs $(JOBS)
	$(BIN)/tuner study best quickstart
	$(BIN)/tuner study export quickstart --out demo/best-model --force

# The whole suite, CI's command (22 minutes on 2 cores at the last measure; the goal is 15).
test: setup
	$(BIN)/pytest -q -n $(TEST_JOBS) --dist loadgroup

# The inner loop: no server, no Ray, no training (inside 2 minutes). One test:
#   .venv/bin/pytest tests/test_space.py::test_NAME
test-fast: setup
	$(BIN)/pytest -q -n $(TEST_JOBS) -m "not (postgres or ray or training or server or slow)"

lint: setup
	$(BIN)/ruff check tuner trials tests
	$(BIN)/ruff format --check tuner trials tests

bench: setup
	$(BIN)/python tests/benchmarks/trial_overhead.py

# Search quality on the demo LoRA and the simulated workload, 5 seeds × 40 trials (~50 min, 2 cores):
# the table, JSON and plot the README shows, in docs/search-quality/.
quality: setup
	$(PIP_C) -e '.[bench]'
	$(BIN)/python tests/benchmarks/search_quality.py --eval-steps 15 --out docs/search-quality

# Rewrite each pin of constraints.txt with the version .venv has (after `make test` passed there).
constraints: setup
	$(BIN)/pip freeze --exclude-editable | awk -F'==' \
	  'NR == FNR { n = tolower($$1); gsub(/[_.]/, "-", n); sub(/\+.*/, "", $$2); v[n] = $$2; next } \
	   $$1 in v { print $$1 "==" v[$$1]; next } { print }' - constraints.txt > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf demo tuner.db tuner.db-* tuner_artifacts
