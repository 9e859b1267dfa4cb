"""One compute choice: how wide, how many loops, which adaptive policy -- the one form every entry point takes.

`model(idx, compute=Compute(...))`, `model.count_flops(context, compute)`, `InferenceCache(..., compute=...)`,
`Engine.generate(..., compute=...)`, the evaluators and the trainer's FLOP tally all take a `Compute`; users'
strings (CLI flags, TOML, HTTP fields) become one in `Compute.parse`. Its three parts:

- width: None is full width (its one meaning; a number equal to n_embd means the same), a compute mode name
  ("ghost"), a Matryoshka level (an int, every attention layer), a per-layer list of levels, or, for a looped
  model, a callable iteration -> any of these (looped.py). Resolved by `ModelConfig.layer_widths`.
- loops (looped models only): None is the config's mean_recurrence, an int, a `looped.Loops` plan (adaptive exit,
  kv_budget, warm start), or a (batch, time) tensor of per-token counts (training and analysis). Resolved by
  `looped.as_plan`.
- adaptive (non-looped models with gates): an `exits.Adaptive` policy -- early exit, expansion, the width
  predictor.
- depth (non-looped models): run only the first `depth` blocks, then the head -- the model truncated at an exit
  (what every token exiting there computes, without the state updates of later layers: their cache state is left
  as it was). An exit draft of speculative decoding (infer/speculative.py). None: every block.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..config import ModelConfig, parse_width, require_loop
from .exits import SEED_EXIT_THRESHOLD, SEED_EXPAND_THRESHOLD, Adaptive
from .looped import EXIT_THRESHOLDS, Loops

ADAPTIVE_CHOICES = ("off", "calibrated", "seeds", "predictor")


@dataclass(frozen=True)
class Compute:
    width: Any = None
    loops: Any = None
    adaptive: Adaptive | None = None
    depth: int | None = None

    @classmethod
    def parse(cls, config: ModelConfig, width: str | None = None, loops: str | int | None = None,
              adaptive: str | None = None, names: dict[str, str] | None = None) -> Compute:
        """A choice from the strings users write, checked against `config`; an error names the field as the user
        wrote it (`names`, e.g. {"width": "--mode"}; by default width, loops, adaptive):
        width: see `config.parse_width` ("ghost", "256", "64,64,128"; "" or None is full width);
        loops: "8" (iterations), "kl" / "latent" (adaptive exit, at most mean_recurrence iterations) or "kl:16"
            (adaptive exit, at most 16);
        adaptive: off, calibrated (the checkpoint's thresholds, else 0.95), seeds (exit >= 0.95, and expand < 0.5
            where the model has ExpansionGates), predictor (per-row widths, calibrated exits), or an exit threshold.
        """
        names = names or {}
        with _named("width", names):
            parsed_width = parse_width(width)
            config.layer_widths(parsed_width)
        with _named("loops", names):
            parsed_loops = _parse_loops(config, loops)
        with _named("adaptive", names):
            parsed_adaptive = _parse_adaptive(config, adaptive)
        compute = cls(parsed_width, parsed_loops, parsed_adaptive)
        compute.check(config)
        return compute

    def check(self, config: ModelConfig) -> None:
        """Raise a ValueError naming the field if this choice does not fit a model with `config`."""
        if not callable(self.width):
            config.layer_widths(self.width)
        if self.loops is not None:
            require_loop(config)
        if self.adaptive is not None and config.loop is not None:
            raise ValueError("adaptive: early exit is not defined for looped models (use loops=Loops(exit=...))")
        if self.depth is not None:
            if isinstance(self.depth, bool) or not isinstance(self.depth, int) or not 1 <= self.depth <= config.n_layer:
                raise ValueError(f"depth: {self.depth!r} is not a number of blocks from 1 to n_layer={config.n_layer}")
            if config.loop is not None or self.adaptive is not None:
                raise ValueError("depth: a truncated stack is not defined for looped models or with adaptive exits")

    def layer_widths(self, config: ModelConfig) -> list[int | None]:
        """Per-layer widths, None = full (for a per-iteration callable, see `Recurrence.iteration_widths`)."""
        return config.layer_widths(self.width)


@contextmanager
def _named(field: str, names: dict[str, str]):
    """Errors about `field` renamed to how the user wrote it."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        if field not in names or not message.startswith(field):
            raise
        raise ValueError(names[field] + message[len(field):]) from None


def _parse_loops(config: ModelConfig, text: str | int | None) -> int | Loops | None:
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    spec = str(text).strip().lower()
    exit, _, count = spec.partition(":") if not spec.isdigit() else ("", "", spec)
    if exit and exit not in EXIT_THRESHOLDS:
        raise ValueError(f"loops: {text!r} is not a count (8), an exit criterion ({', '.join(EXIT_THRESHOLDS)}) or "
                         "criterion:cap (kl:16)")
    if count and not count.isdigit():
        raise ValueError(f"loops: {text!r}: the count after the criterion must be a positive integer (e.g. kl:16)")
    require_loop(config)
    if not exit:
        return int(count)
    return Loops(int(count) if count else None, exit=exit)


def _parse_adaptive(config: ModelConfig, text: str | None) -> Adaptive | None:
    spec = None if text is None else text.strip().lower()
    if spec in (None, "", "off"):
        return None
    if spec == "calibrated":
        return Adaptive()
    if spec == "seeds":
        return Adaptive(threshold=SEED_EXIT_THRESHOLD,
                        expand=SEED_EXPAND_THRESHOLD if config.expansion_gates else None)
    if spec == "predictor":
        return Adaptive(predictor=True)
    try:
        return Adaptive(threshold=float(spec))
    except ValueError:
        raise ValueError(f"adaptive: {text!r} is not {', '.join(ADAPTIVE_CHOICES)} or an exit threshold") from None
