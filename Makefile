# mitwelten-storage: `make demo` shows the tool at work, `make test` runs the test suite.
# `make serve` runs the storage service on throwaway services, with a token to try it with.
# All need only Python 3 (3.10 to 3.13) and make: they create .venv and install into it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo serve test bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-service.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m devkit.demo

serve: $(STAMP)
	$(PY) -m devkit.serve

test: $(STAMP)
	$(PY) -m pytest -q tests

$(VENV)/.bench-installed: $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
