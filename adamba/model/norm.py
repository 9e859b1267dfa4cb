"""Parameter-free RMSNorm, as in nanochat: y = x / sqrt(mean(x^2) + eps), eps = the dtype's machine epsilon."""

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))
