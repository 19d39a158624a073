# Two commands on a fresh machine:  `make demo`  and  `make test`.
.PHONY: setup demo test lint bases experiments experiments-quick

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

# The paper's experiments on the small base and a tiny one (Table 12), then docs/RESULTS.md
# (see README: jobs/experiments.py). The bases are pretrained first when missing.
BASE ?= runs/base-tapt/model
TINY ?= runs/base-tiny/model
TASK_TEXT = --task-text sst2,cola,trec,agnews --task-text-repeat 2

runs/base-tapt/model/config.json:
	. .venv/bin/activate && python jobs/pretrain.py --preset small --output-dir runs/base-tapt --max-steps 3500 --eval-every 500 $(TASK_TEXT) --no-ray --threads 2

runs/base-tiny/model/config.json: runs/base-tapt/model/config.json
	. .venv/bin/activate && python jobs/pretrain.py --preset tiny --tokenizer runs/base-tapt/model --output-dir runs/base-tiny --max-steps 1500 --eval-every 500 $(TASK_TEXT) --no-ray --threads 2

bases: runs/base-tapt/model/config.json runs/base-tiny/model/config.json

experiments: bases
	. .venv/bin/activate && python jobs/experiments.py --base $(BASE) --bases $(TINY) --output-dir runs/experiments --tracking-uri sqlite:///runs/experiments/mlflow.db

experiments-quick: runs/base-tapt/model/config.json
	. .venv/bin/activate && python jobs/experiments.py --base $(BASE) --quick --output-dir runs/experiments-quick --tracking-uri sqlite:///runs/experiments-quick/mlflow.db
