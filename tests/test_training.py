import pytest
import torch

from lora_diffusion.corpus import block_batch
from lora_diffusion.corruption import get_process
from lora_diffusion.losses import denoising_loss
from lora_diffusion.models import DiffusionLM, preset_config
from lora_diffusion.schedules import get_schedule
from lora_diffusion.training import StepSampler, TrainConfig, fit, save_checkpoint


def test_step_sampler_is_a_pure_function_of_seed_and_step():
    a, b = StepSampler(10, 4, seed=3), StepSampler(10, 4, seed=3)
    assert torch.equal(a.indices(7), b.indices(7))
    # one epoch covers every example once
    epoch = torch.cat([a.indices(s) for s in range(5)])[:10]
    assert sorted(epoch.tolist()) == list(range(10))


def test_ranks_see_disjoint_parts_of_each_batch():
    s = StepSampler(100, 8, seed=0)
    r0, r1 = s.indices(3, rank=0, world_size=2), s.indices(3, rank=1, world_size=2)
    assert len(r0) == len(r1) == 4 and not set(r0.tolist()) & set(r1.tolist())
    assert sorted(torch.cat([r0, r1]).tolist()) == sorted(s.indices(3).tolist())


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def _setup(seed=0):
    torch.manual_seed(seed)
    model = DiffusionLM(preset_config("tiny", vocab_size=64))
    blocks = torch.randint(6, 64, (40, 12), generator=torch.Generator().manual_seed(1))
    proc, sched = get_process("absorbing", 64, 1), get_schedule("loglinear")
    cfg = TrainConfig(lr=1e-3, max_steps=6, batch_size=8, grad_accum=2, warmup_steps=2, log_every=1)
    sampler = StepSampler(len(blocks), cfg.batch_size)

    def get_batch(step, micro):
        return block_batch(blocks[sampler.indices(step)[micro * 4 : (micro + 1) * 4]])

    def loss_fn(batch, g):
        out = denoising_loss(model, batch, proc, sched, "elbo", g)
        return out.loss, {"nll": float(out.nll)}

    return model, loss_fn, get_batch, cfg


def test_training_lowers_loss_and_reports(tmp_path):
    model, loss_fn, get_batch, cfg = _setup()
    seen = []
    state = fit(model, loss_fn, get_batch, cfg, report=lambda s, m: seen.append(s), progress=False)
    assert seen == [1, 2, 3, 4, 5, 6] and state.step == 6
    assert {"loss", "nll", "lr", "grad_norm", "tokens_per_s"} <= set(state.history[-1])


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    model, loss_fn, get_batch, cfg = _setup()
    fit(model, loss_fn, get_batch, cfg, progress=False)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model, loss_fn, get_batch, cfg = _setup()
    ckpt = tmp_path / "ckpt"

    def checkpoint(step, opt, sched, state):
        if step == 3:
            save_checkpoint(ckpt, model, opt, sched, state)

    fit(model, loss_fn, get_batch, cfg, checkpoint=checkpoint, checkpoint_every=1, progress=False)
    model, loss_fn, get_batch, cfg = _setup(seed=99)  # different init: must be overwritten
    state = fit(model, loss_fn, get_batch, cfg, resume_from=ckpt, progress=False)
    assert state.step == 6 and state.history[0]["step"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_corrupt_checkpoint_is_refused_with_its_path(tmp_path):
    model, loss_fn, get_batch, cfg = _setup()
    ckpt = tmp_path / "ckpt"
    fit(
        model,
        loss_fn,
        get_batch,
        cfg,
        progress=False,
        checkpoint=lambda s, o, sc, st: save_checkpoint(ckpt, model, o, sc, st),
        checkpoint_every=6,
    )
    (ckpt / "trainable.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        fit(model, loss_fn, get_batch, cfg, resume_from=ckpt, progress=False)
    (ckpt / "state.json").unlink()
    with pytest.raises(FileNotFoundError, match="state.json"):
        fit(model, loss_fn, get_batch, cfg, resume_from=ckpt, progress=False)


def test_fit_reads_metrics_on_the_host_only_at_the_steps_it_logs(monkeypatch):
    """Reading a tensor's value (float, int) makes the host wait for a GPU: fit does it at its
    log steps, not at every step."""
    reads = []
    for float_or_int in ("__float__", "__int__"):
        original = getattr(torch.Tensor, float_or_int)

        def counted(self, original=original):
            reads.append(1)
            return original(self)

        monkeypatch.setattr(torch.Tensor, float_or_int, counted)

    def reads_of(max_steps):
        model, _, get_batch, cfg = _setup()
        proc, sched = get_process("absorbing", 64, 1), get_schedule("loglinear")

        def loss_fn(batch, g):  # metrics as tensors: fit decides when to read them
            out = denoising_loss(model, batch, proc, sched, "elbo", g)
            return out.loss, {"nll": out.nll}

        cfg = TrainConfig(**{**cfg.__dict__, "max_steps": max_steps, "log_every": 1000})
        reads.clear()
        fit(model, loss_fn, get_batch, cfg, progress=False)
        return len(reads)

    assert reads_of(2) == reads_of(6) > 0  # both log at their first and last step only
