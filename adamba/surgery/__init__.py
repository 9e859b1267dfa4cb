"""Function-preserving growth of trained models: add Mamba blocks, widen, deepen (issue 8), and the plans that
chain surgeries with training stages (plan.py). Every surgery starts the grown model exactly where the old one
stood: same logits, and a checkpoint that loads with strict key checking."""

from .add_mamba import add_mamba, add_mamba_config
from .deepen import deepen, deepen_config
from .widen import INITS, widen, widened_config

__all__ = ["INITS", "add_mamba", "add_mamba_config", "deepen", "deepen_config", "widen", "widened_config"]
