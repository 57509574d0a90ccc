# Two commands on a fresh machine (README, "Start here"):
#   make quantize    # creates .venv on first use, installs torch + cbq, runs `cbq quantize`
#   make test        # the same set-up, then the whole test suite (what CI runs)
# More: make test-fast (pytest -m "not slow"), make quantize ARGS="--setting W3A16g64".
# PYTHON picks the interpreter for the venv (>= 3.10); TORCH the torch requirement (the pin
# is the CPU wheel this project's CI uses; on a GPU machine use TORCH=torch).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.cbq-installed

.PHONY: quantize test test-fast clean-venv

$(STAMP): pyproject.toml setup.py CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install -v -e ".[test]" > $(VENV)/build.log 2>&1 || \
	  { tail -n 60 $(VENV)/build.log; echo "make: pip install of cbq failed (log: $(VENV)/build.log)"; exit 1; }
	touch $(STAMP)

quantize: $(STAMP)
	$(BIN)/cbq quantize $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
