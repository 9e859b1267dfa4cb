"""How many loop iterations a training micro-step of a looped model runs (looped.py).

Geiping et al. 2025 ("Huginn", §3.3) draw r from a Poisson-lognormal: lambda ~ LogNormal(mu, sigma = 0.5), then
r = 1 + Poisson(lambda). Most steps stay near the mean, the heavy right tail trains long recurrences, and r = 1
keeps the model usable at its cheapest. Huginn centres lambda on r-bar, so its mean is r-bar + 1; we centre it on
r-bar - 1 so that the mean is r-bar as configured, then clamp to [1, r_max] (the trainer logs the real mean).
The draw is a pure function of (seed, step, micro-step), as in matryoshka.py: every rank draws the same r, and a
resumed run draws what it would have.
"""

from __future__ import annotations

import math
import random

from ..config import ModelConfig

SIGMA = 0.5


def poisson(rng: random.Random, lam: float) -> int:
    """Poisson(lam) by inversion, summing the pmf until it passes a uniform draw (Devroye 1986, X.3.3). O(lam)
    steps, and lam stays within a few times r_max here; the pmf underflowing to 0 ends the search."""
    u, k, p = rng.random(), 0, math.exp(-lam)
    cdf = p
    while u > cdf and p > 0:
        k += 1
        p *= lam / k
        cdf += p
    return k


def sample_loops(model: ModelConfig, seed: int, step: int, micro: int) -> int | None:
    """Iterations for micro-step `micro` of optimizer step `step`; None when the model does not loop."""
    loop = model.loop
    if loop is None:
        return None
    if loop.mean_recurrence == 1:
        return 1
    rng = random.Random(f"loops-{seed}-{step}-{micro}")  # str seeds hash deterministically (sha512)
    lam = rng.lognormvariate(math.log(loop.mean_recurrence - 1) - SIGMA ** 2 / 2, SIGMA)
    return min(max(1 + poisson(rng, lam), 1), loop.r_max)
