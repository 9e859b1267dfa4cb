"""The one FLOP counter: training logs, reports and benchmarks all call it.

Counts 2 FLOPs per multiply-add of every matrix product a forward pass performs, per token:
the projections of each block, attention's score and value products over the keys each query actually
sees (causal, clipped by its window), and the lm_head; the recipe's small gates (value embeddings' and smear's,
model/recipe.py) too. Embedding lookups, norms and elementwise ops are not counted (they are O(d) per token
against O(d^2)). A training step costs 3x the forward (backward = 2x), except for forward work done without
gradient (a looped model's truncated backprop), which has no backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ATTENTION, MAMBA, MAMBA2, SMEAR_GATE_CHANNELS, VALUE_GATE_CHANNELS, ModelConfig
from .mamba import dt_rank_for


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token, by component, averaged over the positions of a `context`-token sequence."""

    context: int
    projections: float  # q/k/v/o, MLP and Mamba projection matrices of every block
    attention: float  # q.k scores and weighted sums of values
    lm_head: float
    scan: float = 0.0  # Mamba's depthwise conv and selective scan; Mamba-2's conv and SSD scan
    no_grad: float = 0.0  # the part of the forward run without gradient (a looped model's first r - k iterations)
    gates: float = 0.0  # exit/expansion gates evaluated (model/exits.py)

    @property
    def forward(self) -> float:
        return self.projections + self.attention + self.lm_head + self.scan + self.gates

    @property
    def train(self) -> float:
        return 3 * self.forward - 2 * self.no_grad


def mean_keys(context: int, window: int | None) -> float:
    """Average number of keys a query sees over positions 0..context-1 (position t sees min(t+1, window))."""
    w = context if window is None else min(window, context)
    # positions t < w see t+1 keys; the remaining context-w positions see w each
    return (w * (w + 1) / 2 + (context - w) * w) / context


def count_flops(config: ModelConfig, context: int | None = None,
                widths: list[int | None] | None = None, *, loops: int | None = None,
                loop_widths: list[list[int | None]] | None = None, probes: int = 0,
                layers: list[tuple[int, str, int | None, int | None]] | None = None, exit_layer: int | None = None,
                gates: int = 0, depth: int | None = None) -> FlopCount:
    """Per-token forward FLOPs; `widths` (from config.layer_widths) gives each attention layer's Matryoshka
    width, None meaning full. A layer at width w uses w/head_dim query heads, the K/V heads they read
    (ceil(n_q / group)), w input and output coordinates and mlp_ratio * w hidden neurons.

    `exit_layer` e (model/exits.py): a token that exits after block e runs blocks < e; every later block only
    updates its state with the token's frozen hidden state (CALM's state propagation): attention computes the
    token's K/V (no query, scores, output projection or MLP), Mamba the input side of its mixer (in_proj without
    the gate z, conv, x_proj / dt) and the scan, no out_proj or MLP. The lm_head runs once either way.
    `gates`: gate MLPs the token evaluated (each 2 (d * gate_hidden + gate_hidden)). `depth` (Compute.depth): only
    the first `depth` blocks run, later ones not at all."""
    context = context or config.sequence_len
    d, hd = config.n_embd, config.model_head_dim
    group = config.n_head // config.n_kv_head
    mlp = 2 * 2 * d * config.mlp_ratio * d
    projections = attention = scan = 0.0
    widths = widths or [None] * config.n_layer
    if config.loop is not None and layers is None:
        return _count_looped(config, context, widths, loops, loop_widths, probes)
    # `layers`: (index, kind, window, width) of the layers to count, instead of every layer once (used for loops)
    if layers is None:
        layers = list(zip(range(config.n_layer), config.block_pattern, config.attention_windows(), widths,
                          strict=True))
        projections += 2 * SMEAR_GATE_CHANNELS if config.smear else 0  # once per token, before the blocks
    for position, (i, kind, window, width) in enumerate(layers):
        if depth is not None and position >= depth:
            break
        propagate = exit_layer is not None and i >= exit_layer
        if kind == ATTENTION:
            w = width or d
            n_q = w // hd
            q_dim, kv_dim = n_q * hd, -(-n_q // group) * hd
            if i in config.value_embed_layers:  # the value-embedding gate of each K/V head
                projections += 2 * VALUE_GATE_CHANNELS * kv_dim // hd
            if propagate:
                projections += 2 * w * 2 * kv_dim
                continue
            projections += 2 * w * (q_dim + 2 * kv_dim) + 2 * q_dim * w + 2 * 2 * w * config.mlp_ratio * w
            attention += 2 * 2 * q_dim * mean_keys(context, window)
        elif kind == MAMBA:
            d_inner, n = config.mamba_expand * d, config.mamba_d_state
            rank = dt_rank_for(d, config.mamba_dt_rank)
            # in_proj, x_proj, dt_proj, out_proj; propagation: in_proj's x half, x_proj, dt_proj
            projections += 2 * (d * d_inner + d_inner * (rank + 2 * n) + rank * d_inner) if propagate else \
                2 * (d * 2 * d_inner + d_inner * (rank + 2 * n) + rank * d_inner + d_inner * d)
            projections += mlp if config.mamba_use_mlp and not propagate else 0
            # conv taps; per (channel, state): decay*h, + dt*x*B, C*h -> 3 multiply-adds (exp not counted)
            scan += 2 * d_inner * config.mamba_d_conv + 2 * 3 * d_inner * n
        elif kind == MAMBA2:
            d_inner, n, g = config.mamba2_expand * d, config.mamba2_d_state, config.mamba2_ngroups
            heads, conv_dim = d_inner // config.mamba2_headdim, d_inner + 2 * g * n
            # in_proj (z, xBC, dt), out_proj; propagation: in_proj's xBC and dt only
            projections += 2 * d * (conv_dim + heads) if propagate else \
                2 * (d * (d_inner + conv_dim + heads) + d_inner * d)
            projections += mlp if config.mamba_use_mlp and not propagate else 0
            # The chunked SSD scan (ssd.py) per token, chunks of q = min(chunk_size, context) tokens: C.B scores
            # against the q tokens of its chunk (per group; the full q x q block is computed, the causal half
            # is masked), those scores times dt*x (q per channel), its share of the chunk's end state, the
            # entering state's output (d_state per channel each), and state passing once per chunk. The conv
            # taps too. Exps, the decay mask, D, the gate and the norm are elementwise (not counted). A decode
            # step instead costs 3 multiply-adds per (channel, state), as in Mamba-1.
            q = min(config.mamba2_chunk_size, context)
            scan += 2 * (conv_dim * config.mamba2_d_conv + g * q * n + d_inner * q + 2 * d_inner * n
                         + d_inner * n / q)
    return FlopCount(context, projections, attention, 2 * d * config.vocab_size, scan,
                     gates=gates * 2 * (d * config.gate_hidden + config.gate_hidden))


def _count_looped(config: ModelConfig, context: int, widths: list, loops: int | None,
                  loop_widths: list[list] | None, probes: int) -> FlopCount:
    """A looped model (looped.py): prelude and coda once, the recurrent layers and the state's half of `inject`
    (D x D) `loops` times (default mean_recurrence), the input's half of inject once. `loop_widths[i]`: iteration
    i's per-layer widths (default `widths`). Backward runs through the last min(loops, backprop_depth) iterations
    only, so the others count as `no_grad`. `probes`: extra coda + lm_head passes per token (the "kl" exit
    criterion evaluates one after every iteration but the last)."""
    loop, d = config.loop, config.n_embd
    r = loop.mean_recurrence if loops is None else loops
    windows = config.attention_windows()

    def part(indices: range, ws: list) -> FlopCount:
        return count_flops(config, context, layers=[(i, config.block_pattern[i], windows[i], ws[i]) for i in indices])

    inject = 2 * d * d  # one D x D half of the (D, 2D) matrix
    once = [part(loop.prelude_layers, widths)] + [part(loop.coda_layers, widths)] * (1 + probes)
    iterations = [part(loop.recurrent_layers, loop_widths[i] if loop_widths else widths) for i in range(r)]
    no_grad = sum((f.projections + f.attention + f.scan + inject for f in iterations[:r - min(r, loop.backprop_depth)]),
                  0.0)
    counted = once + iterations
    smear = 2 * SMEAR_GATE_CHANNELS if config.smear else 0
    return FlopCount(context, sum(f.projections for f in counted) + (r + 1) * inject + smear,
                     sum(f.attention for f in counted), (1 + probes) * 2 * d * config.vocab_size,
                     sum(f.scan for f in counted), no_grad)


def level_costs(config: ModelConfig, context: int | None = None) -> tuple[float, torch.Tensor]:
    """(FLOPs/token of the full model, (n_layer, n_levels) change in FLOPs/token when one layer runs at a level).

    Non-attention layers always run at full width, so their rows are zero."""
    context = context or config.sequence_len
    full = count_flops(config, context).forward
    savings = torch.zeros(config.n_layer, len(config.matryoshka_levels), dtype=torch.float64)
    for layer in range(config.n_layer):
        for j, level in enumerate(config.matryoshka_levels):
            widths: list[int | None] = [None] * config.n_layer
            widths[layer] = level
            savings[layer, j] = count_flops(config, context, config.layer_widths(widths)).forward - full
    return full, savings
