# mitwelten-storage: `make demo` shows the tool at work, `make test` runs the test suite.
# `make serve` runs the storage service on throwaway services, with a token to try it with.
# All need only Python 3 (3.10 to 3.13) and make: they create .venv and install into it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# One stamp per requirements file, each after the one it includes (-r): a changed file reinstalls
# it and everything above it.
STAMP     := $(VENV)/.installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: install demo serve test bench clean

# What a workstation runs: the tool's own dependencies (requirements.txt), nothing for tests.
install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r requirements.txt
	touch $@

# The service's dependencies and the tests' (a throwaway PostgreSQL and S3 server among them):
# requirements-dev.txt includes requirements-service.txt. The demo and `make serve` need them too.
$(DEV_STAMP): $(STAMP) requirements-service.txt requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	touch $@

demo: $(DEV_STAMP)
	$(PY) -m devkit.demo

serve: $(DEV_STAMP)
	$(PY) -m devkit.serve

test: $(DEV_STAMP)
	$(PY) -m pytest -q tests

$(VENV)/.bench-installed: $(DEV_STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
