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

Parameters: len(layers) + (d + 1) k + 4 (k^2 + k) + 2 (mlp_ratio k^2) + (mlp_ratio + 1) k + 6 k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .models.dit import apply_rotary, rotary_cos_sin

READERS = ("none", "attention")
SUMMARIES = ("mean", "none")


class StateReader(nn.Module):
    """Frozen layer states (a sequence of (B, L, d)) -> per-position reading z (B, L, dim)."""

    def __init__(
        self,
        d: int,
        layers: Sequence[int],
        dim: int,
        heads: int,
        mlp_ratio: int = 2,
        summary: str = "mean",
    ) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(
                f"adaptor.reader_dim ({dim}) must split into reader_heads ({heads}) heads of "
                f"an even size"
            )
        if summary not in SUMMARIES:
            raise ValueError(f"adaptor.reader_summary must be one of {SUMMARIES}: {summary!r}")
        self.layers, self.heads, self.summary = tuple(layers), heads, summary
        self.mix = nn.Parameter(torch.zeros(len(self.layers)))  # softmax: a plain mean at init
        self.proj = nn.Linear(d, dim)
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )
        self.norm_out = nn.LayerNorm(dim)

    def forward(
        self,
        states: Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """states: every layer state of the base, embeddings first, final last (each (B, L, d));
        attention_mask (B, L), 1 = real token; condition_mask (B, L), True on the condition.
        Returns (B, L, dim)."""
        picked = [states[i] for i in self.layers]
        w = self.mix.softmax(0).to(picked[0].dtype)
        s = sum(w[i] * F.layer_norm(x, x.shape[-1:]) for i, x in enumerate(picked))
        z = self.proj(s)  # (B, L, k)
        z = z + self._attend(self.norm_attn(z), attention_mask)
        z = z + self.mlp(self.norm_mlp(z))
        if self.summary == "mean" and condition_mask is not None:
            m = condition_mask.to(z.dtype)[..., None]  # (B, L, 1)
            z = z + (z * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        return self.norm_out(z)

    def _attend(self, z: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, k = z.shape
        q, key, v = self.qkv(z).view(b, n, 3, self.heads, k // self.heads).unbind(2)
        q, key, v = (x.transpose(1, 2) for x in (q, key, v))  # (B, heads, L, hs)
        cos, sin = rotary_cos_sin(n, k // self.heads, 10000.0, z.device, z.dtype)
        q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(q, key, v, attn_mask=mask)  # (B, heads, L, hs)
        return self.out(y.transpose(1, 2).reshape(b, n, k))


def count_reader_parameters(d: int, layers: int, dim: int, mlp_ratio: int = 2) -> int:
    """Exact parameter count of a `StateReader(d, range(layers), dim, heads, mlp_ratio)`."""
    attn = 4 * (dim * dim + dim)
    mlp = 2 * mlp_ratio * dim * dim + mlp_ratio * dim + dim
    return layers + (d + 1) * dim + attn + mlp + 3 * 2 * dim
