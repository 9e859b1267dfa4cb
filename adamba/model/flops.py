"""The one FLOP counter: training logs, reports and benchmarks all call it.

Counts 2 FLOPs per multiply-add of every matrix product a forward pass performs, per token:
the projections of each block, attention's score and value products over the keys each query actually
sees (causal, clipped by its window), and the lm_head. Embedding lookups, norms and elementwise ops are
not counted (they are O(d) per token against O(d^2)). A training step costs 3x the forward (backward = 2x).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ATTENTION, ModelConfig


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token, by component, averaged over the positions of a `context`-token sequence."""

    context: int
    projections: float  # q/k/v/o and MLP matrices of every block
    attention: float  # q.k scores and weighted sums of values
    lm_head: float

    @property
    def forward(self) -> float:
        return self.projections + self.attention + self.lm_head

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
    projections = attention = 0.0
    for kind, window in zip(config.block_pattern, config.attention_windows(), strict=True):
        if kind == ATTENTION:
            projections += 2 * d * (q_dim + 2 * kv_dim) + 2 * q_dim * d
            projections += 2 * 2 * d * config.mlp_ratio * d
            attention += 2 * 2 * q_dim * mean_keys(context, window)
    return FlopCount(context, projections, attention, 2 * d * config.vocab_size)
