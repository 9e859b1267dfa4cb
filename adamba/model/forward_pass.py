"""One forward call's walk through the blocks (`AdambaLM.run_layers` is the one loop over them).

At the fixed point before each block the walk lets the call's policies act -- early exit and expansion decide
(exits.ExitPolicy), requested hidden states are kept -- and then applies the block with its `BlockContext`. A looped
model's recurrence walks its recurrent layers with a per-iteration view of the same walk (looped.py). What the call
did comes back in a `ForwardOutput` instead of being left on the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .context import BlockContext
from .exits import ExitPolicy, ExitRecord
from .predictor import allowed_levels, choosable


@dataclass
class ForwardOutput:
    """What `model(..., outputs=True)` returns."""

    logits: torch.Tensor  # (B, T, vocab), float32 or wider
    loss: torch.Tensor | None = None  # the cross-entropy, when targets were given
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer k -> h_k, the input of block k
    exits: ExitRecord | None = None  # per-token exit layers, gates and widths, with early exit or expansion
    loops: torch.Tensor | None = None  # (B, T) iterations each token ran, for looped models
    backout_mid: torch.Tensor | None = None  # the residual after the backout layer, when it ran (recipe.py)


class ForwardPass:
    """What every block of one call is given, and what the call's policies decide before each block.

    widths: per-layer Matryoshka widths (None: full); exits: the call's ExitPolicy, if any; hidden_layers: layers
    whose input to keep (`hidden`); width_probs (B, n_layer, n_levels): per-row probabilities over the levels, each
    choosable attention layer giving their mixture of its nested widths' outputs (the width predictor's
    straight-through Gumbel-softmax in training, train/losses.py)."""

    def __init__(self, model, cos: torch.Tensor, sin: torch.Tensor, cache=None, widths: list | None = None,
                 exits: ExitPolicy | None = None, hidden_layers=(), width_probs: torch.Tensor | None = None,
                 x0: torch.Tensor | None = None, tokens: torch.Tensor | None = None):
        config = model.config
        self.config, self.cache = config, cache
        # today's recipe (recipe.py): residual scalars read the embedding x0; backout keeps a mid-stack residual
        self.scalars, self.x0 = model.scalars, x0
        self.backout_layer = model.backout.layer if model.backout is not None else None
        self.backout_mid: torch.Tensor | None = None
        self.base = BlockContext(cos, sin, cache, levels=tuple(config.matryoshka_levels), tokens=tokens)
        self.widths = widths if widths is not None else [None] * config.n_layer
        self.exits = exits
        self.hidden_layers, self.hidden = frozenset(hidden_layers), {}
        self.width_probs = width_probs
        if width_probs is not None:
            self.mixed_layers = set(choosable(config))
            self.allowed = allowed_levels(config).any(0).tolist()

    def enter(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The fixed point before block i."""
        if i in self.hidden_layers:
            self.hidden[i] = x
        if self.exits is not None:
            self.exits.decide(i, x)
        return x

    def context(self, i: int, state=None, widths: list | None = None) -> BlockContext:
        """Block i's context; `state` / `widths` replace the cache's state and the call's widths (a loop's slot
        and its iteration's widths)."""
        if state is None and self.cache is not None:
            state = self.cache.states[i]
        if self.exits is not None:
            return self.base.at(state=state, **self.exits.block_fields(i))
        return self.base.at(state=state, width=(self.widths if widths is None else widths)[i])

    def apply(self, i: int, block, x: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        ctx = self.context(i) if ctx is None else ctx
        if self.scalars is not None:  # a frozen token (early exit) keeps its residual as it is
            scaled = self.scalars(i, x, self.x0)
            x = scaled if ctx.frozen is None else torch.where(ctx.frozen[..., None], x, scaled)
        if self.width_probs is None or i not in self.mixed_layers:
            out = block(x, ctx)
        else:
            out = sum(self.width_probs[:, i, j, None, None].to(x.dtype) *
                      block(x, ctx.at(width=self.config.block_width(w)))
                      for j, w in enumerate(self.config.matryoshka_levels) if self.allowed[j])
        if i == self.backout_layer:
            self.backout_mid = out
        return out
