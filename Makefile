# Two set-up commands on a fresh machine (see README): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SIGN_VENV ?= .venv-sign

.PHONY: install run test long compare pins bench real-checkpoints real-scale clean

install: $(VENV)/.installed

# From constraints.txt: the versions the tests passed with, so that a new release inside pyproject's ranges cannot
# change a fresh machine's result unnoticed.
# OpenSSF model-signing (g3n sign / verify) gets a venv of its own, its command linked into $(BIN): its dependencies
# cannot be installed beside litert-converter's (contract/signing.py).
$(VENV)/.installed: pyproject.toml constraints.txt constraints-sign.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]' -c constraints.txt
	$(PYTHON) -m venv $(SIGN_VENV)
	$(SIGN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r constraints-sign.txt
	ln -sf $(abspath $(SIGN_VENV))/bin/model_signing $(BIN)/model_signing
	touch $@

# Refresh the pins: the newest releases pyproject.toml allows, in a venv of their own, frozen into constraints.txt;
# then the suite reinstalls from them and runs. Commit constraints.txt if it passes.
pins:
	rm -rf .venv-pins
	$(PYTHON) -m venv .venv-pins
	.venv-pins/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	(echo "# The versions the tests passed with (make pins refreshes them; pyproject.toml keeps the ranges for library users)."; \
	 .venv-pins/bin/python -m pip freeze --exclude-editable) > constraints.txt
	rm -rf .venv-pins
	$(PYTHON) -m venv .venv-pins
	.venv-pins/bin/python -m pip install --quiet --disable-pip-version-check model-signing pyOpenSSL
	(sed -n '/^#/p' constraints-sign.txt; .venv-pins/bin/python -m pip freeze) > constraints-sign.txt.new
	mv constraints-sign.txt.new constraints-sign.txt
	rm -rf .venv-pins
	$(MAKE) test

# The main job on the embedded default model (tiny Gemma 3n with its vision and audio encoders, deterministic random
# weights: the text means nothing, but every backend prints the same text). The last three lines prompt with an image
# and an audio clip (models/assets/make_media.py): on ExecuTorch, on ExecuTorch's stock LLM runner (what its demo
# apps run) and on the float PyTorch reference.
run: install
	rm -rf out/default
	$(BIN)/g3n bundle --out out/default
	$(BIN)/g3n generate --bundle out/default/android --backend litertlm "Write a short story about a robot."
	$(BIN)/g3n generate --bundle out/default/executorch --backend executorch "Write a short story about a robot."
	$(BIN)/g3n generate --bundle out/default/executorch --backend executorch --image models/assets/sample.png --audio models/assets/sample.wav "Describe this."
	$(BIN)/g3n generate --bundle out/default/executorch --backend executorch-runner --image models/assets/sample.png --audio models/assets/sample.wav "Describe this."
	$(BIN)/g3n generate --bundle out/default/executorch --backend torch --image models/assets/sample.png --audio models/assets/sample.wav "Describe this."

test: install
	$(BIN)/python -m pytest -q --durations=25

# The tests that take minutes each, run by .ci/run after `make test`: the exporters over a grid of small valid
# configs (tests/test_config_sweep.py), the default bundles rebuilt in two processes, byte for byte
# (tests/test_reproducible.py), and g3n bench --quick (tests/test_bench.py).
long: install
	$(BIN)/python -m pytest -q --long --dist load tests/test_bench.py tests/test_config_sweep.py tests/test_reproducible.py

# The numerics gate: bundles of the default model at every quantization level, each Linux backend against the float
# PyTorch model; prints report.md and fails past a limit of ci/thresholds.json (report in out/compare).
compare: install
	rm -rf out/compare
	$(BIN)/g3n compare --report out/compare --jobs 2

# Speed against the field (issue 19's rows, every one a ratio measured side by side in one run; not in .ci/run): the
# scaled E2B-shaped model's rows (about an hour on 2 cores), then the published-size encoders' (vision and audio).
# Reports in out/bench and out/bench-encoders (bench.md, bench.json, bench.png); exports kept in out/bench-work.
bench: install
	rm -rf out/bench out/bench-encoders
	$(BIN)/g3n bench --report out/bench --work out/bench-work --only litertlm,ttft,kv-shared,roofline,transformers,slice,ple
	$(BIN)/g3n bench --report out/bench-encoders --work out/bench-work --only vision,audio

# Real scale, step 1: random checkpoints laid out as the published E2B and E4B (11 and 16 GB, bf16), each loaded by
# transformers for one forward pass; time and peak RSS of each step in out/real/checkpoints.md. Not in .ci/run.
real-checkpoints: install
	$(BIN)/python ci/real_checkpoints.py --out out/real

# Real scale, step 2 (in progress: the cells that run today, ci/real_scale.py's CELLS): `g3n export` of those
# checkpoints, each cell in a fresh process, with its time, peak RSS (whole process tree, and its anonymous part) and
# bytes written, then (ExecuTorch cells) a 256-token prompt and 16 tokens in our runtime: tokens/s, time to first
# token, run peak RSS, PLE table resident; in out/real/real-scale.md. An hour a cell on 2 cores. Then the PLE table
# alone at int8 and int4 (ci/real_ple.py: bytes, write time, error of random rows against bf16; out/real/real-ple.md).
# Not in .ci/run.
real-scale: real-checkpoints
	$(BIN)/python ci/real_scale.py --out out/real
	$(BIN)/python ci/real_ple.py --out out/real

clean:
	rm -rf $(VENV) $(SIGN_VENV)
