"""Control: can the base carry the prompt's content to the answer position at all?

    python benchmarks/copy_control.py --base runs/base-small/model [--method lora_diffusion]

1. Sensitivity: the base's hidden state at the answer position, and its log-probability of each
   label word's first token, for two prompts that differ only in "the answer is positive" vs
   "... negative". A base that uses context moves; one that does not, does not.
2. A copy task: SST-2 training sentences (first 4,500) with "the answer is <label>" appended and
   a random label, so the answer is in the prompt; trains `--method` for `--max-steps` steps
   (the recipe of `jobs/train.py`) and evaluates on 200 held-out examples. Chance is 50%.
The task's files are written to a temporary data directory (the shipped data is only read).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from jobs.common import add_set_flag
from lora_diffusion.config import apply_overrides
from lora_diffusion.data import collate, encode_prompt
from lora_diffusion.finetune import FinetuneConfig, finetune
from lora_diffusion.models import load_base
from lora_diffusion.tasks import TASKS, Task, resolve_data_dir
from lora_diffusion.training import TrainConfig

WORDS = ("negative", "positive")


@torch.no_grad()
def sensitivity(base, tok) -> None:
    rows = [
        encode_prompt(tok, f"review: a great movie . the answer is {w}\nsentiment:", 128, 4)
        for w in WORDS
    ]
    b = collate(rows, tok.pad_token_id)
    h = base.hidden_states(b["input_ids"], b["attention_mask"])
    ha, hb = h[0][b["target_mask"][0]], h[1][b["target_mask"][1]]
    print(f"answer-state change between the two prompts: {float((ha - hb).norm() / ha.norm()):.4f}")
    first = [tok(w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    for i, w in enumerate(WORDS):
        lp = base.output_head(h[i][b["target_mask"][i]])[0].log_softmax(-1)
        scores = [f"log p({x}) {float(lp[t]):.4f}" for x, t in zip(WORDS, first, strict=True)]
        print(f"prompt says {w}: " + ", ".join(scores))


def write_copy_task(data_dir: Path, out: Path) -> None:
    rng = random.Random(0)
    lines = (data_dir / "sst2" / "train.tsv").read_text().splitlines()[1:4501]
    (out / "copy").mkdir(parents=True, exist_ok=True)
    for split, part in (("train", lines[:4000]), ("dev", lines[4000:])):
        with open(out / "copy" / f"{split}.tsv", "w") as f:
            f.write("sentence\tlabel\n")
            for line in part:
                y = rng.randint(0, 1)
                f.write(f"{line.split(chr(9))[0]} . the answer is {WORDS[y]}\t{y}\n")
    (out / "copy" / "labels.txt").write_text("\n".join(WORDS) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--method", default="lora_diffusion")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    add_set_flag(p, "config override, e.g. adaptor.condition_norm=none")
    a = p.parse_args(argv)
    base, tok = load_base(a.base)
    sensitivity(base, tok)
    tmp = Path(tempfile.mkdtemp(prefix="copy-control-"))
    write_copy_task(resolve_data_dir(a.data_dir), tmp)
    if "copy" not in TASKS:
        TASKS.register(
            "copy",
            Task(
                name="copy",
                instruction="review: {text}\nsentiment:",
                label_words=WORDS,
                splits={"train": "train", "eval": "dev"},
                local_dir="copy",
                hub_id="none",
                hub_splits={"train": "train", "eval": "validation"},
            ),
        )
    cfg = FinetuneConfig(
        base=a.base,
        output_dir=str(tmp / "run"),
        task="copy",
        method=a.method,
        data_dir=str(tmp),
        eval_limit=200,
        forgetting_blocks=0,
        threads=a.threads,
        train=TrainConfig(lr=a.lr, max_steps=a.max_steps, batch_size=32, warmup_steps=30),
    )
    cfg = apply_overrides(cfg, a.overrides)
    r = finetune(cfg, progress=False)
    keys = ("train_nll", "eval_accuracy", "eval_valid_rate", "eval_accuracy_scoring")
    print(a.method, {k: round(r[k], 4) for k in keys})
    return r


if __name__ == "__main__":
    main()
