# make demo  - create .venv if missing, then train DNC and linear models on the built-in digits (CPU)
# make test  - create .venv if missing, then run the test suite
# make mutation - mutation testing (mutmut) of the core modules against their fast tests; slow, not part
#   of make test (TESTING.md records the last score)
# make bench - head-overhead benchmark (reduced sizes on CPU, full sizes on a GPU)
# make evidence DATA=DIR - DNC vs linear with the pretrained backbone, 3 seeds, on held-out test splits;
#   DIR holds cifar10-train-jpeg.tar.gz, camvid-train-240x180.tar.gz and camvid-val-240x180.tar.gz
#   (about 2 hours on 2 CPU cores; DEVICE=cuda on a GPU)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

DEVICE ?= auto

.PHONY: demo test mutation bench evidence clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,pretrained,export,tensorboard]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/dnc demo

test: $(VENV)/.installed
	$(PY) -m pytest

mutation: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[mutation]'
	rm -rf mutants
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $(if $(JOBS),--max-children $(JOBS))
	$(VENV)/bin/mutmut results

bench: $(VENV)/.installed
	$(PY) benchmarks/head_overhead.py

evidence: $(VENV)/.installed
	test -n "$(DATA)" || { echo "usage: make evidence DATA=DIR (the folder holding the archives)"; exit 2; }
	$(PY) benchmarks/evidence_data.py --cifar $(DATA)/cifar10-train-jpeg.tar.gz \
		--camvid-train $(DATA)/camvid-train-240x180.tar.gz --camvid-val $(DATA)/camvid-val-240x180.tar.gz --out work_dirs/evidence_data
	$(PY) benchmarks/evidence.py --data work_dirs/evidence_data --out work_dirs/evidence --device $(DEVICE)

clean:
	rm -rf $(VENV) work_dirs .pytest_cache mutants
