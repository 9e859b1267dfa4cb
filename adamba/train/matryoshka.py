"""Which Matryoshka widths a training micro-step runs.

Every slice must be trained, or narrow widths are useless at inference. Two rules:
- "sandwich" (Yu & Huang 2019, universally slimmable networks): the full width, the smallest width, and a few
  random widths in between, every micro-step; the extremes bound all the others.
- "sample" (MatFormer, Devvrit et al. 2023): one random level per micro-step.
Widths are per model (one level for all attention layers) or per layer. The choice is a pure function of
(seed, step, micro-step), so every rank picks the same widths and a resumed run picks what it would have.
"""

from __future__ import annotations

import random

from ..config import ModelConfig, TrainConfig


def micro_step_widths(model: ModelConfig, config: TrainConfig, step: int, micro: int) -> list[list[int] | None]:
    """The compute choices (None = full, else a per-layer width list) to train on this micro-batch."""
    if not config.matryoshka:
        return [None if config.width is None else model.layer_widths(config.width)]
    levels = model.matryoshka_levels
    rng = random.Random(f"{config.seed}-{step}-{micro}")  # str seeds hash deterministically (sha512)

    def draw(choices: list[int]) -> list[int]:
        if config.matryoshka_per_layer:
            return [rng.choice(choices) for _ in range(model.n_layer)]
        return [rng.choice(choices)] * model.n_layer

    if config.matryoshka_rule == "sample":
        return [draw(levels)]
    middle = levels[1:-1]
    picks: list[list[int] | None] = [None, [levels[0]] * model.n_layer]
    picks += [draw(middle) for _ in range(config.matryoshka_middle if middle else 0)]
    return picks
