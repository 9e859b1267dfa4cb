"""Causal self-attention as in nanochat (October 2025), with optional sliding windows, and today's options.

    q, k, v = x Wq, x Wk, x Wv                 (no biases; n_kv_head <= n_head for grouped-query attention)
    q, k    = s rms_norm(rotary(q)), s rms_norm(rotary(k))     (rotary first, then parameter-free QK-norm; s =
                                                                qk_scale, 1 in October 2025, 1.2 in nanochat today)
    v      += 3 sigmoid(x[:12] Wg) * E[token]  per K/V head   (value embeddings, ResFormer / nanochat 2026: a token
                                                                table of the K/V width, on the layers of
                                                                ModelConfig.value_embeds; x is the normalised input)
    y       = softmax(q k^T / sqrt(d) + causal/window mask) v,  then y Wo

At a Matryoshka width the value embedding and its gate slice with the K/V heads, like Wv.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import VALUE_GATE_CHANNELS
from .cache import InferenceCache, KVState
from .context import BlockContext, keep_active
from .float8 import linear
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
                 norm_width: int | None = None, value_vocab: int | None = None, qk_scale: float = 1.0):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.norm_width = norm_width  # the block's input norm (norm.py), recomputed by fill_heads
        self.head_dim = n_embd // n_head
        self.window = window
        self.qk_scale = qk_scale
        self.c_q = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=False)
        # value embeddings (`value_vocab` tokens), where the config puts them
        self.value_embed = nn.Embedding(value_vocab, n_kv_head * self.head_dim) if value_vocab else None
        self.ve_gate = nn.Linear(VALUE_GATE_CHANNELS, n_kv_head, bias=False) if value_vocab else None

    def normed_qk(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary, then the parameter-free QK-norm, then qk_scale."""
        qk = rms_norm(apply_rotary(qk, cos, sin))
        return qk if self.qk_scale == 1.0 else qk * self.qk_scale

    def values(self, x: torch.Tensor, n_kv: int, tokens: torch.Tensor | None) -> torch.Tensor:
        """The first n_kv value heads (B, T, n_kv, head_dim) of the normalised input x (its first d coordinates),
        with the tokens' value embeddings mixed in where the layer has them."""
        B, T, d = x.shape
        hd = self.head_dim
        v = linear(x, self.c_v, n_kv * hd, d).view(B, T, n_kv, hd)
        if self.value_embed is None:
            return v
        if tokens is None:
            raise ValueError("this attention layer has value embeddings: it needs the token ids (BlockContext.tokens)")
        gate = 3 * torch.sigmoid(F.linear(x[..., :VALUE_GATE_CHANNELS], self.ve_gate.weight[:n_kv]))  # (0, 3)
        table = self.value_embed.weight[:, :n_kv * hd]
        return v + gate[..., None] * F.embedding(tokens, table).to(v.dtype).view(B, T, n_kv, hd)

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
                k = self.normed_qk(F.linear(h, self.c_k.weight[rows, :level]).unflatten(-1, (-1, hd)),
                                   cos, sin).transpose(1, 2)
                tokens = None if state.tokens is None else state.tokens[:, :end]
                v = self.values(h, last, tokens)[:, :, first:last].transpose(1, 2)
                state.k[:, first:last, :end] = torch.where(missing, k.to(state.k.dtype), state.k[:, first:last, :end])
                state.v[:, first:last, :end] = torch.where(missing, v.to(state.v.dtype), state.v[:, first:last, :end])
            first = max(first, last)
        state.heads[:, :end] = torch.where(need, n_kv, state.heads[:, :end])

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_q: int, n_kv: int,
                tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (the first n_q heads; none for n_q = 0) and the first n_kv K/V heads, each (B, T, heads,
        head_dim), of the normalised layer input x (its first d coordinates). Queries and keys are rotated and
        normalised together, one rotary and one norm over all their heads: a decode step is dominated by
        per-op overhead, and each head's numbers are the same either way."""
        B, T, d = x.shape
        hd = self.head_dim
        k = linear(x, self.c_k, n_kv * hd, d)
        qk = k if n_q == 0 else torch.cat([linear(x, self.c_q, n_q * hd, d), k], dim=-1)
        q, k = self.normed_qk(qk.view(B, T, n_q + n_kv, hd), cos, sin).split([n_q, n_kv], dim=2)
        return q, k, self.values(x, n_kv, tokens)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_kv: int,
                   tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n_kv K/V heads of x: what a token leaves in the cache for later queries, and all that early
        exit's state propagation runs."""
        return self.project(x, cos, sin, 0, n_kv, tokens)[1:]

    def mixed_kv(self, x: torch.Tensor, cos, sin, widths: torch.Tensor, levels: tuple[int, ...],
                 tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V (B, T, heads, head_dim) of tokens at per-token widths (B, T) of the residual stream x, for the heads
        the widest one has: a token's own heads from its own width, a head it lacks from the smallest level that
        has it -- what the cache holds for it once a wider query has asked (`fill_heads`)."""
        distinct = sorted(set(widths.unique().tolist()))
        n_kv_max = self.heads_at(distinct[-1])[1]
        k = v = None
        first = 0
        for level in levels:  # every head from the smallest level that has it ...
            last = min(self.heads_at(level)[1], n_kv_max)
            if last > first:
                kl, vl = self.project_kv(rms_norm(x[..., :level], self.norm_width), cos, sin, last, tokens)
                k = kl[:, :, first:last] if k is None else torch.cat([k, kl[:, :, first:last]], dim=2)
                v = vl[:, :, first:last] if v is None else torch.cat([v, vl[:, :, first:last]], dim=2)
            first = max(first, last)
        for w in distinct:  # ... then each token's own heads from its own width
            n = self.heads_at(w)[1]
            kw, vw = self.project_kv(rms_norm(x[..., :w], self.norm_width), cos, sin, n, tokens)
            mine = (widths == w)[..., None, None]
            k = torch.cat([torch.where(mine, kw, k[:, :, :n]), k[:, :, n:]], dim=2)
            v = torch.cat([torch.where(mine, vw, v[:, :, :n]), v[:, :, n:]], dim=2)
        return k, v

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, ctx: BlockContext,
                    residual: torch.Tensor | None = None) -> tuple:
        """(keys, values, mask, is_causal) that the new tokens' queries attend over, keys and values (B, H, L, D):
        with a cache, the new k, v (B, T, H, D) are stored first (and `residual`, the layer input, where they are
        not every head), and heads an earlier position lacks are filled in."""
        T = k.size(1)
        state, cache = ctx.state, ctx.cache
        if state is None:
            mask, causal = (None, True) if self.window is None or self.window >= T else \
                (window_mask(T, T, self.window, k.device), False)
            return k.transpose(1, 2), v.transpose(1, 2), mask, causal
        if k.size(2) > state.min_heads:  # some position may have been written narrower than this query needs
            self.fill_heads(state, cache, k.size(2), cache.end(T))
        keys, values = state.update(k, v, cache, residual, ctx.tokens)
        return (keys, values, *cache.attention_mask(T, self.window))

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask, causal: bool,
               d: int) -> torch.Tensor:
        """Queries q (B, T, n_q, D) over the first K/V heads they need, then the output projection into the first
        d coordinates of the residual stream."""
        B, T, n_q, _ = q.shape
        n_kv = -(-n_q // (self.n_head // self.n_kv_head))
        keys, values = keys[:, :n_kv], values[:, :n_kv]
        gqa = n_kv != n_q
        if gqa and n_q % n_kv:  # a width whose query heads fill the last K/V group only partly
            keys, values = (t.repeat_interleave(self.n_head // self.n_kv_head, dim=1)[:, :n_q] for t in (keys, values))
            gqa = False
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal,
                                           enable_gqa=gqa)
        return linear(y.transpose(1, 2).reshape(B, T, -1), self.c_proj, d, n_q * self.head_dim)

    def forward(self, x: torch.Tensor, ctx: BlockContext, width: int | None = None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the normalised layer input x (its first `width` coordinates) at one width."""
        n_q, n_kv = (self.n_head, self.n_kv_head) if width is None else self.heads_at(width)
        q, k, v = self.project(x, ctx.cos, ctx.sin, n_q, n_kv, ctx.tokens)
        return self.attend(q, *self.keys_values(k, v, ctx, residual), x.size(-1))


class AttentionBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    At a Matryoshka width w the block reads, normalises and writes only the first w coordinates of the residual
    stream; the others pass through unchanged. Tokens at different widths in one call (ctx.token_widths) each get
    their own width's output; frozen tokens (ctx.frozen, early exit) only leave their K/V."""

    kind = "T"

    def __init__(self, n_embd: int, n_head: int, n_kv_head: int, mlp_hidden: int, window: int | None,
                 norm_width: int | None = None, value_vocab: int | None = None, qk_scale: float = 1.0):
        super().__init__()
        self.norm_width = norm_width  # ModelConfig.norm_width: the residual norms of a widened model (norm.py)
        self.attn = CausalSelfAttention(n_embd, n_head, n_kv_head, window, norm_width, value_vocab, qk_scale)
        self.mlp = MLP(n_embd, mlp_hidden)

    def init_weights(self) -> None:
        for projection in (self.attn.c_q, self.attn.c_k, self.attn.c_v):
            init_linear_(projection)
        nn.init.zeros_(self.attn.c_proj.weight)  # the block starts as the identity
        if self.attn.value_embed is not None:  # as nanochat: the table at std 1/sqrt(n_embd), the gate slightly
            nn.init.normal_(self.attn.value_embed.weight, std=self.attn.c_v.weight.size(1) ** -0.5)  # above neutral
            nn.init.uniform_(self.attn.ve_gate.weight, 0.0, 0.02)
        self.mlp.init_weights()

    def new_state(self, batch: int, capacity: int, device, dtype) -> KVState:
        return KVState(batch, capacity, self.attn.n_kv_head, self.attn.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if ctx.all_frozen():
            if ctx.state is not None:  # nothing to compute, but later tokens read the frozen tokens' K/V
                self.propagate(x, ctx)
            return x
        widths = _distinct(ctx.token_widths)
        if widths is None:
            out = self.at_width(x, ctx, ctx.width)
        elif len(widths) == 1:
            out = self.at_width(x, ctx, None if widths[0] == x.size(-1) else widths[0])
        else:
            out = self.mixed(x, ctx, widths)
        return keep_active(ctx, out, x)

    def at_width(self, x: torch.Tensor, ctx: BlockContext, width: int | None) -> torch.Tensor:
        if width is None:
            x = x + self.attn(rms_norm(x, self.norm_width), ctx)
            return x + self.mlp(rms_norm(x, self.norm_width))
        head, tail = x[..., :width], x[..., width:]
        head = head + self.attn(rms_norm(head, self.norm_width), ctx, width, residual=x)
        head = head + self.mlp(rms_norm(head, self.norm_width), width)
        return torch.cat([head, tail], dim=-1)

    def mixed(self, x: torch.Tensor, ctx: BlockContext, widths: list[int]) -> torch.Tensor:
        """Token t at width ctx.token_widths[t], as decoding the tokens one by one at those widths would (the
        cache's nested-head rule, `fill_heads`): every token's K/V heads are stored once, then each width's
        queries attend over them and each token keeps its own width's output."""
        attn, d = self.attn, x.size(-1)
        keys, values, mask, causal = attn.keys_values(*attn.mixed_kv(x, ctx.cos, ctx.sin, ctx.token_widths,
                                                                    ctx.levels, ctx.tokens), ctx, residual=x)
        out = x
        for w in widths:
            h = x[..., :w]
            q = attn.project(rms_norm(h, self.norm_width), ctx.cos, ctx.sin, attn.heads_at(w)[0], 0, ctx.tokens)[0]
            h = h + attn.attend(q, keys, values, mask, causal, w)
            h = h + self.mlp(rms_norm(h, self.norm_width), None if w == d else w)
            out = torch.where((ctx.token_widths == w)[..., None], torch.cat([h, x[..., w:]], dim=-1), out)
        return out

    def propagate(self, x: torch.Tensor, ctx: BlockContext) -> None:
        """Only the K/V of tokens whose residual is frozen at x: of rms_norm(x) at the tokens' width (keeping x as
        the layer input the cache needs for heads a wider query asks for later)."""
        attn, d = self.attn, x.size(-1)
        widths = _distinct(ctx.token_widths)
        if widths is not None and len(widths) > 1:
            k, v = attn.mixed_kv(x, ctx.cos, ctx.sin, ctx.token_widths, ctx.levels, ctx.tokens)
            ctx.state.update(k, v, ctx.cache, residual=x, tokens=ctx.tokens)
            return
        width = ctx.width if widths is None else None if widths[0] == d else widths[0]
        if width is None:
            ctx.state.update(*attn.project_kv(rms_norm(x, self.norm_width), ctx.cos, ctx.sin, attn.n_kv_head,
                                              ctx.tokens), ctx.cache, tokens=ctx.tokens)
        else:
            ctx.state.update(*attn.project_kv(rms_norm(x[..., :width], self.norm_width), ctx.cos, ctx.sin,
                                              attn.heads_at(width)[1], ctx.tokens), ctx.cache, residual=x,
                             tokens=ctx.tokens)


def _distinct(token_widths: torch.Tensor | None) -> list[int] | None:
    """The widths tokens run at, ascending (None: one width for every token, ctx.width)."""
    return None if token_widths is None else sorted(set(token_widths.unique().tolist()))
