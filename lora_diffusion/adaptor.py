"""Trajectory-level low-rank adaptors: LoRA-Diffusion's perturbation of the denoising path.

At each denoising step the frozen base gives final hidden states h (B, L, d). The adaptor adds

    h' = h + sum_{i=1..k} sigma(t) * A_i(c) ReLU(B_i [x_t ; Emb(t)])

with the modules, rank r and scale sigma chosen by the step's phase (by default one phase of
r 64, sigma 1; the paper's three, `AdaptorConfig.paper()`: early t > 2T/3 r 64, sigma 1.0;
middle r 32, sigma 0.5; late t <= T/3 r 8, sigma 0.25).

- x_t is what the adaptor's reader makes of the frozen base's states (`reader="attention"`,
  default; `reader.py`): small attention blocks of width k (`reader_dim`, 48) that read
  several layers' states, by default one layer per block (`reader_ladder`, three blocks over
  the embeddings, block 3 and the final state), so a target position can read the whole
  condition; B_i: (k + d_t) -> r. Without a reader (`reader="none"`) x_t is the base's final
  hidden state at each position (`input_repr="hidden"`) or its input embedding
  (`"embedding"`, the paper's literal reading), and B_i: (d + d_t) -> r. Emb(t) is a fixed
  sinusoidal embedding of t.
- A_i(c) = W_A + W_A,cond Enc(c), with Enc(c) the mean of the base's hidden states over the
  condition tokens (`condition_repr="hidden"`, default) or of their input embeddings
  (`"embedding"`: for a weak base whose final states carry little of the input's content).
  The conditional part is parameterised as a gate on the rank dimension,
  W_A,cond Enc(c) := W_A diag(W_g Enc(c)), i.e. A_i(c) = W_A diag(1 + W_g Enc(c)): one
  (r x d) matrix W_g per module instead of a (d r x d) tensor, keeping the adaptor a few % of
  the base. W_A starts at zero, so the adapted model equals the base at step 0; W_g starts
  random (`gate_init="random"`, nn.Linear's init; or `"zero"`): were both zero, the
  c-dependent part W_A diag(W_g Enc(c)) would sit at a saddle where none of its factors gets
  a gradient, as a weight LoRA with both factors at zero would.
- Enc(c) pools the condition with a learned attention query (`condition_pool="attention"`,
  default; q starts at zero, i.e. at the plain mean, `"mean"`): a mean over a sentence
  dilutes its few telling words, an attention over the frozen states weights them.
- Enc(c) then passes through a parameter-free layer norm first (`condition_norm="layer"`): pooled
  states share one large common direction and vary little around it (pooled input embeddings
  of SST-2 sentences: norm 0.55, per-coordinate spread 0.005), so a gate reading them raw
  learns at the optimizer's pace on a signal ~100x below its inputs' scale and stays at
  chance; normalised, the same gate reads the sentence (`benchmarks/probe_condition.py`).

Parameters of one module of rank r: B: (d_in + d_t) r + r;  W_A: d r;  W_g: r d + r (d_in = k
with a reader, else d); plus one query q (d) per adaptor for the attention pooling of Enc(c),
and the reader's own (`reader.count_reader_parameters`).
Total = sum over phases of k * r * (2 d + d_in + d_t + 2) + d + reader
(see `count_adaptor_parameters`).

Regularisers (returned separately, weighted in the loss by lambda_rank and lambda_orth):
    rank = sum_i ||W_A_i||_* + ||W_B_i||_*        (nuclear norms)
    orth = sum_{i != j in a phase} ||W_A_i^T W_A_j||_F^2
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .models.dit import timestep_embedding
from .reader import READERS, StateReader, check_depth, count_reader_parameters

#: Representations of x_t and of the condition c an adaptor can read from the frozen base.
CONDITION_REPRS = ("hidden", "embedding")
#: How Enc(c) pools the condition's states, and how it is normalised before the gate reads it.
CONDITION_POOLS = ("attention", "mean")
CONDITION_NORMS = ("layer", "none")
#: How the gate W_g starts: random (as nn.Linear), or zero.
GATE_INITS = ("random", "zero")


@dataclass
class AdaptorConfig:
    # One phase (rank 64, sigma 1) by default: it beat the paper's three phases (64/32/8, sigmas
    # 1/0.5/0.25, boundaries 2/3, 1/3; `AdaptorConfig.paper()`) on held-out SST-2 rows of the
    # small-h200 base, with and without the reader (docs/READER.md).
    ranks: tuple[int, ...] = field(
        default=(64,), metadata={"help": "rank per phase, earliest (t near 1) first"}
    )
    sigmas: tuple[float, ...] = field(
        default=(1.0,), metadata={"help": "perturbation scale per phase (one per rank)"}
    )
    boundaries: tuple[float, ...] = field(
        default=(),
        metadata={
            "help": "phase boundaries in t, descending, one fewer than ranks; phase p "
            "holds t > boundaries[p]"
        },
    )
    k: int = field(default=2, metadata={"help": "modules per phase"})
    input_repr: str = field(default="hidden", metadata={"help": "x_t fed to B: hidden | embedding"})
    condition_repr: str = field(
        default="hidden", metadata={"help": "Enc(c): pooled base hidden | embedding of c"}
    )
    condition_pool: str = field(
        default="attention",
        metadata={"help": "Enc(c) pooling over the condition: attention (learned query) | mean"},
    )
    condition_norm: str = field(
        default="layer", metadata={"help": "Enc(c) normalised before the gate: layer | none"}
    )
    gate_init: str = field(
        default="random", metadata={"help": "W_g at init: random (nn.Linear's) | zero"}
    )
    reader: str = field(
        default="attention",
        metadata={
            "help": "x_t for B_i: none (one frozen state per position, input_repr) | "
            "attention (a side reader over several layers' states; see reader.py)"
        },
    )
    reader_layers: tuple[int, ...] = field(
        default=(0, 3, -1),
        metadata={"help": "base states the reader reads: 0 embeddings, i block i, -1 final"},
    )
    # The ladder reader (three blocks of width 48, block j reading layer reader_layers[j]) by
    # default: on held-out SST-2 rows of small-h200 it beat one block of width 64 over a mix
    # of the same layers at every seed (docs/READER.md, section 4).
    reader_dim: int = field(default=48, metadata={"help": "the reader's width k"})
    reader_summary: str = field(
        default="none",
        metadata={"help": "add the condition's mean reading to every position: mean | none"},
    )
    reader_heads: int = field(default=4, metadata={"help": "the reader's attention heads"})
    reader_depth: int = field(default=3, metadata={"help": "the reader's attention blocks"})
    reader_ladder: bool = field(
        default=True,
        metadata={
            "help": "block j reads reader_layers[j] (Ladder Side-Tuning) instead of one mix "
            "of them at the input; needs reader_depth >= len(reader_layers)"
        },
    )
    time_embed_dim: int = field(default=32, metadata={"help": "sinusoidal Emb(t) size"})
    conditional: bool = field(default=True, metadata={"help": "A_i(c) depends on Enc(c)"})
    lambda_rank: float = field(default=0.01, metadata={"help": "nuclear-norm weight"})
    lambda_orth: float = field(default=0.001, metadata={"help": "orthogonality weight"})

    def __post_init__(self) -> None:
        self.ranks = tuple(int(r) for r in self.ranks)
        self.sigmas = tuple(float(s) for s in self.sigmas)
        self.boundaries = tuple(float(b) for b in self.boundaries)
        self.reader_layers = tuple(int(i) for i in self.reader_layers)
        n = len(self.ranks)
        if n < 1 or len(self.sigmas) != n or len(self.boundaries) != n - 1:
            raise ValueError(
                f"adaptor: {n} ranks need {n} sigmas and {n - 1} boundaries, got "
                f"{len(self.sigmas)} sigmas and {len(self.boundaries)} boundaries (the paper's "
                "three phases: adaptor.ranks=64,32,8 adaptor.sigmas=1,0.5,0.25 "
                "adaptor.boundaries=0.6667,0.3333)"
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
        if self.condition_pool not in CONDITION_POOLS:
            raise ValueError(
                f"adaptor.condition_pool must be attention or mean: {self.condition_pool!r}"
            )
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"adaptor.gate_init must be random or zero: {self.gate_init!r}")
        if self.reader not in READERS:
            raise ValueError(f"adaptor.reader must be one of {READERS}: {self.reader!r}")
        if self.reader != "none" and not self.reader_layers:
            raise ValueError("adaptor.reader_layers: the reader needs at least one layer")
        if self.reader != "none" and (self.reader_dim < 1 or self.reader_heads < 1):
            raise ValueError(
                f"adaptor.reader_dim and reader_heads must be >= 1: "
                f"{self.reader_dim}, {self.reader_heads}"
            )
        if self.reader != "none":
            check_depth(self.reader_depth, self.reader_ladder, len(self.reader_layers))
        if self.condition_norm not in CONDITION_NORMS:
            raise ValueError(
                f"adaptor.condition_norm must be layer or none: {self.condition_norm!r}"
            )

    @classmethod
    def paper(cls, **kw) -> AdaptorConfig:
        """The paper's step-adaptive schedule: ranks 64/32/8, sigmas 1/0.5/0.25, phases split at
        t = 2/3 and 1/3 (early t > 2T/3, late t <= T/3); `kw` overrides any field."""
        paper = {"ranks": (64, 32, 8), "sigmas": (1.0, 0.5, 0.25), "boundaries": (2 / 3, 1 / 3)}
        return cls(**{**paper, **kw})

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
    d_in = cfg.reader_dim if cfg.reader != "none" else d
    per = lambda r: (d_in + cfg.time_embed_dim) * r + r + d * r + gate(r)
    query = d if cfg.conditional and cfg.condition_pool == "attention" else 0
    reader = 0
    if cfg.reader != "none":
        reader = count_reader_parameters(
            d,
            len(cfg.reader_layers),
            cfg.reader_dim,
            depth=cfg.reader_depth,
            ladder=cfg.reader_ladder,
        )
    return sum(cfg.k * per(r) for r in cfg.ranks) + query + reader


class LowRankModule(nn.Module):
    """g(x, t, c) = A(c) ReLU(B [x ; Emb(t)]), A(c) = W_A diag(1 + W_g Enc(c)).

    Args:
        d: hidden size of the base; d_t: time embedding size; rank: r; d_in: size of the x it
            reads (d, or the reader's width).
    """

    def __init__(
        self,
        d: int,
        d_t: int,
        rank: int,
        conditional: bool = True,
        gate_init: str = "random",
        d_in: int | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear((d_in or d) + d_t, rank)  # B
        self.up = nn.Parameter(torch.zeros(d, rank))  # W_A, zero: adapted == base at init
        self.gate = nn.Linear(d, rank) if conditional else None  # W_g
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        if self.gate is not None:
            nn.init.zeros_(self.gate.bias)  # Enc(c) = 0 (no condition): the gate is 1
            if gate_init == "zero":
                nn.init.zeros_(self.gate.weight)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """x: (B, L, d_in); temb: (B, d_t); enc: (B, d). Returns (B, L, d)."""
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
        self.reader = (
            StateReader(
                d,
                cfg.reader_layers,
                cfg.reader_dim,
                cfg.reader_heads,
                summary=cfg.reader_summary,
                depth=cfg.reader_depth,
                ladder=cfg.reader_ladder,
            )
            if cfg.reader == "attention"
            else None
        )
        d_in = cfg.reader_dim if self.reader is not None else d
        self.phases = nn.ModuleList(
            nn.ModuleList(
                LowRankModule(d, cfg.time_embed_dim, r, cfg.conditional, cfg.gate_init, d_in)
                for _ in range(cfg.k)
            )
            for r in cfg.ranks
        )
        attention = cfg.conditional and cfg.condition_pool == "attention"
        # q: zero, so Enc(c) starts as the plain mean over the condition
        self.query = nn.Parameter(torch.zeros(d)) if attention else None

    def encode(self, states: torch.Tensor, condition_mask: torch.Tensor | None) -> torch.Tensor:
        """Enc(c) (B, d) from the condition's states (B, L, d) (final hidden states or input
        embeddings, per `condition_repr`): their mean, or with `condition_pool="attention"`
        sum_i a_i s_i with a = softmax_i(LN(s_i) . q / sqrt(d)) over the condition positions
        (q learned, zero at init). Zeros for an example without a condition."""
        if self.query is None or condition_mask is None:
            return pool_condition(states, condition_mask)
        cond = condition_mask.bool()
        scores = F.layer_norm(states, states.shape[-1:]) @ self.query.to(states.dtype)
        scores = scores / states.shape[-1] ** 0.5
        # a finite fill keeps a condition-less row's softmax (and its gradient) finite
        weights = scores.masked_fill(~cond, torch.finfo(scores.dtype).min).softmax(-1)
        weights = weights * cond.any(-1, keepdim=True).to(weights.dtype)
        return (weights[..., None] * states).sum(1)

    def read(
        self,
        states,
        attention_mask: torch.Tensor | None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t for every position (B, L, reader_dim) from the base's layer states (a sequence of
        (B, L, d), embeddings first, final last; see `reader.StateReader`); condition_mask
        (B, L) marks the condition, whose mean reading every position gets."""
        if self.reader is None:
            raise ValueError("this adaptor has no reader (adaptor.reader=none)")
        n = len(states)
        bad = [i for i in self.cfg.reader_layers if not -n <= i < n]
        if bad:
            raise ValueError(
                f"adaptor.reader_layers {bad} out of range: the base has {n} layer states "
                f"(0 = embeddings .. {n - 1} = final)"
            )
        return self.reader(states, attention_mask, condition_mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
        """Perturbation delta (B, L, d) for representations x (B, L, d_in) at times t (B,)."""
        temb = timestep_embedding(t, self.cfg.time_embed_dim).to(x.dtype)  # (B, d_t)
        if self.cfg.condition_norm == "layer":
            enc = F.layer_norm(enc, enc.shape[-1:])  # no condition: 0 stays 0
        phase = self.cfg.phase_of(t)  # (B,)
        delta = x.new_zeros(*x.shape[:-1], self.d)
        for p, modules in enumerate(self.phases):
            # Every phase runs on every row, weighted sigma_p on its own rows and 0 elsewhere:
            # shapes never depend on the data, so no step waits for the GPU to say which rows
            # are whose (a gather by phase would). The modules are a few % of the base's cost.
            weight = (phase == p).to(x.dtype) * self.cfg.sigmas[p]  # (B,)
            out = sum(m(x, temb, enc) for m in modules)  # (B, L, d)
            delta = delta + weight[:, None, None] * out
        return delta

    def regularisers(self, rank: bool = True) -> dict[str, torch.Tensor]:
        """rank: sum of nuclear norms of W_A and W_B (exact: singular values, one batched call
        per phase and matrix kind; 0 with `rank=False`, for callers that apply it only every
        few steps); orth: sum_{i != j} ||W_A_i^T W_A_j||_F^2 over the modules of each phase."""
        nuclear = self.up.new_zeros(())
        orth = self.up.new_zeros(())
        for phase in self.phases:
            ups = torch.stack([m.up for m in phase])  # (k, d, r)
            if rank:
                downs = torch.stack([m.down.weight for m in phase])  # (k, r, d + d_t)
                svdvals = torch.linalg.svdvals
                nuclear = nuclear + svdvals(ups).sum() + svdvals(downs).sum()
            gram = torch.einsum("idr,jds->ijrs", ups, ups)  # (k, k, r, r): W_A_i^T W_A_j
            pairs = ~torch.eye(len(phase), dtype=torch.bool, device=gram.device)  # i != j
            orth = orth + (gram.pow(2).sum((-2, -1)) * pairs).sum()
        return {"rank": nuclear, "orth": orth}

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
