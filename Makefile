# Two entry points: `make search` (the main job) and `make test` (the suite CI runs).
# Also: `make test-fast` (everything not marked slow), `make docs` (the documentation site), `make lint`.
VENV ?= .venv
PY := $(VENV)/bin/python
# A small real search: OrganMNIST3D at 28^3 (downloaded by medmnist, or --data-root), 20 trials.
SEARCH_ARGS ?= --dataset organmnist3d --name organmnist3d-quick --n-trials 20 --max-epochs 10

.PHONY: search test test-fast docs lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

search: $(VENV)/.installed
	$(VENV)/bin/nas3d search $(SEARCH_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

docs: $(VENV)/.installed
	$(VENV)/bin/mkdocs build --strict

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check nas3d tests bench
