import pytest
import torch

from lora_diffusion.schedules import SCHEDULES, get_schedule

T = torch.linspace(0.0, 1.0, 101)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_alpha_decreases_from_one_to_eps(name):
    s = get_schedule(name, eps=1e-3)
    a = s.alpha(T)
    assert torch.all(a[1:] < a[:-1]), "alpha(t) must strictly decrease"
    assert a[0] == pytest.approx(1.0, abs=1e-6)
    assert a[-1] == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_derivative_matches_finite_difference(name):
    s = get_schedule(name)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(s.dalpha(t), fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_elbo_weight_positive_and_integrates_to_one_minus_eps(name):
    # E over t of w(t) (1 - alpha(t)) = -(alpha(1) - alpha(0)) = 1 - eps: a context-free
    # denoiser's ELBO equals its cross-entropy, so the unigram bar is comparable.
    s = get_schedule(name, eps=1e-3)
    t = (torch.arange(200000, dtype=torch.float64) + 0.5) / 200000
    w = s.elbo_weight(t)
    assert torch.all(w > 0)
    assert float((w * (1 - s.alpha(t))).mean()) == pytest.approx(1 - 1e-3, rel=1e-3)


def test_unknown_schedule_names_the_known_ones():
    with pytest.raises(KeyError, match="loglinear"):
        get_schedule("nope")
