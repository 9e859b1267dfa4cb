"""The selective scan as a compiled CPU kernel (adamba/model/csrc/selective_scan.cpp), with an exact backward.

`cpu_selective_scan(x, dt, A, B, C, D, h0=None)` has the semantics of `adamba.model.scan.sequential_scan`
(shapes there) and is differentiable in all seven inputs; `scan_step` is one decoding step (no gradient). The
C++ source is compiled on first use with `torch.utils.cpp_extension.load` (needs a C++ compiler with OpenMP and
ninja; about a minute the first time, cached afterwards in torch's extensions folder, $TORCH_EXTENSIONS_DIR or
~/.cache/torch_extensions).

`available()` says whether the kernel can be used: it tries the build once per process, and on any failure
warns once with the cause and returns False from then on. `ADAMBA_SCAN_KERNEL=0` turns the kernel off
(`available()` is then False and nothing is built).

The kernel computes in float32 or float64: float64 if the inputs promote to float64, otherwise float32
(bfloat16/float16 inputs are upcast, and the outputs cast back to the promoted input dtype). The forward
keeps a copy of the state every `chunk` steps for the backward (memory B * d_inner * N * L / chunk), which
recomputes each chunk's states from it; nothing of size B * L * d_inner * N is ever stored.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

ENV_VAR = "ADAMBA_SCAN_KERNEL"
EXTENSION_NAME = "adamba_selective_scan"
SOURCE = Path(__file__).parent / "csrc" / "selective_scan.cpp"
DEFAULT_CHUNK = 64  # checkpoint interval of the backward

_lock = threading.Lock()
_module = None
_error: str | None = None


def disabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "off", "no")


def _reset() -> None:
    """Forget the cached build result (tests)."""
    global _module, _error
    with _lock:
        _module, _error = None, None


def _load():
    """The compiled module, building it on the first call; None (after one warning) if that fails."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is None and _error is None:
            try:
                from torch.utils.cpp_extension import load

                _module = load(name=EXTENSION_NAME, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                               extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, no ninja, a build or load error: fall back, say why once
                first_line = (str(e).strip().splitlines() or [""])[0]
                _error = f"{type(e).__name__}: {first_line}"
                warnings.warn(f"adamba: the compiled CPU selective scan is unavailable ({_error}); "
                              f"using the PyTorch scan instead", RuntimeWarning, stacklevel=3)
    return _module


def available() -> bool:
    """True if the compiled kernel can be used (not disabled by ADAMBA_SCAN_KERNEL=0, and it builds)."""
    if disabled_by_env():
        return False
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None if it is True or has not been asked yet)."""
    if disabled_by_env():
        return f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR)}"
    return _error


class SelectiveScanFn(torch.autograd.Function):
    """Inputs: contiguous CPU tensors of one dtype (float32 or float64); h0 may be None."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, chunk: int, save: bool):
        y, h_last, ckpt = _module.forward(x, dt, A, B, C, D, h0, save, chunk)
        ctx.chunk = chunk
        if save:
            ctx.save_for_backward(x, dt, A, B, C, D, h0, ckpt)
        return y, h_last

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_h):
        x, dt, A, B, C, D, h0, ckpt = ctx.saved_tensors
        grads = _module.backward(x, dt, A, B, C, D, h0, ckpt, grad_y.contiguous(), grad_h.contiguous(), ctx.chunk)
        dx, ddt, dA, dB, dC, dD, dh0 = grads
        out = [dx, ddt, dA, dB, dC, dD, dh0 if h0 is not None else None]
        return (*(g if need else None for g, need in zip(out, ctx.needs_input_grad[:7], strict=True)), None, None)


def cpu_selective_scan(x, dt, A, B, C, D, h0=None, chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan (semantics of `adamba.model.scan.sequential_scan`) by the compiled kernel.

    Returns (y (batch, L, d_inner), h_L (batch, d_inner, N)). Raises RuntimeError if the kernel is not
    `available()` or an input is not on the CPU.
    """
    if not available():
        raise RuntimeError(f"the compiled CPU selective scan is unavailable: {unavailable_reason()}")
    inputs = (x, dt, A, B, C, D) + ((h0,) if h0 is not None else ())
    if any(t.device.type != "cpu" for t in inputs):
        raise RuntimeError("cpu_selective_scan: all inputs must be on the CPU")
    out_dtype = inputs[0].dtype
    for t in inputs[1:]:
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    batch, L, d_inner = x.shape
    if L == 0:
        y = x.new_zeros(batch, 0, d_inner, dtype=out_dtype)
        return y, (h0.to(out_dtype) if h0 is not None else x.new_zeros(batch, d_inner, A.size(1), dtype=out_dtype))
    dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    x, dt, A, B, C, D = (t.to(dtype).contiguous() for t in (x, dt, A, B, C, D))
    h0 = h0.to(dtype).contiguous() if h0 is not None else None
    save = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    y, h_last = SelectiveScanFn.apply(x, dt, A, B, C, D, h0, int(chunk), save)
    if out_dtype != dtype:
        y, h_last = y.to(out_dtype), h_last.to(out_dtype)
    return y, h_last


def scan_step(x, dt, z, A, B, C, D, h) -> torch.Tensor | None:
    """One decoding step by the compiled kernel, gate included: h <- exp(dt A) h + dt B x in place, and returns
    y = (C . h + D x) * silu(z) (batch, d_inner). x, dt, z (batch, d_inner); B, C (batch, N); h (batch, d_inner, N).

    None when the kernel cannot take these inputs (unavailable, not on the CPU, not all float32 or all float64,
    or laid out otherwise than `Mamba.step` leaves them); the caller then runs the PyTorch form."""
    dtype = h.dtype
    if h.device.type != "cpu" or dtype not in (torch.float32, torch.float64) or not available():
        return None
    if any(t.dtype != dtype for t in (x, dt, z, A, B, C, D)) or B.stride() != C.stride() or \
            z.stride(-1) != 1 or B.stride(-1) != 1 or \
            not all(t.is_contiguous() for t in (x, dt, A, D, h)):
        return None
    return _module.step(x, dt, z, A, B, C, D, h)
