"""Rotary position embeddings (Su et al. 2021) in nanochat's half-split layout.

Each pair (x_i, x_{i+d/2}) of a head (d = head_dim / 2) is rotated by its position's angle:

    out_i       = x_i * cos + x_{i+d/2} * sin
    out_{i+d/2} = x_{i+d/2} * cos - x_i * sin

The tables are stored spread over the whole head, cos as [cos, cos] and sin as [sin, -sin], so the rotation is
x * cos + swap_halves(x) * sin: four ops in place of ten (a decode step is dominated by per-op overhead), and
bit for bit the same numbers, since a + x * (-s) rounds exactly as a - x * s.
"""

import torch


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim): [cos, cos] and [sin, -sin] of the angles position x
    frequency, frequencies base^(-2i/head_dim).

    Kept in float64 (a few KB) and cast to the activations' dtype on use: in float32, position x frequency
    loses ~1e-4 rad at positions in the thousands."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, -sin], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x (B, T, H, D) by the angle of each token's position.

    cos/sin (from `rotary_tables`) are (T, D) when every row is at the same positions, or (B, T, D) per row
    (cached decoding)."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin  # roll by half a head swaps the halves
