"""The selective scan of Mamba-1 (Gu & Dao 2023, "Mamba", Algorithm 2 / S6), in pure PyTorch.

For each channel d and state index n, with step sizes dt > 0 and A < 0:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        (h: (batch, d_inner, d_state))
    y_t = sum_n C_t[n] * h_t[:, :, n] + D * x_t

Shapes here: x, dt (B, L, d_inner); A (d_inner, d_state); B, C (B, L, d_state); D (d_inner,);
h0 (B, d_inner, d_state) or None. Returns y (B, L, d_inner) and the final state h_L.

`chunked_scan` is the sequence path: the sequence is cut into chunks of K steps; (1) the recurrence runs
over the K positions of every chunk at once, each chunk starting from a zero state; (2) a pass over the L/K
chunk ends carries the true state across chunks; (3) each position adds its chunk's incoming state times its
decay since the chunk start. Every factor is exp(sum of dt*A) over a span, i.e. exp of a non-positive number,
so nothing overflows however large dt*A gets (unlike forms that multiply by exp(+cumulative log-decay)).
It takes K + L/K Python steps instead of L. `sequential_scan` is the plain loop, kept as the reference.
"""

from __future__ import annotations

import functools
import math

import torch


def sequential_scan(x, dt, A, B, C, D, h0=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence exactly as written, one time step at a time (reference)."""
    batch, L, d_inner = x.shape
    h = h0 if h0 is not None else x.new_zeros(batch, d_inner, A.size(1))
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t, :, None] * A)  # (B, d_inner, N)
        h = decay * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(batch, 0, d_inner)
    return y + x * D, h


def default_chunk(L: int) -> int:
    """K near sqrt(L) minimises the K + L/K Python steps."""
    return max(1, min(L, 2 ** round(math.log2(max(1.0, math.sqrt(L))))))


def chunked_scan(x, dt, A, B, C, D, h0=None, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    batch, L, d_inner = x.shape
    N = A.size(1)
    if L == 0:
        return x.new_zeros(batch, 0, d_inner), (h0 if h0 is not None else x.new_zeros(batch, d_inner, N))
    K = chunk or default_chunk(L)
    n_chunks = -(-L // K)
    pad = n_chunks * K - L
    if pad:  # dt = 0 on padding: decay 1, no input, so padded steps leave the state unchanged
        x, dt, B, C = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (x, dt, B, C))
    # (B, n_chunks, K, ...) views
    x_c, dt_c = x.view(batch, n_chunks, K, d_inner), dt.view(batch, n_chunks, K, d_inner)
    B_c, C_c = B.view(batch, n_chunks, K, N), C.view(batch, n_chunks, K, N)
    log_decay = dt_c[..., None] * A  # (B, n_chunks, K, d_inner, N), <= 0
    inputs = (dt_c * x_c)[..., None] * B_c[:, :, :, None, :]

    # (1) local scans: all chunks in parallel, K steps; also the decay since the chunk start
    h = torch.zeros_like(inputs[:, :, 0])
    cum = torch.zeros_like(log_decay[:, :, 0])
    local, since_start = [], []
    for k in range(K):
        cum = cum + log_decay[:, :, k]
        h = torch.exp(log_decay[:, :, k]) * h + inputs[:, :, k]
        local.append(h)
        since_start.append(torch.exp(cum))
    local_h = torch.stack(local, dim=2)  # (B, n_chunks, K, d_inner, N)
    decay_from_start = torch.stack(since_start, dim=2)

    # (2) carry the state across chunk boundaries: incoming[c] is the true state before chunk c
    state = h0 if h0 is not None else x.new_zeros(batch, d_inner, N)
    incoming = []
    for c in range(n_chunks):
        incoming.append(state)
        state = decay_from_start[:, c, -1] * state + local_h[:, c, -1]
    incoming_h = torch.stack(incoming, dim=1)  # (B, n_chunks, d_inner, N)

    # (3) y_t = C_t . (local_t + decay(start..t) * incoming) + D x_t
    y = (C_c[:, :, :, None, :] * (local_h + decay_from_start * incoming_h[:, :, None])).sum(-1)
    y = y.reshape(batch, n_chunks * K, d_inner)[:, :L]
    return y + x[:, :L] * D, state


@functools.cache
def cuda_selective_scan():
    """state-spaces/mamba's fused CUDA scan, if that package imports (it is optional and GPU-only)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its compiled extension
        return None
    return selective_scan_fn


def selective_scan(x, dt, A, B, C, D, h0=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence path used by the model: returns (y, final state).

    On CUDA with mamba_ssm installed its fused kernel runs the scan (it has no initial-state input, so a
    continuation from a nonzero state stays on the PyTorch path); elsewhere the chunked scan."""
    fused = cuda_selective_scan() if x.is_cuda and h0 is None else None
    if fused is not None:  # its layout is (batch, channels, length)
        y, h = fused(x.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A,
                     B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D, return_last_state=True)
        return y.transpose(1, 2), h
    return chunked_scan(x, dt, A, B, C, D, h0)
