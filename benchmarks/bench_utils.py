"""Helpers shared by the benchmark scripts (run them from the repository root: `python benchmarks/NAME.py`)."""

from __future__ import annotations

import math
import platform

import torch

from adamba import AdambaLM


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def randomize(model: AdambaLM, seed: int) -> None:
    """Draw every weight at random (including the zero-initialised lm_head and output projections)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        std = 1.0 if p.ndim < 2 or p is model.wte.weight else 1.0 / math.sqrt(p.size(1))
        p.copy_(torch.randn(p.shape, generator=gen) * std)
