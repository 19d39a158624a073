# Two commands on a fresh machine:  `make demo`  and  `make test`.
.PHONY: setup demo test lint pretrain-small base-tapt bases experiments experiments-quick

# The pretrained base every experiment and the demo use (docs/BASES.md).
BASE ?= ../shared/bases/small-h200
DEMO_STEPS ?= 200
VENV = . .venv/bin/activate &&

setup:
	bash scripts/setup.sh

# The first useful result: fine-tune an SST-2 LoRA-Diffusion adaptor on $(BASE) with the main
# job on its embedded defaults (a local Ray runtime, MLflow in ./mlflow.db), register it as
# sst2-demo@demo, then ask the registered model about two reviews (about 9 min on 2 CPU cores).
demo: setup
	$(VENV) python jobs/train.py --task sst2 --base $(BASE) --output-dir runs/demo-sst2 \
	  --max-steps $(DEMO_STEPS) --eval-limit 200 --register sst2-demo --alias demo
	$(VENV) MLFLOW_TRACKING_URI=sqlite:///mlflow.db MLFLOW_LOGGING_LEVEL=WARNING \
	  MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
	  HF_HUB_DISABLE_PROGRESS_BARS=1 python -m mlflow models predict \
	  -m models:/sst2-demo@demo -i scripts/demo_reviews.json -t json --env-manager local

test: setup
	$(VENV) bash scripts/test.sh

lint:
	$(VENV) bash scripts/lint.sh

# Pretrain the `small` base on the shipped corpus on CPU (31 min on 2 cores, docs/BASES.md), then sample.
pretrain-small: setup
	$(VENV) python jobs/pretrain.py --preset small --output-dir runs/base-small --eval-every 250 --json
	$(VENV) python jobs/sample.py --model runs/base-small/model --prompt "The river" --prompt "In 2018, the" --num-samples 2 --seed 0

# The paper's experiments on $(BASE) and a tiny base (Table 12), then docs/RESULTS.md (see
# docs/JOBS.md: jobs/experiments.py). The tiny base is pretrained first when missing.
TINY ?= runs/base-tiny/model
TASK_TEXT = --task-text sst2,cola,trec,agnews --task-text-repeat 2

runs/base-tiny/model/config.json:
	$(VENV) python jobs/pretrain.py --preset tiny --tokenizer $(BASE) --output-dir runs/base-tiny --max-steps 1500 --eval-every 500 $(TASK_TEXT) --no-ray --threads 2

bases: runs/base-tiny/model/config.json

# The CPU task-adaptive base of the earlier results (docs/HISTORY.md), about 25-70 min on 2 cores.
runs/base-tapt/model/config.json:
	$(VENV) python jobs/pretrain.py --preset small --output-dir runs/base-tapt --max-steps 3500 --eval-every 500 $(TASK_TEXT) --no-ray --threads 2

base-tapt: runs/base-tapt/model/config.json

experiments: bases
	$(VENV) python jobs/experiments.py --base $(BASE) --bases $(TINY) --output-dir runs/experiments --tracking-uri sqlite:///runs/experiments/mlflow.db

experiments-quick:
	$(VENV) python jobs/experiments.py --base $(BASE) --quick --output-dir runs/experiments-quick --tracking-uri sqlite:///runs/experiments-quick/mlflow.db
