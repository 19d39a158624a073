"""The fine-tuning recipe's own pieces: LoRA-Diffusion's lazy nuclear-norm term, the peak
memory a run reports."""

import json

import pytest
import torch

from lora_diffusion.finetune import FinetuneConfig, PeakMemory, finetune
from lora_diffusion.methods import METHODS
from lora_diffusion.models import DiffusionLM, preset_config
from lora_diffusion.training import TrainConfig
from tests.helpers import finetune_config


def extra_terms(tmp_path, rank_every, resume_step=None, grad_accum=1, calls=6):
    resume = None
    if resume_step is not None:
        resume = tmp_path / "ckpt"
        resume.mkdir(exist_ok=True)
        (resume / "state.json").write_text(json.dumps({"step": resume_step, "history": []}))
    torch.manual_seed(0)
    base = DiffusionLM(preset_config("tiny", vocab_size=64))
    cfg = FinetuneConfig(
        base="-",
        output_dir="-",
        rank_every=rank_every,
        resume_from=resume and str(resume),
        train=TrainConfig(batch_size=4, grad_accum=grad_accum),
    )
    bundle = METHODS.get("lora_diffusion").build(cfg, base)
    with torch.no_grad():
        for p in bundle.model.adaptor_parameters():
            p.normal_(0, 0.1)
    return [float(bundle.extra_loss()["reg_rank"]) for _ in range(calls)]


def test_the_nuclear_norm_counts_every_n_steps_with_weight_n(tmp_path):
    every_step = extra_terms(tmp_path, 1)
    lazy = extra_terms(tmp_path, 3)
    assert every_step[0] > 0 and len(set(every_step)) == 1
    assert lazy == pytest.approx([3 * every_step[0], 0, 0, 3 * every_step[0], 0, 0])


def test_micro_batches_of_one_step_share_its_nuclear_norm_term(tmp_path):
    lazy = extra_terms(tmp_path, 2, grad_accum=2, calls=8)
    assert [v > 0 for v in lazy] == [True, True, False, False, True, True, False, False]


def test_a_resumed_run_applies_the_nuclear_norm_at_the_uninterrupted_run_s_steps(tmp_path):
    straight = extra_terms(tmp_path, 3, calls=8)
    resumed = extra_terms(tmp_path, 3, resume_step=2, calls=6)
    assert resumed == straight[2:]


def test_rank_every_below_one_is_refused_by_name():
    with pytest.raises(ValueError, match="rank_every"):
        FinetuneConfig(base="-", output_dir="-", rank_every=0)


def test_a_run_s_peak_memory_leaves_out_what_the_process_held_at_its_peak_before(
    tiny_base_dir, data_dir, tmp_path
):
    cfg = finetune_config(tiny_base_dir, data_dir, tmp_path, train_limit=8)
    before = torch.ones(400 * 2**20 // 4)  # 400 MiB resident, then handed back
    del before
    result = finetune(cfg, progress=False)
    assert 0 < result["train_peak_mb"] < 300


def test_a_run_s_peak_memory_counts_memory_it_reuses_from_what_the_process_freed_before():
    # 100 MiB in 64 KiB blocks, freed below a live tensor: the heap cannot shrink, so it keeps
    # those pages resident, and new blocks would reuse them without raising the resident set
    held = [torch.ones(16384) for _ in range(1600)]
    pin = torch.ones(16)
    del held
    peak = PeakMemory("cpu")
    new = [torch.ones(16384) for _ in range(800)]  # 50 MiB
    assert 40 < peak.read()["train_peak_mb"] < 120
    del new, pin


def test_fine_tuning_weights_its_loss_simple_and_pretraining_keeps_the_elbo():
    from lora_diffusion.config import apply_overrides
    from lora_diffusion.multitask import MultitaskConfig
    from lora_diffusion.pretraining import PretrainConfig

    cfg = FinetuneConfig(base="-", output_dir="-")
    assert cfg.diffusion.weighting == "simple"
    multi = MultitaskConfig(base="-", output_dir="-", tasks=("sst2", "cola"))
    assert multi.diffusion.weighting == "simple"
    assert PretrainConfig(corpus_dir="-", output_dir="-").diffusion.weighting == "elbo"
    assert apply_overrides(cfg, ["diffusion.weighting=elbo"]).diffusion.weighting == "elbo"
    assert cfg.diffusion.weighting == "simple"
