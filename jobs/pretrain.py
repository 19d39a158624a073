"""Pretrain a base masked-diffusion LM on the corpus: tokenizer, model, held-out loss.

python jobs/pretrain.py --preset small --output-dir runs/base-small

The loop runs in Ray Train's TorchTrainer like jobs/train.py (same Ray flags; DDP only: every
weight trains). The driver builds the tokenizer once and ships it to the workers.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from jobs import raytrain
from jobs.common import (
    PRESETS,
    PRETRAIN_STEPS,
    base_parser,
    config_error,
    fail,
    from_flags,
    train_settings,
)
from jobs.tracking import (
    Tracker,
    add_tracking_flags,
    check_reachable,
    track_base,
    tracking_uri,
)


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0], max_steps=PRETRAIN_STEPS)
    p.add_argument("--preset", default="small", choices=PRESETS, help="model size")
    p.add_argument("--corpus-dir", default=None, help="default: <data-dir>/corpus")
    p.add_argument("--tokenizer", default=None, help="reuse this saved tokenizer (folder)")
    p.add_argument(
        "--init-from", default=None, help="continue pretraining this saved base (its tokenizer too)"
    )
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size")
    p.add_argument("--block-length", type=int, default=128, help="tokens per training block")
    p.add_argument("--batch-size", type=int, default=16, help="blocks per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--eval-every", type=int, default=0, help="held-out eval every N steps")
    p.add_argument("--heldout-blocks", type=int, default=512, help="held-out blocks scored")
    p.add_argument("--max-documents", type=int, default=None, help="use only N documents")
    p.add_argument(
        "--task-text",
        default="",
        help="comma-separated tasks (e.g. sst2,cola,trec,agnews) whose train-split texts, without "
        "instruction or label, join the training documents (task-adaptive pretraining)",
    )
    p.add_argument(
        "--task-text-repeat", type=int, default=1, help="copies of the task text in the mix"
    )
    p.add_argument("--process", default="absorbing", help="absorbing | uniform")
    p.add_argument("--time-conditioning", action="store_true", help="adaLN time conditioning")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint interval (steps)")
    p.add_argument("--resume-from", default=None, help="a training-state folder to start from")
    raytrain.add_ray_flags(p)
    add_tracking_flags(
        p, "register the base as a new version of NAME (default base-<preset>)", "--register-base"
    )
    return p.parse_args(argv)


def build_config(a):
    """The run's `PretrainConfig` from its flags; --set overrides last."""
    from lora_diffusion.config import apply_overrides
    from lora_diffusion.pretraining import PretrainConfig

    cfg = from_flags(
        PretrainConfig,
        a,
        "output_dir preset vocab_size tokenizer init_from block_length time_conditioning "
        "max_documents task_text_repeat data_dir heldout_blocks checkpoint_every resume_from "
        "threads",
        corpus_dir=a.corpus_dir or os.path.join(a.data_dir, "corpus"),
        task_text=tuple(t.strip() for t in a.task_text.split(",") if t.strip()),
    )
    train = train_settings(a, cfg.train, warmup_steps=a.warmup_steps, eval_every=a.eval_every)
    diffusion = dataclasses.replace(
        cfg.diffusion,
        process=a.process,
        weighting="simple" if a.process == "uniform" else cfg.diffusion.weighting,
    )
    cfg = dataclasses.replace(cfg, train=train, diffusion=diffusion)
    return apply_overrides(cfg, a.overrides)


def main(argv=None) -> dict:
    a = parse_args(argv)  # first: --help and flag errors answer before torch is imported
    from lora_diffusion.pretraining import pretrain, task_documents

    if not os.path.isdir(a.corpus_dir or os.path.join(a.data_dir, "corpus")):
        fail(f"corpus directory not found: {a.corpus_dir or os.path.join(a.data_dir, 'corpus')}")
    raytrain.check_flags(a)
    if a.strategy == "fsdp":
        fail("--strategy fsdp shards a frozen base; pretraining trains every weight: use ddp")
    try:
        cfg = build_config(a)
        task_documents(cfg)  # an unknown task or a missing/bad file fails here, not on a worker
    except (KeyError, ValueError) as e:
        fail(config_error(e))
    if not a.no_tracking:
        check_reachable(tracking_uri(a.tracking_uri))
    resources = None if a.no_ray else raytrain.connect(a)

    name = f"pretrain-{cfg.preset}-lr{cfg.train.lr:g}-steps{cfg.train.max_steps}"
    tracker = Tracker.from_args(a, "lora-diffusion/pretrain", name)
    tracker.log_config(cfg, preset=cfg.preset, workers=a.num_workers)
    with tracker.failing():
        if a.no_ray:
            result = pretrain(cfg, report=_printer(tracker.report), progress=not a.no_progress)
        else:
            paths = ("corpus_dir", "tokenizer", "init_from", "cache_dir", "resume_from", "data_dir")
            config = {
                "cfg": raytrain.absolute_paths(cfg, paths),
                "tracking": tracker.spec(),
                "tokenizer": _tokenizer_files(cfg),
            }
            result, out = raytrain.run(pretrain_loop, config, a, resources)
            result["model_dir"] = str(out / "model")
    result.pop("config", None)
    result.update(track_base(tracker, a, cfg, result))
    return tracker.finish(result, a.json)


def _printer(report):
    def f(step, m):
        report(step, m)
        if "heldout_loss" in m:
            print(f"step {step}: loss {m['loss']:.4f} heldout {m['heldout_loss']:.4f}", flush=True)

    return f


def _tokenizer_files(cfg) -> dict[str, str]:
    """The tokenizer, built once here (or read from --tokenizer/--init-from), as file texts:
    every worker, on any node and after any restart, then uses exactly the same one."""
    from lora_diffusion.corpus import corpus_files, split_files
    from lora_diffusion.models import preset_config
    from lora_diffusion.pretraining import build_tokenizer

    train_files, _ = split_files(corpus_files(cfg.corpus_dir))
    tok = build_tokenizer(cfg, train_files, cfg.vocab_size or preset_config(cfg.preset).vocab_size)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(d).iterdir() if p.is_file()}


def pretrain_loop(config: dict) -> None:
    """One Ray Train worker of the pretraining job (see `jobs/train.py: train_loop`)."""
    from lora_diffusion.pretraining import pretrain

    def tokenizer(work: Path) -> dict:  # the tokenizer the driver built, as files
        (work / "tokenizer").mkdir()
        for name, text in config["tokenizer"].items():
            (work / "tokenizer" / name).write_text(text, encoding="utf-8")
        return {"tokenizer": str(work / "tokenizer")}

    raytrain.worker_loop(config, "pretrain", pretrain, _printer, files=tokenizer)


if __name__ == "__main__":
    main()
