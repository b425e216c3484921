# Two commands: `make demo` and `make test`. Both create .venv once (pinned versions from
# constraints.txt) and reuse it while setup.cfg, pyproject.toml and constraints.txt are unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint setup clean-venv

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e ".[test,slurm]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m runs.pipeline --preset demo --out demo_out

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
