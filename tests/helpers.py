"""Builders the test modules share."""

from __future__ import annotations

from pathlib import Path

from lora_diffusion.finetune import FinetuneConfig
from lora_diffusion.training import TrainConfig


def finetune_config(base, data_dir, tmp_path: Path, train: dict | None = None, **fields):
    """A `FinetuneConfig` sized for a test: `base` on the shipped data, two steps of four
    examples at lr 5e-3, four eval examples scored at one t, no forgetting measure, its files
    under `tmp_path`; `fields` (config fields) and `train` (`TrainConfig` fields) on top."""
    steps = {"lr": 5e-3, "max_steps": 2, "batch_size": 4, "warmup_steps": 0} | (train or {})
    sized = {
        "output_dir": str(tmp_path / "run"),
        "data_dir": str(data_dir),
        "max_length": 64,
        "eval_limit": 4,
        "scoring_num_t": 1,
        "forgetting_blocks": 0,
        "cache_dir": str(tmp_path / "cache"),
    }
    return FinetuneConfig(base=str(base), train=TrainConfig(**steps), **(sized | fields))
