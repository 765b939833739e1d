# The two commands of the README. Both install first (scripts/setup.sh: .venv, CPU torch
# pinned, rlcore editable); the install is skipped when nothing it depends on changed.
.PHONY: setup train test bench

export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

setup:
	@bash scripts/setup.sh

train: setup
	.venv/bin/rlcore train recipe=opo_math

test: setup
	.venv/bin/python -m pytest -q tests

bench: setup
	.venv/bin/python bench/step_vs_trl.py
