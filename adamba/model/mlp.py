"""The feed-forward half of a block: Linear -> relu^2 -> Linear, no biases (So et al. 2021, "Primer")."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .float8 import linear
from .init import init_linear_


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, n_embd, bias=False)

    def init_weights(self) -> None:
        init_linear_(self.c_fc)
        nn.init.zeros_(self.c_proj.weight)  # the block starts as the identity

    def forward(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """At a Matryoshka width w < n_embd, x holds the first w coordinates and the first
        hidden * w / n_embd neurons are used (nested: a narrower slice is a prefix of a wider one)."""
        if width is None:
            return linear(F.relu(linear(x, self.c_fc)).square(), self.c_proj)
        hidden = self.c_fc.out_features * width // self.c_fc.in_features
        h = F.relu(linear(x, self.c_fc, hidden, width)).square()
        return linear(h, self.c_proj, width, hidden)
