# The two commands of the README: `make demo` (the main job) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint
setup:
	bash scripts/setup-venv.sh

demo: setup
	$(PY) -m truepolicy.cli demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: lint
	$(PY) -m pytest
