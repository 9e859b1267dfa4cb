"""`adamba surgery deepen`: insert blocks of any kind, each starting as the identity (insert.py; Net2DeeperNet,
Chen et al. 2016)."""

from __future__ import annotations

from ..config import ModelConfig
from ..model import AdambaLM
from .insert import insert_blocks, inserted_config


def deepen_config(config: ModelConfig, pattern) -> ModelConfig:
    return inserted_config(config, pattern)[0]


def deepen(model: AdambaLM, pattern) -> tuple[AdambaLM, list[int]]:
    """(the model grown to the block pattern `pattern`, the indices of the new blocks)."""
    return insert_blocks(model, pattern)
