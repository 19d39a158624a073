"""Several task adaptors on one frozen base: joint training with a router, and zero-shot
composition of adaptors trained apart.

Joint training (`train_multitask`): one adaptor per task and a router (2-layer MLP, 512 hidden)
from Enc(c) to softmax task weights, trained together on batches that mix the tasks. Every
example's step update is the router-weighted sum of the tasks' perturbations (the paper's Eq. 6),
and the loss is

    denoising NLL + sum over adaptors of the regularisers + routing_loss * CE(router, task id).

The routing term (default 0.1) is our addition: the denoising loss alone lets the router settle
on any mixture that fits, which says nothing about which task a prompt belongs to; with the term,
the router learns to route and the adaptors still learn through the mixture. `routing_loss=0`
gives the paper's objective.

Zero-shot composition (`composition_interference`): adaptors trained separately, merged with
fixed weights (or a router) without retraining; each task's accuracy with its own adaptor alone
vs. inside the composition measures interference.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .adaptor import AdaptorConfig, TrajectoryAdaptor
from .adaptor_io import load_adaptor, save_adaptor, save_router
from .composition import AdaptedDenoiser
from .config import DiffusionConfig, finetuning_diffusion
from .corruption import get_process
from .data import collate, tokenize_task
from .evaluation import generative_accuracy, scoring_accuracy
from .losses import denoising_loss
from .models import load_base
from .plots import plot_history
from .router import Router
from .schedules import get_schedule
from .tasks import get_task
from .training import TrainConfig, fit, save_checkpoint


@dataclass
class MultitaskConfig:
    base: str = field(metadata={"help": "base model folder or hub id"})
    output_dir: str = field(metadata={"help": "adaptors/<task>/, router/, metrics.json"})
    tasks: tuple[str, ...] = field(
        default=("sst2", "cola", "trec", "agnews"), metadata={"help": "tasks, in router order"}
    )
    adaptor_dirs: tuple[str, ...] = field(
        default=(), metadata={"help": "task=DIR: start that task's adaptor from a saved one"}
    )
    train_router_only: bool = field(
        default=False, metadata={"help": "freeze the adaptors (all need adaptor_dirs)"}
    )
    routing_loss: float = field(default=0.1, metadata={"help": "weight of CE(router, task)"})
    router_hidden: int = field(default=512, metadata={"help": "router MLP hidden size"})
    data_dir: str | None = field(default=None, metadata={"help": "task data folder"})
    max_length: int = field(default=128, metadata={"help": "tokens per example"})
    train_limit: int | None = field(default=None, metadata={"help": "N train examples per task"})
    eval_limit: int | None = field(default=200, metadata={"help": "N eval examples per task"})
    eval_steps: int | None = field(default=None, metadata={"help": "sampling steps; None: T"})
    scoring_num_t: int = field(default=8, metadata={"help": "t values for candidate scoring"})
    threads: int | None = None
    cache_dir: str | None = None
    adaptor: AdaptorConfig = field(default_factory=AdaptorConfig)
    diffusion: DiffusionConfig = field(default_factory=finetuning_diffusion)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=2e-3, max_steps=1000, batch_size=32, warmup_steps=50)
    )

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"multi-task training needs 2+ distinct tasks, got {self.tasks}")
        for t in self.tasks:
            get_task(t)  # unknown names fail here, with the known ones listed
        dirs = parse_task_dirs(self.adaptor_dirs)
        if set(dirs) - set(self.tasks):
            raise ValueError(
                f"adaptor_dirs for tasks not trained: {sorted(set(dirs) - set(self.tasks))}"
            )
        if self.train_router_only and set(dirs) != set(self.tasks):
            raise ValueError(
                "train_router_only needs a saved adaptor for every task (adaptor_dirs)"
            )


def parse_task_dirs(items: Sequence[str]) -> dict[str, str]:
    """["sst2=runs/a", ...] -> {"sst2": "runs/a", ...}, with a clear error on a bad item."""
    out = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise ValueError(f"expected TASK=DIR, got {item!r}")
        out[task] = path
    return out


class MixedTaskSampler:
    """Step k's batch from (seed, k) alone: each slot draws a task uniformly, then an example of
    it, so small tasks are not drowned by large ones and resuming replays the same batches."""

    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0) -> None:
        if min(sizes) < 1:
            raise ValueError(f"every task needs training examples, sizes: {list(sizes)}")
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed

    def indices(self, step: int) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        tasks = torch.randint(len(self.sizes), (self.batch_size,), generator=g)
        u = torch.rand(self.batch_size, generator=g, dtype=torch.float64)
        return [(int(j), int(x * self.sizes[j])) for j, x in zip(tasks, u, strict=True)]


def build_multitask_model(cfg: MultitaskConfig, base) -> AdaptedDenoiser:
    """One adaptor per task (fresh, or loaded from `adaptor_dirs`) and a router, on `base`."""
    d = base.config.hidden_size
    dirs = parse_task_dirs(cfg.adaptor_dirs)
    adaptors = {}
    for task in cfg.tasks:
        adaptors[task] = (
            load_adaptor(dirs[task], base)[0] if task in dirs else TrajectoryAdaptor(cfg.adaptor, d)
        )
    router = Router(d, len(cfg.tasks), cfg.router_hidden, cfg.adaptor.condition_repr)
    model = AdaptedDenoiser(base, adaptors, router)
    if cfg.train_router_only:
        model.adaptors.requires_grad_(False)
    return model


def train_multitask(cfg: MultitaskConfig, report=None, progress: bool = True) -> dict:
    """Train the task adaptors and the router jointly; save them; evaluate every task."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    base, tok = load_base(cfg.base)
    model = build_multitask_model(cfg, base)
    train_sets = [
        tokenize_task(
            t, "train", tok, cfg.max_length, cfg.data_dir, cfg.cache_dir, cfg.train_limit
        ).with_format("python")
        for t in cfg.tasks
    ]
    process = get_process(cfg.diffusion.process, len(tok), tok.mask_token_id)
    schedule = get_schedule(cfg.diffusion.schedule, cfg.diffusion.eps)
    sampler = MixedTaskSampler([len(d) for d in train_sets], cfg.train.batch_size, cfg.train.seed)
    micro = cfg.train.batch_size // cfg.train.grad_accum

    def get_batch(step: int, m: int) -> dict:
        picks = sampler.indices(step)[m * micro : (m + 1) * micro]
        batch = collate([train_sets[j][i] for j, i in picks], tok.pad_token_id)
        batch["task_ids"] = torch.tensor([j for j, _ in picks])
        return batch

    trained = [a for a in model.adaptors.values() if not cfg.train_router_only]

    def loss_fn(batch, gen):
        out = denoising_loss(model, batch, process, schedule, cfg.diffusion.weighting, gen)
        logits = model.router_logits
        ce = F.cross_entropy(logits, batch["task_ids"])
        regs = [a.regularisers() for a in trained]
        rank = cfg.adaptor.lambda_rank * sum((r["rank"] for r in regs), torch.zeros(()))
        orth = cfg.adaptor.lambda_orth * sum((r["orth"] for r in regs), torch.zeros(()))
        loss = out.loss + rank + orth + cfg.routing_loss * ce
        acc = (logits.argmax(-1) == batch["task_ids"]).float().mean()
        metrics = {
            "nll": out.nll,
            "reg_rank": rank,
            "reg_orth": orth,
            "routing_ce": ce,
            "routing_acc": acc,
        }
        return loss, {k: v.detach() for k, v in metrics.items()}

    out_dir = Path(cfg.output_dir)

    def checkpoint(step, opt, sched, state):
        save_checkpoint(out_dir / "checkpoints" / "last", model, opt, sched, state)

    state = fit(
        model,
        loss_fn,
        get_batch,
        cfg.train,
        report=report,
        checkpoint=checkpoint,
        checkpoint_every=cfg.train.max_steps,
        progress=progress,
    )
    train_seconds = time.perf_counter() - start
    for task, adaptor in model.adaptors.items():
        save_adaptor(out_dir / "adaptors" / task, adaptor, base, task=task)
    save_router(out_dir / "router", model.router, list(cfg.tasks), base)
    trainable = sum(p.numel() for p in model.adaptor_parameters() if p.requires_grad)
    result = {
        "tasks": list(cfg.tasks),
        "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / sum(p.numel() for p in base.parameters()),
        "router_params": sum(p.numel() for p in model.router.parameters()),
        "train_loss": state.history[-1]["loss"],
        "train_routing_acc": state.history[-1]["routing_acc"],
        "steps": state.step,
        "train_seconds": train_seconds,
        "per_task": evaluate_multitask(cfg, model, tok, progress),
    }
    for key in ("accuracy_router", "accuracy_oracle", "routing_accuracy"):
        result[f"mean_{key}"] = sum(r[key] for r in result["per_task"].values()) / len(cfg.tasks)
    result.update(output_dir=str(out_dir), seconds=time.perf_counter() - start)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "history.json").write_text(json.dumps(state.history))
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    plot_history(
        state.history,
        out_dir / "plots" / "train_curves.png",
        ("loss", "nll", "routing_ce", "routing_acc"),
        "multi-task training",
    )
    return result


@torch.no_grad()
def routing_accuracy(model: AdaptedDenoiser, rows, task_index: int, pad_id: int) -> float:
    """Share of examples whose router weight is highest on their own task (targets masked)."""
    hits, n = 0, 0
    for i in range(0, len(rows), 64):
        b = collate([rows[j] for j in range(i, min(i + 64, len(rows)))], pad_id)
        ids = b["input_ids"].masked_fill(b["target_mask"], model.mask_token_id)
        cond = b["attention_mask"].bool() & ~b["target_mask"]
        h = model.base_hidden(ids, b["attention_mask"], None)
        enc = model.condition_encodings(ids, h, cond)[model.router.condition_repr]
        hits += int((model.router(enc).argmax(-1) == task_index).sum())
        n += len(ids)
    return hits / n


def evaluate_multitask(cfg: MultitaskConfig, model: AdaptedDenoiser, tok, progress=False) -> dict:
    """Per task: generative accuracy under the router and with the oracle one-hot weights,
    scoring accuracy under the router, and how often the router picks the right task."""
    model.eval()
    n = len(cfg.tasks)
    common = dict(
        process=cfg.diffusion.process, schedule=cfg.diffusion.schedule, seed=cfg.train.seed
    )
    out = {}
    for j, task in enumerate(cfg.tasks):
        ds = tokenize_task(
            task, "eval", tok, cfg.max_length, cfg.data_dir, cfg.cache_dir, cfg.eval_limit
        )
        rows = list(ds.with_format("python"))
        routed = generative_accuracy(
            model,
            tok,
            task,
            rows,
            steps=cfg.eval_steps,
            max_length=cfg.max_length,
            progress=progress,
            **common,
        )
        with model.task_weights(F.one_hot(torch.tensor(j), n).float()):
            oracle = generative_accuracy(
                model, tok, task, rows, steps=cfg.eval_steps, max_length=cfg.max_length, **common
            )
        scoring = scoring_accuracy(model, tok, task, rows, num_t=cfg.scoring_num_t, **common)
        out[task] = {
            "accuracy_router": routed["accuracy"],
            "valid_rate_router": routed["valid_rate"],
            "accuracy_oracle": oracle["accuracy"],
            "accuracy_scoring_router": scoring["accuracy"],
            "routing_accuracy": routing_accuracy(model, rows, j, tok.pad_token_id),
            "n": routed["n"],
        }
    return out


def composition_interference(
    base,
    tokenizer,
    adaptors: Mapping[str, TrajectoryAdaptor],
    tasks: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    router: Router | None = None,
    *,
    data_dir=None,
    cache_dir=None,
    eval_limit: int | None = 200,
    max_length: int = 128,
    eval_steps: int | None = None,
    scoring_num_t: int = 8,
    process: str = "absorbing",
    schedule: str = "loglinear",
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Zero-shot composition: each task's accuracy with its adaptor alone vs. inside the merge.

    The merge uses fixed `weights` (one per adaptor, default uniform) or a `router`; nothing is
    retrained. `tasks` are the tasks to evaluate (default: every adaptor's name). Returns, per
    task, generative and scoring accuracy alone and composed, and their drops (alone - composed:
    > 0 means the other adaptors interfere)."""
    names = list(adaptors)
    tasks = list(tasks or names)
    if router is None:
        w = (
            torch.full((len(names),), 1.0 / len(names))
            if weights is None
            else torch.tensor([float(x) for x in weights])
        )
        if w.numel() != len(names) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"composition weights must be {len(names)} non-negative values with a positive "
                f"sum (one per adaptor: {', '.join(names)}), got {w.tolist()}"
            )
        w = w / w.sum()
    model = AdaptedDenoiser(base, dict(adaptors), router).eval()
    common = dict(process=process, schedule=schedule, seed=seed)
    out: dict = {"adaptors": names, "weights": None if router is not None else w.tolist()}
    for task in tasks:
        if task not in names:
            raise ValueError(f"no adaptor for task {task!r} among {names}")
        one_hot = F.one_hot(torch.tensor(names.index(task)), len(names)).float()
        rows = list(
            tokenize_task(
                task, "eval", tokenizer, max_length, data_dir, cache_dir, eval_limit
            ).with_format("python")
        )

        def measure(weights_row, task=task, rows=rows):
            with model.task_weights(weights_row):
                g = generative_accuracy(
                    model,
                    tokenizer,
                    task,
                    rows,
                    steps=eval_steps,
                    max_length=max_length,
                    progress=progress,
                    **common,
                )
                s = scoring_accuracy(model, tokenizer, task, rows, num_t=scoring_num_t, **common)
            return g["accuracy"], s["accuracy"]

        alone, alone_s = measure(one_hot)
        composed, composed_s = measure(None if router is not None else w)
        out[task] = {
            "accuracy_alone": alone,
            "accuracy_composed": composed,
            "drop": alone - composed,
            "accuracy_scoring_alone": alone_s,
            "accuracy_scoring_composed": composed_s,
            "drop_scoring": alone_s - composed_s,
            "n": len(rows),
        }
    return out
