"""Bits per byte: the tokenizer-independent measure of a language model's loss.

bpb = sum over predicted tokens of -log p(token) / (ln 2 * sum of their UTF-8 bytes). Special tokens
(<|bos|> and the chat markers) have no bytes and are left out of both sums, as in nanochat.

A measurement keeps its per-batch sums (`BpbEstimate`), so reports can say how far a number would move on other
held-out text: a bootstrap over validation batches (Efron & Tibshirani 1993, BCa intervals), and for two compute
choices scored on the same batches a paired interval of their difference, which is much narrower than the two
intervals side by side because both see the same hard and easy text.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from scipy.stats import DegenerateDataWarning, bootstrap

from ..data.dataset import TokenizedCorpus
from ..data.loader import DataLoader

CONFIDENCE = 0.95
RESAMPLES = 2000


def _bpb(nats, n_bytes, axis=-1):
    return np.sum(nats, axis=axis) / (math.log(2) * np.maximum(np.sum(n_bytes, axis=axis), 1))


def _interval(samples: tuple, statistic, confidence: float, seed: int) -> tuple[float, float]:
    """Bootstrap interval of `statistic` over the batches (the paired rows of `samples`): BCa, or the percentile
    interval where BCa is undefined (batches without spread, e.g. all equal)."""
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateDataWarning)  # and BCa's 0/0 on such batches:
            warnings.simplefilter("ignore", RuntimeWarning)  # both end in a NaN interval, handled below
            ci = bootstrap(samples, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                           confidence_level=confidence, method=method,
                           rng=np.random.default_rng(seed)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            break
    return float(ci.low), float(ci.high)


@dataclass
class BpbEstimate:
    """bpb from per-batch sums: `nats[i]` (summed -log p) and `bytes[i]` (UTF-8 bytes) of validation batch i."""

    nats: np.ndarray
    bytes: np.ndarray
    loops: Counter = field(default_factory=Counter)  # looped models: iterations -> tokens that ran them

    @property
    def bpb(self) -> float:
        return float(_bpb(self.nats, self.bytes))

    def interval(self, confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
        """Bootstrap interval of bpb over the validation batches."""
        if len(self.nats) < 2:
            return self.bpb, self.bpb  # one batch: nothing to resample
        return _interval((self.nats, self.bytes), _bpb, confidence, seed)

    def difference(self, control: BpbEstimate, confidence: float = CONFIDENCE,
                   seed: int = 0) -> tuple[float, float, float]:
        """(bpb - control's bpb, low, high): the paired bootstrap interval, resampling the same batches for both."""
        if len(self.nats) != len(control.nats):
            raise ValueError(f"a paired difference needs the same batches: {len(self.nats)} against "
                             f"{len(control.nats)}")
        delta = self.bpb - control.bpb
        if len(self.nats) < 2 or np.array_equal(self.nats, control.nats):
            return delta, delta, delta

        def statistic(nats, n_bytes, control_nats, control_bytes, axis=-1):
            return _bpb(nats, n_bytes, axis) - _bpb(control_nats, control_bytes, axis)

        return delta, *_interval((self.nats, self.bytes, control.nats, control.bytes), statistic, confidence, seed)

    def describe(self) -> str:
        low, high = self.interval()
        return f"{self.bpb:.4f} ({low:.4f}-{high:.4f})"


def evaluate_bpb(model, data: TokenizedCorpus, **kwargs) -> float:
    """bpb on (the first `max_tokens` tokens of) the validation split; the arguments are measure_bpb's."""
    return measure_bpb(model, data, **kwargs).bpb


@torch.no_grad()
def measure_bpb(model, data: TokenizedCorpus, *, batch_size: int, seq_len: int, max_tokens: int,
                device: torch.device, rank: int = 0, world_size: int = 1,
                autocast=contextlib.nullcontext, compute=None) -> BpbEstimate:
    """Per-batch sums of (the first `max_tokens` tokens of) the validation split, summed across ranks, at a
    compute choice (model/compute.py; None: the full model)."""
    loader = DataLoader(data, "val", batch_size, seq_len, rank=rank, world_size=world_size, shuffle=False,
                        device=device)
    per_epoch = sum(loader.batches_in(0, shard) for shard in range(len(data)))
    steps = min(per_epoch, max(1, max_tokens // (batch_size * seq_len * world_size)))
    if steps == 0:
        raise ValueError(f"the validation split has fewer than {batch_size * world_size} rows of {seq_len + 1} "
                         "tokens; raise val_fraction, use more data or a smaller batch")
    token_bytes = data.tokenizer.token_bytes.to(device)
    nats = torch.zeros(steps, dtype=torch.float64, device=device)
    histogram: Counter = Counter()
    n_bytes = torch.zeros(steps, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    for step in range(steps):
        x, y = next(loader)
        with autocast():
            out = model(x, y, compute=compute, loss_reduction="none", outputs=True)
        loss = out.loss.view(-1)
        if out.loops is not None:
            ran, count = out.loops.flatten().unique(return_counts=True)
            histogram.update(dict(zip(ran.tolist(), count.tolist(), strict=True)))
        nbytes = token_bytes[y.reshape(-1)]
        counted = nbytes > 0
        nats[step] = loss[counted].double().sum()
        n_bytes[step] = nbytes[counted].sum()
    model.train(was_training)
    if world_size > 1:  # batch i of the estimate: every rank's batch i
        dist.all_reduce(nats)
        dist.all_reduce(n_bytes)
    return BpbEstimate(nats.cpu().numpy(), n_bytes.cpu().numpy(), histogram)
