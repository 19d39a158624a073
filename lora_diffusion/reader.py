"""The adaptor's reader: what x_t is in B_i [x_t ; Emb(t)].

Without a reader (`reader="none"`) each position's x_t is one frozen state of that position
alone (the final hidden state, or the input embedding): a module can only re-weight what the
base already put at the position, and on a small base a linear read of pooled frozen states
stops at the same accuracy as the adaptor (`benchmarks/probe_condition.py`).

The attention reader (`reader="attention"`) is a side network in the spirit of Ladder
Side-Tuning (Sung, Cho and Bansal, 2022): it *reads* the frozen base's states from several
layers and lets positions exchange information, and is never backpropagated through the base:

    s_l   = LN(H_l)                                  H_l: (B, L, d) frozen state of layer l
    s     = sum_l softmax(m)_l s_l                   learned scalar mix over `layers`
    z     = W_in s                                   (B, L, k), k = `dim` << d
    z     = z + Attn(LN(z))                          one bidirectional attention layer
    z     = z + MLP(LN(z))                           (rotary positions, padding masked)
    x_t  := LN(z + mean_{j in c} z_j)                what every B_i of the adaptor reads

The condition's mean reading (`summary="mean"`; `"none"` leaves it out) hands every target
position the whole condition at once: a masked target's own query has to find the telling
words in one attention layer, while the mean over the condition has them all.

Layer l = 0 is the input embedding, l = 1..n the output of block l, and n + 1 (or -1) the
final hidden state after the base's last norm. The reader is shared by the adaptor's phases
(the sentence is read once per step; the phases' modules stay low-rank and step-specific).

Deeper readers: `depth` stacks that attention + MLP block D times. With `ladder=True` the
layers are not mixed at the input; block j reads layer `layers[j]` through its own
projection, added to z before the block (z = W_0 s_0, then z = z + W_j s_j before block j),
as Ladder Side-Tuning's side network reads ever deeper backbone states.

Parameters: a block is 4 (k^2 + k) + 2 mlp_ratio k^2 + (mlp_ratio + 1) k + 4 k; the reader
is depth blocks + P (d + 1) k + 2 k, plus len(layers) mixing weights (P = 1), or with the
ladder P = len(layers) projections and no mixing weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .models.dit import apply_rotary, rotary_cos_sin

READERS = ("none", "attention")
SUMMARIES = ("mean", "none")


class _Block(nn.Module):
    """z + Attn(LN(z)), then + MLP(LN(z)): one pre-norm bidirectional block of width dim."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self._build(dim, heads, mlp_ratio)

    def _build(self, dim: int, heads: int, mlp_ratio: int) -> None:
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, z: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        z = z + self._attend(self.norm_attn(z), attention_mask)
        return z + self.mlp(self.norm_mlp(z))

    def _attend(self, z: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, k = z.shape
        q, key, v = self.qkv(z).view(b, n, 3, self.heads, k // self.heads).unbind(2)
        q, key, v = (x.transpose(1, 2) for x in (q, key, v))  # (B, heads, L, hs)
        cos, sin = rotary_cos_sin(n, k // self.heads, 10000.0, z.device, z.dtype)
        q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(q, key, v, attn_mask=mask)  # (B, heads, L, hs)
        return self.out(y.transpose(1, 2).reshape(b, n, k))


class StateReader(_Block):
    """Frozen layer states (a sequence of (B, L, d)) -> per-position reading z (B, L, dim).

    The first block's weights are the reader's own attributes, made in the order a one-block
    reader always made them (its files keep their names, and a seed its initialisation);
    further blocks are `blocks`, the ladder's projections `ladder`."""

    def __init__(
        self,
        d: int,
        layers: Sequence[int],
        dim: int,
        heads: int,
        mlp_ratio: int = 2,
        summary: str = "mean",
        depth: int = 1,
        ladder: bool = False,
    ) -> None:
        if dim % heads or (dim // heads) % 2:
            raise ValueError(
                f"adaptor.reader_dim ({dim}) must split into reader_heads ({heads}) heads of "
                f"an even size"
            )
        if summary not in SUMMARIES:
            raise ValueError(f"adaptor.reader_summary must be one of {SUMMARIES}: {summary!r}")
        check_depth(depth, ladder, len(layers))
        nn.Module.__init__(self)
        self.layers, self.summary = tuple(layers), summary
        if not ladder:  # softmax: a plain mean at init
            self.mix = nn.Parameter(torch.zeros(len(self.layers)))
        self.proj = nn.Linear(d, dim)
        self._build(dim, heads, mlp_ratio)
        self.norm_out = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth - 1))
        if ladder:
            self.ladder = nn.ModuleList(nn.Linear(d, dim) for _ in self.layers[1:])

    def forward(
        self,
        states: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """states: every layer state of the base, embeddings first, final last (each (B, L, d));
        attention_mask (B, L), 1 = real token; condition_mask (B, L), True on the condition.
        Returns (B, L, dim)."""
        picked = [F.layer_norm(states[i], states[i].shape[-1:]) for i in self.layers]
        if hasattr(self, "ladder"):
            z = self.proj(picked[0])  # (B, L, k); block j then adds layers[j]
            extra = [proj(s) for proj, s in zip(self.ladder, picked[1:], strict=True)]
        else:
            w = self.mix.softmax(0).to(picked[0].dtype)
            z = self.proj(sum(w[i] * s for i, s in enumerate(picked)))
            extra = []
        z = super().forward(z, attention_mask)
        for j, block in enumerate(self.blocks, start=1):
            z = block(z + extra[j - 1] if j <= len(extra) else z, attention_mask)
        if self.summary == "mean" and condition_mask is not None:
            m = condition_mask.to(z.dtype)[..., None]  # (B, L, 1)
            z = z + (z * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        return self.norm_out(z)


def check_depth(depth: int, ladder: bool, layers: int) -> None:
    """Raises ValueError naming the setting when a reader of `depth` blocks (with `ladder`)
    cannot read `layers` layers."""
    if depth < 1:
        raise ValueError(f"adaptor.reader_depth must be >= 1: {depth}")
    if ladder and depth < layers:
        raise ValueError(
            f"adaptor.reader_ladder feeds one of reader_layers to each block: {layers} layers "
            f"need reader_depth >= {layers}, got {depth}"
        )


def count_reader_parameters(
    d: int, layers: int, dim: int, mlp_ratio: int = 2, depth: int = 1, ladder: bool = False
) -> int:
    """Exact parameter count of a `StateReader(d, range(layers), dim, heads, mlp_ratio,
    depth=depth, ladder=ladder)`."""
    attn = 4 * (dim * dim + dim)
    mlp = 2 * mlp_ratio * dim * dim + mlp_ratio * dim + dim
    block = attn + mlp + 2 * 2 * dim
    inputs = layers * (d + 1) * dim if ladder else layers + (d + 1) * dim
    return inputs + depth * block + 2 * dim
