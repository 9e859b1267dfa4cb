"""Give a trained model a width predictor (model/predictor.py) without changing what it computes: every weight is
kept, the forward at any fixed width is the same, and the new LayerDimPredictor starts with zero output weights,
so its first choice is uniform over the levels each layer may take. Compute-aware RL (train/rl.py) adds one this
way when the checkpoint it starts from has none, and trains it as the policy over widths."""

from __future__ import annotations

import dataclasses

from ..model import AdambaLM


def with_width_predictor(model: AdambaLM, layers: int = 1) -> AdambaLM:
    """A copy of `model` (same device and dtype) whose config has predictor_layers = `layers` and whose predictor
    is freshly initialised; `model` is left as it is."""
    if model.config.predictor_layers:
        raise ValueError(f"predictor_layers: the model already has a width predictor (reading after "
                         f"{model.config.predictor_layers} layers)")
    config = dataclasses.replace(model.config, predictor_layers=layers)  # validated: raises naming the field
    weight = model.wte.weight
    grown = AdambaLM.build(config, weight.device).to(weight.dtype)
    # not strict: the new predictor's weights are the only ones the old state lacks -- checked right below, so any
    # other missing or unexpected key is still an error
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    new = {name for name in missing if not name.startswith("adaptive_heads.predictor.")}
    if new or unexpected:
        raise ValueError(f"with_width_predictor: weights do not carry over (missing {sorted(new)}, unexpected "
                         f"{sorted(unexpected)})")
    grown.adaptive_heads.thresholds = model.adaptive_heads.thresholds if model.adaptive_heads is not None else None
    return grown
