"""Inserting blocks into a stack (add-mamba, deepen) so that the model computes exactly what it did.

A new block is built by the model's own `init_weights`, which zeroes every projection that writes into the
residual stream (attention and MLP `c_proj`, Mamba's `out_proj`): with one residual, x + f(norm(x)) with f's
output matrix 0, the block adds exact zeros, so it is the identity until training moves it (cf. Net2DeeperNet,
Chen et al. 2016, "Net2Net", which also inserts identity layers). Its input projections stay random, so the
zero output matrix gets gradients at once. (The public forks' new blocks were not no-ops: a double residual.)

The new stack is given as its whole block pattern; the old blocks keep their order and take the earliest
positions that fit (old "TT" -> new "TMTM": old blocks at 0 and 2). What the config must keep for the old blocks
to compute the same, it keeps: attention windows (the window pattern tiles over attention layers, so inserted
attention layers would shift it; it is then written out per layer) and a looped model's segments (an inserted
block joins the segment of the old block before it, so prelude / recur / coda grow around it).
"""

from __future__ import annotations

import dataclasses
import re

import torch

from ..checkpoint import load_weights_into
from ..config import ATTENTION, ModelConfig, parse_block_pattern
from ..model import AdambaLM
from .growth import supported


def old_positions(old: list[str], new: list[str]) -> list[int]:
    """Where each old block lands in the new pattern: the earliest positions that keep the old order."""
    positions, j = [], 0
    for kind in old:
        while j < len(new) and new[j] != kind:
            j += 1
        if j == len(new):
            raise ValueError(f"pattern: {''.join(new)} does not contain the model's blocks {''.join(old)} in "
                             "order; give the whole new stack, with every old block in its place")
        positions.append(j)
        j += 1
    if len(new) == len(old):
        raise ValueError(f"pattern: {''.join(new)} adds no block to {''.join(old)}")
    return positions


def _window_pattern(config: ModelConfig, new_pattern: list[str], positions: list[int]) -> str:
    """Per-attention-layer window letters that give every old attention layer its old window; new ones get 'L'."""
    if new_pattern.count(ATTENTION) == config.block_pattern.count(ATTENTION):
        return config.window_pattern  # no attention layer inserted: every old one keeps its place in the tiling
    windows = config.attention_windows()
    letter = {positions[i]: "L" if windows[i] is None else "S"
              for i, kind in enumerate(config.block_pattern) if kind == ATTENTION}
    letters = "".join(letter.get(j, "L") for j, kind in enumerate(new_pattern) if kind == ATTENTION)
    return "L" if set(letters) <= {"L"} else letters


def _loop(config: ModelConfig, n_new: int, positions: list[int]) -> dict | None:
    """The loop segments after insertion: each new block joins the segment of the old block before it (of the
    first old block if it comes first)."""
    loop = config.loop
    if loop is None:
        return None
    segment_of_old = ["prelude"] * loop.prelude + ["recur"] * loop.recur + ["coda"] * loop.coda
    owner = {p: segment_of_old[i] for i, p in enumerate(positions)}
    segments, current = [], segment_of_old[0]
    for j in range(n_new):
        current = owner.get(j, current)
        segments.append(current)
    counts = {name: segments.count(name) for name in ("prelude", "recur", "coda")}
    if loop.sandwich_norm and counts["recur"] != loop.recur:
        raise ValueError("loop.sandwich_norm: a block inserted into the recurrent segment of a sandwich-norm loop "
                         "is followed by a new learnable RMSNorm, which rescales its input, so it cannot start as "
                         "the identity; insert the block in the prelude or coda instead")
    return {**dataclasses.asdict(loop), **counts}


def inserted_config(config: ModelConfig, pattern, positions: list[int] | None = None) \
        -> tuple[ModelConfig, list[int]]:
    """(the config of the deeper stack, the new position of each old block). `pattern`: the whole new stack;
    `positions`: where the old blocks go, when the caller knows (default: the earliest positions that fit)."""
    supported(config)
    new_pattern = parse_block_pattern(pattern)
    positions = positions or old_positions(config.block_pattern, new_pattern)
    # the recipe's per-layer choices (model/recipe.py) follow their blocks; new blocks get no value embedding
    fields = config.to_dict() | {"block_pattern": new_pattern, "n_layer": len(new_pattern),
                                 "window_pattern": _window_pattern(config, new_pattern, positions),
                                 "loop": _loop(config, len(new_pattern), positions),
                                 "value_embeds": [positions[i] for i in config.value_embed_layers] or None,
                                 "backout_layer": positions[config.backout_at] if config.backout else None}
    try:
        new = ModelConfig.from_dict(fields)
    except ValueError as err:
        raise ValueError(f"pattern: the new stack is not a valid model: {err}") from None
    return new, positions


@torch.no_grad()
def insert_blocks(model: AdambaLM, pattern, positions: list[int] | None = None) -> tuple[AdambaLM, list[int]]:
    """The model with blocks inserted to make `pattern` (old blocks at `positions`, see inserted_config), and
    the indices of the new blocks."""
    config, positions = inserted_config(model.config, pattern, positions)
    grown = AdambaLM.build(config, model.wte.weight.device).to(model.wte.weight.dtype)
    state = grown.state_dict()
    moved = {i: positions[i] for i in range(len(positions))}
    for key, value in model.state_dict().items():
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if key in ("scalars.resid", "scalars.x0"):  # per layer: a new block's x <- 1 x + 0 x0 is the identity
            value = torch.full_like(state[key], 1.0 if key == "scalars.resid" else 0.0).index_copy(
                0, torch.tensor(positions, device=value.device), value)
        state[f"blocks.{moved[int(match.group(1))]}.{match.group(2)}" if match else key] = value
    load_weights_into(grown, state, "surgery (inserted blocks)")
    grown.train(model.training)
    return grown, sorted(set(range(config.n_layer)) - set(positions))
