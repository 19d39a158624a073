"""LoRA-Diffusion as a tuning method: the trajectory adaptor on a frozen base, registered as
`lora_diffusion` in `methods.METHODS`."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from .adaptor import TrajectoryAdaptor
from .adaptor_io import adaptor_report, load_adaptor, save_adaptor
from .composition import AdaptedDenoiser
from .config import BaselineConfig, FinetuneConfig
from .methods import Method, MethodBundle, register
from .training import checkpoint_step


def build_lora_diffusion(cfg: FinetuneConfig, base: nn.Module) -> MethodBundle:
    adaptor = TrajectoryAdaptor(cfg.adaptor, base.config.hidden_size)
    model = AdaptedDenoiser(base, {cfg.task: adaptor})

    # The training step of each call, from the step training starts at, so that a resumed run
    # regularises at the same steps as an uninterrupted one (extra runs once per micro-batch).
    calls = itertools.count(checkpoint_step(cfg.resume_from) * cfg.train.grad_accum)

    def extra() -> dict[str, torch.Tensor]:
        step = next(calls) // cfg.train.grad_accum
        reg = adaptor.regularisers(rank=step % cfg.rank_every == 0)
        return {
            "reg_rank": cfg.rank_every * cfg.adaptor.lambda_rank * reg["rank"],
            "reg_orth": cfg.adaptor.lambda_orth * reg["orth"],
        }

    # model.base, not `base`: a data-parallel run with a sharded base swaps in a whole copy
    def save(path: Path) -> None:
        save_adaptor(path, adaptor, model.base, task=cfg.task, method="lora_diffusion")

    return MethodBundle(model, extra, save, describe=lambda: adaptor_report(adaptor, model.base))


def load_lora_diffusion(path: Path, base: nn.Module, cfg: BaselineConfig) -> AdaptedDenoiser:
    """The saved adaptor on `base`, under the task it was trained on (`load_method` has checked
    the base fingerprint already)."""
    adaptor, config = load_adaptor(path, base, check_base=False)
    return AdaptedDenoiser(base, {config.get("task") or "task": adaptor})


register(
    Method(
        "lora_diffusion",
        build_lora_diffusion,
        load_lora_diffusion,
        default_lr=1e-3,  # chosen on held-out SST-2 rows, 3 seeds (docs/READER.md)
        label="LoRA-Diffusion",
        run_name_knobs=(("r", "adaptor.ranks"), ("k", "adaptor.k")),
        in_paper=True,
        frozen_base=True,
    )
)
