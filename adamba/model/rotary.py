"""Rotary position embeddings (Su et al. 2021) in nanochat's half-split layout."""

import torch


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (seq_len, head_dim/2), frequencies base^(-2i/head_dim).

    Kept in float64 (a few KB) and cast to the activations' dtype on use: in float32, position x frequency
    loses ~1e-4 rad at positions in the thousands."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) of x (B, T, H, D) by the angle of each token's position.

    cos/sin are (T, D/2) when every row is at the same positions, or (B, T, D/2) per row (cached decoding)."""
    d = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
