# Two commands on a fresh machine:  `make demo`  and  `make test`.
.PHONY: setup demo test lint experiments experiments-quick

setup:
	bash scripts/setup.sh

# The main job on the embedded default: pretrain the `small` base on the shipped corpus
# (25-30 min on 2 CPU cores), then sample from it.
demo: setup
	. .venv/bin/activate && python jobs/pretrain.py --preset small --output-dir runs/base-small --eval-every 250 --json
	. .venv/bin/activate && python jobs/sample.py --model runs/base-small/model --prompt "The river" --prompt "In 2018, the" --num-samples 2 --seed 0

test: setup
	. .venv/bin/activate && bash scripts/test.sh

lint:
	. .venv/bin/activate && ruff check lora_diffusion jobs tests && ruff format --check lora_diffusion jobs tests

# The paper's experiments on the small base, then docs/RESULTS.md (see README: jobs/experiments.py).
BASE ?= runs/base-small2/model
experiments:
	. .venv/bin/activate && python jobs/experiments.py --base $(BASE)

experiments-quick:
	. .venv/bin/activate && python jobs/experiments.py --base $(BASE) --quick
