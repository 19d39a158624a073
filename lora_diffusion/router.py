"""The router: per-example weights over task adaptors, read from the encoded condition.

Its own module, below both `composition` (which routes with it) and `adaptor_io` (which saves and
loads it), so neither has to import the other to reach it.
"""

from __future__ import annotations

import torch
from torch import nn

from .adaptor import CONDITION_REPRS


class Router(nn.Module):
    """Enc(c) (B, d) -> softmax task weights (B, n_tasks), through one hidden layer.

    `condition_repr` says which encoding of the condition it reads, as for adaptors: the pooled
    final hidden states of the base ("hidden") or its pooled input embeddings ("embedding")."""

    def __init__(
        self, d: int, num_tasks: int, hidden: int = 512, condition_repr: str = "hidden"
    ) -> None:
        super().__init__()
        if condition_repr not in CONDITION_REPRS:
            raise ValueError(f"router condition_repr must be one of {CONDITION_REPRS}")
        self.condition_repr = condition_repr
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_tasks))

    def logits(self, enc: torch.Tensor) -> torch.Tensor:
        return self.net(enc)

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        return self.net(enc).softmax(-1)
