"""Text in, text out: continue or answer prompts with any denoiser via the sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .corruption import get_process
from .sampling import device_of, sample
from .schedules import get_schedule


@dataclass
class Generation:
    texts: list[str]
    network_calls: int
    calls_saved: int
    trajectory: list[list[str]] | None = None  # per step, the batch's decoded targets


def continuation_batch(tokenizer, prompts: list[str], gen_length: int) -> dict[str, torch.Tensor]:
    """Prompt tokens then `gen_length` target positions, left-padded so targets align.

    The base is pretrained on packed running text, so a plain continuation (no special tokens)
    is what it knows. Returns input_ids, attention_mask (B, L) and target_mask (B, L) bool.
    """
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids) + gen_length
    pad = tokenizer.pad_token_id
    rows, attn, tgt = [], [], []
    for x in ids:
        n_pad = width - len(x) - gen_length
        rows.append([pad] * n_pad + x + [tokenizer.mask_token_id] * gen_length)
        attn.append([0] * n_pad + [1] * (len(x) + gen_length))
        tgt.append([0] * (n_pad + len(x)) + [1] * gen_length)
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": torch.tensor(attn),
        "target_mask": torch.tensor(tgt).bool(),
    }


def generate(
    denoiser,
    tokenizer,
    batch: dict[str, torch.Tensor],
    process: str = "absorbing",
    schedule: str = "loglinear",
    steps: int = 100,
    seed: int = 0,
    cache: bool = True,
    return_trajectory: bool = False,
) -> Generation:
    """Sample the target positions of `batch` and decode them (the text of each target). The
    batch may be on the CPU: it is moved to the denoiser's device."""
    proc = get_process(process, len(tokenizer), tokenizer.mask_token_id)
    device = device_of(denoiser)
    batch = {k: v.to(device) for k, v in batch.items()}
    g = torch.Generator().manual_seed(seed)
    out = sample(
        denoiser,
        proc,
        get_schedule(schedule),
        batch["input_ids"],
        batch["attention_mask"],
        batch["target_mask"],
        steps=steps,
        generator=g,
        cache=cache,
        return_trajectory=return_trajectory,
    )
    mask = batch["target_mask"].bool()

    def decode(x: torch.Tensor) -> list[str]:
        return [tokenizer.decode(row[m]) for row, m in zip(x, mask, strict=True)]

    traj = [decode(x) for x in out.trajectory] if return_trajectory else None
    return Generation(decode(out.tokens), out.network_calls, out.calls_saved, traj)
