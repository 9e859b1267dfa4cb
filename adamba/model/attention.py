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
    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, window: int | None = None,
                 norm_width: int | None = None):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.norm_width = norm_width  # the block's input norm (norm.py), recomputed by fill_heads
        self.head_dim = n_embd // n_head
        self.window = window
        self.c_q = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=False)

    def heads_at(self, width: int) -> tuple[int, int]:
        """(query heads, K/V heads) a Matryoshka width uses: whole heads of fixed size, the first ones; a query
        head h reads K/V head h // (n_head / n_kv_head), so the first ceil(n_q / group) K/V heads suffice."""
        n_q = width // self.head_dim
        group = self.n_head // self.n_kv_head
        return n_q, -(-n_q // group)

    @torch.no_grad()
    def fill_heads(self, state: KVState, cache: InferenceCache, n_kv: int, end: int) -> None:
        """Give every earlier position the first n_kv K/V heads. A head a position lacks is computed from the
        layer input it kept, at the smallest Matryoshka level that has that head: exactly what the position
        would hold had it run at that width (it ran narrower, so every head it did compute is unchanged)."""
        before = torch.arange(end, device=state.heads.device)[None, :] < cache.lengths[:, None]
        need = before & (state.heads[:, :end] < n_kv)
        state.min_heads = n_kv  # true once this returns: later positions are written before they are read
        if not bool(need.any()):
            return
        cos, sin = (t[:end] for t in cache.rotary)
        hd, first = self.head_dim, 0
        for level in cache.levels:
            last = min(self.heads_at(level)[1], n_kv)
            if last > first:  # heads [first, last) first appear at this level
                missing = (need & (state.heads[:, :end] < last))[:, None, :, None]
                h = rms_norm(state.inputs[:, :end, :level], self.norm_width)
                rows = slice(first * hd, last * hd)
                k = rms_norm(apply_rotary(F.linear(h, self.c_k.weight[rows, :level]).unflatten(-1, (-1, hd)),
                                          cos, sin)).transpose(1, 2)
                v = F.linear(h, self.c_v.weight[rows, :level]).unflatten(-1, (-1, hd)).transpose(1, 2)
                state.k[:, first:last, :end] = torch.where(missing, k.to(state.k.dtype), state.k[:, first:last, :end])
                state.v[:, first:last, :end] = torch.where(missing, v.to(state.v.dtype), state.v[:, first:last, :end])
            first = max(first, last)
        state.heads[:, :end] = torch.where(need, n_kv, state.heads[:, :end])

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int,
                n_kv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (the first n_q heads; none for n_q = 0) and the first n_kv K/V heads, each (B, T, heads,
        head_dim), of the normalised layer input x (its first d coordinates). Queries and keys are rotated and
        normalised together, one rotary and one norm over all their heads: a decode step is dominated by
        per-op overhead, and each head's numbers are the same either way."""
        B, T, d = x.shape
        hd = self.head_dim
        k = F.linear(x, self.c_k.weight[:n_kv * hd, :d])
        qk = k if n_q == 0 else torch.cat([F.linear(x, self.c_q.weight[:n_q * hd, :d]), k], dim=-1)
        q, k = rms_norm(apply_rotary(qk.view(B, T, n_q + n_kv, hd), cos, sin)).split([n_q, n_kv], dim=2)
        return q, k, F.linear(x, self.c_v.weight[:n_kv * hd, :d]).view(B, T, n_kv, hd)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n_kv K/V heads of x: what a token leaves in the cache for later queries, and all that early
        exit's state propagation runs."""
        return self.project(x, cos, sin, 0, n_kv)[1:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: InferenceCache | None = None, state: KVState | None = None,
                width: int | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        B, T, d = x.shape
        n_q, n_kv = (self.n_head, self.n_kv_head) if width is None else self.heads_at(width)
        q, k, v = self.project(x, cos, sin, n_q, n_kv)
        gqa = n_kv != n_q
        if state is not None:
            if n_kv > state.min_heads:  # some position may have been written narrower than this query needs
                self.fill_heads(state, cache, n_kv, cache.end(T))
            k, v = state.update(k, v, cache, residual)
            mask, causal = cache.attention_mask(T, self.window)
            q = q.transpose(1, 2)
        else:
            mask, causal = (None, True) if self.window is None or self.window >= T else \
                (window_mask(T, T, self.window, x.device), False)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if gqa and n_q % n_kv:  # a width whose query heads fill the last K/V group only partly
            k, v = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1)[:, :n_q] for t in (k, v))
            gqa = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return F.linear(y.transpose(1, 2).reshape(B, T, -1), self.c_proj.weight[:d, :n_q * self.head_dim])


class AttentionBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    kind = "T"

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, mlp_hidden: int, window: int | None,
                 norm_width: int | None = None):
        super().__init__()
        self.norm_width = norm_width  # ModelConfig.norm_width: the residual norms of a widened model (norm.py)
        self.attn = CausalSelfAttention(n_embd, n_head, n_kv_head, window, norm_width)
        self.mlp = MLP(n_embd, mlp_hidden)

    def init_weights(self) -> None:
        for linear in (self.attn.c_q, self.attn.c_k, self.attn.c_v):
            init_linear_(linear)
        nn.init.zeros_(self.attn.c_proj.weight)  # the block starts as the identity
        self.mlp.init_weights()

    def new_state(self, batch: int, capacity: int, device, dtype) -> KVState:
        return KVState(batch, capacity, self.attn.n_kv_head, self.attn.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: InferenceCache | None = None, state: KVState | None = None,
                width: int | None = None) -> torch.Tensor:
        """At a Matryoshka width w the block reads, normalises and writes only the first w coordinates of
        the residual stream; the others pass through unchanged."""
        if width is None:
            x = x + self.attn(rms_norm(x, self.norm_width), cos, sin, cache, state)
            return x + self.mlp(rms_norm(x, self.norm_width))
        head, tail = x[..., :width], x[..., width:]
        head = head + self.attn(rms_norm(head, self.norm_width), cos, sin, cache, state, width, residual=x)
        head = head + self.mlp(rms_norm(head, self.norm_width), width)
        return torch.cat([head, tail], dim=-1)
