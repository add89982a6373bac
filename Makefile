# Two commands from a fresh clone (only Python needed): `make demo` and `make test`.
# Each creates .venv and installs kdpipe with its extras on first use, pinned by constraints.txt (scripts/lock.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,cpu,demo,teachers,storage,interop
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/kdpipe demo --out demo-out

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
