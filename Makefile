# `make demo`: set up .venv and compare the four balancers on Multi-Fashion.
# `make test`: set up .venv, lint, type-check and run the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# the local CPU build of torch, installed before anything that depends on torch
TORCH := torch==2.13.0

.PHONY: setup data browser demo test lint typecheck unit clean

setup: $(STAMP)

# peers compared in tests and benchmarks; --no-deps keeps them from replacing the CPU torch
PEERS := libmtl==1.1.5 torchjd==0.18.0 torch-rechub==0.9.0 peft==0.21.2 accelerate==1.15.0 psutil==7.2.2

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,plots,peers,tabular,hf,loggers]'
	$(BIN)/python -m pip install --quiet --no-deps $(PEERS)
	touch $(STAMP)

# Debian's real Fashion-MNIST, when it is missing and apt can install it
data:
	@if [ ! -f $(FASHION) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else \
	    echo "Fashion-MNIST is missing and apt-get is not available as root:"; \
	    echo "  install dataset-fashion-mnist, or set data.root in the config"; \
	  fi; \
	fi

# Debian's chromium, which tests/test_report_browser.py starts headless to check the HTML report
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium (for the report's browser test)"; \
	    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null \
	      || echo "could not install chromium: tests/test_report_browser.py will be skipped"; \
	  else \
	    echo "chromium is missing and apt-get is not available as root:"; \
	    echo "  install chromium, or tests/test_report_browser.py is skipped"; \
	  fi; \
	fi

demo: setup data
	$(BIN)/manytask compare configs/multi_fashion_compare.yaml --methods ew,uw,dwa,rlw --seeds 2 --overwrite

LINTED := $(wildcard src tests benchmarks)

lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

typecheck: setup
	$(BIN)/mypy

unit: setup data browser
	$(BIN)/python -m pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
