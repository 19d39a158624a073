"""Ancestral sampling over T discrete steps, for any forward process and any denoiser.

Condition tokens stay fixed; only target positions are sampled. When the denoiser is
time-agnostic and no token changed since the last step, its output is reused instead of
calling the network again (MDLM's caching trick); the saved calls are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .corruption import ForwardProcess
from .schedules import NoiseSchedule


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # (B, L) final sequences
    trajectory: list[torch.Tensor] = field(default_factory=list)  # x_t after each step
    network_calls: int = 0
    calls_saved: int = 0


def device_of(model) -> torch.device:
    """Where a model's parameters live (the CPU for parameter-free stubs)."""
    params = model.parameters() if hasattr(model, "parameters") else iter(())
    first = next(params, None)
    return first.device if first is not None else torch.device("cpu")


def init_targets(
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    process: ForwardProcess,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """x_T: target positions drawn from the stationary noise (all [MASK] when absorbing).
    `generator` may be one per row (see `sample`)."""
    if isinstance(generator, Sequence):
        noise = torch.cat(
            [process.noise_like(row[None], g) for row, g in zip(input_ids, generator, strict=True)]
        )
    else:
        noise = process.noise_like(input_ids, generator)
    return torch.where(target_mask, noise, input_ids)


@torch.no_grad()
def sample(
    denoiser,
    process: ForwardProcess,
    schedule: NoiseSchedule,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    steps: int | Sequence[int] = 100,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    cache: bool = True,
    return_trajectory: bool = False,
    temperature: float = 1.0,
) -> SampleOutput:
    """Sample the target positions of a batch from t = 1 to 0 in `steps` equal steps.

    input_ids: (B, L) with condition tokens in place (target content is ignored);
    attention_mask: (B, L); target_mask: (B, L) bool. `generator`: one for the batch, or one
    per row, so that a row's sample depends only on its own seed, not on what it is batched
    with (a server batching requests of different clients needs this). `steps` may be one per
    row too (with one generator per row): each row then follows its own time grid in one
    pass of max(steps) network calls, each over the rows still sampling (a denoiser that
    keeps per-row state is told which rows a call holds through its `select_rows(idx)`).
    `temperature` scales the logits of p(x0 | x_t); 0 takes their argmax (greedy decoding: the
    positions still unmask at random, each to its most likely token).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(steps, Sequence):  # a step count per row
        batch = (input_ids, attention_mask, target_mask, list(steps))
        return _sample_rows(denoiser, process, schedule, *batch, generator, temperature)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    per_row = isinstance(generator, Sequence)
    if per_row and len(generator) != input_ids.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {input_ids.shape[0]} rows")
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
            probs = _x0_probs(denoiser.output_head(h[target_mask]), process, temperature)
            out.network_calls += 1
        else:
            out.calls_saved += 1
        alpha_t = float(schedule.alpha(torch.tensor(t)))
        alpha_s = float(schedule.alpha(torch.tensor(s))) if s > 0 else 1.0
        prev = x
        x = x.clone()
        if per_row:
            n = len(generator)
            x[target_mask] = _posterior_rows(
                process, x, target_mask, probs, [alpha_t] * n, [alpha_s] * n, generator
            )
        else:
            x[target_mask] = process.posterior_step(
                x[target_mask], probs, alpha_t, alpha_s, generator
            )
        if return_trajectory:
            out.trajectory.append(x.clone())
    out.tokens = x
    return out


def _sample_rows(
    denoiser,
    process,
    schedule,
    input_ids,
    attention_mask,
    target_mask,
    steps,
    generators,
    temperature=1.0,
) -> SampleOutput:
    """`sample` with per-row step counts: row r steps through t = (S_r - k) / S_r, k < S_r."""
    b = input_ids.shape[0]
    if len(steps) != b or min(steps) < 1:
        raise ValueError(f"per-row steps must be {b} values >= 1, got {steps}")
    if not (isinstance(generators, Sequence) and len(generators) == b):
        raise ValueError("per-row steps need one generator per row")
    target_mask = target_mask.bool()
    cond_mask = attention_mask.bool() & ~target_mask
    x = init_targets(input_ids, target_mask, process, generators)
    out = SampleOutput(tokens=x)
    select = getattr(denoiser, "select_rows", None)
    for k in range(max(steps)):
        rows = [r for r in range(b) if steps[r] > k]
        idx = torch.tensor(rows, device=x.device)
        if select is not None:
            select(idx)
        t = [(steps[r] - k) / steps[r] for r in rows]
        tt = torch.tensor(t, device=x.device, dtype=torch.float32)
        xs, tm = x[idx], target_mask[idx]
        h = denoiser.hidden_states(xs, attention_mask[idx], tt, condition_mask=cond_mask[idx])
        probs = _x0_probs(denoiser.output_head(h[tm]), process, temperature)  # (N, V)
        out.network_calls += 1
        alpha = lambda u: float(schedule.alpha(torch.tensor(u))) if u > 0 else 1.0
        xs = xs.clone()
        xs[tm] = _posterior_rows(
            process,
            xs,
            tm,
            probs,
            [alpha(u) for u in t],
            [alpha((steps[r] - k - 1) / steps[r]) for r in rows],
            [generators[r] for r in rows],
        )
        x = x.clone()
        x[idx] = xs
    out.tokens = x
    return out


def _posterior_rows(process, x, target_mask, probs, alphas_t, alphas_s, generators):
    """One posterior step row by row, each with its own alphas and generator: the new tokens at
    x[target_mask] (rows' target positions are contiguous there and in probs (N, V))."""
    sizes = target_mask.sum(1).tolist()
    parts = zip(
        x[target_mask].split(sizes), probs.split(sizes), alphas_t, alphas_s, generators, strict=True
    )
    return torch.cat([process.posterior_step(*part) for part in parts])


def _x0_probs(
    logits: torch.Tensor, process: ForwardProcess, temperature: float = 1.0
) -> torch.Tensor:
    """p(x0 | x_t) over the vocabulary, never the mask token: (N, V) -> (N, V); at
    `temperature` 0 a one-hot on the most likely token."""
    logits = logits.float()
    logits[..., process.mask_token_id] = float("-inf")
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return (logits / temperature).softmax(-1)
