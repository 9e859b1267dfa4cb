"""Batches of rendered conversations for supervised fine-tuning, with a state for exact resume.

Each conversation is rendered once to (ids, mask) (chat/render.py: mask 1 where the assistant speaks) and cut to a
row (one warning counts them). Per epoch the conversations are shuffled by (seed, epoch) and packed best-fit into
rows of sequence_len + 1 tokens, padded instead of cropped, so every row starts with <|bos|> and no conversation is
cut in two (loader.pack_rows). Targets are -1 wherever the mask is 0 -- user turns, tool outputs, padding -- so the
loss counts only what the assistant says. A conversation with nothing to learn after truncation is dropped (it would
add a row of ignored targets: nanochat's SFT got NaN losses from batches without a supervised token).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .loader import pack_rows

Render = Callable[[dict], tuple[list[int], list[int]]]  # conversation -> (ids, mask), whole


@dataclass
class ConversationState:
    epoch: int = 0
    batch: int = 0  # the next batch within the epoch


class ConversationLoader:
    """Infinite iterator of (inputs, targets), each (batch_size, seq_len), of one rank's share of the rows."""

    def __init__(self, conversations: Sequence[dict], render: Render, batch_size: int, seq_len: int, *,
                 pad_id: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 device: torch.device | str = "cpu", progress: bool = False, name: str = "conversations"):
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.device = seed, shuffle, torch.device(device)
        self.state = ConversationState()
        self.pieces, self.dropped = _render_all(conversations, render, seq_len + 1, progress, name)
        if not self.pieces:
            raise ValueError(f"{name}: none of the {len(conversations)} conversations has an assistant token "
                             "to learn within the context; check the data or raise sequence_len")
        self._epoch: int | None = None
        self._rows = np.zeros((0, 2, seq_len + 1), dtype=np.int64)
        if self.batches_in(0) == 0:
            raise ValueError(f"{name}: {len(self.rows(0))} packed rows, fewer than one batch of {batch_size} rows "
                             f"on {world_size} rank(s); use more conversations or a smaller device_batch_size")

    def rows(self, epoch: int) -> np.ndarray:
        """All ranks' rows of one epoch, (rows, 2, seq_len + 1): ids and mask."""
        if self._epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces)) if self.shuffle \
                else range(len(self.pieces))
            self._rows = pack_rows([self.pieces[i] for i in order], self.seq_len + 1, pad=[self.pad_id, 0])
            self._epoch = epoch
        return self._rows

    def batches_in(self, epoch: int) -> int:
        """Whole batches per rank; the remainder rows are dropped."""
        return len(self.rows(epoch)) // (self.batch_size * self.world_size)

    def supervised_tokens(self) -> int:
        return sum(int(piece[1, 1:].sum()) for piece in self.pieces)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.state
        if s.batch >= self.batches_in(s.epoch):
            s.epoch, s.batch = s.epoch + 1, 0
        start = s.batch * self.batch_size * self.world_size
        block = self.rows(s.epoch)[start:start + self.batch_size * self.world_size][self.rank::self.world_size]
        s.batch += 1
        ids, mask = torch.from_numpy(block[:, 0]), torch.from_numpy(block[:, 1])
        targets = torch.where(mask[:, 1:] == 1, ids[:, 1:], -1)
        return ids[:, :-1].to(self.device), targets.to(self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "batch": self.state.batch}

    def load_state_dict(self, state: dict) -> None:
        self.state = ConversationState(int(state["epoch"]), int(state["batch"]))


def _render_all(conversations: Sequence[dict], render: Render, row_len: int, progress: bool,
                name: str) -> tuple[list[np.ndarray], int]:
    """(ids, mask) of every conversation with a supervised target, as (2, n) arrays; and how many were dropped."""
    pieces, dropped, truncated = [], 0, 0
    for i in tqdm(range(len(conversations)), desc=f"render {name}", disable=not progress, unit="conv"):
        ids, mask = render(conversations[i])
        if len(ids) > row_len:
            ids, mask, truncated = ids[:row_len], mask[:row_len], truncated + 1
        if sum(mask[1:]) == 0:  # the first token is never a target
            dropped += 1
            continue
        pieces.append(np.array([ids, mask], dtype=np.int64))
    if truncated:
        warnings.warn(f"{name}: {truncated} of {len(conversations)} conversations were longer than the context "
                      f"({row_len} tokens) and were truncated", stacklevel=3)
    if dropped:
        warnings.warn(f"{name}: {dropped} conversations had no assistant token within the context and were dropped",
                      stacklevel=3)
    return pieces, dropped
