# One command to install and run the demo, one to run the tests (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench lint asyncapi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/cipherface weights --log-level WARNING >/dev/null

demo: install
	$(BIN)/cipherface demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_search.py

lint: install
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check cipherface agents tests benchmarks

asyncapi: install
	$(BIN)/python -m cipherface.asyncapi > docs/asyncapi.yaml
