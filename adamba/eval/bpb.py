"""Bits per byte: the tokenizer-independent measure of a language model's loss.

bpb = sum over predicted tokens of -log p(token) / (ln 2 * sum of their UTF-8 bytes). Special tokens
(<|bos|> and the chat markers) have no bytes and are left out of both sums, as in nanochat.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from ..data.dataset import TokenizedCorpus
from ..data.loader import DataLoader


@torch.no_grad()
def evaluate_bpb(model, data: TokenizedCorpus, *, batch_size: int, seq_len: int, max_tokens: int,
                 device: torch.device, rank: int = 0, world_size: int = 1,
                 autocast=contextlib.nullcontext, width=None, loops=None) -> float:
    """bpb on (the first `max_tokens` tokens of) the validation split, summed across ranks; `width` is a
    Matryoshka compute choice and `loops` a looped model's iterations (see AdambaLM.forward)."""
    loader = DataLoader(data, "val", batch_size, seq_len, rank=rank, world_size=world_size, shuffle=False,
                        device=device)
    per_epoch = sum(loader.batches_in(0, shard) for shard in range(len(data)))
    steps = min(per_epoch, max(1, max_tokens // (batch_size * seq_len * world_size)))
    if steps == 0:
        raise ValueError(f"the validation split has fewer than {batch_size * world_size} rows of {seq_len + 1} "
                         "tokens; raise val_fraction, use more data or a smaller batch")
    token_bytes = data.tokenizer.token_bytes.to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    for _ in range(steps):
        x, y = next(loader)
        with autocast():
            loss = model(x, y, width=width, loops=loops, loss_reduction="none").view(-1)
        nbytes = token_bytes[y.reshape(-1)]
        counted = nbytes > 0
        nats += loss[counted].double().sum()
        n_bytes += nbytes[counted].sum()
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(nats)
        dist.all_reduce(n_bytes)
    return (nats / (math.log(2) * n_bytes.clamp(min=1))).item()
