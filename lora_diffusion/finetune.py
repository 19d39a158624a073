"""Fine-tune a frozen base on a task with a parameter-efficient method, then evaluate it.

The recipe behind `jobs/train.py`, Ray-free. Methods plug in through `methods.METHODS`: each
record's builder wraps the base and says which parameters train and how to save them.
"""

from __future__ import annotations

import ctypes
import gc
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FinetuneConfig
from .corpus import corpus_files, packed_blocks
from .corruption import get_process
from .data import collate, tokenize_task
from .evaluation import convergence_step, forgetting, generative_accuracy, scoring_accuracy
from .losses import LossModule
from .methods import METHODS
from .models import load_base
from .plots import plot_effective_ranks, plot_history
from .schedules import get_schedule
from .tasks import resolve_data_dir
from .training import (
    Distributed,
    LossFn,
    StepSampler,
    checkpoint_callback,
    checkpoint_step,
    fit,
)

CheckpointHook = Callable[[int, Callable[[Path], None]], None]


def recipe_loss_fn(loss_module: LossModule) -> LossFn:
    """`fit`'s loss_fn around a LossModule: the loss, and the NLL and the method's extra terms
    as metrics (tensors: `fit` reads them at its log steps only)."""

    def loss_fn(batch: dict, gen: torch.Generator):
        loss, nll, extras = loss_module(batch, gen)
        return loss, {"nll": nll, **{k: v.detach() for k, v in extras.items()}}

    return loss_fn


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finetune(
    cfg: FinetuneConfig,
    report=None,
    progress: bool = True,
    dist: Distributed | None = None,
    checkpoint_hook: CheckpointHook | None = None,
) -> dict:
    """Train `cfg.method` on `cfg.task`, save it, evaluate it; returns the results.

    Data-parallel (`dist`): every rank runs this; each computes the loss on its rows of every
    global batch, through `dist.prepare` (DDP). Rank 0 alone saves, evaluates and writes files;
    the other ranks return {"rank": r, "steps": n} after training.
    checkpoint_hook(step, save_into) is called on every rank every `cfg.checkpoint_every`
    steps; `save_into(folder)` writes the training state there (default: rank 0 saves to
    OUTPUT_DIR/checkpoints/last).
    """
    dist = dist or Distributed()
    if dist.sharded_base and cfg.method != "lora_diffusion":
        raise ValueError(
            f"a sharded base (FSDP) needs a method that leaves the base whole and frozen "
            f"(lora_diffusion), not {cfg.method!r}: shard nothing (DDP) instead"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    peak = PeakMemory(dist.device)
    torch.manual_seed(cfg.train.seed)
    base, tok = load_base(cfg.base)
    bundle = METHODS.get(cfg.method).build(cfg, base)
    model = bundle.model
    base = base if bundle.reference is None else bundle.reference
    train_ds, val_ds = train_and_holdout(cfg, tok)
    train_ds = train_ds.with_format("python")
    process = get_process(cfg.diffusion.process, len(tok), tok.mask_token_id)
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    sampler = StepSampler(len(train_ds), cfg.train.batch_size, cfg.train.seed)
    micro = cfg.train.batch_size // cfg.train.grad_accum

    def get_batch(step: int, m: int) -> dict:
        idx = sampler.indices(step)[m * micro : (m + 1) * micro].tolist()
        batch = collate([train_ds[i] for i in idx], tok.pad_token_id)
        return {k: v.to(dist.device) for k, v in batch.items()}

    weighting = cfg.diffusion.weighting
    loss_module = dist.prepare(
        LossModule(model, process, schedule, weighting, dist.shard, bundle.extra_loss)
    )
    if bundle.reference is not None:  # outside what prepare moves; evaluation compares the two
        base = base.to(dist.device)

    loss_fn = recipe_loss_fn(loss_module)
    out_dir = Path(cfg.output_dir)

    checkpoint = checkpoint_callback(model, out_dir, dist, checkpoint_hook)
    lead = dist.rank == 0
    periodic = _periodic_eval(cfg, model, tok, val_ds) if lead and cfg.train.eval_every else None
    state = fit(
        model,
        loss_fn,
        get_batch,
        cfg.train,
        periodic,
        report=report if lead else None,
        checkpoint=checkpoint,
        checkpoint_every=cfg.checkpoint_every or cfg.train.max_steps,
        resume_from=cfg.resume_from,
        progress=progress and lead,
        all_reduce=dist.all_reduce,
    )
    train_seconds = time.perf_counter() - start
    if not lead:
        return {"rank": dist.rank, "steps": state.step}
    if dist.sharded_base:  # the frozen base was sharded across ranks: use a whole copy from here
        base = model.base = load_base(cfg.base)[0].to(dist.device).requires_grad_(False)
    bundle.save(out_dir / "adaptor")
    result = {
        "method": cfg.method,
        "task": cfg.task,
        **_size_report(model, base, out_dir / "adaptor"),
        "train_loss": state.history[-1]["loss"],
        "train_nll": state.history[-1]["nll"],
        "steps": state.step,
        "resumed_from_step": checkpoint_step(cfg.resume_from),
        "train_seconds": train_seconds,
    }
    result.update(peak.read())
    result["convergence_step"] = _convergence(state.history)
    if bundle.describe is not None:
        result.update(_describe(bundle.describe(), out_dir, cfg.task))
    result.update(evaluate_all(cfg, model, base, tok, process, schedule, progress))
    if val_ds is not None:
        result.update(validate(cfg, model, tok, val_ds, "val"), val_n=len(val_ds))
    result.update(adaptor_dir=str(out_dir / "adaptor"), seconds=time.perf_counter() - start)
    _write_results(out_dir, result, state.history, cfg)
    return result


def _return_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc; a no-op elsewhere). The
    process's own symbols hold libc's: no `find_library`, which runs ldconfig each call."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except AttributeError:  # not glibc
        pass


class PeakMemory:
    """The memory one run adds at its peak, from its start to `read()`: base, data, activations,
    gradients and optimizer state, but nothing an earlier run in the same process left behind.

    On a GPU: `max_memory_allocated` since a reset at the start, less what was allocated then.
    On CPU (Linux): the resident set's high-water mark (VmHWM) after resetting it at the start
    (`/proc/self/clear_refs`, "5"), less the resident set then. Before that reset the heap's
    free pages go back to the system (`gc.collect`, glibc `malloc_trim(0)`): memory an earlier
    run freed but the process kept would otherwise be reused without raising the resident set,
    and a second run in a process would read a fraction of its peak. Where neither reset
    exists (other systems) `read()` gives nothing rather than a process-wide figure, which
    would charge each run with every run before it.
    """

    CLEAR_REFS = Path("/proc/self/clear_refs")
    STATUS = Path("/proc/self/status")

    def __init__(self, device) -> None:
        self.cuda = str(device).startswith("cuda")
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.floor = torch.cuda.memory_allocated(device)
            return
        try:
            _return_free_heap()
            self.CLEAR_REFS.write_text("5")
            self.floor = self._status_kib("VmRSS")
        except OSError:
            self.floor = None

    def _status_kib(self, field: str) -> int:
        for line in self.STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise OSError(f"no {field} in {self.STATUS}")

    def read(self) -> dict[str, float]:
        """{"train_peak_mb": MB above the start} (1 MB = 1e6 bytes), or {} where unmeasured."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) - self.floor
            return {"train_peak_mb": peak / 1e6}
        if self.floor is None:
            return {}
        try:
            return {"train_peak_mb": (self._status_kib("VmHWM") - self.floor) * 1024 / 1e6}
        except OSError:
            return {}


def train_and_holdout(cfg: FinetuneConfig, tok) -> tuple[Any, Any | None]:
    """The rows to train on and the held-out validation rows (None without `cfg.holdout`).

    The validation rows are the last `cfg.holdout` rows of the task's train split; training
    uses the first `cfg.train_limit` (default: all) of the rows before them, so the two never
    share a row. Choosing a learning rate or a trial on them leaves the eval split unseen.
    """
    args = (cfg.task, "train", tok, cfg.max_length, cfg.data_dir, cfg.cache_dir)
    if not cfg.holdout:
        return tokenize_task(*args, cfg.train_limit), None
    full = tokenize_task(*args)
    n = len(full) - cfg.holdout
    if n < 1:
        raise ValueError(
            f"holdout={cfg.holdout} leaves no rows to train on: the {cfg.task} train split has "
            f"{len(full)}"
        )
    keep = n if cfg.train_limit is None else min(cfg.train_limit, n)
    return full.select(range(keep)), full.select(range(n, len(full)))


def validate(cfg: FinetuneConfig, model: nn.Module, tok, dataset, prefix: str) -> dict:
    """Candidate scoring of `dataset`: `{prefix}_accuracy_scoring`, `{prefix}_gold_loss` (the
    gold label's denoising loss: a smooth score for early stopping) and, for two-label tasks,
    `{prefix}_auc_scoring`."""
    model.eval()
    out = scoring_accuracy(
        model,
        tok,
        cfg.task,
        dataset,
        process=cfg.diffusion.process,
        schedule=cfg.diffusion.schedule,
        num_t=cfg.scoring_num_t,
        seed=cfg.train.seed,
        max_length=cfg.max_length,
    )
    result = {
        f"{prefix}_accuracy_scoring": out["accuracy"],
        f"{prefix}_gold_loss": out["gold_loss"],
    }
    if out.get("auc") is not None:
        result[f"{prefix}_auc_scoring"] = out["auc"]
    return result


def _periodic_eval(cfg: FinetuneConfig, model: nn.Module, tok, val_ds) -> Callable[[], dict]:
    """Every `train.eval_every` steps: `validate` on the held-out train rows (`val_*` keys), or
    without a holdout on the eval split (`eval_limit` examples, `eval_*` keys)."""
    dataset = val_ds
    if dataset is None:
        args = (cfg.task, "eval", tok, cfg.max_length, cfg.data_dir, cfg.cache_dir)
        dataset = tokenize_task(*args, cfg.eval_limit)
    return lambda: validate(cfg, model, tok, dataset, cfg.scored_split)


def _convergence(history: list[dict]) -> int | None:
    """The step at which the logged training loss settles (`evaluation.convergence_step` with a
    window of a tenth of the logged points), or None."""
    index = convergence_step([h["loss"] for h in history], window=max(2, len(history) // 10))
    return None if index is None else history[index]["step"]


def _describe(report: dict, out_dir: Path, task: str) -> dict:
    """Write a method's report (adaptor_report.json) and its effective-rank plot; returns the
    per-module effective ranks for the results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adaptor_report.json").write_text(json.dumps(report, indent=2))
    if "modules" not in report:
        return {}
    plot_effective_ranks(report, out_dir / "plots" / "effective_rank.png", f"{task} adaptor")
    return {"effective_rank_up": [round(m["effective_rank_up"], 2) for m in report["modules"]]}


def _size_report(model: nn.Module, base: nn.Module, adaptor_dir: Path) -> dict:
    trainable = _trainable(model)
    base_params = sum(p.numel() for p in base.parameters())
    stored = sum(f.stat().st_size for f in adaptor_dir.glob("*.safetensors"))
    return {
        "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / base_params,
        "storage_mb": stored / 1e6,
        "storage_mb_bf16": 2 * trainable / 1e6,
    }


def evaluate_all(cfg, model, base, tok, process, schedule, progress=False) -> dict:
    """Generative and scoring accuracy on the eval split, forgetting on held-out corpus."""
    model.eval()
    eval_ds = tokenize_task(
        cfg.task, "eval", tok, cfg.max_length, cfg.data_dir, cfg.cache_dir, cfg.eval_limit
    )
    common = dict(process=cfg.diffusion.process, schedule=cfg.diffusion.schedule)
    gen = generative_accuracy(
        model,
        tok,
        cfg.task,
        eval_ds,
        steps=cfg.eval_steps,
        seed=cfg.train.seed,
        temperature=cfg.eval_temperature,
        max_length=cfg.max_length,
        progress=progress,
        **common,
    )
    result = {
        "eval_accuracy": gen["accuracy"],
        "eval_valid_rate": gen["valid_rate"],
        **validate(cfg, model, tok, eval_ds, "eval"),
        "eval_n": gen["n"],
        "eval_network_calls": gen["network_calls"],
        "eval_calls_saved": gen["calls_saved"],
        **{f"eval_{k}": gen[k] for k in ("base_calls", "base_calls_saved") if k in gen},
        "eval_examples": gen.get("examples", []),
    }
    if cfg.forgetting_blocks:
        result.update(_forgetting(cfg, model, base, tok, process, schedule))
    return result


def _forgetting(cfg, model, base, tok, process, schedule) -> dict:
    corpus = Path(cfg.corpus_dir or resolve_data_dir(cfg.data_dir) / "corpus")
    blocks = packed_blocks(corpus_files(corpus)[-1:], tok, 128, cfg.cache_dir)
    return forgetting(
        base, model, blocks[: cfg.forgetting_blocks], process=process, schedule=schedule
    )


def _write_results(out_dir: Path, result: dict, history: list[dict], cfg: FinetuneConfig) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "history.json").write_text(json.dumps(history))
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    keys = [k for k in ("loss", "nll", "reg_rank", "reg_orth") if k in history[-1]]
    title = f"{cfg.method} / {cfg.task}"
    plot_history(history, out_dir / "plots" / "train_curves.png", keys, title)
