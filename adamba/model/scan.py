"""The selective scan of Mamba-1 (Gu & Dao 2023, "Mamba", Algorithm 2 / S6).

For each channel d and state index n, with step sizes dt > 0 and A < 0:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        (h: (batch, d_inner, d_state))
    y_t = sum_n C_t[n] * h_t[:, :, n] + D * x_t

Shapes here: x, dt (B, L, d_inner); A (d_inner, d_state); B, C (B, L, d_state); D (d_inner,);
h0 (B, d_inner, d_state) or None. Returns y (B, L, d_inner) and the final state h_L.

Three implementations, chosen by `selective_scan`: mamba_ssm's fused kernel on CUDA when it is installed (kernels.py);
our compiled CPU kernel (`scan_cpu`, C++ with an exact backward) when it builds; otherwise
`sequential_scan`, the recurrence in PyTorch. Measured (BENCHMARKS.md, "scan"): every pure-PyTorch form is
memory-bound on (B, L, d_inner, d_state) tensors, and the plain loop over precomputed decays was the
fastest of them (a chunked two-level scan was 15x and a log-depth parallel scan 2.5x slower in
forward+backward), so it is both the fallback and the reference the kernels are tested against.
"""

from __future__ import annotations

import functools

import torch

from . import kernels, scan_cpu


def without_autocast(scan):
    """Run `scan` (its first argument a tensor) with autocast off on that tensor's device. The mixers hand the scans
    float32 inputs, and the state accumulates over the whole sequence, but under bf16 autocast einsum and matmul
    would still compute in bf16 and the state would drift."""
    @functools.wraps(scan)
    def run(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return scan(x, *args, **kwargs)
    return run


@without_autocast
def sequential_scan(x, dt, A, B, C, D, h0=None, all_states: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one time step at a time. Decays exp(dt*A) <= 1 and inputs dt*B*x are computed for all
    steps at once, so the Python loop only multiplies and adds. `all_states`: return the state after every step
    (B, L, d_inner, N) instead of the last one."""
    batch, _, d_inner = x.shape
    decay = torch.exp(dt[..., None] * A)  # (B, L, d_inner, N)
    inputs = (dt * x)[..., None] * B[:, :, None, :]
    h = h0 if h0 is not None else x.new_zeros(batch, d_inner, A.size(1))
    states = []
    # unbind, not decay[:, t]: the backward of indexing writes a full-size gradient at every step (O(L^2))
    for decay_t, input_t in zip(decay.unbind(1), inputs.unbind(1), strict=True):
        h = decay_t * h + input_t
        states.append(h)
    if not states:
        return x.new_zeros(batch, 0, d_inner), h
    stacked = torch.stack(states, dim=1)
    y = torch.einsum("bldn,bln->bld", stacked, C)
    return y + x * D, stacked if all_states else h


@torch.compiler.disable  # none of its paths belongs in a compiled graph: a fused kernel, a C++ one, a Python loop
def selective_scan(x, dt, A, B, C, D, h0=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence path used by the model: returns (y, final state).

    On CUDA with mamba_ssm's kernel (kernels.py) it runs the scan (it has no initial-state input, so a
    continuation from a nonzero state stays on the PyTorch path); on the CPU our compiled kernel. Under torch.compile
    this runs eagerly: the compiler would otherwise unroll the PyTorch loop once per time step."""
    fused = kernels.resolve().selective_scan if x.is_cuda and h0 is None else None
    if fused is not None:  # its layout is (batch, channels, length)
        y, h = fused(x.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A,
                     B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D, return_last_state=True)
        return y.transpose(1, 2), h
    if x.device.type == "cpu" and scan_cpu.available():
        return scan_cpu.cpu_selective_scan(x, dt, A, B, C, D, h0)
    return sequential_scan(x, dt, A, B, C, D, h0)
