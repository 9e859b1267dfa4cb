"""nanochat's rule for initialising a linear layer (Everett et al. 2023, arXiv:2310.17813)."""

import math

import torch
import torch.nn as nn


@torch.no_grad()
def init_linear_(linear: nn.Linear) -> None:
    """N(0, std) with std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)): O(1) activations for wide and
    narrow matrices alike."""
    fan_out, fan_in = linear.weight.shape
    nn.init.normal_(linear.weight, mean=0.0, std=1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in)))
