"""`adamba surgery add-mamba`: insert Mamba blocks into a trained stack (the seeds' first step: nanochat d32 with a
Mamba block after every attention block). The new blocks start as exact no-ops (insert.py)."""

from __future__ import annotations

from ..config import ATTENTION, MAMBA, MAMBA2, ModelConfig, parse_block_pattern
from ..model import AdambaLM
from .insert import insert_blocks, inserted_config, old_positions

MAMBA_KINDS = (MAMBA, MAMBA2)


def mamba_pattern(config: ModelConfig, pattern=None, kind: str = MAMBA) -> tuple[list[str], list[int] | None]:
    """(the new stack, where the old blocks go): `pattern` if given (it may add only Mamba blocks; old blocks at
    the earliest positions that fit), else a `kind` block right after every attention block."""
    kind = parse_block_pattern(kind)
    if len(kind) != 1 or kind[0] not in MAMBA_KINDS:
        raise ValueError(f"kind: {kind} is not one Mamba block kind; use M (Mamba-1) or M2 (Mamba-2)")
    if pattern is None:
        if ATTENTION not in config.block_pattern:
            raise ValueError("pattern: the model has no attention block to put a Mamba block after; "
                             "give the new stack with --pattern")
        new, positions = [], []
        for old in config.block_pattern:
            positions.append(len(new))
            new += [old, kind[0]] if old == ATTENTION else [old]
        return new, positions
    new = parse_block_pattern(pattern)
    kept = set(old_positions(config.block_pattern, new))
    added = [k for j, k in enumerate(new) if j not in kept]
    wrong = sorted(set(added) - set(MAMBA_KINDS))
    if wrong:
        raise ValueError(f"pattern: add-mamba may add only Mamba blocks (M, M2), but {''.join(new)} adds "
                         f"{wrong}; use `adamba surgery deepen` to add other blocks")
    return new, None


def add_mamba_config(config: ModelConfig, pattern=None, kind: str = MAMBA) -> ModelConfig:
    return inserted_config(config, *mamba_pattern(config, pattern, kind))[0]


def add_mamba(model: AdambaLM, pattern=None, kind: str = MAMBA) -> tuple[AdambaLM, list[int]]:
    """(the model with Mamba blocks inserted, the indices of the new blocks)."""
    return insert_blocks(model, *mamba_pattern(model.config, pattern, kind))
