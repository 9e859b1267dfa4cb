"""What a block is given besides its input: one small object, the same for every block kind.

Every block is called as `block(x, ctx)`. Attention reads the rotary tables and the widths; Mamba reads the state
and the padding; each block kind implements per-token widths and state-only propagation for itself (attention.py,
mamba.py), so nothing outside a block reaches into its weights or its state.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(slots=True)
class BlockContext:
    cos: torch.Tensor  # rotary tables of the new tokens' positions (T, head_dim / 2) or (B, T, head_dim / 2)
    sin: torch.Tensor
    cache: object | None = None  # the InferenceCache this call appends to (cache.py), or None
    state: object | None = None  # this layer's state in that cache
    width: int | None = None  # one Matryoshka width for every token; None: full width
    # (B, T) per-token widths where tokens differ (expansion, per-row plans; n_embd = full); it replaces `width`
    token_widths: torch.Tensor | None = None
    # (B, T) bool: tokens whose residual is frozen (they exited early): the block only runs their state update
    # (CALM's state propagation, exits.py) and passes them through unchanged
    frozen: torch.Tensor | None = None
    levels: tuple[int, ...] = ()  # the Matryoshka levels, for heads a token at a mixed width lacks
    tokens: torch.Tensor | None = None  # (B, T) the new tokens' ids, for layers with value embeddings

    def at(self, **changes) -> BlockContext:
        return replace(self, **changes)

    @property
    def valid(self) -> torch.Tensor | None:
        """(B,) real tokens per row of a right-padded call (the rest must not move a running state)."""
        return self.cache.valid if self.cache is not None else None

    def all_frozen(self) -> bool:
        return self.frozen is not None and bool(self.frozen.all())


def keep_active(ctx: BlockContext, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The block's output for active tokens, the unchanged input for frozen ones."""
    return out if ctx.frozen is None else torch.where(ctx.frozen[..., None], x, out)
