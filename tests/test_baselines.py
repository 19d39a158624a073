"""Every baseline method through the same generic checks (peft-style test table)."""

import copy

import pytest
import torch

from lora_diffusion.adaptor_io import AdaptorFileError
from lora_diffusion.baselines import trunk
from lora_diffusion.config import BaselineConfig, apply_overrides
from lora_diffusion.corruption import get_process
from lora_diffusion.finetune import FinetuneConfig, finetune
from lora_diffusion.losses import denoising_loss
from lora_diffusion.methods import METHODS, load_method, read_method_config
from lora_diffusion.models import DiffusionLM, preset_config
from lora_diffusion.schedules import get_schedule
from tests.helpers import finetune_config

V = 64
SMALL = BaselineConfig(lora_rank=4, bottleneck=8, prefix_length=4, loreft_rank=4, nara_rank=4)

# method -> (does base/method parameter `name` train?, trainable count on the tiny model)
CASES = {
    "full": (lambda n: True, None),
    "weight_lora": (lambda n: "lora_" in n, 2 * 4 * (4 * 64 + 64 * 4)),
    "adapters": (lambda n: n.startswith("delta."), 2 * 2 * (64 * 8 + 8 + 8 * 64 + 64)),
    "bitfit": (lambda n: n.endswith(".bias"), 2 * (4 * 64 + 256 + 64 + 2 * 64) + 64),
    "prefix": (lambda n: n.startswith("delta."), 4 * 2 * 2 * 64),
    "loreft": (lambda n: n.startswith("delta."), 4 * 64 + 4 * 64 + 4),
    "nara": (lambda n: n.startswith("delta."), (64 * 64 + 64 + 64 * 4 + 4) + 2 * 4 * 2 * 4 * 64),
}
STARTS_AS_BASE = {"full", "weight_lora", "adapters", "bitfit", "loreft", "nara"}  # not prefix


def tiny_base(seed=0):
    torch.manual_seed(seed)
    return DiffusionLM(preset_config("tiny", vocab_size=V)).eval()


def build(method, base, baselines=SMALL, **kw):
    cfg = FinetuneConfig(base="-", output_dir="-", method=method, baselines=baselines, **kw)
    return METHODS.get(method).build(cfg, base)


@pytest.fixture()
def batch():
    ids = torch.randint(6, V, (2, 12), generator=torch.Generator().manual_seed(1)).repeat(4, 1)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 6:] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_mask": target}


def loss_of(model, batch, seed=0):
    proc, sched = get_process("absorbing", V, 1), get_schedule("loglinear")
    t = torch.full((batch["input_ids"].shape[0],), 0.5)
    g = torch.Generator().manual_seed(seed)
    return denoising_loss(model, batch, proc, sched, "elbo", g, t=t).loss


def train(model, batch, steps, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        model.train()
        loss = loss_of(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def hidden(model, batch):
    model.eval()
    t = torch.full((batch["input_ids"].shape[0],), 0.3)
    with torch.no_grad():
        return model.hidden_states(batch["input_ids"], batch["attention_mask"], t)


@pytest.mark.parametrize("method", CASES)
def test_only_the_methods_parameters_get_gradients(method, batch):
    base = tiny_base()
    model = build(method, base).model
    loss_of(model, batch).backward()
    trains, count = CASES[method]
    for name, p in model.named_parameters():
        assert (p.grad is not None) == trains(name) == p.requires_grad, name
    expected = count or sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("method", CASES)
def test_frozen_parameters_stay_bitwise_unchanged_and_the_base_stays_the_base(method, batch):
    base = tiny_base()
    before = copy.deepcopy(base)
    bundle = build(method, base)
    trains, _ = CASES[method]
    start = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    train(bundle.model, batch, 3, 1e-2)
    changed = {n for n, p in bundle.model.named_parameters() if not torch.equal(p, start[n])}
    assert changed and all(trains(n) for n in changed)
    reference = base if bundle.reference is None else bundle.reference
    assert torch.equal(hidden(reference, batch), hidden(before, batch))


@pytest.mark.parametrize("method", CASES)
def test_save_and_load_give_identical_outputs(method, batch, tmp_path):
    base = tiny_base()
    bundle = build(method, base)
    train(bundle.model, batch, 3, 1e-2)
    bundle.save(tmp_path / "adaptor")
    assert read_method_config(tmp_path / "adaptor")["method"] == method
    assert {f.suffix for f in (tmp_path / "adaptor").iterdir()} <= {".json", ".safetensors", ".md"}
    reference = base if bundle.reference is None else bundle.reference
    loaded = load_method(tmp_path / "adaptor", reference, method=method)
    assert torch.equal(hidden(loaded, batch), hidden(bundle.model, batch))


@pytest.mark.parametrize("method", CASES)
def test_training_lowers_the_loss(method, batch):
    lr = {"full": 1e-3, "bitfit": 2e-2, "prefix": 5e-2}.get(method, 1e-2)
    losses = train(build(method, tiny_base()).model, batch, 30, lr)
    assert losses[-1] < 0.9 * losses[0], losses  # same noise every step: no noise in the losses


@pytest.mark.parametrize("method", CASES)
def test_zero_init_methods_start_as_the_base(method, batch):
    base = tiny_base()
    before = copy.deepcopy(base)
    model = build(method, base).model
    same = torch.allclose(hidden(model, batch), hidden(before, batch), atol=1e-6)
    assert same == (method in STARTS_AS_BASE)


def test_prefix_trunk_reproduces_the_base(batch):
    base = tiny_base()
    mask = batch["attention_mask"].clone()
    mask[0, -3:] = 0
    want = base.hidden_states(batch["input_ids"], mask)
    assert torch.allclose(trunk(base, batch["input_ids"], mask), want, atol=1e-6)


def test_weight_lora_folder_is_peft_loadable(batch, tmp_path):
    from peft import PeftModel

    base = tiny_base()
    bundle = build("weight_lora", base)
    train(bundle.model, batch, 2, 1e-2)
    bundle.save(tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(bundle.reference), tmp_path)
    out = peft_model.base_model.model.hidden_states(batch["input_ids"])
    assert torch.equal(out, bundle.model.hidden_states(batch["input_ids"]))


def test_bad_combinations_name_the_problem(batch, tmp_path):
    bad_target = BaselineConfig(target_modules=("q_proj", "gate_proj"))
    for method in ("weight_lora", "nara"):
        with pytest.raises(ValueError, match="gate_proj"):
            build(method, tiny_base(), bad_target)
    with pytest.raises(ValueError, match="max_length"):
        build("prefix", tiny_base(), BaselineConfig(prefix_length=64), max_length=32)
    with pytest.raises(ValueError, match="lora_rank"):
        BaselineConfig(lora_rank=0)
    build("adapters", tiny_base(), SMALL).save(tmp_path)
    with pytest.raises(AdaptorFileError, match="'adapters' adaptor, not 'nara'"):
        load_method(tmp_path, tiny_base(), method="nara")
    with pytest.raises(AdaptorFileError, match="trained on base"):
        load_method(tmp_path, tiny_base(seed=1), method="adapters")
    with pytest.raises(ValueError, match="needs t"):
        build("nara", tiny_base()).model.hidden_states(batch["input_ids"])


def test_knobs_are_config_overrides():
    cfg = FinetuneConfig(base="-", output_dir="-")
    assert (cfg.baselines.lora_rank, cfg.baselines.bottleneck, cfg.baselines.prefix_length) == (
        64,
        256,
        32,
    )
    cfg = apply_overrides(cfg, ["baselines.lora_rank=16", "baselines.target_modules=q_proj,v_proj"])
    assert cfg.baselines.lora_rank == 16 and cfg.baselines.target_modules == ("q_proj", "v_proj")


def test_finetune_runs_bitfit_end_to_end(tiny_base_dir, data_dir, tmp_path):
    cfg = finetune_config(
        tiny_base_dir,
        data_dir,
        tmp_path,
        method="bitfit",
        train_limit=16,
        eval_steps=4,
        forgetting_blocks=2,
    )
    result = finetune(cfg, progress=False)
    for key in ("trainable_params", "trainable_pct", "storage_mb", "eval_accuracy", "forgetting"):
        assert key in result
    assert 0 < result["trainable_pct"] < 5 and result["storage_mb"] > 0
    assert result["heldout_loss_base"] != result["heldout_loss_adapted"]


def test_evaluate_job_loads_a_baseline_and_reproduces_its_accuracy(
    tiny_base_dir, data_dir, tmp_path
):
    from jobs.evaluate import main as evaluate

    cfg = finetune_config(
        tiny_base_dir,
        data_dir,
        tmp_path,
        method="weight_lora",
        train_limit=16,
        eval_limit=6,
        train={"max_steps": 3},
    )
    cfg.baselines.lora_rank = 4
    result = finetune(cfg, progress=False)
    again = evaluate(["--base", str(tiny_base_dir), "--adaptor", result["adaptor_dir"],
                      "--eval-limit", "6", "--forgetting-blocks", "0", "--data-dir",
                      str(data_dir), "--scoring-num-t", "1", "--max-length", "64"])  # fmt: skip
    assert again["eval_accuracy"] == result["eval_accuracy"]
    assert again["eval_accuracy_scoring"] == result["eval_accuracy_scoring"]
    assert "effective_rank_up" not in again  # a report of LoRA-Diffusion adaptors only
