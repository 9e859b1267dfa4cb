"""The feed-forward half of a block: Linear -> relu^2 -> Linear, no biases (So et al. 2021, "Primer")."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_linear_


class MLP(nn.Module):
    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, n_embd, bias=False)

    def init_weights(self) -> None:
        init_linear_(self.c_fc)
        nn.init.zeros_(self.c_proj.weight)  # the block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())
