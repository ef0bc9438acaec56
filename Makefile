# One command to set up and run the demo, one to set up and run the tests (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(PY) -m train.demo --out outputs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.bench_train
	$(PY) -m bench.bench_sample

clean:
	rm -rf outputs wandb
