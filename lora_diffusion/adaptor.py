"""Trajectory-level low-rank adaptors: LoRA-Diffusion's perturbation of the denoising path.

At each denoising step the frozen base gives final hidden states h (B, L, d). The adaptor adds

    h' = h + sum_{i=1..k} sigma(t) * A_i(c) ReLU(B_i [x_t ; Emb(t)])

with the modules, rank r and scale sigma chosen by the step's phase (early t > 2T/3: r 64,
sigma 1.0; middle: r 32, sigma 0.5; late t <= T/3: r 8, sigma 0.25 by default).

- x_t is the base's final hidden state at each position (`input_repr="hidden"`, default) or
  its input embedding (`"embedding"`, the paper's literal reading). Emb(t) is a fixed
  sinusoidal embedding of t, so B_i: (d + d_t) -> r.
- A_i(c) = W_A + W_A,cond Enc(c), with Enc(c) the mean of the base's hidden states over the
  condition tokens (`condition_repr="hidden"`, default) or of their input embeddings
  (`"embedding"`: for a weak base whose final states carry little of the input's content).
  The conditional part is parameterised as a gate on the rank dimension,
  W_A,cond Enc(c) := W_A diag(W_g Enc(c)), i.e. A_i(c) = W_A diag(1 + W_g Enc(c)): one
  (r x d) matrix W_g per module instead of a (d r x d) tensor, keeping the adaptor < 1% of
  the base. W_A starts at zero, so the adapted model equals the base at step 0.

Parameters of one module of rank r: B: (d + d_t) r + r;  W_A: d r;  W_g: r d + r.
Total = sum over phases of k * r * (3 d + d_t + 2)  (see `count_adaptor_parameters`).

Regularisers (returned separately, weighted in the loss by lambda_rank and lambda_orth):
    rank = sum_i ||W_A_i||_* + ||W_B_i||_*        (nuclear norms)
    orth = sum_{i != j in a phase} ||W_A_i^T W_A_j||_F^2
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .models.dit import timestep_embedding

#: Representations of x_t and of the condition c an adaptor can read from the frozen base.
CONDITION_REPRS = ("hidden", "embedding")


@dataclass
class AdaptorConfig:
    ranks: tuple[int, ...] = field(
        default=(64, 32, 8), metadata={"help": "rank per phase, earliest (t near 1) first"}
    )
    sigmas: tuple[float, ...] = field(
        default=(1.0, 0.5, 0.25), metadata={"help": "perturbation scale per phase"}
    )
    boundaries: tuple[float, ...] = field(
        default=(2 / 3, 1 / 3),
        metadata={"help": "phase boundaries in t, descending; phase p holds t > boundaries[p]"},
    )
    k: int = field(default=2, metadata={"help": "modules per phase"})
    input_repr: str = field(default="hidden", metadata={"help": "x_t fed to B: hidden | embedding"})
    condition_repr: str = field(
        default="hidden", metadata={"help": "Enc(c): pooled base hidden | embedding of c"}
    )
    time_embed_dim: int = field(default=32, metadata={"help": "sinusoidal Emb(t) size"})
    conditional: bool = field(default=True, metadata={"help": "A_i(c) depends on Enc(c)"})
    lambda_rank: float = field(default=0.01, metadata={"help": "nuclear-norm weight"})
    lambda_orth: float = field(default=0.001, metadata={"help": "orthogonality weight"})

    def __post_init__(self) -> None:
        self.ranks = tuple(int(r) for r in self.ranks)
        self.sigmas = tuple(float(s) for s in self.sigmas)
        self.boundaries = tuple(float(b) for b in self.boundaries)
        n = len(self.ranks)
        if n < 1 or len(self.sigmas) != n or len(self.boundaries) != n - 1:
            raise ValueError(
                f"adaptor: {n} ranks need {n} sigmas and {n - 1} boundaries, got "
                f"{len(self.sigmas)} sigmas and {len(self.boundaries)} boundaries"
            )
        if any(r < 1 for r in self.ranks) or self.k < 1:
            raise ValueError(f"adaptor: ranks and k must be >= 1, got {self.ranks}, k={self.k}")
        if list(self.boundaries) != sorted(self.boundaries, reverse=True) or not all(
            0 < b < 1 for b in self.boundaries
        ):
            raise ValueError(f"adaptor: boundaries must descend within (0, 1): {self.boundaries}")
        for name in ("input_repr", "condition_repr"):
            if getattr(self, name) not in CONDITION_REPRS:
                raise ValueError(
                    f"adaptor.{name} must be hidden or embedding: {getattr(self, name)!r}"
                )

    @classmethod
    def uniform(cls, rank: int, phases: int = 3, **kw) -> AdaptorConfig:
        """The same rank and sigma 1 in every phase (the paper's uniform-rank ablation)."""
        bounds = tuple((phases - p) / phases for p in range(1, phases))
        return cls(ranks=(rank,) * phases, sigmas=(1.0,) * phases, boundaries=bounds, **kw)

    def phase_of(self, t: torch.Tensor) -> torch.Tensor:
        """Phase index (0 = earliest, noisiest) of each t: (B,) float -> (B,) long."""
        bounds = torch.tensor(self.boundaries, device=t.device, dtype=t.dtype)
        return (t[:, None] <= bounds[None]).sum(-1)


def count_adaptor_parameters(cfg: AdaptorConfig, d: int) -> int:
    """Exact trainable parameter count of a `TrajectoryAdaptor(cfg, d)`."""
    gate = lambda r: r * d + r if cfg.conditional else 0
    per = lambda r: (d + cfg.time_embed_dim) * r + r + d * r + gate(r)
    return sum(cfg.k * per(r) for r in cfg.ranks)


class LowRankModule(nn.Module):
    """g(x, t, c) = A(c) ReLU(B [x ; Emb(t)]), A(c) = W_A diag(1 + W_g Enc(c)).

    Args:
        d: hidden size of the base; d_t: time embedding size; rank: r.
    """

    def __init__(self, d: int, d_t: int, rank: int, conditional: bool = True) -> None:
        super().__init__()
        self.down = nn.Linear(d + d_t, rank)  # B
        self.up = nn.Parameter(torch.zeros(d, rank))  # W_A, zero: adapted == base at init
        self.gate = nn.Linear(d, rank) if conditional else None  # W_g
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d); temb: (B, d_t); enc: (B, d). Returns (B, L, d)."""
        z = torch.cat([x, temb[:, None].expand(-1, x.shape[1], -1)], dim=-1)
        u = torch.relu(self.down(z))  # (B, L, r)
        if self.gate is not None:
            u = u * (1 + self.gate(enc))[:, None]  # diag(1 + W_g Enc(c)) per example
        return u @ self.up.T  # (B, L, d)


class TrajectoryAdaptor(nn.Module):
    """The step-adaptive perturbation for one task: `phases[p]` holds k modules of rank
    ranks[p], scaled by sigmas[p]; each example uses the phase of its own t."""

    def __init__(self, cfg: AdaptorConfig, d: int) -> None:
        super().__init__()
        self.cfg, self.d = cfg, d
        self.phases = nn.ModuleList(
            nn.ModuleList(
                LowRankModule(d, cfg.time_embed_dim, r, cfg.conditional) for _ in range(cfg.k)
            )
            for r in cfg.ranks
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """Perturbation delta (B, L, d) for representations x (B, L, d) at times t (B,)."""
        temb = timestep_embedding(t, self.cfg.time_embed_dim).to(x.dtype)  # (B, d_t)
        phase = self.cfg.phase_of(t)
        delta = torch.zeros_like(x)
        for p, modules in enumerate(self.phases):
            rows = (phase == p).nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            xs, ts, es = x[rows], temb[rows], enc[rows]
            out = sum(m(xs, ts, es) for m in modules)
            delta = delta.index_put((rows,), self.cfg.sigmas[p] * out)
        return delta

    def regularisers(self) -> dict[str, torch.Tensor]:
        """rank: sum of nuclear norms of W_A and W_B; orth: sum_{i != j} ||W_A_i^T W_A_j||_F^2
        over the modules of each phase."""
        rank = sum(
            torch.linalg.svdvals(m.up).sum() + torch.linalg.svdvals(m.down.weight).sum()
            for phase in self.phases
            for m in phase
        )
        orth = self.up.new_zeros(())
        for phase in self.phases:
            ups = [m.up for m in phase]
            for i, a in enumerate(ups):
                for j, b in enumerate(ups):
                    if i != j:
                        orth = orth + (a.T @ b).pow(2).sum()
        return {"rank": rank, "orth": orth}

    @property
    def up(self) -> torch.Tensor:
        return self.phases[0][0].up


def pool_condition(h: torch.Tensor, condition_mask: torch.Tensor | None) -> torch.Tensor:
    """Enc(c): mean of h (B, L, d) over condition positions (B, L) -> (B, d); zeros where an
    example has no condition (e.g. unconditional corpus text)."""
    if condition_mask is None:
        return h.new_zeros(h.shape[0], h.shape[-1])
    m = condition_mask.to(h.dtype)[..., None]  # (B, L, 1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)
