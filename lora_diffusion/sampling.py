"""Ancestral sampling over T discrete steps, for any forward process and any denoiser.

Condition tokens stay fixed; only target positions are sampled. When the denoiser is
time-agnostic and no token changed since the last step, its output is reused instead of
calling the network again (MDLM's caching trick); the saved calls are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .corruption import ForwardProcess
from .schedules import NoiseSchedule


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, L) final sequences
    trajectory: list[torch.Tensor] = field(default_factory=list)  # x_t after each step
    network_calls: int = 0
    calls_saved: int = 0


def init_targets(
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    process: ForwardProcess,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_T: target positions drawn from the stationary noise (all [MASK] when absorbing)."""
    return torch.where(target_mask, process.noise_like(input_ids, generator), input_ids)


@torch.no_grad()
def sample(
    denoiser,
    process: ForwardProcess,
    schedule: NoiseSchedule,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    steps: int = 100,
    generator: torch.Generator | None = None,
    cache: bool = True,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Sample the target positions of a batch from t = 1 to 0 in `steps` equal steps.

    input_ids: (B, L) with condition tokens in place (target content is ignored);
    attention_mask: (B, L); target_mask: (B, L) bool.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    target_mask = target_mask.bool()
    cond_mask = attention_mask.bool() & ~target_mask
    x = init_targets(input_ids, target_mask, process, generator)
    out = SampleOutput(tokens=x)
    reusable = cache and not getattr(denoiser, "time_conditioned", True)
    probs, prev = None, None
    for i in range(steps, 0, -1):
        t, s = i / steps, (i - 1) / steps
        if probs is None or not (reusable and torch.equal(x, prev)):
            tt = torch.full((x.shape[0],), t, device=x.device)
            h = denoiser.hidden_states(x, attention_mask, tt, condition_mask=cond_mask)
            probs = _x0_probs(denoiser.output_head(h[target_mask]), process)  # (N, V)
            out.network_calls += 1
        else:
            out.calls_saved += 1
        alpha_t = float(schedule.alpha(torch.tensor(t)))
        alpha_s = float(schedule.alpha(torch.tensor(s))) if s > 0 else 1.0
        prev = x
        x = x.clone()
        x[target_mask] = process.posterior_step(x[target_mask], probs, alpha_t, alpha_s, generator)
        if return_trajectory:
            out.trajectory.append(x.clone())
    out.tokens = x
    return out


def _x0_probs(logits: torch.Tensor, process: ForwardProcess) -> torch.Tensor:
    """p(x0 | x_t) over the vocabulary, never the mask token: (N, V) -> (N, V)."""
    logits = logits.float()
    logits[..., process.mask_token_id] = float("-inf")
    return logits.softmax(-1)
