# Two set-up commands on a fresh machine (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# The main job on the embedded default model (tiny Gemma 3n, deterministic random weights: the tokens mean nothing).
run: install
	$(BIN)/g3n info
	$(BIN)/g3n generate --token-ids 2,105,200,107 --max-new-tokens 12

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
