"""LayerDimPredictor: one Matryoshka width per attention layer, chosen per row from its prompt (issue 6).

The first `config.predictor_layers` blocks run at full width; their output, normalised and mean-pooled over the
row's real prompt tokens (never its padding), goes through a 2-layer MLP that scores every level of every layer.
Layers that cannot change width -- the first ones, Mamba layers -- are pinned to full width, so the scores form an
(n_layer, n_levels) table that `train/energy.expected_flops` prices exactly. The choice holds for the whole
generation (as in the seeds' V2). A budget (a compute mode's width) caps the levels it may pick, so modes and the
predictor compose. Training (train/losses.py) relaxes the choice with a straight-through Gumbel-softmax over levels
(Jang et al. 2017) and adds lambda * E[FLOPs]: the energy penalty's gradient reaches the predictor's scores.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ATTENTION, ModelConfig
from .flops import count_flops, level_costs
from .init import init_linear_
from .norm import rms_norm


def choosable(config: ModelConfig) -> list[int]:
    """Layers whose width the predictor chooses: attention layers after the first predictor_layers."""
    return [i for i, kind in enumerate(config.block_pattern) if kind == ATTENTION and i >= config.predictor_layers]


def allowed_levels(config: ModelConfig, budget=None, device=None) -> torch.Tensor:
    """(n_layer, n_levels) bool: the levels each layer may run at. Pinned layers: only full width; choosable
    layers: every level up to the budget's width (a mode name or a width; None: n_embd)."""
    levels = torch.tensor(config.matryoshka_levels, device=device)
    cap = config.width_values(budget)[choosable(config)[0]]
    allowed = (levels == config.n_embd).expand(config.n_layer, -1).clone()
    allowed[choosable(config)] = levels <= cap
    return allowed


def predictor_flops(config: ModelConfig) -> float:
    """FLOPs of one prediction (once per row): the MLP's two matrices (pooling and norm are O(T d), not counted)."""
    h = config.predictor_hidden
    return 2 * (config.n_embd * h + h * config.n_layer * len(config.matryoshka_levels))


def reading_flops(config: ModelConfig, context: int | None = None) -> float:
    """Forward FLOPs per token of what the predictor reads: the first predictor_layers blocks at full width, run
    once more without a cache (`hidden_after`), no lm_head."""
    prefix = count_flops(config, context, depth=config.predictor_layers)
    return prefix.forward - prefix.lm_head


def prediction_flops(config: ModelConfig, prompt_tokens: int) -> float:
    """Forward FLOPs of one prediction for a prompt of `prompt_tokens` tokens: its reading pass and the MLP."""
    return prompt_tokens * reading_flops(config, max(1, prompt_tokens)) + predictor_flops(config)


class LayerDimPredictor(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(config.n_embd, config.predictor_hidden)
        self.out = nn.Linear(config.predictor_hidden, config.n_layer * len(config.matryoshka_levels))

    @torch.no_grad()
    def init_weights(self) -> None:
        init_linear_(self.fc)
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.out.weight)  # starts uniform over levels
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, valid: torch.Tensor | None = None, budget=None) -> torch.Tensor:
        """Scores (B, n_layer, n_levels) from hidden states h (B, T, n_embd) after the first predictor_layers
        blocks; `valid` (B,) counts each row's real tokens (the rest is padding, never pooled). Levels a layer
        may not take score -inf."""
        B, T, _ = h.shape
        x = rms_norm(h.detach(), self.config.norm_width).to(self.fc.weight.dtype)
        if valid is None:
            pooled = x.mean(dim=1)
        else:
            real = (torch.arange(T, device=h.device)[None, :] < valid[:, None]).to(x.dtype)
            pooled = (x * real[..., None]).sum(dim=1) / real.sum(dim=1, keepdim=True).clamp(min=1)
        scores = self.out(F.gelu(self.fc(pooled))).view(B, self.config.n_layer, -1).float()
        return scores.masked_fill(~allowed_levels(self.config, budget, h.device), float("-inf"))


@torch.no_grad()
def predict_widths(model, idx: torch.Tensor, valid: torch.Tensor | None = None, budget=None,
                   price: float = 0.0) -> list[list[int]]:
    """Per row, the per-layer widths the predictor picks (argmax) from the prompt idx (B, T), whose first valid[b]
    tokens are real. Runs the embedding and the first predictor_layers blocks at full width, without a cache.
    `price` > 0 shifts the choice toward cheaper levels (< 0: toward wider ones): each level's score drops by
    price x its FLOPs/token as a fraction of the full model's -- the energy penalty's lambda, moved at test time."""
    config = model.config
    if model.adaptive_heads is None or model.adaptive_heads.predictor is None:
        raise ValueError("adaptive.predictor: this model has no LayerDimPredictor (config.predictor_layers is 0)")
    scores = model.adaptive_heads.predictor(model.hidden_after(idx, config.predictor_layers), valid, budget)
    if price:
        full, savings = level_costs(config, idx.size(1))
        scores = scores - price * (savings / full).to(scores)
    choice = scores.argmax(-1)
    return [[config.matryoshka_levels[j] for j in row] for row in choice.tolist()]
