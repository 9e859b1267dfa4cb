"""Helpers shared by the benchmark scripts (run them from the repository root: `python benchmarks/NAME.py`).

Every script takes `--smoke` (`parse_args`): seconds at tiny sizes, run by tests/test_benchmarks.py."""

from __future__ import annotations

import argparse
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


def parse_args(parser: argparse.ArgumentParser, smoke: dict[str, object]) -> argparse.Namespace:
    """Parse the command line, adding `--smoke`: a run of a few seconds at tiny sizes, one repeat, through the
    same code (checks included), so that tests/test_benchmarks.py notices when a benchmark breaks. Its numbers
    mean nothing. `smoke` maps argument names (dests) to their smoke values; they replace the defaults, so
    flags given explicitly still win."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat, a few seconds: checks that the benchmark runs, measures nothing")
    args = parser.parse_args()
    unknown = smoke.keys() - vars(args).keys()
    if unknown:  # a renamed flag must not leave its smoke setting silently ignored
        raise ValueError(f"smoke settings for unknown arguments: {sorted(unknown)}")
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args()
    return args
