"""Inference state: one object per layer, each shaped by what its layer needs, held in one cache.

The cache knows how many tokens each row has consumed (`lengths`); each block creates its own state
(`block.new_state(...)`) and reads and writes it in its forward. Nothing outside the blocks looks inside a
layer's state, so the engine works the same for every architecture.
"""

from __future__ import annotations

import torch

from .looped import cache_slots
from .recipe import SmearState


class KVState:
    """Keys and values of an attention layer, for `capacity` positions per row.

    Rows may hold different numbers of tokens: the new tokens of row b go to positions
    lengths[b] .. lengths[b] + T - 1, and a query at position p sees keys j <= p (and p - j < window).

    Matryoshka widths: a token run at width w writes only the K/V heads that width has (the first ones);
    `heads` records how many each position holds. A narrower query later reads the first heads (nested: exact).
    A wider one needs heads the token never computed; for that, positions written narrower than full also keep
    the layer's input (the residual stream, n_embd floats per token and layer: as much again as full K/V
    when n_kv_head = n_head), from which the attention layer computes the missing heads when first needed."""

    # Running a layer again on the same new tokens rewrites the same entries (nothing accumulates), so looped
    # models (looped.py) may re-run it, e.g. for an exit probe, without saving the state first.
    idempotent = True

    def __init__(self, batch: int, capacity: int, n_kv_head: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv_head, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.heads = torch.full((batch, capacity), n_kv_head, dtype=torch.long, device=device)
        self.inputs: torch.Tensor | None = None  # (batch, capacity, n_embd), made at the first narrow write
        self.tokens: torch.Tensor | None = None  # (batch, capacity) token ids beside `inputs` (value embeddings)
        # The fewest heads any written position holds (a Python int, so the common case -- every query at most
        # as wide as every earlier token -- costs no tensor op to recognise).
        self.min_heads = n_kv_head

    def update(self, k: torch.Tensor, v: torch.Tensor, cache: InferenceCache, residual: torch.Tensor | None = None,
               tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v (B, T, H, D) in the first H heads; return the first H heads of all keys
        and values so far (B, H, L, D). `residual` (B, T, n_embd) is kept when H is not every head, and with it
        the `tokens` (B, T), which a layer with value embeddings needs to compute the missing heads later."""
        T, n = k.size(1), k.size(2)
        if cache.uniform_start is not None:  # every row at the same position: a plain slice
            start = cache.uniform_start
            self.k[:, :n, start:start + T] = k.transpose(1, 2)
            self.v[:, :n, start:start + T] = v.transpose(1, 2)
        else:
            rows, cols = cache.write_index(T)
            self.k[:, :n].transpose(1, 2)[rows, cols] = k
            self.v[:, :n].transpose(1, 2)[rows, cols] = v
        if n < self.k.size(1) or self.inputs is not None:
            if self.inputs is None:
                self.inputs = residual.new_zeros(self.k.size(0), self.k.size(2), residual.size(-1))
            if tokens is not None and self.tokens is None:
                self.tokens = torch.zeros(self.k.size(0), self.k.size(2), dtype=torch.long, device=self.k.device)
            self.min_heads = min(self.min_heads, n)
            if cache.uniform_start is not None:
                start = cache.uniform_start
                self.heads[:, start:start + T] = n
                if n < self.k.size(1):
                    self.inputs[:, start:start + T] = residual
                    if tokens is not None:
                        self.tokens[:, start:start + T] = tokens
            else:
                rows, cols = cache.write_index(T)
                self.heads[rows, cols] = n
                if n < self.k.size(1):
                    self.inputs[rows, cols] = residual
                    if tokens is not None:
                        self.tokens[rows, cols] = tokens
        end = cache.end(T)
        return self.k[:, :n, :end], self.v[:, :n, :end]

    def load_row(self, slot: int, source: KVState, row: int = 0) -> None:
        """Make row `slot` hold what row `row` of `source` (a cache of at most this capacity) holds; positions past
        the source's capacity are marked full-width (they are rewritten before any query can see them)."""
        span = source.k.size(2)
        self.k[slot, :, :span], self.v[slot, :, :span] = source.k[row], source.v[row]
        self.heads[slot, :span], self.heads[slot, span:] = source.heads[row], self.k.size(1)
        if source.inputs is not None and self.inputs is None:
            self.inputs = source.inputs.new_zeros(self.k.size(0), self.k.size(2), source.inputs.size(-1))
        if self.inputs is not None:
            self.inputs[slot, :span] = 0 if source.inputs is None else source.inputs[row]
        if source.tokens is not None and self.tokens is None:
            self.tokens = torch.zeros_like(self.heads)
        if self.tokens is not None:
            self.tokens[slot, :span] = 0 if source.tokens is None else source.tokens[row]
        self.min_heads = min(self.min_heads, source.min_heads)

    def first_rows(self, n: int) -> KVState:
        """A state over rows [0, n) that shares this one's tensors (writes land here); `absorb` it afterwards."""
        view = object.__new__(KVState)
        view.k, view.v, view.heads = self.k[:n], self.v[:n], self.heads[:n]
        view.inputs = None if self.inputs is None else self.inputs[:n]
        view.tokens = None if self.tokens is None else self.tokens[:n]
        view.min_heads = self.min_heads
        return view

    def absorb(self, view: KVState) -> None:
        """Take back what a `first_rows` view changed beyond its shared tensors."""
        if view.inputs is not None and self.inputs is None:  # allocated by the view: keep it for every row
            self.inputs = view.inputs.new_zeros(self.k.size(0), *view.inputs.shape[1:])
            self.inputs[:view.inputs.size(0)] = view.inputs
        if view.tokens is not None and self.tokens is None:
            self.tokens = torch.zeros_like(self.heads)
            self.tokens[:view.tokens.size(0)] = view.tokens
        self.min_heads = min(self.min_heads, view.min_heads)

    def begin_trail(self) -> None:
        """Nothing to keep for speculative decoding: a rollback moves the rows' lengths back, and the entries past
        them are masked until a later token rewrites them."""

    def rollback(self, keep: torch.Tensor) -> None:
        """See `begin_trail`."""

    def copy_new(self, source: KVState, cache: InferenceCache, T: int) -> None:
        """Give the T new tokens of each row the entries `source` (another loop iteration's slot) holds for
        them: K/V depend only on a token's layer input and position, so this is what running the layer on that
        same input would write."""
        rows, cols = cache.write_index(T)
        for name in ("k", "v"):
            getattr(self, name).transpose(1, 2)[rows, cols] = getattr(source, name).transpose(1, 2)[rows, cols]
        self.heads[rows, cols] = source.heads[rows, cols]
        if source.inputs is not None:
            if self.inputs is None:
                self.inputs = torch.zeros_like(source.inputs)
            self.inputs[rows, cols] = source.inputs[rows, cols]
        if source.tokens is not None:
            if self.tokens is None:
                self.tokens = torch.zeros_like(source.tokens)
            self.tokens[rows, cols] = source.tokens[rows, cols]


class InferenceCache:
    """Per-layer states for `batch` rows of up to `capacity` tokens, plus how many tokens each row holds.

    `static=True` gives single-token steps static shapes, so that a compiled decode step (torch.compile; see
    `Engine(compile=True)`) is one graph for the whole generation: every step attends over all `capacity` key
    positions with a mask (instead of the keys written so far, a length that changes every step), writes each row
    at its own position, and reads nothing back to the host (`begin` skips its capacity check: the caller keeps
    every row within `capacity`, as the engine does). Steps of several tokens (prefill) are unchanged."""

    def __init__(self, model, batch: int, capacity: int, *, device=None, dtype=None, compute=None,
                 static: bool = False):
        """`compute` (compute.py), for looped models: its `loops` are the most iterations a forward on this cache
        will run, an int or a `looped.Loops` plan (which may share slots with kv_budget, or warm-start); None:
        the config's mean."""
        if capacity > model.config.sequence_len:
            raise ValueError(f"capacity: {capacity} tokens exceeds the model's context "
                             f"(sequence_len={model.config.sequence_len})")
        param = next(model.parameters())
        device, dtype = device or param.device, dtype or param.dtype
        self.batch, self.capacity, self.static = batch, capacity, static
        self.levels = model.config.matryoshka_levels
        self.rotary = (model.cos, model.sin)  # for K/V heads computed later at earlier positions
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        # Looped models: each recurrent layer holds a list of states, one per slot (looped.py).
        self.loop_slots, self.loop_shared, self.warm_start = cache_slots(model.config, compute)
        recurrent = model.config.loop.recurrent_layers if model.config.loop is not None else range(0)
        self.states = [[block.new_state(batch, capacity, device, dtype) for _ in range(self.loop_slots)]
                       if i in recurrent else block.new_state(batch, capacity, device, dtype)
                       for i, block in enumerate(model.blocks)]
        self.loop_last: torch.Tensor | None = None  # (batch, n_embd): each row's last final loop state (warm start)
        # smear (recipe.py): each row's previous token embedding
        self.smear_state = SmearState(batch, model.config.n_embd, device, dtype) if model.smear is not None else None
        self._masks: dict = {}
        self.uniform_start: int | None = 0
        # Set before a forward whose rows are right-padded: how many of the new tokens of each row are real.
        # Layers whose state is a running summary (Mamba) must not absorb the padding.
        self.valid: torch.Tensor | None = None

    def load_row(self, slot: int, source: InferenceCache, row: int = 0) -> None:
        """Row `slot` takes over row `row` of `source` (e.g. a prompt prefilled alone): every layer's state, loop
        slots included, and its length. Continuous batching (serve/scheduler.py) admits requests this way."""
        if source.capacity > self.capacity or source.loop_slots != self.loop_slots:
            raise ValueError(f"load_row: a cache of capacity {source.capacity} and {source.loop_slots} loop slot(s) "
                             f"does not fit one of capacity {self.capacity} and {self.loop_slots}")
        for state, other in zip(self.layer_states(), source.layer_states(), strict=True):
            state.load_row(slot, other, row)
        if source.loop_last is not None:
            if self.loop_last is None:
                self.loop_last = source.loop_last.new_zeros(self.batch, source.loop_last.size(-1))
            self.loop_last[slot] = source.loop_last[row]
        if self.smear_state is not None:
            self.smear_state.load_row(slot, source.smear_state, row)
        self.lengths[slot] = source.lengths[row]

    def first_rows(self, n: int) -> InferenceCache:
        """A cache over rows [0, n) sharing this one's state (a forward on it writes here), so a batch that uses
        only its first rows runs at their size; `absorb` it after the forward."""
        view = object.__new__(InferenceCache)
        view.__dict__.update(self.__dict__)
        view.batch, view.lengths, view._masks = n, self.lengths[:n], {}
        view.states = [[state.first_rows(n) for state in layer] if isinstance(layer, list) else layer.first_rows(n)
                       for layer in self.states]
        view.loop_last = None if self.loop_last is None else self.loop_last[:n]
        view.smear_state = None if self.smear_state is None else self.smear_state.first_rows(n)
        return view

    def absorb(self, view: InferenceCache) -> None:
        """Take back what a forward on a `first_rows` view changed beyond the shared tensors."""
        for state, other in zip(self.layer_states(), view.layer_states(), strict=True):
            state.absorb(other)
        if view.loop_last is not None and self.loop_last is None:
            self.loop_last = view.loop_last.new_zeros(self.batch, view.loop_last.size(-1))
            self.loop_last[:view.batch] = view.loop_last

    def layer_states(self) -> list:
        """Every layer's state, each loop slot's included."""
        return [state for layer in self.states for state in (layer if isinstance(layer, list) else [layer])]

    def begin_trail(self) -> None:
        """From here on, remember what is needed to take back tokens (speculative decoding, infer/speculative.py):
        attention by lengths, Mamba by the state after each token (ssm_state.py)."""
        self.trail_start = self.lengths.clone()
        for state in self.layer_states():
            state.begin_trail()
        if self.smear_state is not None:
            self.smear_state.begin_trail()

    def rollback(self, keep: torch.Tensor) -> None:
        """Row b keeps only the first keep[b] tokens read since `begin_trail`, as if it had read only those."""
        for state in self.layer_states():
            state.rollback(keep)
        if self.smear_state is not None:
            self.smear_state.rollback(keep)
        self.lengths.copy_(self.trail_start + keep)

    # --- called by the model around each forward -------------------------------------------------------
    def begin(self, T: int) -> torch.Tensor:
        """Check room for T new tokens per row; return each new token's absolute position (B, T)."""
        if self.static and T == 1:
            self.uniform_start = None  # rows write at their own positions (write_index), read from no host value
            return self.lengths[:, None]
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        if hi + T > self.capacity:
            raise ValueError(f"the sequence would grow to {hi + T} tokens, beyond the cache's capacity of "
                             f"{self.capacity} (the model's context is at most sequence_len)")
        self.uniform_start = lo if lo == hi else None
        self._max_length = hi
        self._masks.clear()
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def finish(self, T: int) -> None:
        self.lengths += self.valid if self.valid is not None else T
        self.valid = None

    # --- used by layer states ------------------------------------------------------------------------------
    def end(self, T: int) -> int:
        """Number of key positions that can be visible to any row this step (static steps: all of them)."""
        return self.capacity if self.static and T == 1 else self._max_length + T

    def write_index(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        cols = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
        rows = torch.arange(self.batch, device=self.lengths.device)[:, None].expand_as(cols)
        return rows, cols

    def attention_mask(self, T: int, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for scaled_dot_product_attention over the keys returned by `KVState.update`.

        The boolean mask is (B, 1, T, L); it is None where a cheaper form is exact: a plain causal mask
        when every row starts empty, or no mask when one new token per row may see every key."""
        if self.static and T == 1:  # computed afresh: a compiled step has no Python-side memo to consult
            return self._position_mask(T, window)[:, None], False
        key = (T, window)
        if key not in self._masks:
            end = self.end(T)
            if self.uniform_start == 0 and (window is None or window >= T):
                self._masks[key] = (None, True)
            elif T == 1 and self.uniform_start is not None and (window is None or window >= end):
                self._masks[key] = (None, False)
            else:
                self._masks[key] = (self._position_mask(T, window)[:, None], False)
        return self._masks[key]

    def _position_mask(self, T: int, window: int | None) -> torch.Tensor:
        """(B, T, end(T)): True where the new token t of row b may see key position j."""
        query_pos = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        key_pos = torch.arange(self.end(T), device=self.lengths.device)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]
        if window is not None:
            mask &= query_pos[:, :, None] - key_pos[None, None, :] < window
        return mask
