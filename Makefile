# Fresh clone -> working environment, without pulling a multi-GB CUDA torch onto a CPU-only machine.
#   make test   create .venv, install, run the test suite
#   make demo   create .venv, install, run the demo
# A torch that the system python already imports is kept (the venv then sees system site-packages);
# otherwise TORCH_SPEC is installed (the CPU build on this machine). Override: make TORCH_SPEC=torch==2.6.0 test
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vramplan-installed

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "using the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[runtime,test,fleet]"
	@touch $(STAMP)

# Test workers (pytest-xdist): the files are spread over TEST_WORKERS processes, each file's tests in
# one of them (--dist loadfile: a file's module fixtures and its Ray cluster stay in one process);
# one torch thread per worker unless OMP_NUM_THREADS says (two workers on two cores).
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

demo: $(STAMP)
	$(PY) -m vramplan.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_svd_memory.py

clean:
	rm -rf $(VENV) build *.egg-info
