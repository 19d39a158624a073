"""Train one adaptor per task and the router jointly on mixed-task batches, then evaluate.

    python jobs/multitask.py --base runs/base-small/model --tasks sst2,cola,trec,agnews \\
        --output-dir runs/multitask
"""

from __future__ import annotations

import dataclasses

from jobs.common import (
    MULTITASK_STEPS,
    base_parser,
    config_error,
    emit,
    fail,
    from_flags,
    train_settings,
)


def parser():
    p = base_parser(__doc__.splitlines()[0], max_steps=MULTITASK_STEPS, base=True)
    p.add_argument("--tasks", default="sst2,cola,trec,agnews", help="comma list, router order")
    p.add_argument(
        "--adaptor",
        action="append",
        default=[],
        metavar="TASK=DIR",
        help="start TASK's adaptor from a saved one (repeatable)",
    )
    p.add_argument(
        "--router-only",
        action="store_true",
        help="freeze the adaptors (each task needs --adaptor) and train the router",
    )
    p.add_argument("--routing-loss", type=float, default=0.1, help="weight of CE(router, task)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--train-limit", type=int, default=None, help="train examples per task")
    p.add_argument("--eval-limit", type=int, default=200, help="eval examples per task")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


Args = parser().args_class  # the flags as a dataclass: run(Args(...)) from Python
parse_args = Args.parse


def run(a: Args) -> dict:
    """Train the task adaptors and router `a` describes, then evaluate them."""
    from lora_diffusion.config import apply_overrides
    from lora_diffusion.multitask import MultitaskConfig, train_multitask

    try:
        cfg = from_flags(
            MultitaskConfig,
            a,
            "base output_dir routing_loss data_dir train_limit eval_limit threads",
            tasks=tuple(a.tasks.split(",")),
            adaptor_dirs=tuple(a.adaptor),
            train_router_only=a.router_only,
        )
        train = train_settings(a, cfg.train)
        cfg = apply_overrides(dataclasses.replace(cfg, train=train), a.overrides)
    except (KeyError, ValueError) as e:
        fail(config_error(e))

    def report(step, m):
        if step % 50 == 0:
            print(
                f"step {step}: loss {m['loss']:.4f} nll {m['nll']:.4f} "
                f"routing acc {m['routing_acc']:.2f}",
                flush=True,
            )

    try:
        result = train_multitask(cfg, report=report, progress=not a.no_progress)
    except FileNotFoundError as e:
        fail(str(e))
    for task, r in result["per_task"].items():
        print(f"  {task}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "n"))
    return emit(result, a.json)


def main(argv=None) -> dict:
    return run(parse_args(argv))  # first: --help and flag errors answer before torch loads


if __name__ == "__main__":
    main()
