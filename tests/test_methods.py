"""The method records: one registration makes a method trainable, loadable and named."""

import json

import pytest
import torch
from torch import nn

import lora_diffusion.finetune as ft
from jobs import train as train_job
from jobs.tracking import run_name
from lora_diffusion.adaptor_io import AdaptorFileError
from lora_diffusion.composition import AdaptedDenoiser
from lora_diffusion.config import FinetuneConfig
from lora_diffusion.methods import (
    METHOD_FILE,
    METHODS,
    Method,
    MethodBundle,
    load_method,
    register,
)
from lora_diffusion.models import DiffusionLM, preset_config


class Scaled(nn.Module):
    """A toy method: the base's hidden states times a learned scalar."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base, self.scale = base, nn.Parameter(torch.ones(()))


def build_scaled(cfg, base):
    return MethodBundle(Scaled(base), dict, lambda path: None)


def load_scaled(path, base, cfg):
    return Scaled(base).train()


SCALED = Method(
    "scaled",
    build_scaled,
    load_scaled,
    default_lr=0.25,
    label="scaled",
    run_name_knobs=(("b", "baselines.bottleneck"),),
)


@pytest.fixture()
def scaled_folder(tmp_path):
    (tmp_path / METHOD_FILE).write_text(json.dumps({"method": "scaled"}))
    return tmp_path


def test_adding_a_method_is_one_registration(scaled_folder, monkeypatch):
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # restored after the test
    base = DiffusionLM(preset_config("tiny", vocab_size=64))
    with pytest.raises(AdaptorFileError, match="unknown method 'scaled'"):
        load_method(scaled_folder, base)

    register(SCALED)

    cfg = FinetuneConfig(base="-", output_dir="-", method="scaled")
    assert isinstance(ft.METHODS.get(cfg.method).build(cfg, base).model, Scaled)  # the recipe's
    loaded = load_method(scaled_folder, base)
    assert isinstance(loaded, Scaled) and not loaded.training
    a = train_job.parse_args(["--base", "-", "--output-dir", "-"])
    a.method = "scaled"  # --method's choices are jobs/common.py's copy, checked in test_jobs
    assert train_job.build_config(a).train.lr == 0.25
    assert run_name(cfg) == "scaled-sst2-b256-lr0.002"
    with pytest.raises(ValueError, match="already registered"):
        register(SCALED)


# what jobs/tracking.py named runs before the knobs moved onto the records
RUN_NAMES = {
    "lora_diffusion": "lora_diffusion-sst2-r64-k2-lr0.002",  # one phase since the defaults changed
    "weight_lora": "weight_lora-sst2-r64-lr0.002",
    "adapters": "adapters-sst2-b256-lr0.002",
    "prefix": "prefix-sst2-p32-lr0.002",
    "full": "full-sst2-lr0.002",
    "bitfit": "bitfit-sst2-lr0.002",
    "loreft": "loreft-sst2-lr0.002",
    "nara": "nara-sst2-lr0.002",
}


def test_every_method_names_its_runs_as_before():
    assert sorted(RUN_NAMES) == METHODS.names()
    for method, name in RUN_NAMES.items():
        assert run_name(FinetuneConfig(base="-", output_dir="-", method=method)) == name


def test_load_method_reads_a_lora_diffusion_folder_too(tmp_path):
    torch.manual_seed(0)
    base = DiffusionLM(preset_config("tiny", vocab_size=64)).eval()
    cfg = FinetuneConfig(base="-", output_dir="-", task="trec")
    bundle = METHODS.get("lora_diffusion").build(cfg, base)
    with torch.no_grad():
        for p in bundle.model.adaptor_parameters():
            p.normal_(0, 0.1)
    bundle.save(tmp_path)
    loaded = load_method(tmp_path, base, method="lora_diffusion")
    assert isinstance(loaded, AdaptedDenoiser) and list(loaded.adaptors) == ["trec"]
    ids = torch.randint(6, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 0.5)
    bundle.model.eval()
    h = loaded.hidden_states(ids, t=t)
    assert torch.equal(h, bundle.model.hidden_states(ids, t=t))
    assert not torch.equal(h, base.hidden_states(ids))  # the adaptor does something
