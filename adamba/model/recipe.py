"""Today's nanochat recipe (karpathy/nanochat since March 2026), the parts outside the blocks; each is a config
option (ModelConfig.residual_scalars, smear, backout; value embeddings live in attention.py):

- Residual scalars (after modded-nanogpt): before block i, x <- resid[i] x + x0[i] x0, where x0 is the (smeared)
  normalised embedding. Initialised as nanochat: resid 1.15 -> 1.05 and x0 0.20 -> 0.05, linearly over the depth.
- Smear: x_t <- x_t + lambda sigmoid(w . x_t[:24]) x_{t-1} on the normalised embeddings, a cheap bigram feature; the
  first position has no predecessor. Decoding keeps each row's previous embedding (`SmearState`). lambda starts at
  0, so the option starts as the identity; w ~ U(0, 0.02).
- Backout: before the final norm, x <- x - lambda h, h the residual after block `backout_layer` (default
  n_layer // 2); lambda starts at 0.2. A token that exits at or before that layer (an early exit, a truncated
  stack) backs out its own residual, which is what the full forward computes for it (its later blocks pass it
  through); under the scale-free final norm that leaves its logits as they were for lambda < 1. In a looped model
  the layer's latest run counts (a recurrent layer's last iteration, per token; looped.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import SMEAR_GATE_CHANNELS


class ResidualScalars(nn.Module):
    def __init__(self, n_layer: int):
        super().__init__()
        self.resid = nn.Parameter(torch.empty(n_layer))
        self.x0 = nn.Parameter(torch.empty(n_layer))

    @torch.no_grad()
    def init_weights(self) -> None:
        n = len(self.resid)
        depth = torch.arange(n, dtype=torch.float32, device=self.resid.device) / max(n - 1, 1)
        self.resid.copy_(1.15 - 0.10 * depth)
        self.x0.copy_(0.20 - 0.15 * depth)

    def forward(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return self.resid[i].to(x.dtype) * x + self.x0[i].to(x.dtype) * x0


class SmearState:
    """Each row's previous normalised embedding (B, D), zero before a row's first token (so its first token gets
    no smear, as in the full forward), and the trail that lets speculative decoding take tokens back."""

    def __init__(self, batch: int, n_embd: int, device, dtype):
        self.prev = torch.zeros(batch, n_embd, device=device, dtype=dtype)
        self.trail: list[torch.Tensor] | None = None

    def load_row(self, slot: int, source: SmearState, row: int = 0) -> None:
        self.prev[slot] = source.prev[row]

    def first_rows(self, n: int) -> SmearState:
        view = object.__new__(SmearState)
        view.prev, view.trail = self.prev[:n], None
        return view

    def begin_trail(self) -> None:
        self.trail = [self.prev[:, None].clone()]

    def rollback(self, keep: torch.Tensor) -> None:
        """Row b's previous embedding after its first keep[b] tokens since `begin_trail`."""
        seen = torch.cat(self.trail, dim=1)  # (B, 1 + tokens, D): index t = after t tokens
        self.prev.copy_(seen[torch.arange(seen.size(0), device=keep.device), keep])
        self.trail = None

    def advance(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The embeddings each new token's smear reads, (B, T, D): the row's previous one, then x shifted; the state
        moves to each row's last real token (`valid` of the T, with right padding)."""
        before = torch.cat([self.prev[:, None].to(x.dtype), x[:, :-1]], dim=1)
        if self.trail is not None:
            if valid is not None:
                raise ValueError("a trail (speculative decoding) takes whole rows of new tokens, not right-padded ones")
            self.trail.append(x.to(self.prev.dtype, copy=True))
        if valid is None:
            self.prev.copy_(x[:, -1])
        else:  # a row with no real token keeps its state
            last = (valid - 1).clamp(min=0)
            taken = x[torch.arange(x.size(0), device=x.device), last]
            self.prev.copy_(torch.where((valid > 0)[:, None], taken.to(self.prev.dtype), self.prev))
        return before


class Smear(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(SMEAR_GATE_CHANNELS, 1, bias=False)
        self.scale = nn.Parameter(torch.empty(1))

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.uniform_(self.gate.weight, 0.0, 0.02)
        nn.init.zeros_(self.scale)

    def forward(self, x: torch.Tensor, state: SmearState | None = None, valid: torch.Tensor | None = None):
        """x (B, T, D) normalised embeddings -> smeared; with `state` the first token reads the row's previous one."""
        gate = self.scale.to(x.dtype) * torch.sigmoid(F.linear(x[..., :SMEAR_GATE_CHANNELS], self.gate.weight))
        if state is None:
            return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        return x + gate * state.advance(x, valid)


class Backout(nn.Module):
    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer
        self.scale = nn.Parameter(torch.empty(1))

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.constant_(self.scale, 0.2)

    def forward(self, x: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        return x - self.scale.to(x.dtype) * mid
