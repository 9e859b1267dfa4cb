"""Calibrating early-exit thresholds with Learn-then-Test (Angelopoulos, Bates, Candès, Jordan & Lei 2021,
"Learn then Test: Calibrating Predictive Algorithms to Achieve Risk Control"), as CALM does (Schuster et al. 2022).

The risk of a threshold lambda is the rate at which the adaptive model's next-token choice (argmax) differs from
the full model's on held-out text. For each lambda of a descending grid (most conservative first) the null
hypothesis H_lambda: risk(lambda) > delta is tested with the exact binomial tail p-value

    p(lambda) = P(Binomial(n, delta) <= k(lambda)),   k = disagreements among n calibration tokens,

and fixed-sequence testing rejects while p <= epsilon and stops at the first failure; the lowest rejected lambda
(the most exits) is chosen. Fixed-sequence testing controls the family-wise error at epsilon, so the chosen
threshold has risk <= delta with probability >= 1 - epsilon over the draw of the calibration data. No threshold
rejected: exits stay off. The binomial treats tokens as independent draws; tokens of one document are not, which
is why `benchmarks/adaptive.py` checks the guarantee empirically over random calibration/test splits of whole
sequences. One lambda is shared by every exit gate (as in CALM), so the test is one-dimensional.

Each lambda's decisions come from a real adaptive forward (gates decide layer by layer, exited tokens propagate
their state), not from the full model's hidden states, so the risk measured is the risk incurred.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binom

from ..config import ATTENTION
from ..data.loader import DataLoader
from ..model.compute import Compute
from ..model.exits import Adaptive
from .bpb import BpbEstimate

# Descending: LTT's fixed sequence starts where exits are rarest.
DEFAULT_GRID = (0.999, 0.998, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.9, 0.88,
                0.85, 0.82, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1)


def held_out_batches(data, *, batch_size: int, seq_len: int, max_tokens: int,
                     device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first batches of the validation split (fixed order), up to max_tokens input tokens."""
    loader = DataLoader(data, "val", batch_size, seq_len, shuffle=False, device=device)
    per_epoch = sum(loader.batches_in(0, shard) for shard in range(len(data)))
    steps = min(per_epoch, max(1, max_tokens // (batch_size * seq_len)))
    if per_epoch == 0:
        raise ValueError(f"the validation split has fewer than {batch_size} rows of {seq_len + 1} tokens; use "
                         "more data or a smaller batch")
    return [next(loader) for _ in range(steps)]


@dataclass
class Run:
    """One compute choice to measure: a label, and the model's keyword arguments for a batch x (a dict, or a
    function of x; its `compute` a Compute). `flops`: its forward FLOPs per token when the forward's own record
    does not say (None: the record of an adaptive forward, else the FLOP counter at the forward's `compute`);
    `extra`: FLOPs per token outside the forward (the width predictor's MLP)."""

    label: str
    kwargs: dict | Callable[[torch.Tensor], dict] = field(default_factory=dict)
    flops: float | None = None
    extra: float = 0.0


@dataclass
class Sweep:
    """Per run (R) and held-out sequence (S): what the model did, so that any subset of sequences can be
    calibrated or tested without running the model again. Tokens before `start` in each row are not counted."""

    labels: list[str]
    tokens: np.ndarray  # (S,) tokens counted per sequence
    disagree: np.ndarray  # (R, S) tokens whose argmax differs from the full model's
    flops: np.ndarray  # (R, S) forward FLOPs summed over the sequence's tokens
    exited: np.ndarray  # (R, S) tokens that exited before the last layer
    exit_layer_sum: np.ndarray  # (R, S) sum of exit layers (n_layer for tokens that did not exit)
    exit_hist: np.ndarray  # (R, n_layer + 1) tokens per exit layer, over every sequence
    width_hist: np.ndarray  # (R, n_levels) (token, attention layer) pairs per Matryoshka level
    nats: np.ndarray  # (R, S) summed -log p(next token), over tokens with bytes
    bytes: np.ndarray  # (S,) UTF-8 bytes of the predicted tokens
    full_flops: float  # forward FLOPs per token of the full model
    batch_starts: np.ndarray  # the first sequence of each held-out batch
    thresholds: list[float] = field(default_factory=list)  # the exit threshold of each run, for calibration

    def estimate(self, run: int) -> BpbEstimate:
        """Run `run`'s bpb with per-batch sums, for its bootstrap interval."""
        return BpbEstimate(np.add.reduceat(self.nats[run], self.batch_starts),
                           np.add.reduceat(self.bytes, self.batch_starts))

    def rows(self, subset: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Totals per run over a subset of sequences (default all)."""
        s = slice(None) if subset is None else subset
        n = self.tokens[s].sum()
        return {"tokens": n, "disagree": self.disagree[:, s].sum(1), "risk": self.disagree[:, s].sum(1) / n,
                "flops": self.flops[:, s].sum(1) / n, "exit_rate": self.exited[:, s].sum(1) / n,
                "mean_exit": self.exit_layer_sum[:, s].sum(1) / n,
                "bpb": self.nats[:, s].sum(1) / (math.log(2) * max(self.bytes[s].sum(), 1))}


@torch.no_grad()
def measure(model, batches, runs: list[Run], token_bytes: torch.Tensor | None = None, start: int = 0,
            reference=None) -> Sweep:
    """Run every compute choice on held-out batches [(x, y)] and compare each with the model at `reference` (a
    Compute without exits; None: the full model)."""
    config = model.config
    L, levels = config.n_layer, config.matryoshka_levels
    attention = torch.tensor([kind == ATTENTION for kind in config.block_pattern])
    was_training = model.training
    model.eval()
    R = len(runs)
    per = {k: [] for k in ("tokens", "bytes", "disagree", "flops", "exited", "exit_sum", "nats")}
    exit_hist, width_hist = np.zeros((R, L + 1)), np.zeros((R, len(levels)))
    for x, y in batches:
        B, T = x.shape
        if not 0 <= start < T:
            raise ValueError(f"start: {start} leaves no token to score in rows of {T}")
        scored = torch.arange(T, device=x.device) >= start
        full = model(x, compute=reference).argmax(-1)
        target_bytes = token_bytes[y] if token_bytes is not None else torch.ones_like(y)
        counted = (target_bytes > 0) & scored
        per["tokens"].append(np.full(B, T - start))
        per["bytes"].append((target_bytes * counted).sum(1).cpu().numpy())
        rows = {k: [] for k in ("disagree", "flops", "exited", "exit_sum", "nats")}
        for r, run in enumerate(runs):
            kwargs = run.kwargs(x) if callable(run.kwargs) else run.kwargs
            out = model(x, **kwargs, outputs=True)
            logits, record = out.logits, out.exits
            if run.flops is not None:
                flops = torch.full((B, T), run.flops, dtype=torch.float64)
            elif record is not None:
                flops = record.token_flops(config, T)
            else:
                flops = torch.full((B, T), model.count_flops(T, kwargs.get("compute")).forward,
                                   dtype=torch.float64)
            exit_layer = record.exit_layer.cpu() if record is not None else torch.full((B, T), L)
            widths = record.widths.cpu() if record is not None else torch.tensor(
                config.width_values((kwargs.get("compute") or Compute()).width)).expand(B, T, L)
            keep = scored.cpu()
            rows["disagree"].append(((logits.argmax(-1) != full) & scored).sum(1).cpu().numpy())
            rows["flops"].append((flops[:, keep] + run.extra).sum(1).numpy())
            rows["exited"].append((exit_layer[:, keep] < L).sum(1).numpy())
            rows["exit_sum"].append(exit_layer[:, keep].sum(1).numpy())
            rows["nats"].append(_nats(logits, y, counted))
            exit_hist[r] += np.bincount(exit_layer[:, keep].flatten().numpy(), minlength=L + 1)
            chosen = widths[:, keep][..., attention]
            width_hist[r] += [(chosen == w).sum().item() for w in levels]
        for k, v in rows.items():
            per[k].append(np.stack(v))
    model.train(was_training)
    cat = {k: np.concatenate(v, axis=-1) for k, v in per.items()}
    return Sweep([run.label for run in runs], cat["tokens"], cat["disagree"], cat["flops"], cat["exited"],
                 cat["exit_sum"], exit_hist, width_hist, cat["nats"], cat["bytes"],
                 model.count_flops(batches[0][0].size(1), reference).forward,
                 np.cumsum([0] + [x.size(0) for x, _ in batches[:-1]]))


def sweep(model, batches, thresholds=DEFAULT_GRID, width=None, token_bytes: torch.Tensor | None = None) -> Sweep:
    """The adaptive forward at every exit threshold (and `width`), for calibration: disagreement and FLOPs saved
    are measured against the model at the same width without exits."""
    runs = [Run(f"exit >= {t:g}", {"compute": Compute(width, adaptive=Adaptive(threshold=t))}) for t in thresholds]
    result = measure(model, batches, runs, token_bytes, reference=Compute(width))
    result.thresholds = list(thresholds)
    return result


def _nats(logits: torch.Tensor, y: torch.Tensor, counted: torch.Tensor) -> np.ndarray:
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").view(y.shape)
    return (loss.double() * counted).sum(1).cpu().numpy()


def learn_then_test(disagree: np.ndarray, n: int, delta: float, epsilon: float) -> int | None:
    """Index of the lowest threshold certified by fixed-sequence testing over the (descending) grid, or None."""
    chosen = None
    for g, k in enumerate(disagree):
        if binom.cdf(int(k), int(n), delta) > epsilon:  # the p-value of H0: risk > delta
            break
        chosen = g
    return chosen


@dataclass
class Calibration:
    threshold: float | None  # None: no threshold certified, exits stay off
    delta: float
    epsilon: float
    tokens: int
    risk: float  # disagreement on the calibration data at the threshold
    exit_rate: float
    flops_saved: float  # fraction of the full model's FLOPs/token
    mean_exit: float

    def to_dict(self, config, width) -> dict:
        return {"delta": self.delta, "epsilon": self.epsilon, "width": width, "threshold": self.threshold,
                "thresholds": {str(k): self.threshold for k in config.exit_layers}, "tokens": self.tokens,
                "risk": self.risk, "exit_rate": self.exit_rate, "flops_saved": self.flops_saved,
                "mean_exit": self.mean_exit}


def calibrate(result: Sweep, delta: float, epsilon: float, subset: np.ndarray | None = None) -> Calibration:
    """Learn-then-Test on the sequences `subset` (default all) of a sweep."""
    if not 0 < delta < 1:
        raise ValueError(f"delta: must be in (0, 1), got {delta!r}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon: must be in (0, 1), got {epsilon!r}")
    if list(result.thresholds) != sorted(result.thresholds, reverse=True):
        raise ValueError("thresholds: Learn-then-Test's fixed sequence needs a descending grid")
    rows = result.rows(subset)
    g = learn_then_test(rows["disagree"], rows["tokens"], delta, epsilon)
    n = int(rows["tokens"])
    if g is None:
        return Calibration(None, delta, epsilon, n, 0.0, 0.0, 0.0, float(result.exit_hist.shape[1] - 1))
    return Calibration(result.thresholds[g], delta, epsilon, n, float(rows["risk"][g]), float(rows["exit_rate"][g]),
                       1 - float(rows["flops"][g]) / result.full_flops, float(rows["mean_exit"][g]))
