"""The state-space-duality (SSD) scan of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", section 6).

Per head h (of H, each `headdim` = P wide) with a scalar decay rate A_h < 0 and step sizes dt >= 0; the heads
share B and C within each of G groups (head h reads group h // (H / G)):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          (h: (P, N) per head and row)
    y_t = h_t C_t + D x_t

Shapes here (those of mamba_ssm's `mamba_chunk_scan_combined`): x (batch, L, H, P); dt (batch, L, H); A (H,);
B, C (batch, L, G, N); D (H,) or None; h0 (batch, H, P, N) or None. Each function returns y (batch, L, H, P)
and the final state h_L (batch, H, P, N).

Because the decay is one scalar per head and step, the recurrence unrolls into a masked, attention-like
matrix product (the paper's "SSD" duality): y_i = sum_{j<=i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
with a_t = dt_t A. `ssd_chunked` evaluates it in chunks of Q steps (the paper's Listing 1): the quadratic
form inside each chunk, and the recurrence only between chunks, so everything is a matmul and no
(batch, L, d_inner, d_state) tensor is ever made (the memory wall of the Mamba-1 scan on a CPU).
`ssd_sequential` is the recurrence itself, one step at a time: the decode step and the tests' reference.
`ssd_scan` picks mamba_ssm's fused Triton kernel on CUDA when it imports (kernels.py), else `ssd_chunked`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .scan import without_autocast


@without_autocast
def ssd_sequential(x, dt, A, B, C, D=None, h0=None, all_states: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one time step at a time (no chunking): exact, O(L) Python steps. `all_states`: return the
    state after every step (batch, L, H, P, N) instead of the last one."""
    batch, L, H, P = x.shape
    G, N = B.shape[-2:]
    decay = torch.exp(dt * A)  # (batch, L, H), each <= 1
    xdt = (x * dt[..., None]).view(batch, L, G, H // G, P, 1)
    h = h0 if h0 is not None else x.new_zeros(batch, H, P, N)
    ys, states = [], []
    # unbind, not x[:, t]: the backward of indexing writes a full-size gradient at every step (O(L^2))
    for decay_t, xdt_t, B_t, C_t in zip(decay.unbind(1), xdt.unbind(1), B.unbind(1), C.unbind(1), strict=True):
        inputs = (xdt_t * B_t[:, :, None, None, :]).view(batch, H, P, N)  # dt x B^T, B shared within a group
        h = decay_t[:, :, None, None] * h + inputs
        if all_states:
            states.append(h)
        ys.append((h.view(batch, G, H // G, P, N) @ C_t[:, :, None, :, None]).view(batch, H, P))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * D[:, None]
    return y, torch.stack(states, dim=1) if all_states else h


def segsum(a: torch.Tensor) -> torch.Tensor:
    """a (..., Q) -> (..., Q, Q) with out[i, j] = a[j+1] + ... + a[i] for i >= j and -inf above the diagonal.

    Summed directly from a masked copy (cumsum of a[k] for k > j), never as cumsum[i] - cumsum[j]: that
    difference cancels catastrophically when the cumulative sums are large (a long or strongly decaying chunk),
    and exponentiating it can overflow. Every entry here is a sum of terms <= 0, so exp() lies in [0, 1]."""
    Q = a.size(-1)
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    sums = a[..., :, None].expand(*a.shape, Q).masked_fill(~ones.tril(-1), 0.0).cumsum(dim=-2)  # terms k > j
    return sums.masked_fill(~ones.tril(), float("-inf"))


@without_autocast
def ssd_chunked(x, dt, A, B, C, D=None, h0=None, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm in PyTorch (Dao & Gu 2024, section 6 / Listing 1), in four steps per chunk:
    (1) the intra-chunk output by the quadratic (attention-like) form; (2) the state each chunk produces by
    itself; (3) the states passed from chunk to chunk (a recurrence over L / Q chunks, with the initial state
    h0); (4) the output of the state entering each chunk. L need not be a multiple of the chunk size."""
    batch, L, H, P = x.shape
    G, N = B.shape[-2:]
    Hg = H // G
    Q = min(chunk_size, L)
    pad = -L % Q
    if pad:  # dt = 0 on the padding: decay 1 and no input, so the final state is the state at step L
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = (L + pad) // Q
    a = (dt * A).view(batch, c, Q, H).transpose(2, 3)  # log-decays a_t = dt_t A <= 0: (batch, c, H, Q)
    xdt = (x * dt[..., None]).view(batch, c, Q, G, Hg, P).permute(0, 1, 3, 4, 2, 5)  # (batch, c, G, Hg, Q, P)
    Bc = B.reshape(batch, c, Q, G, N).transpose(2, 3)[:, :, :, None]  # (batch, c, G, 1, Q, N): shared by Hg heads
    Cc = C.reshape(batch, c, Q, G, N).transpose(2, 3)[:, :, :, None]
    decay = torch.exp(segsum(a)).view(batch, c, G, Hg, Q, Q)  # decay[i, j] = exp(a_{j+1} + ... + a_i)
    # (1) y_i = sum_{j <= i} (C_i . B_j) decay[i, j] dt_j x_j within the chunk
    y = ((Cc @ Bc.transpose(-1, -2)) * decay) @ xdt
    # (2) the chunk's own end state: sum_j decay[Q-1, j] dt_j x_j B_j^T (the last row of decay: stable sums)
    states = (xdt * decay[..., -1, :, None]).transpose(-1, -2) @ Bc  # (batch, c, G, Hg, P, N)
    # (3) pass states across chunks: h <- exp(a_0 + ... + a_{Q-1}) h + state of the chunk
    chunk_decay = torch.exp(a.sum(-1)).view(batch, c, G, Hg, 1, 1)
    h = h0.reshape(batch, G, Hg, P, N) if h0 is not None else x.new_zeros(batch, G, Hg, P, N)
    entering = []
    for k in range(c):  # L / Q steps of elementwise work: cheap next to the matmuls above
        entering.append(h)
        h = chunk_decay[:, k] * h + states[:, k]
    # (4) y_i += exp(a_0 + ... + a_i) C_i . h_entering
    into = torch.exp(a.cumsum(-1)).view(batch, c, G, Hg, Q, 1)
    y = y + (Cc @ torch.stack(entering, dim=1).transpose(-1, -2)) * into
    y = y.permute(0, 1, 4, 2, 3, 5).reshape(batch, c * Q, H, P)[:, :L]
    if D is not None:
        y = y + x[:, :L] * D[:, None]
    return y, h.view(batch, H, P, N)


def ssd_scan(x, dt, A, B, C, D=None, h0=None, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence path used by the model: returns (y, final state). On CUDA with mamba_ssm's Triton kernel
    (kernels.py; it takes an initial state too, and runs outside compiled graphs); everywhere else `ssd_chunked`,
    which torch.compile may trace: matmuls, and a loop over only L / chunk_size chunks."""
    fused = kernels.resolve().chunk_scan if x.is_cuda else None
    if fused is not None:
        return fused(x, dt, A, B, C, chunk_size, D=D, initial_states=h0, return_final_states=True)
    return ssd_chunked(x, dt, A, B, C, D, h0, chunk_size)
