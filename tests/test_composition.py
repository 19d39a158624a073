"""Several task adaptors on one base: fixed weights, per-example mixing, router, base cache."""

import pytest
import torch

from lora_diffusion.adaptor import AdaptorConfig, TrajectoryAdaptor
from lora_diffusion.composition import AdaptedDenoiser, Router
from lora_diffusion.corruption import get_process
from lora_diffusion.sampling import sample
from lora_diffusion.schedules import get_schedule

D = 64


def random_adaptor(seed):
    torch.manual_seed(seed)
    adaptor = TrajectoryAdaptor(AdaptorConfig.paper(ranks=(8, 4, 2)), D)
    with torch.no_grad():
        for p in adaptor.parameters():
            p.normal_(std=0.2)
    return adaptor


@pytest.fixture()
def two(tiny_model):
    a, b = random_adaptor(1), random_adaptor(2)
    x = torch.randint(6, 512, (3, 12), generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(3, 12, dtype=torch.bool)
    cond[:, :7] = True
    t = torch.tensor([0.9, 0.5, 0.2])
    return tiny_model, a, b, x, cond, t


def test_one_hot_weights_reproduce_the_single_task_model_exactly(two):
    base, a, b, x, cond, t = two
    composed = AdaptedDenoiser(base, {"a": a, "b": b})
    with composed.task_weights(torch.tensor([[1.0, 0.0]] * 3)):
        h = composed.hidden_states(x, None, t, cond)
    assert torch.equal(h, AdaptedDenoiser(base, {"a": a}).hidden_states(x, None, t, cond))


def test_weights_apply_per_example_so_one_batch_mixes_tasks(two):
    base, a, b, x, cond, t = two
    composed = AdaptedDenoiser(base, {"a": a, "b": b})
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    with composed.task_weights(w):
        mixed = composed.hidden_states(x, None, t, cond)
    h = base.hidden_states(x)
    only_a = AdaptedDenoiser(base, {"a": a}).hidden_states(x, None, t, cond) - h
    only_b = AdaptedDenoiser(base, {"b": b}).hidden_states(x, None, t, cond) - h
    expected = h + w[:, 0, None, None] * only_a + w[:, 1, None, None] * only_b
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[0], (h + only_a)[0], rtol=1e-5, atol=1e-6)


def test_router_gives_softmax_weights_and_learns(two):
    base, a, b, x, cond, t = two
    router = Router(D, 2)
    composed = AdaptedDenoiser(base, {"a": a, "b": b}, router=router)
    enc = torch.randn(5, D)
    w = router(enc)
    assert w.shape == (5, 2) and torch.allclose(w.sum(-1), torch.ones(5))
    assert router.net[0].out_features == 512  # the paper's 2-layer MLP, 512 hidden
    composed.hidden_states(x, None, t, cond).pow(2).mean().backward()
    assert router.net[0].weight.grad.abs().sum() > 0


def test_missing_or_misshapen_weights_are_refused(two):
    base, a, b, x, cond, t = two
    composed = AdaptedDenoiser(base, {"a": a, "b": b})
    with pytest.raises(ValueError, match="router"):
        composed.hidden_states(x, None, t, cond)
    with pytest.raises(ValueError, match="a, b"):
        with composed.task_weights(torch.ones(3, 3)):
            pass


def _sample(model, tok_mask_id, seed=0, steps=32):
    x = torch.randint(6, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    target = torch.zeros(2, 16, dtype=torch.bool)
    target[:, 10:] = True
    proc = get_process("absorbing", 512, tok_mask_id)
    g = torch.Generator().manual_seed(seed)
    return sample(model, proc, get_schedule("loglinear"), x, torch.ones_like(x), target, steps, g)


def test_sampling_reuses_the_frozen_base_when_no_token_changed(tiny_model):
    model = AdaptedDenoiser(tiny_model, random_adaptor(4))
    cached = _sample(model, tiny_model.mask_token_id)
    saved = model.base_calls_saved
    assert saved > 0 and model.base_calls + saved == 32
    assert cached.network_calls == 32  # the adaptor itself runs every step: it depends on t
    model.cache_base = False
    plain = _sample(model, tiny_model.mask_token_id)
    assert torch.equal(cached.tokens, plain.tokens)


def test_an_untrained_adaptor_samples_exactly_like_the_base(tiny_model):
    model = AdaptedDenoiser(tiny_model, TrajectoryAdaptor(AdaptorConfig(), D))
    assert torch.equal(
        _sample(model, tiny_model.mask_token_id).tokens,
        _sample(tiny_model, tiny_model.mask_token_id).tokens,
    )
