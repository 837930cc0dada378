# The README's commands. Each creates .venv when it is missing and installs the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test sweep lint format clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)  # one device, then the tests that need a mesh of 8 simulated CPU devices
	$(PY) -m pytest -n 2
	$(PY) -m pytest -n 2 -m mesh

sweep: $(STAMP)
	$(PY) -m experiments.sweep --config=configs/context_sweep.py

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:  # keeps results/: measured sweeps are not build products
	rm -rf $(VENV) .pytest_cache
