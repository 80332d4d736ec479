# edgellm: two commands for a fresh machine, `make run` and `make test` (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
MODEL   ?= smollm2
PROMPT  ?= The capital of France is
NATIVE_SRC := $(wildcard native/*.c native/*.h native/*.py) $(wildcard setup.py)

.PHONY: install install-dev browser-deps run test test-arm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the packaging or the native sources change (the C core is built at install time).
$(VENV)/.installed: $(BIN)/python pyproject.toml $(NATIVE_SRC)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# Test tools too; torch goes in first and alone so pip takes the CPU build on this machine's disk.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/edgellm pull $(MODEL)
	$(BIN)/edgellm run $(MODEL) -p "$(PROMPT)" -n 64

# Headless Chromium for tests/test_serve_page.py (Debian's packages; the test skips without them)
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "chromium not installed: the chat page test will skip"

test: install-dev browser-deps
	$(BIN)/python -m pytest -q
	$(MAKE) test-arm

# The NEON kernels as a Raspberry Pi runs them: cross-compiled, run under qemu-aarch64 as a
# Cortex-A72 (Pi 4, no dot product) and a Cortex-A76 (Pi 5, dot product). Installs the toolchain if missing.
test-arm:
	bash native/tests/run_arm.sh

clean:
	rm -rf build *.egg-info edgellm/_native*.so
