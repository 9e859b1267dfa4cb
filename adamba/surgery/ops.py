"""The three surgeries by name, as the CLI and plans call them: the derived config alone (dry runs), or the grown
model with the indices of its new blocks and the settings to record."""

from __future__ import annotations

from ..config import ModelConfig
from ..model import AdambaLM
from .add_mamba import add_mamba, add_mamba_config
from .deepen import deepen, deepen_config
from .widen import widen, widened_config

OPTIONS = {"add-mamba": {"pattern", "kind"}, "widen": {"width", "init", "rank", "scale", "seed"},
           "deepen": {"pattern"}}


def check(op: str, options: dict, where: str) -> None:
    if op not in OPTIONS:
        raise ValueError(f"{where}: unknown surgery {op!r}; use one of {sorted(OPTIONS)}")
    unknown = sorted(set(options) - OPTIONS[op])
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown} for {op}; it takes {sorted(OPTIONS[op])}")
    if op == "widen" and "width" not in options:
        raise ValueError(f"{where}: widen needs a width (the new n_embd)")
    if op == "deepen" and "pattern" not in options:
        raise ValueError(f"{where}: deepen needs a pattern (the whole new block stack)")


def derive(op: str, config: ModelConfig, options: dict) -> ModelConfig:
    """The config a surgery produces, without touching weights."""
    check(op, options, "surgery")
    if op == "add-mamba":
        return add_mamba_config(config, options.get("pattern"), options.get("kind", "M"))
    if op == "widen":
        return widened_config(config, options["width"])
    return deepen_config(config, options["pattern"])


def perform(op: str, model: AdambaLM, options: dict) -> tuple[AdambaLM, list[int], dict]:
    """(the grown model, indices of its new blocks, the settings for its growth record)."""
    check(op, options, "surgery")
    if op == "add-mamba":
        grown, new = add_mamba(model, options.get("pattern"), options.get("kind", "M"))
        return grown, new, {"pattern": "".join(grown.config.block_pattern)}
    if op == "widen":
        init = options.get("init", "zero")
        grown = widen(model, options["width"], init, rank=options.get("rank"), scale=options.get("scale", 0.1),
                      seed=options.get("seed", 0))
        return grown, [], {"width": [model.config.n_embd, grown.config.n_embd], "init": init}
    grown, new = deepen(model, options["pattern"])
    return grown, new, {"pattern": "".join(grown.config.block_pattern)}
