"""Held-out train rows (`FinetuneConfig.holdout`): never trained on, scored as `val_*`, and what
`benchmarks/compare_methods.py` chooses each method's learning rate on."""

from __future__ import annotations

import json

import pytest

from lora_diffusion.data import tokenize_task
from lora_diffusion.finetune import FinetuneConfig, finetune, train_and_holdout
from tests.helpers import finetune_config


def _cfg(base, data_dir, tmp_path, **fields) -> FinetuneConfig:
    return finetune_config(
        base, data_dir, tmp_path, task="trec", max_length=48, eval_steps=1, **fields
    )


def test_holdout_is_the_last_train_rows_and_never_trained_on(tiny_tokenizer, data_dir, tmp_path):
    full = tokenize_task("trec", "train", tiny_tokenizer, 48, data_dir, tmp_path / "cache")
    n = len(full)
    train, val = train_and_holdout(_cfg("-", data_dir, tmp_path, holdout=30), tiny_tokenizer)
    assert (len(train), len(val)) == (n - 30, 30)
    assert val["input_ids"] == full.select(range(n - 30, n))["input_ids"]
    assert train["input_ids"] == full.select(range(n - 30))["input_ids"]
    # a train limit takes the first rows before the held-out ones, never into them
    train, val = train_and_holdout(
        _cfg("-", data_dir, tmp_path, holdout=30, train_limit=10), tiny_tokenizer
    )
    assert train["input_ids"] == full.select(range(10))["input_ids"] and len(val) == 30
    train, _ = train_and_holdout(
        _cfg("-", data_dir, tmp_path, holdout=30, train_limit=n), tiny_tokenizer
    )
    assert len(train) == n - 30
    train, val = train_and_holdout(_cfg("-", data_dir, tmp_path, train_limit=7), tiny_tokenizer)
    assert len(train) == 7 and val is None


def test_bad_holdouts_fail_with_their_size(tiny_tokenizer, data_dir, tmp_path):
    with pytest.raises(ValueError, match="holdout must be >= 0 train rows, got -1"):
        _cfg("-", data_dir, tmp_path, holdout=-1)
    with pytest.raises(ValueError, match="holdout=5452 leaves no rows to train on.*has 5452"):
        train_and_holdout(_cfg("-", data_dir, tmp_path, holdout=5452), tiny_tokenizer)


def test_finetune_scores_the_holdout_during_and_after_training(tiny_base_dir, data_dir, tmp_path):
    seen = []
    train = {"eval_every": 1}
    cfg = _cfg(tiny_base_dir, data_dir, tmp_path, holdout=6, train_limit=16, train=train)
    result = finetune(cfg, report=lambda step, m: seen.append(m), progress=False)
    assert result["val_n"] == 6 and result["eval_n"] == 4
    assert 0 <= result["val_accuracy_scoring"] <= 1 and result["val_gold_loss"] > 0
    periodic = [m for m in seen if "val_gold_loss" in m]
    assert len(periodic) == 2 and not any("eval_gold_loss" in m for m in seen)
    # the final validation is the same scoring of the same rows as the last periodic one
    assert periodic[-1]["val_gold_loss"] == pytest.approx(result["val_gold_loss"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val_accuracy_scoring"] == result["val_accuracy_scoring"]


def test_compare_methods_chooses_the_learning_rate_on_the_holdout(
    tiny_base_dir, data_dir, tmp_path
):
    from benchmarks.compare_methods import best_per_method, main

    out = tmp_path / "compare"
    rows = main(["--base", str(tiny_base_dir), "--task", "trec", "--methods",
                 "lora_diffusion,bitfit", "--lr-factors", "0.1,3", "--max-steps", "3",
                 "--batch-size", "4", "--train-limit", "24", "--eval-limit", "6",
                 "--holdout", "12", "--forgetting-blocks", "0", "--data-dir", str(data_dir),
                 "--set", "scoring_num_t=1", "--set", "eval_steps=1", "--set", "max_length=48",
                 "--output-dir", str(out)])  # fmt: skip
    runs = json.loads((out / "all_runs.json").read_text())
    assert len(runs) == 4 and [r["method"] for r in rows] == ["lora_diffusion", "bitfit"]
    for row in rows:
        mine = [r for r in runs if r["method"] == row["method"]]
        best = max((r["val_accuracy_scoring"], -r["val_gold_loss"]) for r in mine)
        assert (row["val_accuracy_scoring"], -row["val_gold_loss"]) == best
        assert all(r["val_n"] == 12 for r in mine)
    assert "chosen on the last 12 rows of the train split" in (out / "table.md").read_text()
    assert (out / "plots" / "lr_sweep.png").stat().st_size > 0
    # the choice follows the split it is told to use: the dev scores pick differently here
    fake = [
        {
            "method": "m",
            "lr": 1,
            "val_accuracy_scoring": 0.9,
            "val_gold_loss": 2.0,
            "eval_accuracy_scoring": 0.1,
            "eval_gold_loss": 2.0,
        },
        {
            "method": "m",
            "lr": 2,
            "val_accuracy_scoring": 0.9,
            "val_gold_loss": 1.0,
            "eval_accuracy_scoring": 0.5,
            "eval_gold_loss": 1.0,
        },
        {
            "method": "m",
            "lr": 3,
            "val_accuracy_scoring": 0.2,
            "val_gold_loss": 0.5,
            "eval_accuracy_scoring": 0.8,
            "eval_gold_loss": 3.0,
        },
    ]
    assert best_per_method(fake, "val")[0]["lr"] == 2  # a tie on accuracy: the lower loss
    assert best_per_method(fake, "eval")[0]["lr"] == 3
