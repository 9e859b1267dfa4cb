"""Batches of BOS-aligned rows, sharded across ranks, with a state for exact resume.

For each (epoch, shard) the rows are a pure function of (seed, epoch, shard), so every rank builds the
same rows and takes every world_size-th one, and a resumed run rebuilds them and skips to where it was:

1. Documents longer than a row are cut into row-sized pieces; each piece starts with <|bos|>, so every
   row starts at a document (or piece) boundary and no token of a long document is lost.
2. Pieces are shuffled, then packed best-fit (as nanochat does): each row takes the largest buffered
   piece that still fits; when none fits, the shortest one is cropped to fill the row exactly.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from .dataset import TokenizedCorpus

PACK_BUFFER = 256  # pieces considered for each slot of a row


def split_pieces(docs: list[np.ndarray], row_len: int, bos_id: int) -> list[np.ndarray]:
    pieces = []
    for doc in docs:
        if len(doc) <= row_len:
            pieces.append(doc)
            continue
        pieces.append(doc[:row_len])
        for start in range(row_len, len(doc), row_len - 1):
            pieces.append(np.concatenate([[bos_id], doc[start:start + row_len - 1]]).astype(doc.dtype))
    return pieces


def pack_rows(pieces: list[np.ndarray], row_len: int, buffer: int = PACK_BUFFER, pad=None) -> np.ndarray:
    """Best-fit packing of pieces (each at most row_len long on their last axis) into rows of exactly row_len.

    When no buffered piece fits the space left, the shortest is cropped to fill it (pretraining: no token is
    wasted), or, with `pad`, the space is filled with `pad` (a value, or one per leading row of a piece, e.g.
    [bos, 0] for (ids, mask) pieces): fine-tuning never cuts a conversation in two."""
    rows = []
    pending = iter(pieces)
    pool: list[tuple[int, int, np.ndarray]] = []  # sorted by (length, arrival)
    arrival = 0

    def refill() -> None:
        nonlocal arrival
        while len(pool) < buffer:
            piece = next(pending, None)
            if piece is None:
                return
            bisect.insort(pool, (piece.shape[-1], arrival, piece), key=lambda t: (t[0], t[1]))
            arrival += 1

    refill()
    while pool:
        row, space = [], row_len
        while space > 0 and pool:
            i = bisect.bisect_right(pool, space, key=lambda t: t[0]) - 1  # largest piece that fits
            if i >= 0:
                piece = pool.pop(i)[2]
            elif pad is None:
                piece = pool.pop(0)[2][..., :space]  # none fits: crop the shortest
            else:
                piece = np.repeat(np.asarray(pad, dtype=pool[0][2].dtype)[..., None], space, axis=-1)
            row.append(piece)
            space -= piece.shape[-1]
            refill()
        if space and pad is not None:  # the last row
            row.append(np.repeat(np.asarray(pad, dtype=row[0].dtype)[..., None], space, axis=-1))
            space = 0
        if space == 0:
            rows.append(np.concatenate(row, axis=-1))
    return np.stack(rows) if rows else np.zeros((0, row_len), dtype=np.int64)


@dataclass
class LoaderState:
    epoch: int = 0
    shard: int = 0
    batch: int = 0  # index of the next batch within the (epoch, shard)


class DataLoader:
    """Infinite iterator of (inputs, targets) of shape (batch_size, seq_len) for one rank."""

    def __init__(self, data: TokenizedCorpus, split: str, batch_size: int, seq_len: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 device: torch.device | str = "cpu"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.data, self.split = data, split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.device = seed, shuffle, torch.device(device)
        self.state = LoaderState()
        self._rows_key: tuple[int, int] | None = None
        self._rows = np.zeros((0, seq_len + 1), dtype=np.int64)

    def rows(self, epoch: int, shard: int) -> np.ndarray:
        """All ranks' rows of one (epoch, shard), in the order they are served."""
        if self._rows_key != (epoch, shard):
            docs = self.data.split_documents(shard, self.split)
            pieces = split_pieces(docs, self.seq_len + 1, self.data.tokenizer.bos_id)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, shard])
                pieces = [pieces[i] for i in rng.permutation(len(pieces))]
            self._rows = pack_rows(pieces, self.seq_len + 1)
            self._rows_key = (epoch, shard)
        return self._rows

    def batches_in(self, epoch: int, shard: int) -> int:
        """Whole batches per rank; the remainder rows (fewer than one batch for all ranks) are dropped."""
        return len(self.rows(epoch, shard)) // (self.batch_size * self.world_size)

    def rank_rows(self, epoch: int, shard: int, batch: int) -> np.ndarray:
        rows = self.rows(epoch, shard)
        start = batch * self.batch_size * self.world_size
        block = rows[start:start + self.batch_size * self.world_size]
        return block[self.rank::self.world_size]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.state
        empty_passes = 0
        while s.batch >= self.batches_in(s.epoch, s.shard):
            s.batch = 0
            s.shard += 1
            if s.shard >= len(self.data):
                s.shard, s.epoch = 0, s.epoch + 1
                empty_passes += 1
                if empty_passes > 1:
                    raise ValueError(
                        f"the {self.split} split has too little data for one batch of {self.batch_size} x "
                        f"{self.seq_len} tokens on {self.world_size} rank(s); use more data or a smaller batch")
        block = torch.from_numpy(self.rank_rows(s.epoch, s.shard, s.batch).astype(np.int64))
        s.batch += 1
        if self.device.type == "cuda":
            block = block.pin_memory().to(self.device, non_blocking=True)
        else:
            block = block.to(self.device)
        return block[:, :-1], block[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "shard": self.state.shard, "batch": self.state.batch}

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["shard"]), int(state["batch"]))
