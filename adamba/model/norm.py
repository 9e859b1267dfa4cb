"""Parameter-free RMSNorm, as in nanochat: y = x / sqrt(mean(x^2) + eps), eps = the dtype's machine epsilon.

Widened models (`ModelConfig.norm_width`, set by `adamba surgery widen`). Growing the residual stream from D to
D' > D coordinates appends D' - D coordinates that start at zero. Over the wider vector the mean of squares is
taken over D' coordinates, sum(x^2) / D' = (D / D') * sum(x^2) / D, so a plain RMSNorm would scale every output
by sqrt(D' / D) and change what the model computes. No weight can undo this for every width at once: at full
width the norm sees D' coordinates, but the Matryoshka slice of width D (which must stay the old model) sees D.
So the count itself is fixed: a norm over n coordinates divides the sum of squares by c = min(n, norm_width),

    y = x / sqrt(sum(x^2) / c + eps),

which is exactly the old norm while the new coordinates are zero (their squares add nothing to the sum), at
every width, and is a plain RMSNorm for n <= norm_width (every slice no wider than the old model). In terms of
the library call: F.rms_norm divides by n, and with eps' = eps * c / n,

    x / sqrt(sum / n + eps * c / n) = sqrt(n / c) * x / sqrt(sum / c + eps),

so y = sqrt(c / n) * F.rms_norm(x, eps=eps * c / n), with the same eps as before (no approximation). Once the
new coordinates train, the norm is an RMSNorm with the fixed gain sqrt(c / n), which the next layer absorbs.
"""

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, norm_width: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension; with `norm_width`, the mean of squares divides by at most that many
    coordinates (see the module docstring). norm_width None (every unwidened model) is nanochat's norm."""
    n = x.size(-1)
    if norm_width is None or n <= norm_width:
        return F.rms_norm(x, (n,))
    return F.rms_norm(x, (n,), eps=torch.finfo(x.dtype).eps * norm_width / n) * math.sqrt(norm_width / n)
