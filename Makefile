# edgellm: two commands for a fresh machine, `make run` and `make test` (see README.md).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
MODEL   ?= smollm2
PROMPT  ?= What is the capital of France? Answer in one word.
NATIVE_SRC := $(wildcard native/*.c native/*.h native/*.py) $(wildcard setup.py)

.PHONY: install install-dev browser-deps run test fuzz test-arm test-gpu wheels test-pi test-pi-or-skip clean

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
	$(MAKE) test-pi-or-skip

# test-pi within make test (~7 min, the arm64 root cached after its first ~3 min); exit 3 from test_pi.sh means
# this machine cannot run an arm64 root at all (no root, no binfmt_misc): said loudly, not failed
test-pi-or-skip: install-dev
	{ bash packaging/build_wheels.sh && bash packaging/test_pi.sh; } || \
	  { rc=$$?; [ $$rc -eq 3 ] && echo "make test: test-pi SKIPPED (see above)"; [ $$rc -eq 3 ]; }

# The fuzz targets at length (make test runs each briefly): GGUF reader, tokenizer, chat templates, GBNF, JSON schema,
# session files, HTTP requests. FUZZ_EXAMPLES per target.
FUZZ_EXAMPLES ?= 5000
fuzz: install-dev
	EDGELLM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/test_fuzz.py tests/test_gguf_fuzz.py \
	  tests/test_serve_fuzz.py

# The GPU backend on a machine with an NVIDIA GPU: CuPy and NVRTC from PyPI (no CUDA toolkit), then tests/test_cuda.py
# (which skips everywhere else). CUDA=cuda12 for a CUDA 12 driver.
CUDA ?= cuda
test-gpu: install-dev
	$(BIN)/python -m pip install --quiet -e ".[$(CUDA)]"
	$(BIN)/python -m pytest -q tests/test_cuda.py

# The NEON kernels as a Raspberry Pi runs them: cross-compiled, run under qemu-aarch64 as a
# Cortex-A72 (Pi 4, no dot product) and a Cortex-A76 (Pi 5, dot product). Installs the toolchain if missing.
test-arm:
	bash native/tests/run_arm.sh

# Binary wheels into dist/: Linux x86-64 and aarch64 (cross-compiled), cp311-abi3, manylinux tagged from the glibc
# symbol versions the core imports, checked; and the sdist (packaging/build_wheels.sh).
wheels: install-dev
	bash packaging/build_wheels.sh

# The whole program on an aarch64 Python under qemu, as a Pi 4 (Cortex-A72) and a Pi 5 (Cortex-A76): the wheel from
# dist/ installed in an arm64 Debian root (cached in ~/.cache/edgellm-pi), edgellm run / tokenize, llama.cpp's
# fixtures, the numba fallback (packaging/test_pi.sh). Needs root (debootstrap, chroot, binfmt_misc).
test-pi: wheels
	bash packaging/test_pi.sh

clean:
	rm -rf build dist *.egg-info edgellm/_native*.so
