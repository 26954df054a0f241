# Each target creates .venv when missing and installs what it needs (pins: constraints.txt).
# torch is installed first and pinned: elsewhere an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
PYTEST_ARGS ?= -n 2

.PHONY: test bench aot tune gpu-session clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	touch $@

# The tests run `python -m bench --smoke` (plot and baselines included), so they need the bench extra.
$(VENV)/.test: $(VENV)/.base pyproject.toml constraints.txt
	$(PIP) -e ".[torch,jax,tpu,bench,test]"
	touch $@

test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS) $(ARGS)

bench: $(VENV)/.test
	$(PY) -m bench $(ARGS)

# Tune decode configs on this machine's GPU into the user cache (qkernels.tuning); ARGS to override.
tune: $(VENV)/.test
	$(PY) -m qkernels.tune $(or $(ARGS),--recipes w4a16-g128,w8a16,w8a8 --shapes decode-sweep)

# On a CUDA GPU (e.g. a lent H100): the kernel tests compiled, the package's tuned decode table for
# this device kind (qkernels/tuned/triton-<device>.json, to commit), then the benchmark suite saved.
gpu-session: $(VENV)/.test
	$(PY) -m pytest -q tests/test_triton_decode.py tests/test_triton_kernels.py
	$(PY) -m qkernels.tune --recipes w4a16-g128,w8a16,w8a8 --shapes decode-sweep --ship
	$(PY) -m bench --save

aot: $(VENV)/.test
	$(PY) -m qkernels.aot --target sm_80
	$(PY) -m qkernels.aot --target sm_90

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
