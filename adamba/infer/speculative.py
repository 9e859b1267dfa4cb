"""Self-speculative decoding: the model's own narrow slice or early exit drafts, the full model verifies.

A Matryoshka model's Ghost slice and the stack truncated at an exit share every weight with the full model, so
they are free draft models (MatFormer, Devvrit et al. 2023, §4.3: nested drafts; LayerSkip, Elhoushi et al.
2024: early-exit drafts). One round, per row:

1. the draft proposes k tokens d_1..d_k autoregressively with its own cache, drawing each from its distribution q_i;
2. the full model reads [last, d_1..d_k] in one forward and gives p_0..p_k;
3. d_i is accepted with probability min(1, p_{i-1}(d_i) / q_i(d_i)) while they are accepted; at the first rejection
   the row's next token is drawn from norm(max(0, p_{i-1} - q_i)), and if all k are accepted from p_k (Leviathan
   et al. 2023, "Fast Inference from Transformers via Speculative Decoding", Algorithm 1; Chen et al. 2023). The
   tokens then follow the full model's distribution exactly. Greedy: accept while d_i = argmax p_{i-1}, then
   argmax p_n -- the plain greedy output token for token.
4. both caches go back to the accepted prefix (`InferenceCache.rollback`): attention by lengths, Mamba / Mamba-2
   by the state kept after each token read in the round (model/ssm_state.py; memory: k + 2 copies of each SSM
   state per row, for the round only).

Rows accept different numbers of tokens; each cache keeps each row's own. After a round that accepted all k, the
draft has not read d_k yet: it reads d_k and the next token at the start of the next round (in one forward
right-padded with the other rows, or as two plain steps when every row needs both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import ModelConfig, parse_width
from ..model.cache import InferenceCache
from ..model.compute import Compute
from .sampling import SamplingParams, probabilities


@dataclass(frozen=True)
class Draft:
    """The draft: the model at a Matryoshka width (a mode name like "ghost" or a level) and/or truncated after
    `exit_layer` blocks; k tokens proposed per round."""

    width: Any = None
    exit_layer: int | None = None
    k: int = 4

    def compute(self) -> Compute:
        return Compute(width=self.width, depth=self.exit_layer)

    def describe(self) -> str:
        """As users write it: "ghost", "exit:2", "32+exit:3"."""
        parts = [] if self.width is None else [str(self.width)]
        return "+".join(parts + ([] if self.exit_layer is None else [f"exit:{self.exit_layer}"]))

    def check(self, config: ModelConfig) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"speculative: k (tokens drafted per round) must be a positive integer, got {self.k!r}")
        if self.width is None and self.exit_layer is None:
            raise ValueError("speculative: the draft must be narrower (width) or shallower (exit_layer) than the model")
        if config.loop is not None:
            raise ValueError("speculative: not for looped models (their tokens run a varying number of loops)")
        try:
            compute = self.compute()
            compute.check(config)
        except ValueError as error:
            raise ValueError(f"speculative: {error}") from None
        if self.exit_layer in (None, config.n_layer) and all(w in (None, config.n_embd)
                                                              for w in compute.layer_widths(config)):
            raise ValueError(f"speculative: this draft computes the same as the model ({config.block_pattern!r} has "
                             "no attention layer for a width to narrow, or the width is full); use exit:J or a "
                             "narrower width")

    @classmethod
    def parse(cls, config: ModelConfig, text: str, k: int = 4) -> Draft:
        """From what users write: a width ("ghost", "whisper", "128") or "exit:J" (the first J blocks)."""
        spec = str(text).strip().lower()
        if spec.startswith("exit:"):
            layer = spec.partition(":")[2]
            if not layer.isdigit():
                raise ValueError(f"speculative: {text!r}: the exit layer after 'exit:' must be a whole number")
            draft = cls(exit_layer=int(layer), k=k)
        else:
            try:
                draft = cls(width=parse_width(spec), k=k)
            except ValueError as error:
                raise ValueError(f"speculative: {error} (or exit:J for the first J blocks)") from None
        draft.check(config)
        return draft


def offered_drafts(config: ModelConfig) -> list[str]:
    """The drafts worth offering for a model (the server lists them for its UI): its smallest compute mode and the
    first half of its stack, where each is a valid draft."""
    offered = []
    for spec in (min(config.compute_modes, key=config.compute_modes.get), f"exit:{config.n_layer // 2}"):
        try:
            Draft.parse(config, spec)
        except ValueError:
            continue
        offered.append(spec)
    return offered


def accept(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule: (accepted draft tokens per row n (B,), the row's next token (B,)).

    draft_tokens (B, k); draft_probs (B, k, V) the distributions they were drawn from (unused when greedy);
    target (B, k + 1, V): the full model's logits after last, d_1, .., d_k; forced (B, k): drafts accepted as they
    are (a tool's output)."""
    B, k = draft_tokens.shape
    rows = torch.arange(B, device=target.device)
    if params.temperature == 0:
        accepted = draft_tokens == target[:, :k].argmax(-1)
    else:
        p = probabilities(target, params)
        picked = draft_tokens[..., None]
        ratio = p[:, :k].gather(-1, picked)[..., 0] / draft_probs.gather(-1, picked)[..., 0]
        uniform = torch.rand(B, k, device=target.device, generator=generator)
        accepted = uniform < ratio  # u < p/q: probability min(1, p/q)
    if forced is not None:
        accepted = accepted | forced
    n = accepted.long().cumprod(-1).sum(-1)  # leading accepted tokens
    if params.temperature == 0:
        return n, target[rows, n].argmax(-1)
    # at a rejection: the residual max(0, p - q); after k acceptances: p_k itself (q = 0 there)
    q = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)[rows, n]
    residual = (p[rows, n] - q).clamp(min=0)
    # a residual of all zeros needs p = q, when no rejection can happen; guard rounding all the same
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p[rows, n], residual)
    return n, torch.multinomial(residual, 1, generator=generator)[:, 0]


class SpeculativeDecoder:
    """The verifier's cache and the draft's for one batch, and the rounds that advance them."""

    def __init__(self, model, draft: Draft, batch: int, capacity: int, compute: Compute, params: SamplingParams,
                 generator: torch.Generator | None, vocab: int | None):
        """`params` and `generator`: every row's sampling, until `set_sampler` gives a row its own."""
        self.model, self.draft, self.compute = model, draft, compute
        self.draft_compute = draft.compute()
        self.vocab = vocab
        self.samplers = [(params, generator)] * batch
        self.cache = InferenceCache(model, batch, capacity, compute=compute)
        self.draft_cache = InferenceCache(model, batch, capacity, compute=self.draft_compute)
        device = self.cache.lengths.device
        self.lag = torch.zeros(batch, dtype=torch.bool, device=device)  # the draft has yet to read `held`
        self.held = torch.zeros(batch, dtype=torch.long, device=device)  # d_k of the last round, per row

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        if self.vocab is not None:  # padded vocabulary: ids past the tokenizer's are never chosen
            logits[..., self.vocab:] = float("-inf")
        return logits

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Both caches read the right-padded prompts; returns the full model's logits after each (B, V)."""
        rows = torch.arange(ids.size(0), device=ids.device)
        self.draft_cache.valid = lengths
        self.model(ids, cache=self.draft_cache, compute=self.draft_compute)
        self.cache.valid = lengths
        return self.logits(self.model(ids, cache=self.cache, compute=self.compute)[rows, lengths - 1])

    def set_sampler(self, row: int, params: SamplingParams, generator: torch.Generator | None) -> None:
        self.samplers[row] = (params, generator)

    def _sampler_groups(self, n: int) -> list[tuple[SamplingParams, torch.Generator | None, torch.Tensor]]:
        """The first n rows, in groups that share sampling parameters and a generator, each group sampled in one
        call (an engine's batch is one group; a server's rows each have their own seed)."""
        groups: dict[tuple, list[int]] = {}
        for b, (params, generator) in enumerate(self.samplers[:n]):
            groups.setdefault((params, id(generator)), []).append(b)
        device = self.cache.lengths.device
        return [(*self.samplers[rows[0]], torch.tensor(rows, device=device)) for rows in groups.values()]

    def _propose(self, logits: torch.Tensor, groups) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's next token per row, and the distribution it was drawn from (zeros for greedy rows)."""
        logits = self.logits(logits)
        tokens, probs = logits.argmax(-1), torch.zeros_like(logits)
        for params, generator, rows in groups:
            if params.temperature != 0:
                probs[rows] = probabilities(logits[rows], params)
                tokens[rows] = torch.multinomial(probs[rows], 1, generator=generator)[:, 0]
        return tokens, probs

    def _draft_reads(self, cache: InferenceCache, last: torch.Tensor, keep_rows: torch.Tensor) -> torch.Tensor:
        """The draft's first step: it reads `last`, after d_k of the previous round where it accepted all k (in one
        right-padded forward, or two where that would run past the context); returns its logits (B, V)."""
        model, B = self.model, last.size(0)
        lagging, held = self.lag[:B], self.held[:B]
        lag = lagging.long()
        everyone = bool(keep_rows.all())
        if everyone and not bool(lag.any()):
            return model(last[:, None], cache=cache, compute=self.draft_compute)[:, 0]
        if everyone and bool(lag.all()):  # two plain steps: a step is cheaper than a padded two-token forward
            model(held[:, None], cache=cache, compute=self.draft_compute)
            return model(last[:, None], cache=cache, compute=self.draft_compute)[:, 0]
        if int(cache.lengths.max()) + 2 <= cache.capacity:
            cache.valid = (1 + lag) * keep_rows
            logits = model(torch.stack([torch.where(lagging, held, last), last], dim=1), cache=cache,
                           compute=self.draft_compute)
            return logits[torch.arange(B, device=last.device), lag]
        cache.valid = lag * keep_rows
        model(held[:, None], cache=cache, compute=self.draft_compute)
        cache.valid = keep_rows
        return model(last[:, None], cache=cache, compute=self.draft_compute)[:, 0]

    @torch.no_grad()
    def round(self, last: torch.Tensor, active: torch.Tensor,
              forced: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row has just produced `last` (B,), which neither cache has read. Returns (tokens (B, k + 1), n (B,),
        the full model's logits (B, k + 1, V)): row b's next tokens are tokens[b, :n[b] + 1] (n[b] accepted draft
        tokens, then the full model's own), token j chosen from logits[b, j]. `forced[b]`: tokens row b must take
        next (a tool's output, infer/tool_use.py), drafted in place of the draft's own and accepted as they are.
        Inactive rows (finished or free) keep their caches as they are. B may be fewer than the caches' rows: the
        round then runs on the first B. Then `commit` says how many of the tokens each row keeps."""
        model, B = self.model, last.size(0)
        whole = B == self.cache.batch
        full, draft = (self.cache, self.draft_cache) if whole else \
            (self.cache.first_rows(B), self.draft_cache.first_rows(B))
        keep_rows = active.long()
        if not bool(active.all()):  # finished rows write their (ignored) round at the start, never past the end
            for cache in (full, draft):
                cache.lengths.mul_(keep_rows)
        k = min(self.draft.k, full.capacity - 1 - int(full.lengths.max()))  # room for k + 1 tokens
        # forced tokens per position (k + 1 of them: the last may be the row's next token), -1 where none
        must = torch.full((B, k + 1), -1, dtype=torch.long, device=last.device)
        for b, tokens in enumerate(forced or []):
            if tokens:
                must[b, :min(len(tokens), k + 1)] = torch.tensor(tokens[:k + 1])
        logits = self._draft_reads(draft, last, keep_rows)
        groups = self._sampler_groups(B)
        drafts, draft_probs = [], []
        draft.begin_trail()
        for i in range(k):
            token, probs = self._propose(logits, groups)
            token = torch.where(must[:, i] >= 0, must[:, i], token)
            drafts.append(token)
            draft_probs.append(probs)
            if i + 1 < k:
                logits = model(token[:, None], cache=draft, compute=self.draft_compute)[:, 0]
        drafted = torch.stack(drafts, dim=1) if k else last.new_zeros(B, 0)
        full.begin_trail()
        target = self.logits(model(torch.cat([last[:, None], drafted], dim=1), cache=full, compute=self.compute))
        q = torch.stack(draft_probs, dim=1) if k else target.new_zeros(B, 0, target.size(-1))
        n, following = torch.zeros_like(last), torch.zeros_like(last)
        kept_as_is = must[:, :k] >= 0 if forced else None
        for params, generator, rows in groups:
            n[rows], following[rows] = accept(drafted[rows], q[rows], target[rows], params, generator,
                                              None if kept_as_is is None else kept_as_is[rows])
        if forced:  # where the row's next token is forced too, it replaces the chosen one
            pick = must.gather(1, n[:, None])[:, 0]
            following = torch.where(pick >= 0, pick, following)
        self._round = (full, draft, whole, k, active, drafted)
        tokens = torch.cat([drafted, following[:, None]], dim=1)
        return tokens.scatter(1, n[:, None], following[:, None]), n, target

    def commit(self, kept: torch.Tensor) -> None:
        """After `round`: row b keeps its first kept[b] + 1 tokens (at most n[b] + 1; fewer where a tool call ends
        it early), the last of them unread, as `last` of the next round."""
        full, draft, whole, k, active, drafted = self._round
        keep_rows = active.long()
        full.rollback((kept + 1) * keep_rows)
        draft.rollback(kept.clamp(max=max(k - 1, 0)) * keep_rows)
        B = kept.size(0)
        if not whole:
            self.cache.absorb(full)
            self.draft_cache.absorb(draft)
        self.lag[:B] = (kept == k) & active if k else False
        if k:
            self.held[:B] = drafted[:, -1]
