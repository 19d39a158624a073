"""Fine-tune a frozen base on a task (LoRA-Diffusion or a baseline), save it and evaluate it.

    python jobs/train.py --method lora_diffusion --task sst2 --base runs/base-small/model \\
        --output-dir runs/sst2-lora-diffusion
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobs.common import base_parser, emit, fail  # noqa: E402
from jobs.tracking import Tracker, add_tracking_flags, run_name, track_adaptor  # noqa: E402
from lora_diffusion.baselines import DEFAULT_LR  # noqa: E402
from lora_diffusion.config import apply_overrides  # noqa: E402
from lora_diffusion.finetune import METHODS, FinetuneConfig, finetune  # noqa: E402
from lora_diffusion.tasks import TASKS  # noqa: E402


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base model folder (or hub id)")
    p.add_argument("--method", default="lora_diffusion", help="one of: " + ", ".join(METHODS))
    p.add_argument("--task", default="sst2", help="one of: " + ", ".join(TASKS))
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument(
        "--lr", type=float, default=None,
        help="peak learning rate; default: the method's ("
        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")",
    )  # fmt: skip
    p.add_argument("--ranks", default=None, help="lora_diffusion: rank per phase, e.g. 64,32,8")
    p.add_argument("--k", type=int, default=None, help="lora_diffusion: modules per phase")
    p.add_argument("--lora-rank", type=int, help="weight_lora: rank (baselines.lora_rank)")
    p.add_argument("--bottleneck", type=int, help="adapters: width (baselines.bottleneck)")
    p.add_argument("--prefix-length", type=int, help="prefix: length (baselines.prefix_length)")
    p.add_argument(
        "--target-modules", help="weight_lora/nara: e.g. q_proj,v_proj (baselines.target_modules)"
    )
    p.add_argument("--train-limit", type=int, default=None, help="use only N train examples")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate only N examples")
    p.add_argument("--eval-steps", type=int, default=None, help="sampling steps at evaluation")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint interval (steps)")
    p.add_argument("--resume-from", default=None, help="checkpoint folder to resume from")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_tracking_flags(p, "register the adaptor as a new version of NAME (default <task>-<method>)")
    p.add_argument(
        "--base-model-name",
        default=None,
        help="registered base to record as lineage (default: found by fingerprint)",
    )
    p.add_argument(
        "--base-artifact",
        choices=("copy", "reference"),
        default="copy",
        help="the adaptor model carries a copy of the base folder, or references it "
        "(the registered base's models:/ URI when found, else its path)",
    )
    return p.parse_args(argv)


def build_config(a) -> FinetuneConfig:
    cfg = FinetuneConfig(
        base=a.base,
        output_dir=a.output_dir,
        task=a.task,
        method=a.method,
        data_dir=a.data_dir,
        train_limit=a.train_limit,
        eval_limit=a.eval_limit,
        eval_steps=a.eval_steps,
        checkpoint_every=a.checkpoint_every,
        resume_from=a.resume_from,
        threads=a.threads,
    )
    train = dataclasses.replace(
        cfg.train,
        lr=a.lr if a.lr is not None else DEFAULT_LR.get(a.method, cfg.train.lr),
        batch_size=a.batch_size,
        seed=a.seed,
        **({"max_steps": a.max_steps} if a.max_steps else {}),
    )
    cfg = dataclasses.replace(cfg, train=train)
    flags = [f"adaptor.ranks={a.ranks}"] if a.ranks else []
    flags += [f"adaptor.k={a.k}"] if a.k else []
    knobs = {
        "lora_rank": a.lora_rank,
        "bottleneck": a.bottleneck,
        "prefix_length": a.prefix_length,
        "target_modules": a.target_modules,
    }
    flags += [f"baselines.{k}={v}" for k, v in knobs.items() if v is not None]
    return apply_overrides(cfg, flags + a.overrides)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.method not in METHODS:
        fail(f"unknown method {a.method!r}; known: {', '.join(METHODS)}")
    if a.task not in TASKS:
        fail(f"unknown task {a.task!r}; known: {', '.join(TASKS)}")
    try:
        cfg = build_config(a)
    except (KeyError, ValueError) as e:
        fail(str(e))

    tracker = Tracker.from_args(a, f"lora-diffusion/{a.task}", run_name(cfg))
    tracker.log_config(cfg, task=a.task, method=a.method)

    def report(step, m):
        tracker.report(step, m)
        if step % 50 == 0:
            print(f"step {step}: loss {m['loss']:.4f} nll {m['nll']:.4f}", flush=True)

    try:
        result = finetune(cfg, report=report, progress=not a.no_progress)
    except FileNotFoundError as e:
        tracker.abort()
        fail(str(e))
    except BaseException:
        tracker.abort()
        raise
    examples = result.pop("eval_examples", [])
    for ex in examples:
        print(f"  example: {ex}")
    result.update(track_adaptor(tracker, a, cfg, result))
    result.update(tracker.close())
    emit(result, a.json)
    return result


if __name__ == "__main__":
    main()
