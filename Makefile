# The two commands of the README: `make demo` (the main job) and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test lint deploy-tools
setup:
	bash scripts/setup-venv.sh

demo: setup
	$(PY) -m truepolicy.cli demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# kubectl (kustomize), kubernetes-validate, checkov for tests/test_deploy.py, in .venv-deploy.
deploy-tools:
	bash scripts/setup-deploy-venv.sh

test: lint deploy-tools
	$(PY) -m pytest
