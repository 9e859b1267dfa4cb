"""The energy penalty: the expected forward FLOPs/token of a distribution over Matryoshka widths.

    E[FLOPs] = F(full) + sum_layers sum_levels p[layer, level] * (F(layer at level) - F(full))

where F comes from the one FLOP counter (`count_flops`). FLOPs add up over layers, so each layer's saving at
a level is measured by narrowing that layer alone, and the sum is exact for every joint choice of widths.

The penalty lambda * E[FLOPs] only has a gradient when the probabilities come from something that chooses
widths and is trained (the width predictor). Matryoshka training samples widths by a fixed rule, so there
the expected FLOPs is a constant: the trainer logs what the sampled widths cost and says that nothing learns
from it, rather than adding a term with no gradient to the loss (the seeds' "energy loss" did that).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model.flops import level_costs


def expected_flops(config: ModelConfig, probs: torch.Tensor, context: int | None = None) -> torch.Tensor:
    """Expected forward FLOPs/token for per-layer probabilities over `config.matryoshka_levels`.

    probs: (..., n_layer, n_levels), each row summing to 1 (a one-hot row is a fixed choice). Differentiable
    in probs; returns shape (...)."""
    levels = len(config.matryoshka_levels)
    if probs.shape[-2:] != (config.n_layer, levels):
        raise ValueError(f"probs: expected (..., n_layer={config.n_layer}, levels={levels}), "
                         f"got {tuple(probs.shape)}")
    full, savings = level_costs(config, context)
    return full + (probs * savings.to(probs)).sum(dim=(-1, -2))


def choice_probs(config: ModelConfig, width) -> torch.Tensor:
    """One-hot (n_layer, n_levels) probabilities of a fixed compute choice (see ModelConfig.layer_widths)."""
    widths = config.width_values(width)
    probs = torch.zeros(config.n_layer, len(config.matryoshka_levels), dtype=torch.float64)
    for layer, w in enumerate(widths):
        probs[layer, config.matryoshka_levels.index(w)] = 1.0
    return probs
