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


def count_flops(config: ModelConfig, context: int | None = None) -> FlopCount:
    context = context or config.sequence_len
    d, hd = config.n_embd, config.model_head_dim
    q_dim, kv_dim = config.n_head * hd, config.n_kv_head * hd
    mlp = 2 * 2 * d * config.mlp_ratio * d
    projections = attention = scan = 0.0
    for kind, window in zip(config.block_pattern, config.attention_windows(), strict=True):
        if kind == ATTENTION:
            projections += 2 * d * (q_dim + 2 * kv_dim) + 2 * q_dim * d + mlp
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
