import pytest
import torch

from lora_diffusion.corruption import AbsorbingProcess, UniformProcess, get_process, sample_t

V, MASK = 50, 1


def batch(b=64, n=40):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(6, V, (b, n), generator=g)
    target = torch.zeros(b, n, dtype=torch.bool)
    target[:, n // 2 :] = True
    return x0, target


@pytest.mark.parametrize("name", ["absorbing", "uniform"])
def test_only_target_positions_are_corrupted(name):
    proc = get_process(name, V, MASK)
    x0, target = batch()
    xt, changed = proc.corrupt(x0, torch.full((64,), 0.0), target, torch.Generator().manual_seed(1))
    assert torch.equal(xt[~target], x0[~target]), "condition tokens must stay clean"
    assert changed[target].all() and not changed[~target].any()


def test_absorbing_masks_a_fraction_one_minus_alpha():
    proc = AbsorbingProcess(V, MASK)
    x0, target = batch(b=512)
    alpha = torch.full((512,), 0.3)
    xt, changed = proc.corrupt(x0, alpha, target, torch.Generator().manual_seed(2))
    assert torch.all(xt[changed] == MASK)
    assert float(changed[target].float().mean()) == pytest.approx(0.7, abs=0.01)


def test_absorbing_posterior_carries_over_and_unmasks_all_at_s0():
    proc = AbsorbingProcess(V, MASK)
    xt = torch.tensor([MASK, 7, MASK, 9])
    probs = torch.zeros(4, V)
    probs[:, 20] = 1.0
    xs = proc.posterior_step(xt, probs, alpha_t=0.5, alpha_s=1.0)
    assert xs.tolist() == [20, 7, 20, 9]
    assert proc.posterior_step(xt, probs, alpha_t=0.5, alpha_s=0.5).tolist() == xt.tolist()


def test_uniform_posterior_at_s0_draws_from_prediction():
    proc = UniformProcess(V, MASK)
    xt = torch.tensor([3, 4, 5])
    probs = torch.zeros(3, V)
    probs[torch.arange(3), torch.tensor([10, 11, 12])] = 1.0
    assert proc.posterior_step(xt, probs, alpha_t=0.2, alpha_s=1.0).tolist() == [10, 11, 12]


def test_uniform_noise_stays_in_vocabulary():
    proc = UniformProcess(V, MASK)
    noise = proc.noise_like(torch.zeros(1000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert noise.min() >= 0 and noise.max() < V and len(noise.unique()) > V // 2


def test_sample_t_is_low_discrepancy_and_in_range():
    t = sample_t(8, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() <= 1
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / 8), atol=1e-4, rtol=0)
