"""Mamba-1 (Gu & Dao 2023): the selective state-space mixer, and the residual block built around it.

Parameter names, shapes and initialisation follow state-spaces/mamba's `Mamba` module, so a reference
state dict loads unchanged:

    in_proj   d_model -> 2 d_inner (x and the gate z)     conv1d  depthwise causal, kernel d_conv, bias
    x_proj    d_inner -> dt_rank + 2 d_state (dt, B, C)   dt_proj dt_rank -> d_inner, bias
    A_log     (d_inner, d_state), A = -exp(A_log)         D       (d_inner,) skip connection
    out_proj  d_inner -> d_model

    x, z = in_proj(u);  x = silu(conv1d(x));  dt, B, C = x_proj(x);  dt = softplus(dt_proj(dt))
    y = selective_scan(x, dt, A, B, C, D) * silu(z);  out = out_proj(y)

The same forward serves training, prefill and decoding: with a `MambaState` it starts from the stored
conv window and SSM state and leaves them where stepping token by token would.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels, scan_cpu
from .context import BlockContext, keep_active
from .float8 import linear
from .mlp import MLP
from .norm import rms_norm
from .scan import selective_scan, sequential_scan
from .ssm_state import ConvSSMState, keep_conv_window, ssm_dtype


def dt_rank_for(d_model: int, dt_rank: int | str) -> int:
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


def causal_conv_silu(x: torch.Tensor, conv: nn.Conv1d,
                     history: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """silu(depthwise causal conv) of x (B, L, channels), each output reading the d_conv inputs up to it;
    `history` (B, channels, d_conv - 1) holds the inputs before x (None: zeros, a fresh sequence).

    Returns the output (B, L, channels) and the window [history, x] (B, channels, d_conv - 1 + L) whose last
    inputs a decoding state keeps (`keep_conv_window`); None on the fused CUDA path, taken only without history."""
    x = x.transpose(1, 2)
    fused = kernels.resolve().causal_conv1d if x.is_cuda and history is None else None
    if fused is not None:  # training on a GPU: Dao-AILab's fused kernel (zero history, as below)
        return fused(x.contiguous(), conv.weight.squeeze(1), conv.bias, activation="silu").transpose(1, 2), None
    if history is None:
        history = x.new_zeros(x.size(0), x.size(1), conv.kernel_size[0] - 1)
    window = torch.cat([history.to(x.dtype), x], dim=-1)
    if x.size(-1) == 1:  # one token: a dot product per channel (F.conv1d costs several times as much on a CPU)
        out = (window * conv.weight[:, 0]).sum(-1, keepdim=True)
        out = out + conv.bias[:, None] if conv.bias is not None else out
    else:
        out = F.conv1d(window, conv.weight, conv.bias, groups=conv.in_channels)
    return F.silu(out).transpose(1, 2), window


class MambaState(ConvSSMState):
    """Decoding state of one Mamba layer: the last d_conv-1 conv inputs (B, d_inner, d_conv - 1) and the SSM state
    (B, d_inner, d_state), per row (ssm_state.py)."""

    def __init__(self, batch: int, d_inner: int, d_conv: int, d_state: int, device, dtype):
        super().__init__(torch.zeros(batch, d_inner, d_conv - 1, device=device, dtype=dtype),
                         torch.zeros(batch, d_inner, d_state, device=device, dtype=ssm_dtype(dtype)))
        self.A: torch.Tensor | None = None  # -exp(A_log), computed at the first decoding step

    def absorb(self, view: MambaState) -> None:
        if view.A is not None:
            self.A = view.A


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = dt_rank_for(d_model, dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        if self.A_log.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialisation.

        - Linear and conv weights: PyTorch's default (uniform, bound 1/sqrt(fan_in)).
        - dt_proj.weight ~ U(-dt_rank^-0.5, dt_rank^-0.5); dt_proj.bias = softplus^-1(dt) with dt log-uniform in
          [dt_min, dt_max], so the initial step sizes span three orders of magnitude (S4D-style timescales).
        - A = -(1, 2, ..., d_state) for every channel (S4D-Real), stored as A_log = log(1..d_state); D = 1.
        """
        for module in (self.in_proj, self.conv1d, self.x_proj, self.out_proj):
            module.reset_parameters()
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner, device=self.D.device)
                       * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Decay rates, skip weights and biases: trained by AdamW without weight decay, never by Muon."""
        return [p for p in (self.A_log, self.D, self.dt_proj.bias, self.conv1d.bias) if p is not None]

    def new_state(self, batch: int, device, dtype) -> MambaState:
        return MambaState(batch, self.d_inner, self.d_conv, self.d_state, device, dtype)

    def step_sizes(self, dt: torch.Tensor) -> torch.Tensor:
        """softplus(dt_proj(dt)) in at least float32, the bias added after the matmul: under bf16 autocast the layer
        would round the bias -- which sets each channel's time scale -- to bf16 before the softplus (mamba_ssm
        likewise passes it to its kernel as a float32 delta_bias)."""
        f = torch.promote_types(dt.dtype, torch.float32)
        return F.softplus(F.linear(dt, self.dt_proj.weight).to(f) + self.dt_proj.bias.to(f))

    def forward(self, u: torch.Tensor, state: MambaState | None = None,
                valid: torch.Tensor | None = None, output: bool = True) -> torch.Tensor | None:
        """u (B, L, d_model) -> (B, L, d_model). With `state`, continue from it and update it in place;
        `valid` (B,) says how many of the L tokens of each row are real (the rest is right padding).
        `output=False` only advances the state (early exit's state propagation, model/exits.py): the gate half
        of in_proj, the gate and out_proj are skipped, and None is returned."""
        batch, L, _ = u.shape
        if state is not None and L == 1 and valid is None:
            return self.step(u, state, output)
        x, z = linear(u, self.in_proj).chunk(2, dim=-1) if output else (linear(u, self.in_proj, self.d_inner), None)
        x, window = causal_conv_silu(x, self.conv1d, state.conv if state is not None else None)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.step_sizes(dt)
        if valid is not None:  # padding must not move the state: dt = 0 means decay 1 and no input
            dt = dt * (torch.arange(L, device=u.device)[None, :, None] < valid[:, None, None])
        # The scan runs in at least float32: its state accumulates over the whole sequence (bf16 would drift).
        f = torch.promote_types(x.dtype, torch.float32)
        A = -torch.exp(self.A_log.to(f))
        # An all-zero state (a fresh cache) is the same as none, and none lets the fused CUDA kernel run prefill;
        # single-token steps never use that kernel, so they skip the check (a device sync) on the hot path.
        h0 = state.ssm.to(f) if state is not None and (L == 1 or bool(state.ssm.any())) else None
        args = (x.to(f), dt.to(f), A, B.to(f), C.to(f), self.D.to(f), h0)
        if state is not None and state.trail is not None:  # speculative decoding keeps the state after each token
            y, states = sequential_scan(*args, all_states=True)
            h = states[:, -1]
            state.record(states, window[..., -L:], valid)
        else:
            y, h = (sequential_scan if L == 1 else selective_scan)(*args)  # one step needs no chunking
        if state is not None:
            state.ssm.copy_(h)
            keep_conv_window(state.conv, window, valid)
        if not output:
            return None
        y = y.to(u.dtype) * F.silu(z)
        return linear(y, self.out_proj)


    def step(self, u: torch.Tensor, state: MambaState, output: bool = True) -> torch.Tensor | None:
        """One decoding step, u (B, 1, d_model): the same equations for a single token, written out.

        A decode step is a few small matrix-vector products, so per-op overhead dominates it; a conv1d call
        and the scan machinery cost several times the arithmetic they do here."""
        if output:
            x, z = self.in_proj(u[:, 0]).chunk(2, dim=-1)  # (B, d_inner)
        else:  # state propagation: the gate half is not needed
            bias = self.in_proj.bias
            x = F.linear(u[:, 0], self.in_proj.weight[:self.d_inner], None if bias is None else bias[:self.d_inner])
        x, window = causal_conv_silu(x[:, None], self.conv1d, state.conv)
        keep_conv_window(state.conv, window, None)
        x = x[:, 0]
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.step_sizes(dt)
        f = torch.promote_types(x.dtype, torch.float32)
        x, dt, B, C = x.to(f), dt.to(f), B.to(f), C.to(f)
        # Inside a compiled step (torch.compile) the PyTorch form below is traced and fused by the compiler, and
        # -exp(A_log) is part of the graph: reading a value cached on the state would make the first step's graph
        # differ from the others'.
        compiling = torch.compiler.is_compiling()
        if compiling:
            A = -torch.exp(self.A_log.to(f))
        else:
            if state.A is None:  # the weights are fixed while a cache is in use
                state.A = -torch.exp(self.A_log.to(f))
            A = state.A
        y = scan_cpu.scan_step(x, dt, z, A, B, C, self.D, state.ssm) if output and not compiling else None
        if y is not None:  # the compiled kernel: the same equations in one pass over the state
            state.record(state.ssm[:, None], window[..., -1:], None)
            return self.out_proj(y[:, None])
        h = torch.exp(dt[..., None] * A) * state.ssm.to(f) + (dt * x)[..., None] * B[:, None, :]
        state.ssm.copy_(h)
        state.record(state.ssm[:, None], window[..., -1:], None)
        if not output:
            return None
        y = (h * C[:, None, :]).sum(-1) + self.D.to(f) * x  # twice as fast as a bmm with inner size d_state
        return self.out_proj((y.to(u.dtype) * F.silu(z))[:, None])


class SSMBlock(nn.Module):
    """x + mixer(norm(x)), then optionally x + mlp(norm(x)): the residual block around a state-space mixer
    (Mamba-1 here, Mamba-2 in mamba2.py). The mixer owns its decoding state and its no-decay parameters."""

    def __init__(self, mixer: nn.Module, n_embd: int, mlp_hidden: int | None, norm_width: int | None = None):
        super().__init__()
        self.norm_width = norm_width  # ModelConfig.norm_width: the residual norms of a widened model (norm.py)
        self.mixer = mixer
        self.mlp = MLP(n_embd, mlp_hidden) if mlp_hidden else None

    def init_weights(self) -> None:
        self.mixer.reset_parameters()
        # Like attention's c_proj: the block starts as the identity (the reference instead scales out_proj
        # by 1/sqrt(n_layer)); in_proj still gets gradients through the zero matrix's input.
        nn.init.zeros_(self.mixer.out_proj.weight)
        if self.mlp is not None:
            self.mlp.init_weights()

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return self.mixer.no_decay_parameters()

    def new_state(self, batch: int, capacity: int, device, dtype):
        return self.mixer.new_state(batch, device, dtype)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        """Always at full width (Matryoshka widths are attention's). Frozen tokens (ctx.frozen, early exit) still
        advance the state, with their frozen residual as input (exits.py); if every token is frozen, only the
        state update runs."""
        if ctx.all_frozen():
            if ctx.state is not None:
                self.mixer(rms_norm(x, self.norm_width), ctx.state, ctx.valid, output=False)
            return x
        out = x + self.mixer(rms_norm(x, self.norm_width), ctx.state, ctx.valid)
        if self.mlp is not None:
            out = out + self.mlp(rms_norm(out, self.norm_width))
        return keep_active(ctx, out, x)


class MambaBlock(SSMBlock):
    kind = "M"

    def __init__(self, n_embd: int, d_state: int, d_conv: int, expand: int, dt_rank: int | str,
                 mlp_hidden: int | None, norm_width: int | None = None):
        super().__init__(Mamba(n_embd, d_state, d_conv, expand, dt_rank), n_embd, mlp_hidden, norm_width)
