"""The framework-free training loop shared by pretraining, LoRA-Diffusion and the baselines.

AdamW, linear warmup then cosine decay, gradient accumulation, bf16 autocast where the device
supports it, gradient clipping, periodic evaluation, progress and metrics to a callback.

Resume is bit-exact because nothing random is carried between steps: the batch of step k is a
pure function of (seed, k) (an epoch permutation), and the diffusion noise of step k comes from
a generator seeded with (seed, k). Data-parallel ranks all draw the noise of the global batch
and keep their own rows, so any number of workers trains exactly like one. A checkpoint holds
the trainable weights, optimizer, scheduler and step; see `save_checkpoint` / `load_checkpoint`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    max_steps: int = field(default=1000, metadata={"help": "optimizer steps in all"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr"})
    batch_size: int = field(default=32, metadata={"help": "global examples per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm; 0 disables"})
    seed: int = 0
    log_every: int = 10
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps; 0: at end"})
    precision: str = field(default="fp32", metadata={"help": "fp32 | bf16 (autocast)"})

    def __post_init__(self) -> None:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                f"({self.grad_accum})"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")


class StepSampler:
    """Indices of the examples in step k's batch, from (seed, k) alone.

    Each epoch is a fresh seeded permutation; a step's global batch is a contiguous slice of
    it (wrapping into the next epoch), and rank r of W takes every W-th example of it, so
    workers see disjoint parts of every batch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0) -> None:
        if num_examples < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self._perm: dict[int, torch.Tensor] = {}

    def _epoch(self, e: int) -> torch.Tensor:
        if e not in self._perm:
            self._perm = {e: torch.randperm(self.n, generator=_gen(self.seed, e))}
        return self._perm[e]

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        start, stop = step * self.batch_size, (step + 1) * self.batch_size
        positions = torch.arange(start, stop)
        epochs = positions // self.n
        idx = torch.empty_like(positions)
        for e in range(start // self.n, (stop - 1) // self.n + 1):  # a batch may wrap epochs
            here = epochs == e
            idx[here] = self._epoch(e)[positions[here] % self.n]
        return idx[rank::world_size]


def _gen(*seeds: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on `device` seeded from a tuple of ints."""
    s = 0
    for x in seeds:
        s = (s * 1_000_003 + int(x)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(s)


def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The noise generator of one training step (the same on every rank). It lives on the
    training device, so the noise is drawn there: no host-to-device copy (a sync) per draw. The
    noise is a pure function of (seed, step, device type): a CUDA run draws other numbers than
    a CPU run of the same seed, and resumes as bit-exactly."""
    return _gen(seed, 7919, step, 0, device=device)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine

    return f


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig):
    """AdamW (fused into one kernel per step when every parameter is on a CUDA device) and the
    warm-up + cosine schedule."""
    if not params:
        raise ValueError("no trainable parameters")
    fused = all(p.is_cuda for p in params) or None  # None: torch's default (foreach)
    opt = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
        fused=fused,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


@dataclass
class TrainState:
    """What a checkpoint restores: the step to run next and the loss history so far."""

    step: int = 0
    history: list[dict] = field(default_factory=list)


def save_checkpoint(path, module: nn.Module, opt, sched, state: TrainState) -> None:
    """Trainable weights as safetensors; optimizer/scheduler via torch.save of plain tensors and
    numbers (loaded back with weights_only=True, never as arbitrary pickles); state as JSON."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    trainable = {k: v.detach().contiguous() for k, v in trainable_state_dict(module).items()}
    save_file(trainable, str(path / "trainable.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, path / "optim.pt")
    (path / "state.json").write_text(json.dumps(asdict(state)))


def load_checkpoint(path, module: nn.Module, opt, sched) -> TrainState:
    path = Path(path)
    missing = [
        f for f in ("trainable.safetensors", "optim.pt", "state.json") if not (path / f).exists()
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        optim = torch.load(path / "optim.pt", weights_only=True)
        state = TrainState(**json.loads((path / "state.json").read_text()))
    except Exception as e:  # corrupt files: say which checkpoint, keep the cause
        raise ValueError(f"checkpoint {path} is corrupt: {e}") from e
    params = dict(module.named_parameters())
    for k, v in weights.items():
        if k not in params or params[k].shape != v.shape:
            raise ValueError(f"checkpoint {path}: parameter {k} does not fit this model")
        with torch.no_grad():
            params[k].copy_(v)
    opt.load_state_dict(optim["optimizer"])
    sched.load_state_dict(optim["scheduler"])
    return state


def checkpoint_step(folder: str | Path | None) -> int:
    """The step a checkpoint folder resumes at (0 for None: a fresh start)."""
    if not folder:
        return 0
    return int(json.loads((Path(folder) / "state.json").read_text())["step"])


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


@dataclass
class Distributed:
    """How a loop runs in a process group. Ray-free: `jobs/raytrain.py` fills it from Ray Train.

    rank, world_size: this process's place; prepare(module) wraps the module that computes the
    loss for data-parallel training (DDP) and returns what to call instead; all_reduce(metrics)
    averages scalar metrics over ranks (called by every rank at the same steps). With
    `sharded_base`, rank 0 reloads the base whole for saving and evaluation after training."""

    rank: int = 0
    world_size: int = 1
    prepare: Callable[[nn.Module], nn.Module] = field(default=lambda m: m)
    all_reduce: Callable[[dict[str, float]], dict[str, float]] | None = None
    device: str = "cpu"
    sharded_base: bool = False  # prepare() shards the frozen base (FSDP) across the ranks

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world_size) if self.world_size > 1 else None


def checkpoint_callback(
    module: nn.Module, out_dir: str | Path, dist: Distributed, hook=None
) -> Callable[[int, object, object, TrainState], None]:
    """fit's `checkpoint` for the recipes: hook(step, save_into) is called on every rank;
    save_into(folder) writes `module`'s training state there. Default hook: rank 0 saves to
    OUT_DIR/checkpoints/last."""

    def default_hook(step: int, save_into) -> None:
        if dist.rank == 0:
            save_into(Path(out_dir) / "checkpoints" / "last")

    def checkpoint(step, opt, sched, state) -> None:
        (hook or default_hook)(
            step, lambda folder: save_checkpoint(folder, module, opt, sched, state)
        )

    return checkpoint


#: loss_fn(batch, generator) -> (loss, scalar metrics). Metrics may be 0-dim tensors: `fit`
#: reads them (a host sync on a GPU) only at the steps it logs.
LossFn = Callable[[dict, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]


def fit(
    module: nn.Module,
    loss_fn: LossFn,
    get_batch: Callable[[int, int], dict],
    cfg: TrainConfig,
    evaluate: Callable[[], dict[str, float]] | None = None,
    report: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: Callable[[int, object, object, TrainState], None] | None = None,
    checkpoint_every: int = 0,
    resume_from: str | Path | None = None,
    progress: bool = True,
    all_reduce: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> TrainState:
    """Train `module`'s parameters that require grad.

    loss_fn(batch, generator) -> (loss, scalar metrics); get_batch(step, micro) -> the micro-batch
    `micro` of step `step` (already on the right device); evaluate() -> metrics, run every
    `cfg.eval_every` steps and at the end; report(step, metrics) receives every log line;
    checkpoint(step, opt, sched, state) is called every `checkpoint_every` steps.
    Data-parallel: every rank calls fit; `all_reduce` averages the logged metrics over ranks,
    and the caller passes `report`, `evaluate` and `progress` on rank 0 only.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    opt, sched = build_optimizer(params, cfg)
    state = load_checkpoint(resume_from, module, opt, sched) if resume_from else TrainState()
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not progress, desc="train")
    t0, tokens = time.perf_counter(), 0
    while state.step < cfg.max_steps:
        step = state.step
        metrics, ntok = _train_step(module, loss_fn, get_batch, cfg, opt, params, step)
        sched.step()
        tokens += ntok
        state.step = step + 1
        last = state.step == cfg.max_steps
        evaluating = evaluate is not None and (
            last or (cfg.eval_every > 0 and state.step % cfg.eval_every == 0)
        )
        if state.step % cfg.log_every == 0 or last or step == 0 or evaluating:
            metrics = {k: float(v) for k, v in metrics.items()}
            tokens = int(tokens)
            if all_reduce is not None:
                metrics = all_reduce(metrics)
            metrics["lr"] = sched.get_last_lr()[0]
            metrics["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
            if evaluating:
                metrics.update(evaluate())
            state.history.append({"step": state.step, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if report:
                report(state.step, metrics)
        if checkpoint and checkpoint_every and (state.step % checkpoint_every == 0 or last):
            checkpoint(state.step, opt, sched, state)
        bar.update(1)
    bar.close()
    return state


def _train_step(module, loss_fn, get_batch, cfg, opt, params, step):
    """One optimizer step over cfg.grad_accum micro-batches; returns (metrics, tokens), both
    left on the device as tensors where they are tensors: nothing here waits for the GPU."""
    module.train()
    opt.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor | float] = {}
    ntok: torch.Tensor | int = 0
    gen = step_generator(cfg.seed, step, params[0].device)
    for micro in range(cfg.grad_accum):
        batch = get_batch(step, micro)
        device_type = batch["input_ids"].device.type
        with torch.autocast(device_type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, m = loss_fn(batch, gen)
        (loss / cfg.grad_accum).backward()
        ntok = ntok + batch["attention_mask"].sum()
        for k, v in {"loss": loss, **m}.items():
            v = v.detach() if isinstance(v, torch.Tensor) else v
            sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
    if cfg.grad_clip:
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return sums, ntok
