# Everything runs in .venv at the repo root, made here from PyPI: nothing relies on
# what happens to be installed on the machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gpunet-installed

KERNEL := gpunet

.PHONY: demo kernel lab test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,bench,browser]"
	touch $(STAMP)

## make kernel: register .venv as the Jupyter kernel "Python (gpunet)", which the notebooks name
kernel: $(STAMP)
	$(BIN)/python -m ipykernel install --user --name $(KERNEL) --display-name "Python (gpunet)"

## make demo: start the embedded network and run notebooks/quickstart.ipynb headless
demo: kernel
	$(BIN)/python -m gpunet.demo notebooks/quickstart.ipynb

## make lab: JupyterLab (installed into .venv) on notebooks/, with the gpunet kernel
lab: kernel
	$(BIN)/pip install -q --disable-pip-version-check -e ".[lab]"
	$(BIN)/jupyter lab notebooks/

## make test: the whole suite (unit + end-to-end against real local servers)
test: $(STAMP)
	$(BIN)/python -m pytest

## make bench: every benchmark in benchmarks/ (prints figures; never fails on a time)
bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache notebooks/*.executed.ipynb
