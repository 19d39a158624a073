"""Noise schedules for masked / uniform discrete diffusion.

A schedule gives alpha(t), the probability that a token is still clean at time t in [0, 1]
(alpha(0) = 1, alpha(1) ~ 0), and its derivative. The continuous-time ELBO weight of the
absorbing process is -alpha'(t) / (1 - alpha(t)) (MDLM, Sahoo et al. 2024, eq. 10).
"""

from __future__ import annotations

import math

import torch

from .registry import Registry

SCHEDULES: Registry[type[NoiseSchedule]] = Registry("noise schedule")


class NoiseSchedule:
    """alpha(t): probability a token is uncorrupted at time t. Subclasses define both methods."""

    def __init__(self, eps: float = 1e-3) -> None:
        # alpha(1) = eps > 0 keeps the ELBO weight and the posterior finite at t = 1.
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)), shape of t."""
        return -self.dalpha(t) / (1.0 - self.alpha(t)).clamp_min(1e-8)


@SCHEDULES.register("loglinear")
class LogLinearSchedule(NoiseSchedule):
    """MDLM's default: total noise sigma(t) = -log(1 - (1 - eps) t), so alpha is linear in t."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -(1.0 - self.eps))


@SCHEDULES.register("linear")
class LinearSigmaSchedule(NoiseSchedule):
    """Total noise linear in t: sigma(t) = sigma_max t, alpha = exp(-sigma)."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__(eps)
        self.sigma_max = -math.log(eps)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.sigma_max * t)

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return -self.sigma_max * torch.exp(-self.sigma_max * t)


@SCHEDULES.register("cosine")
class CosineSchedule(NoiseSchedule):
    """alpha(t) = (1 - eps) cos(pi t / 2) + eps: slow corruption early, fast late."""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.eps) * torch.cos(0.5 * math.pi * t) + self.eps

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)


def get_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    return SCHEDULES.get(name)(eps=eps)
