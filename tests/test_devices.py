"""Where things live: every module and tensor the recipes make after `Distributed.prepare` sits
on the Distributed's device, for every method.

A CPU-only machine cannot run on a second device, but CPU torch has one it can place modules
on: `meta` (shapes without data). These tests train on `meta` with the numeric parts (the
training loop, saving, the evaluations) replaced by recorders of where their inputs live; on a
GPU the same misplacement is a device-mismatch crash at evaluation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lora_diffusion.finetune as ft
from lora_diffusion import evaluation, generation
from lora_diffusion.config import BaselineConfig
from lora_diffusion.training import Distributed, TrainConfig, TrainState

METHODS = (
    "lora_diffusion",
    "full",
    "weight_lora",
    "bitfit",
    "adapters",
    "prefix",
    "loreft",
    "nara",
)
SMALL = BaselineConfig(lora_rank=4, bottleneck=8, prefix_length=4, loreft_rank=4, nara_rank=4)


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    return module.to("meta")


def devices(module: torch.nn.Module) -> set[str]:
    tensors = [*module.parameters(), *module.buffers()]
    return {t.device.type for t in tensors}


@pytest.fixture()
def recorded(monkeypatch) -> dict[str, set[str]]:
    """finetune with training, saving and evaluation replaced by recorders: returns, per place
    a model reached, the device types of its parameters and buffers."""
    seen: dict[str, set[str]] = {}
    get_method = ft.METHODS.get

    def fake_fit(module, loss_fn, get_batch, cfg, evaluate=None, **kwargs):
        seen["trained"] = devices(module)
        if evaluate is not None:
            evaluate()
        return TrainState(cfg.max_steps, [{"step": cfg.max_steps, "loss": 1.0, "nll": 1.0}])

    def no_numerics(name):  # saving and reports read the weights' values: none on meta
        method = get_method(name)

        def build(cfg, base):
            bundle = method.build(cfg, base)
            return dataclasses.replace(bundle, save=lambda path: None, describe=None)

        return dataclasses.replace(method, build=build)

    def fake_evaluate_all(cfg, model, base, *args, **kwargs):
        seen["evaluated"], seen["reference"] = devices(model), devices(base)
        return {}

    def fake_validate(cfg, model, tok, dataset, prefix):
        seen[f"validated_{prefix}"] = devices(model)
        return {}

    monkeypatch.setattr(ft, "fit", fake_fit)
    monkeypatch.setattr(ft.METHODS, "get", no_numerics)
    monkeypatch.setattr(ft, "evaluate_all", fake_evaluate_all)
    monkeypatch.setattr(ft, "validate", fake_validate)
    monkeypatch.setattr(ft, "_size_report", lambda *args: {})
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_every_model_finetune_trains_and_evaluates_lives_on_the_training_device(
    method, recorded, tiny_base_dir, data_dir, tmp_path, tmp_path_factory
):
    cfg = ft.FinetuneConfig(
        base=str(tiny_base_dir),
        output_dir=str(tmp_path / "run"),
        method=method,
        data_dir=str(data_dir),
        max_length=64,
        train_limit=8,
        eval_limit=4,
        baselines=SMALL,
        cache_dir=str(tmp_path_factory.getbasetemp() / "device-cache"),
        train=TrainConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_every=1),
    )
    ft.finetune(cfg, progress=False, dist=Distributed(device="meta", prepare=on_meta))
    assert recorded == {
        "trained": {"meta"},
        "validated_eval": {"meta"},  # periodic evaluation
        "evaluated": {"meta"},
        "reference": {"meta"},  # the pristine base forgetting compares against
    }


def test_generate_feeds_the_denoiser_its_batch_on_the_denoiser_s_device(
    tiny_model, tiny_tokenizer, monkeypatch
):
    seen = []

    def fake_sample(denoiser, process, schedule, input_ids, attention_mask, target_mask, **kwargs):
        seen.extend(x.device.type for x in (input_ids, attention_mask, target_mask))
        raise StopIteration

    monkeypatch.setattr(generation, "sample", fake_sample)
    batch = generation.continuation_batch(tiny_tokenizer, ["the cat"], 3)
    with pytest.raises(StopIteration):
        generation.generate(tiny_model.to("meta"), tiny_tokenizer, batch, steps=2)
    assert seen == ["meta"] * 3


def test_forgetting_scores_each_model_on_blocks_on_its_own_device(tiny_model, monkeypatch):
    seen = []

    def fake_corpus_loss(denoiser, batches, process, schedule, seed):
        seen.append((_device_type(denoiser), {t.device.type for b in batches for t in b.values()}))
        return 0.0

    monkeypatch.setattr(evaluation, "_corpus_loss", fake_corpus_loss)
    reference = torch.nn.Module()
    reference.weight = torch.nn.Parameter(torch.zeros(1))  # a stand-in base on the CPU
    reference.mask_token_id = 1
    blocks = torch.randint(6, 64, (3, 8))
    evaluation.forgetting(reference, tiny_model.to("meta"), blocks)
    assert seen == [("cpu", {"cpu"}), ("meta", {"meta"})]


def _device_type(module) -> str:
    return next(module.parameters()).device.type
