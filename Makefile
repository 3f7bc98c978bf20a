# fedcompare: `make demo` runs the main job on a local stack, `make test` passes the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast down status clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with fedcompare and its pinned dependencies

demo: $(STAMP)  ## start the local stack, run federated-compare/local, print the report
	$(BIN)/fedcompare demo

# two workers: the fault and integration stacks spend much of their time waiting, so they overlap well
test: $(STAMP)  ## all tests, the integration tests against a real local stack included
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not integration"

down:  ## stop everything `make demo` / `fedcompare up` started
	@if [ -x $(BIN)/fedcompare ]; then $(BIN)/fedcompare down; else echo "nothing to stop: no $(VENV)"; fi

status:
	$(BIN)/fedcompare status

clean: down
	rm -rf .fedcompare
