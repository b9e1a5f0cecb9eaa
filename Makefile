# The two set-up commands: `make demo` and `make test`. Both create .venv if missing.
PY_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint install clean-zoo

install: $(STAMP)

# --system-site-packages lets a machine that already has torch (a GPU image) keep its own build.
# Where none is importable, torch==2.13.0 takes the CPU wheel already on disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/install_corpora.sh
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check moeshare kernels scripts tests
	$(VENV)/bin/ruff format --check moeshare kernels scripts tests
