"""Denoising loss on target positions, for any denoiser behind the seam.

For the absorbing process the continuous-time ELBO (MDLM) is

    L = E_t [ w(t) * sum_{l masked} -log p(x0_l | x_t) ],   w(t) = -alpha'(t) / (1 - alpha(t)),

normalised here by the number of target tokens. The `simple` weighting drops w(t): a plain
mean cross-entropy over the loss positions, as in LLaDA's fine-tuning. Padding and condition
tokens never carry loss; the output head runs only at loss positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .corruption import ForwardProcess, sample_t
from .schedules import NoiseSchedule

WEIGHTINGS = ("elbo", "simple")


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, to backpropagate
    nll: torch.Tensor  # scalar, mean -log p over loss positions (unweighted), detached
    num_loss_tokens: int
    target_count: torch.Tensor  # 0-dim: target tokens, left on the device (no sync to make it)

    @property
    def num_target_tokens(self) -> int:
        return int(self.target_count)


def denoising_loss(
    denoiser,
    batch: dict[str, torch.Tensor],
    process: ForwardProcess,
    schedule: NoiseSchedule,
    weighting: str = "elbo",
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    shard: tuple[int, int] | None = None,
) -> LossOutput:
    """Corrupt the batch's target tokens at random t, denoise, score the clean tokens.

    batch: input_ids (B, L), attention_mask (B, L), target_mask (B, L) bool.
    t: optional fixed times (B,); sampled low-discrepancy in [0, 1] when omitted.
    shard: (rank, world_size) for data-parallel training. `batch` is then the global batch:
    the noise is drawn for all of it (the same on every rank), the network runs on rows
    rank::world_size only, and the loss is scaled so that the mean over ranks (what DDP's
    gradient averaging computes) equals the single-process loss of the global batch exactly.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose from {WEIGHTINGS}")
    if weighting == "elbo" and not process.loss_on_corrupted_only:
        raise ValueError(
            "the `elbo` weighting is the absorbing process's ELBO; use weighting='simple' "
            "with the uniform process"
        )
    x0, attn = batch["input_ids"], batch["attention_mask"]
    target_mask = batch["target_mask"].bool() & attn.bool()
    if t is None:
        t = sample_t(x0.shape[0], generator=generator, device=x0.device)
    xt, changed = process.corrupt(x0, schedule.alpha(t), target_mask, generator)
    # Denominators of the global batch: the number of targets, and of loss positions (0-dim
    # tensors: reading them on the host would wait for the GPU).
    num_targets = target_mask.sum()
    den_elbo = num_targets.clamp_min(1)
    den_simple = (changed if process.loss_on_corrupted_only else target_mask).sum().clamp_min(1)
    if shard is not None:
        rank, world = shard
        x0, xt, attn, t = x0[rank::world], xt[rank::world], attn[rank::world], t[rank::world]
        target_mask, changed = target_mask[rank::world], changed[rank::world]
        den_elbo, den_simple = den_elbo / world, den_simple / world
    cond_mask = attn.bool() & ~target_mask
    h = denoiser.hidden_states(xt, attn, t, condition_mask=cond_mask)  # (B, L, d)
    loss_pos = changed if process.loss_on_corrupted_only else target_mask
    logits = denoiser.output_head(h[loss_pos])  # (N, V), N = loss positions
    nll = F.cross_entropy(logits.float(), x0[loss_pos], reduction="none")  # (N,)
    n = nll.numel()
    if weighting == "elbo":
        w = schedule.elbo_weight(t)[:, None].expand_as(loss_pos)[loss_pos]  # (N,)
        loss = (w * nll).sum() / den_elbo
    else:
        loss = nll.sum() / den_simple
    mean_nll = nll.detach().mean() if n else nll.detach().sum()
    return LossOutput(loss, mean_nll, n, num_targets)


@torch.no_grad()
def heldout_loss(
    denoiser,
    batches,
    process: ForwardProcess,
    schedule: NoiseSchedule,
    seed: int = 0,
    repeats: int = 1,
) -> float:
    """Mean ELBO-weighted loss per target token over `batches`, at seeded times: comparable
    across runs and an upper bound on the per-token NLL (nats) for the absorbing process."""
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for batch in batches:
            out = denoising_loss(denoiser, batch, process, schedule, "elbo", generator=g)
            total += float(out.loss) * out.num_target_tokens
            count += out.num_target_tokens
    return total / max(count, 1)


class LossModule(nn.Module):
    """The whole training loss as one module's forward: denoising NLL + a method's extra terms
    (name -> weighted scalar), so a data-parallel wrapper (DDP) sees every trainable parameter
    the loss touches. forward(batch, generator) -> (loss, mean nll, extras)."""

    def __init__(
        self,
        model: nn.Module,
        process: ForwardProcess,
        schedule: NoiseSchedule,
        weighting: str = "elbo",
        shard: tuple[int, int] | None = None,
        extra_loss: Callable[[], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.model, self.extra_loss = model, extra_loss or dict
        self.process, self.schedule, self.weighting, self.shard = (
            process,
            schedule,
            weighting,
            shard,
        )

    def forward(self, batch: dict, gen: torch.Generator | None = None):
        out = denoising_loss(
            self.model, batch, self.process, self.schedule, self.weighting, gen, shard=self.shard
        )
        extras = self.extra_loss()
        return out.loss + sum(extras.values(), torch.zeros(())), out.nll, extras
