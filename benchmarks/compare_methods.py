"""Every tuning method on one task and base, each at a small learning-rate grid, as one table.

    python benchmarks/compare_methods.py --base runs/base-small/model --task sst2 \\
        --max-steps 400 --holdout 1000 --output-dir runs/compare-sst2

For each method and each learning rate in its grid (the method's default times 0.3, 1 and 3,
or --lr-factors), trains with `jobs/train.py`'s recipe (`finetune.finetune`) on the same data,
seed, batch and steps, and evaluates on the same eval examples. The learning rate is chosen
honestly: the last --holdout rows of the train split are never trained on, every run is scored
on them (`val_accuracy_scoring`, candidate scoring; ties go to the lower `val_gold_loss`), and
per method the best run on them is kept; the eval split (SST-2's dev set: it has no labelled
test split) is only reported. `--holdout 0` chooses on the eval split instead, and the table
says so. Every run is listed in `all_runs.json`. Prints a markdown table and writes
`results.json`, `table.md` and `plots/lr_sweep.png` under --output-dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs.common import add_set_flag
from lora_diffusion.config import apply_overrides
from lora_diffusion.finetune import FinetuneConfig, finetune
from lora_diffusion.methods import METHODS
from lora_diffusion.training import TrainConfig

COLUMNS = (
    ("method", "method", "{}"),
    ("lr", "lr", "{:g}"),
    ("val_accuracy_scoring", "val acc (scoring)", "{:.3f}"),
    ("trainable_pct", "trainable %", "{:.3f}"),
    ("storage_mb", "storage MB", "{:.2f}"),
    ("train_loss", "train loss", "{:.3f}"),
    ("eval_accuracy", "dev acc (gen.)", "{:.3f}"),
    ("eval_valid_rate", "valid", "{:.2f}"),
    ("eval_accuracy_scoring", "dev acc (scoring)", "{:.3f}"),
    ("eval_auc_scoring", "dev AUC", "{:.3f}"),
    ("convergence_step", "converged at", "{}"),
    ("forgetting", "forgetting", "{:+.4f}"),
    ("train_seconds", "train s", "{:.0f}"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base model folder")
    p.add_argument("--task", default="sst2", help="task name (default: sst2)")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma list (default: every method)"
    )
    p.add_argument("--lr-factors", default="0.3,1,3", help="multiples of each method's default")
    p.add_argument("--max-steps", type=int, default=400, help="optimizer steps a run (400)")
    p.add_argument("--batch-size", type=int, default=32, help="examples a step (32)")
    p.add_argument("--train-limit", type=int, default=None, help="train rows (default: all)")
    p.add_argument("--eval-limit", type=int, default=None, help="eval rows (default: all)")
    p.add_argument(
        "--holdout",
        type=int,
        default=1000,
        help="last N train rows, never trained on, that choose each method's learning rate "
        "(0: choose on the eval split)",
    )
    p.add_argument(
        "--forgetting-blocks", type=int, default=32, help="corpus blocks forgetting reads (32)"
    )
    p.add_argument("--data-dir", default=None, help="task data folder (default: configured)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_set_flag(p, "dotted FinetuneConfig override for every run (repeatable)")
    p.add_argument("--output-dir", required=True, help="runs and the table go here")
    return p.parse_args(argv)


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * len(COLUMNS)]
    for r in rows:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    out = Path(a.output_dir)
    factors = [float(x) for x in a.lr_factors.split(",")]
    runs = []
    for method in a.methods.split(","):
        default_lr = METHODS.get(method).default_lr  # unknown names fail before any training
        for f in factors:
            lr = default_lr * f
            cfg = FinetuneConfig(
                base=a.base,
                output_dir=str(out / method / f"lr{lr:g}"),
                task=a.task,
                method=method,
                data_dir=a.data_dir,
                train_limit=a.train_limit,
                eval_limit=a.eval_limit,
                holdout=a.holdout,
                forgetting_blocks=a.forgetting_blocks,
                threads=a.threads,
                train=TrainConfig(
                    lr=lr,
                    max_steps=a.max_steps,
                    batch_size=a.batch_size,
                    warmup_steps=min(50, a.max_steps // 10),
                    seed=a.seed,
                ),
            )
            cfg = apply_overrides(cfg, a.overrides)
            print(f"== {method} lr {lr:g}", flush=True)
            r = finetune(cfg, progress=False)
            r.pop("eval_examples", None)
            runs.append({**r, "lr": lr})
            out.mkdir(parents=True, exist_ok=True)  # written as it goes: a long sweep can be read
            (out / "all_runs.json").write_text(json.dumps(runs, indent=2, default=str))
            print(table([runs[-1]]).splitlines()[-1], flush=True)
    rows = best_per_method(runs, "val" if a.holdout else "eval")
    chosen = (
        f"Each method's learning rate chosen on the last {a.holdout} rows of the train split "
        "(never trained on); dev columns are reported only."
        if a.holdout
        else "Each method's learning rate chosen on the eval split it reports (--holdout 0)."
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "all_runs.json").write_text(json.dumps(runs, indent=2, default=str))
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str))
    (out / "table.md").write_text(f"{chosen}\n\n{table(rows)}\n\nEvery run:\n\n{table(runs)}\n")
    _plot(runs, out / "plots" / "lr_sweep.png", bool(a.holdout))
    print(chosen)
    print(table(rows))
    return rows


def best_per_method(runs: list[dict], split: str) -> list[dict]:
    """Per method (in first-seen order), the run with the best `{split}_accuracy_scoring`,
    ties broken by the lower `{split}_gold_loss`."""
    score = lambda r: (r[f"{split}_accuracy_scoring"], -r[f"{split}_gold_loss"])
    methods = dict.fromkeys(r["method"] for r in runs)
    return [max((r for r in runs if r["method"] == m), key=score) for m in methods]


def _plot(runs: list[dict], path: Path, holdout: bool) -> None:
    """Scoring accuracy against learning rate, one line per method: on the held-out train rows
    (what chooses) beside the dev set (what is reported)."""
    from lora_diffusion.plots import pyplot, save_figure

    plt = pyplot()
    panels = [("val", "held-out train rows (chooses)")] if holdout else []
    panels.append(("eval", "dev (reported)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    for ax, (split, title) in zip(axes[0], panels, strict=True):
        for method in dict.fromkeys(r["method"] for r in runs):
            rs = sorted((r for r in runs if r["method"] == method), key=lambda r: r["lr"])
            ys = [r[f"{split}_accuracy_scoring"] for r in rs]
            ax.plot([r["lr"] for r in rs], ys, "o-", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("accuracy (scoring)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
