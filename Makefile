# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/eight_schools_noncentered

.PHONY: demo test test-fast lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first: an unpinned resolve would pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,dask,nutpie]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vimodels compare eight_schools_noncentered --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# one pytest worker per core; the NUTS reference cache of the catalog tests is shared
test: lint
	$(BIN)/python -m pytest -q -n auto --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -x

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
