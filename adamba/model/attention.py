"""Causal self-attention as in nanochat (October 2025), with optional sliding windows.

    q, k, v = x Wq, x Wk, x Wv                 (no biases; n_kv_head <= n_head for grouped-query attention)
    q, k    = rms_norm(rotary(q)), rms_norm(rotary(k))     (rotary first, then parameter-free QK-norm)
    y       = softmax(q k^T / sqrt(d) + causal/window mask) v,  then y Wo
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import InferenceCache, KVState
from .init import init_linear_
from .mlp import MLP
from .norm import rms_norm
from .rotary import apply_rotary


def window_mask(t_q: int, t_k: int, window: int, device) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where query i (the last t_q of t_k positions) may see key j."""
    i = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    return (j <= i) & (i - j < window)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, window: int | None = None):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.window = window
        self.c_q = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: InferenceCache | None = None, state: KVState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        gqa = self.n_kv_head != self.n_head
        if state is not None:
            k, v = state.update(k, v, cache)
            mask, causal = cache.attention_mask(T, self.window)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=gqa)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.window is None or self.window >= T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            mask = window_mask(T, T, self.window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class AttentionBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    kind = "T"

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, mlp_hidden: int, window: int | None):
        super().__init__()
        self.attn = CausalSelfAttention(n_embd, n_head, n_kv_head, window)
        self.mlp = MLP(n_embd, mlp_hidden)

    def init_weights(self) -> None:
        for linear in (self.attn.c_q, self.attn.c_k, self.attn.c_v):
            init_linear_(linear)
        nn.init.zeros_(self.attn.c_proj.weight)  # the block starts as the identity
        self.mlp.init_weights()

    def new_state(self, batch: int, capacity: int, device, dtype) -> KVState:
        return KVState(batch, capacity, self.attn.n_kv_head, self.attn.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: InferenceCache | None = None, state: KVState | None = None) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), cos, sin, cache, state)
        return x + self.mlp(rms_norm(x))
