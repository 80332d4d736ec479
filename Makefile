# edgellm: two commands for a fresh machine, `make run` and `make test` (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODEL   ?= smollm2
PROMPT  ?= The capital of France is
NATIVE_SRC := $(wildcard native/*.c native/*.h native/*.py) $(wildcard setup.py)

.PHONY: install run test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the packaging or the native sources change (the C core is built at install time).
$(STAMP): $(BIN)/python pyproject.toml $(NATIVE_SRC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/edgellm pull $(MODEL)
	$(BIN)/edgellm run $(MODEL) -p "$(PROMPT)" -n 64

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf build *.egg-info edgellm/_native*.so
