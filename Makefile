# Everything runs in .venv at the repo root, made here from PyPI: nothing relies on
# what happens to be installed on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gpunet-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,bench,browser]"
	touch $(STAMP)

## make demo: start the embedded network and run notebooks/quickstart.ipynb headless
demo: $(STAMP)
	$(BIN)/python -m gpunet.demo notebooks/quickstart.ipynb

## make test: the whole suite (unit + end-to-end against real local servers)
test: $(STAMP)
	$(BIN)/python -m pytest

## make bench: every benchmark in benchmarks/ (prints figures; never fails on a time)
bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache notebooks/*.executed.ipynb
