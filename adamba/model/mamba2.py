"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): the SSD mixer, and the residual block built around it.

Parameter names, shapes and initialisation follow state-spaces/mamba's `Mamba2` module (with its defaults
d_ssm = d_inner, rmsnorm = True, norm_before_gate = False, D per head), so a reference state dict loads unchanged:

    in_proj  d_model -> [z, x, B, C, dt]: d_inner, d_inner, G N, G N, H (in that order), no bias
    conv1d   depthwise causal over [x, B, C] (d_inner + 2 G N channels), kernel d_conv, bias
    dt_bias  (H,)    A_log (H,), A = -exp(A_log)    D (H,) skip connection
    norm     gated RMSNorm, weight (d_inner,): y = rmsnorm(y * silu(z)) * weight, per group of d_inner / G
    out_proj d_inner -> d_model, no bias

with H = d_inner / headdim heads and G = ngroups groups of heads sharing B and C:

    z, xBC, dt = in_proj(u);  x, B, C = silu(conv1d(xBC));  dt = softplus(dt + dt_bias)
    y = ssd(x, dt, A, B, C, D);  out = out_proj(norm(y, z))

The same forward serves training, prefill and decoding: with a `Mamba2State` it starts from the stored conv
window and SSM state and leaves them where stepping token by token would.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .float8 import linear
from .mamba import SSMBlock, causal_conv_silu
from .ssd import ssd_scan, ssd_sequential
from .ssm_state import ConvSSMState, keep_conv_window, ssm_dtype


class Mamba2State(ConvSSMState):
    """Decoding state of one Mamba-2 layer, per row: the last d_conv-1 inputs of the conv (x, B and C
    channels) and the SSM state (nheads, headdim, d_state) (ssm_state.py)."""

    def __init__(self, batch: int, conv_dim: int, d_conv: int, nheads: int, headdim: int, d_state: int,
                 device, dtype):
        super().__init__(torch.zeros(batch, conv_dim, d_conv - 1, device=device, dtype=dtype),
                         torch.zeros(batch, nheads, headdim, d_state, device=device, dtype=ssm_dtype(dtype)))


class GatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: rmsnorm(y * silu(z)) * weight, normalised over
    each group of `group_size` channels (one per ngroups), computed in at least float32 as the reference does.

    `count` (widened models, see norm.py): the mean of squares divides by min(group_size, count) instead of
    group_size; count is the group size before widening, so new channels whose gated value is zero leave the
    norm exactly as it was: rmsnorm(g, eps * c / n) * sqrt(c / n) = g / sqrt(sum(g^2) / c + eps)."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, count: float | None = None):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.scale = None if count is None or count >= group_size else count / group_size
        self.weight = nn.Parameter(torch.empty(d))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1.0)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        f = torch.promote_types(y.dtype, torch.float32)
        gated = (y.to(f) * F.silu(z.to(f))).unflatten(-1, (-1, self.group_size))
        if self.scale is None:
            normed = F.rms_norm(gated, (self.group_size,), eps=self.eps).flatten(-2)
        else:
            normed = F.rms_norm(gated, (self.group_size,), eps=self.eps * self.scale).flatten(-2) \
                * math.sqrt(self.scale)
        return (normed * self.weight.to(f)).to(y.dtype)


class Mamba2(nn.Module):
    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 64, A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, norm_width: int | None = None):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"headdim: {headdim} does not divide d_inner={self.d_inner}")
        self.headdim, self.nheads = headdim, self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups: {ngroups} does not divide the {self.nheads} heads")
        self.ngroups, self.chunk_size = ngroups, chunk_size
        self.A_init_range = A_init_range
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        # A widened model (ModelConfig.norm_width) normalises each group as at its width before widening
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // ngroups,
                                 count=None if norm_width is None else expand * norm_width / ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        if self.A_log.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialisation.

        - Linear and conv weights: PyTorch's default (uniform, bound 1/sqrt(fan_in)); norm weight 1.
        - dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] per head (S4D-style timescales
          spanning two orders of magnitude), floored at dt_init_floor.
        - A uniform in A_init_range (default [1, 16]) per head, stored as A_log = log(A); D = 1.
        """
        for module in (self.in_proj, self.conv1d, self.norm, self.out_proj):
            module.reset_parameters()
        device = self.A_log.device
        dt = torch.exp(torch.rand(self.nheads, device=device)
                       * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.log(torch.empty(self.nheads, device=device).uniform_(*self.A_init_range)))
        self.D.fill_(1.0)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Decay rates, skip weights, biases and the norm's gain: trained by AdamW without weight decay, never
        by Muon (the reference marks A_log, D and dt_bias `_no_weight_decay`)."""
        return [p for p in (self.A_log, self.D, self.dt_bias, self.conv1d.bias, self.norm.weight) if p is not None]

    def new_state(self, batch: int, device, dtype) -> Mamba2State:
        return Mamba2State(batch, self.conv_dim, self.d_conv, self.nheads, self.headdim, self.d_state, device,
                           dtype)

    def forward(self, u: torch.Tensor, state: Mamba2State | None = None,
                valid: torch.Tensor | None = None, output: bool = True) -> torch.Tensor | None:
        """u (B, L, d_model) -> (B, L, d_model). With `state`, continue from it and update it in place;
        `valid` (B,) says how many of the L tokens of each row are real (the rest is right padding).
        `output=False` only advances the state (early exit's state propagation, model/exits.py): the z part of
        in_proj, the gated norm and out_proj are skipped, and None is returned."""
        batch, L, _ = u.shape
        if output:
            z, xBC, dt = linear(u, self.in_proj).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        else:
            bias = self.in_proj.bias
            xBC, dt = F.linear(u, self.in_proj.weight[self.d_inner:], None if bias is None else
                               bias[self.d_inner:]).split([self.conv_dim, self.nheads], dim=-1)
        xBC, window = causal_conv_silu(xBC, self.conv1d, state.conv if state is not None else None)
        G, N = self.ngroups, self.d_state
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        # The scan runs in at least float32: its state accumulates over the whole sequence (bf16 would drift).
        f = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(f) + self.dt_bias.to(f))  # (B, L, nheads)
        if valid is not None:  # padding must not move the state: dt = 0 means decay 1 and no input
            dt = dt * (torch.arange(L, device=u.device)[None, :, None] < valid[:, None, None])
        A = -torch.exp(self.A_log.to(f))
        h0 = state.ssm.to(f) if state is not None else None
        args = (x.to(f).unflatten(-1, (self.nheads, self.headdim)), dt, A, B.to(f).unflatten(-1, (G, N)),
                C.to(f).unflatten(-1, (G, N)), self.D.to(f), h0)
        if state is not None and state.trail is not None:  # speculative decoding keeps the state after each token
            y, states = ssd_sequential(*args, all_states=True)
            h = states[:, -1]
            state.record(states, window[..., -L:], valid)
        else:  # one step needs no chunking (the decode hot path); a sequence takes the chunked SSD form
            y, h = ssd_sequential(*args) if L == 1 else ssd_scan(*args, chunk_size=self.chunk_size)
        if state is not None:
            state.ssm.copy_(h)
            keep_conv_window(state.conv, window, valid)
        if not output:
            return None
        y = self.norm(y.flatten(-2).to(u.dtype), z)
        return linear(y, self.out_proj)


class Mamba2Block(SSMBlock):
    kind = "M2"

    def __init__(self, n_embd: int, d_state: int, d_conv: int, expand: int, headdim: int, ngroups: int,
                 chunk_size: int, mlp_hidden: int | None, norm_width: int | None = None):
        super().__init__(Mamba2(n_embd, d_state, d_conv, expand, headdim, ngroups, chunk_size, norm_width=norm_width),
                         n_embd, mlp_hidden, norm_width)
