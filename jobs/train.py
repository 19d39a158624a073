"""Fine-tune a frozen base on a task (LoRA-Diffusion or a baseline), save it and evaluate it.

    python jobs/train.py --method lora_diffusion --task sst2 --base runs/base-small/model \\
        --output-dir runs/sst2-lora-diffusion

The loop runs in Ray Train's TorchTrainer: on a local Ray runtime started by the job, on the
cluster of $RAY_ADDRESS (`ray job submit -- python jobs/train.py ...`) or of --address.
"""

from __future__ import annotations

import os
from pathlib import Path

from jobs import raytrain
from jobs.common import (
    FINETUNE_STEPS,
    METHOD_LR,
    RANKS,
    K,
    add_task_flags,
    base_parser,
    config_error,
    fail,
    finetune_config,
)
from jobs.tracking import (
    Tracker,
    add_tracking_flags,
    check_reachable,
    run_name,
    track_adaptor,
    tracking_uri,
)


def parser():
    p = base_parser(__doc__.splitlines()[0], max_steps=FINETUNE_STEPS, base=True)
    add_task_flags(p, method="the method to train")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: the method's: "
        + ", ".join(f"{m} {lr:g}" for m, lr in METHOD_LR.items())
        + ")",
    )
    p.add_argument(
        "--ranks", default=None, help=f"lora_diffusion: rank per phase (default: {RANKS})"
    )
    p.add_argument(
        "--k", type=int, default=None, help=f"lora_diffusion: modules per phase (default: {K})"
    )
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
    p.add_argument(
        "--resume-from",
        default=None,
        help="a training-state folder to start from (Ray reruns resume by themselves)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    raytrain.add_ray_flags(p)
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
    return p


Args = parser().args_class  # the flags as a dataclass: run(Args(...)) from Python
parse_args = Args.parse


def build_config(a):
    """The run's `FinetuneConfig` from its flags; --set overrides last."""
    from lora_diffusion.config import apply_overrides

    cfg = finetune_config(
        a,
        eval_steps=a.eval_steps,
        checkpoint_every=a.checkpoint_every,
        resume_from=a.resume_from,
        threads=a.threads,
    )
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


def run(a: Args) -> dict:
    """Train, evaluate, save and track one run (`a`: the job's flags, parsed or built)."""
    from lora_diffusion.finetune import finetune
    from lora_diffusion.methods import METHODS

    raytrain.check_flags(a)
    if a.strategy == "fsdp" and not METHODS.get(a.method).frozen_base:
        frozen = ", ".join(m for m in METHODS.names() if METHODS.get(m).frozen_base)
        fail(
            f"--strategy fsdp shards the frozen base: it needs a method that leaves the base "
            f"whole and frozen ({frozen}), not {a.method!r}; use --strategy ddp"
        )
    try:
        cfg = build_config(a)
    except (KeyError, ValueError) as e:
        fail(config_error(e))
    if not os.path.exists(cfg.base) and "/" not in cfg.base.strip("./"):
        fail(f"base {cfg.base!r} not found (a model folder, or a hub id like org/name)")
    if not a.no_tracking:  # the quick check first: a dead server fails in seconds
        check_reachable(tracking_uri(a.tracking_uri))
    resources = None if a.no_ray else raytrain.connect(a)  # exits before any work if short

    tracker = Tracker.from_args(a, f"lora-diffusion/{a.task}", run_name(cfg))
    tracker.log_config(
        cfg,
        task=a.task,
        method=a.method,
        workers=a.num_workers,
        strategy=a.strategy if a.num_workers > 1 else "single",
    )
    with tracker.failing(FileNotFoundError):
        if a.no_ray:
            result = finetune(cfg, report=_printer(tracker.report), progress=not a.no_progress)
        else:
            paths = ("base", "data_dir", "corpus_dir", "cache_dir", "resume_from")
            config = {
                "cfg": raytrain.absolute_paths(cfg, paths),
                "tracking": tracker.spec(),
                "progress": False,
            }
            result, _ = raytrain.run(train_loop, config, a, resources)
            result["adaptor_dir"] = str(Path(a.output_dir) / "adaptor")
    examples = result.pop("eval_examples", [])
    for ex in examples:
        print(f"  example: {ex}")
    result.update(track_adaptor(tracker, a, cfg, result))
    return tracker.finish(result, a.json)


def _printer(report):
    def f(step, m):
        report(step, m)
        if step % 50 == 0:
            print(f"step {step}: loss {m['loss']:.4f} nll {m['nll']:.4f}", flush=True)

    return f


def train_loop(config: dict) -> None:
    """One Ray Train worker: the library's `finetune` with this worker's rank, DDP/FSDP and
    checkpoints through Ray (restored after a worker failure or on a rerun of the run)."""
    from lora_diffusion.finetune import finetune

    raytrain.worker_loop(config, "train", finetune, _printer)


def main(argv=None) -> dict:
    return run(parse_args(argv))  # first: --help and flag errors answer before torch loads


if __name__ == "__main__":
    main()
