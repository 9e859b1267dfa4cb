"""The optional fused CUDA kernels, resolved once per process.

Three kernels speed up the state-space mixers on a GPU, and none is required:

    selective_scan   mamba_ssm's CUDA selective scan (Mamba-1), which needs mamba_ssm's compiled extension
                     `selective_scan_cuda`: mamba-ssm 2.x imports without it and fails only at the first call
    causal_conv1d    Dao-AILab's fused causal depthwise conv + SiLU (both mixers)
    chunk_scan       mamba_ssm's Triton SSD kernel `mamba_chunk_scan_combined` (Mamba-2)

`resolve()` probes them the first time it is called (building a model with state-space blocks on a GPU does, in
`AdambaLM.build`), prints one line saying which path each mixer takes and why, and keeps the answer, so that the
probes never run inside a torch.compile'd graph. Without a kernel the PyTorch path runs: the same equations
(model/scan.py, model/ssd.py), slower. `check_config` refuses, at start-up, the config values a kernel that
will run would reject at the first step.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..common import print0
from ..config import MAMBA, MAMBA2, ModelConfig

# Limits of the kernels (their own checks): causal_conv1d supports widths 2-4; the selective scan's
# TORCH_CHECK(dstate <= 256) in mamba_ssm's csrc/selective_scan/selective_scan.cpp.
CONV_WIDTHS = (2, 3, 4)
SELECTIVE_SCAN_MAX_STATE = 256


@dataclass(frozen=True)
class Kernels:
    selective_scan: Callable | None
    causal_conv1d: Callable | None
    chunk_scan: Callable | None
    notes: tuple[str, str, str]  # per kernel: the path chosen and why

    def describe(self) -> str:
        return "CUDA kernels: " + "; ".join(self.notes)


def _import(module: str, name: str) -> tuple[Callable | None, str | None]:
    """`module`.`name`, or None and why not (an ImportError: not installed, or built without its extension;
    an OSError: a shared library it links against is missing)."""
    try:
        return getattr(importlib.import_module(module), name), None
    except (ImportError, OSError, AttributeError) as error:
        return None, f"{type(error).__name__}: {error}"


def _probe_selective_scan() -> tuple[Callable | None, str]:
    fn, why = _import("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")
    if fn is None:
        return None, f"Mamba-1 scan: PyTorch (mamba_ssm unavailable, {why})"
    extension, why = _import("selective_scan_cuda", "fwd")
    if extension is None:
        return None, (f"Mamba-1 scan: PyTorch (mamba_ssm imports, but without its compiled selective_scan_cuda "
                      f"extension, {why}; reinstall mamba-ssm with --no-build-isolation to build it)")
    return torch.compiler.disable(fn), "Mamba-1 scan: mamba_ssm selective_scan_fn"


def _probe_causal_conv1d() -> tuple[Callable | None, str]:
    fn, why = _import("causal_conv1d", "causal_conv1d_fn")
    if fn is None:
        return None, f"causal conv: PyTorch (causal_conv1d unavailable, {why})"
    return torch.compiler.disable(fn), "causal conv: causal_conv1d_fn"


def _probe_chunk_scan() -> tuple[Callable | None, str]:
    fn, why = _import("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")
    if fn is None:
        return None, f"Mamba-2 scan: PyTorch chunked SSD (mamba_ssm's Triton kernel unavailable, {why})"
    # Dynamo fails on mamba_ssm's autotuned Triton kernels: they run as they are, outside any compiled graph
    return torch.compiler.disable(fn), "Mamba-2 scan: mamba_ssm mamba_chunk_scan_combined (Triton)"


_resolved: Kernels | None = None


def resolve(*, fresh: bool = False, log: Callable[[str], None] | None = None) -> Kernels:
    """The kernels of this process, probed on the first call (or again with `fresh`, for tests); the first probe
    prints `describe()` through `log` (default: print on rank 0)."""
    global _resolved
    if _resolved is None or fresh:
        (scan, scan_note), (conv, conv_note), (chunk, chunk_note) = \
            _probe_selective_scan(), _probe_causal_conv1d(), _probe_chunk_scan()
        _resolved = Kernels(scan, conv, chunk, (scan_note, conv_note, chunk_note))
        (log or print0)(_resolved.describe())
    return _resolved


def uses_ssm(config: ModelConfig) -> bool:
    return MAMBA in config.block_pattern or MAMBA2 in config.block_pattern


def check_config(config: ModelConfig, device: torch.device, kernels: Kernels | None = None) -> None:
    """On a GPU: the config values a kernel that will run cannot take fail here, naming the field (instead of a
    kernel error at the first step). Nothing to check on other devices or without the kernel."""
    if device.type != "cuda" or not uses_ssm(config):
        return
    kernels = kernels or resolve()
    pattern = config.block_pattern
    if kernels.causal_conv1d is not None:
        for kind, field in ((MAMBA, "mamba_d_conv"), (MAMBA2, "mamba2_d_conv")):
            width = getattr(config, field)
            if kind in pattern and width not in CONV_WIDTHS:
                raise ValueError(f"{field}: {width}, but causal_conv1d's fused kernel takes widths 2-4; use one of "
                                 "them (or uninstall causal-conv1d: the PyTorch conv takes any width)")
    if kernels.selective_scan is not None and MAMBA in pattern and config.mamba_d_state > SELECTIVE_SCAN_MAX_STATE:
        raise ValueError(f"mamba_d_state: {config.mamba_d_state}, but mamba_ssm's selective scan takes at most "
                         f"{SELECTIVE_SCAN_MAX_STATE}; use a smaller state (or uninstall mamba-ssm: the PyTorch "
                         "scan takes any size)")
