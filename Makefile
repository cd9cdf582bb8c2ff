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

# The main job on the embedded default model (tiny Gemma 3n, deterministic random weights: the text means nothing,
# but every backend prints the same text).
run: install
	rm -rf out/default
	$(BIN)/g3n bundle --out out/default
	$(BIN)/g3n generate --bundle out/default/android --backend litertlm "Write a short story about a robot."
	$(BIN)/g3n generate --bundle out/default/executorch --backend executorch "Write a short story about a robot."

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
