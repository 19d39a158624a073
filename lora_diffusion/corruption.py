"""Forward processes q(x_t | x_0) and their reverse posteriors (Austin et al. 2021).

Only target positions are corrupted: condition tokens (instruction + input) and padding stay
clean. Both processes share one interface, so losses and samplers never branch on the kind.
"""

from __future__ import annotations

import torch

from .registry import Registry

PROCESSES: Registry[type[ForwardProcess]] = Registry("forward process")


class ForwardProcess:
    """q(x_t | x_0) = alpha_t * onehot(x_0) + (1 - alpha_t) * noise distribution."""

    #: whether loss positions are only those the forward process changed (absorbing) or every
    #: target position (uniform: a corrupted token is indistinguishable from a clean one).
    loss_on_corrupted_only: bool = True

    def __init__(self, vocab_size: int, mask_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id

    def noise_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def corrupt(
        self,
        x0: torch.Tensor,
        alpha_t: torch.Tensor,
        target_mask: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample x_t ~ q(x_t | x_0) on target positions.

        x0: (B, L) token ids; alpha_t: (B,) clean probability; target_mask: (B, L) bool.
        Returns x_t (B, L) and `changed` (B, L) bool: positions drawn from the noise.
        """
        u = _rand(x0.shape, generator, x0.device)
        changed = (u > alpha_t[:, None]) & target_mask
        xt = torch.where(changed, self.noise_like(x0, generator), x0)
        return xt, changed

    def posterior_step(
        self,
        xt: torch.Tensor,
        probs_x0: torch.Tensor,
        alpha_t: float,
        alpha_s: float,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample x_s ~ p(x_s | x_t) = sum_x0 q(x_s | x_t, x_0) p(x_0 | x_t), for s < t.

        xt: (N,) current tokens at target positions; probs_x0: (N, V) the model's
        distribution of each clean token. Returns x_s (N,).
        """
        raise NotImplementedError


@PROCESSES.register("absorbing")
class AbsorbingProcess(ForwardProcess):
    """Tokens jump to [MASK] and stay there (MDLM / LLaDA)."""

    def noise_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.full_like(x, self.mask_token_id)

    def posterior_step(self, xt, probs_x0, alpha_t, alpha_s, generator=None):
        # A masked token unmasks with prob (alpha_s - alpha_t) / (1 - alpha_t), to x_0 ~ p;
        # an unmasked token is carried over (MDLM's carry-over parameterisation).
        p_unmask = (alpha_s - alpha_t) / max(1.0 - alpha_t, 1e-12)
        masked = xt == self.mask_token_id
        u = _rand(xt.shape, generator, xt.device)
        draw = _categorical(probs_x0, generator)
        return torch.where(masked & (u < p_unmask), draw, xt)


@PROCESSES.register("uniform")
class UniformProcess(ForwardProcess):
    """Tokens jump to a uniformly random token (D3PM-uniform / UDLM)."""

    loss_on_corrupted_only = False

    def noise_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else x.device
        ids = torch.randint(0, self.vocab_size, x.shape, generator=generator, device=gen_device)
        return ids.to(device=x.device, dtype=x.dtype)

    def posterior_step(self, xt, probs_x0, alpha_t, alpha_s, generator=None):
        # q(x_s | x_t, x_0) ∝ q(x_t | x_s) q(x_s | x_0); summing over x_0 ~ p gives
        # [a_ts 1{x_s = x_t} + (1 - a_ts)/V] * [a_s p(x_s) + (1 - a_s)/V], a_ts = a_t / a_s.
        vocab = probs_x0.shape[-1]
        a_ts = alpha_t / max(alpha_s, 1e-12)
        onehot = torch.nn.functional.one_hot(xt, vocab).to(probs_x0.dtype)  # (N, V)
        post = (a_ts * onehot + (1 - a_ts) / vocab) * (alpha_s * probs_x0 + (1 - alpha_s) / vocab)
        return _categorical(post / post.sum(-1, keepdim=True), generator)


def _categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample ids from (..., V) probabilities with the Gumbel-max trick (seedable, batched)."""
    u = _rand(probs.shape, generator, probs.device, torch.float64)
    gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))
    return (torch.log(probs.double().clamp_min(1e-30)) + gumbel).argmax(-1)


def _rand(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device (seeded CPU generators work with GPU data)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def sample_t(
    batch_size: int, generator: torch.Generator | None = None, device=None, t_min: float = 1e-5
) -> torch.Tensor:
    """Low-discrepancy t ~ U[t_min, 1]: one uniform offset, evenly spaced (MDLM's antithetic
    sampler), which lowers the variance of the batch loss. Returns (batch_size,)."""
    offset = _rand((), generator, device)
    t = (offset + torch.arange(batch_size, device=device) / batch_size) % 1.0
    return t_min + (1.0 - t_min) * t


def get_process(name: str, vocab_size: int, mask_token_id: int) -> ForwardProcess:
    return PROCESSES.get(name)(vocab_size=vocab_size, mask_token_id=mask_token_id)
