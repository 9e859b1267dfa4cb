"""The one FLOP counter: training logs, reports and benchmarks all call it.

Counts 2 FLOPs per multiply-add of every matrix product a forward pass performs, per token:
the projections of each block, attention's score and value products over the keys each query actually
sees (causal, clipped by its window), and the lm_head. Embedding lookups, norms and elementwise ops are
not counted (they are O(d) per token against O(d^2)). A training step costs 3x the forward (backward = 2x).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ATTENTION, MAMBA, ModelConfig
from .mamba import dt_rank_for


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token, by component, averaged over the positions of a `context`-token sequence."""

    context: int
    projections: float  # q/k/v/o, MLP and Mamba projection matrices of every block
    attention: float  # q.k scores and weighted sums of values
    lm_head: float
    scan: float = 0.0  # Mamba's depthwise conv and selective scan

    @property
    def forward(self) -> float:
        return self.projections + self.attention + self.lm_head + self.scan

    @property
    def train(self) -> float:
        return 3 * self.forward


def mean_keys(context: int, window: int | None) -> float:
    """Average number of keys a query sees over positions 0..context-1 (position t sees min(t+1, window))."""
    w = context if window is None else min(window, context)
    # positions t < w see t+1 keys; the remaining context-w positions see w each
    return (w * (w + 1) / 2 + (context - w) * w) / context


def count_flops(config: ModelConfig, context: int | None = None,
                widths: list[int | None] | None = None) -> FlopCount:
    """Per-token forward FLOPs; `widths` (from config.layer_widths) gives each attention layer's Matryoshka
    width, None meaning full. A layer at width w uses w/head_dim query heads, the K/V heads they read
    (ceil(n_q / group)), w input and output coordinates and mlp_ratio * w hidden neurons."""
    context = context or config.sequence_len
    d, hd = config.n_embd, config.model_head_dim
    group = config.n_head // config.n_kv_head
    mlp = 2 * 2 * d * config.mlp_ratio * d
    projections = attention = scan = 0.0
    widths = widths or [None] * config.n_layer
    for kind, window, width in zip(config.block_pattern, config.attention_windows(), widths, strict=True):
        if kind == ATTENTION:
            w = width or d
            n_q = w // hd
            q_dim, kv_dim = n_q * hd, -(-n_q // group) * hd
            projections += 2 * w * (q_dim + 2 * kv_dim) + 2 * q_dim * w + 2 * 2 * w * config.mlp_ratio * w
            attention += 2 * 2 * q_dim * mean_keys(context, window)
        elif kind == MAMBA:
            d_inner, n = config.mamba_expand * d, config.mamba_d_state
            rank = dt_rank_for(d, config.mamba_dt_rank)
            # in_proj, x_proj, dt_proj, out_proj
            projections += 2 * (d * 2 * d_inner + d_inner * (rank + 2 * n) + rank * d_inner + d_inner * d)
            projections += mlp if config.mamba_use_mlp else 0
            # conv taps; per (channel, state): decay*h, + dt*x*B, C*h -> 3 multiply-adds (exp not counted)
            scan += 2 * d_inner * config.mamba_d_conv + 2 * 3 * d_inner * n
    return FlopCount(context, projections, attention, 2 * d * config.vocab_size, scan)
