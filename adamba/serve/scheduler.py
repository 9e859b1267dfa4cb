"""Continuous batching: one thread owns the model and a cache of `max_batch` slots, and runs one decode step at a time
for every request in it (Yu et al. 2022, Orca's iteration-level scheduling; vLLM and llama.cpp's server do the same).

A request joins at a step boundary: its prompt is prefilled alone, at its own compute, into a one-row cache whose
state (attention K/V, Mamba conv and SSM state, loop slots) is then loaded into a free slot of the running cache
(`InferenceCache.load_row`). Each row keeps its own sampling parameters, seed, stop conditions, tool calls and
width: rows at different widths share a step (the forward runs each token at its row's width, exactly as alone).
A request leaves when it stops, or at once when its client goes away (`Request.cancel`); its slot is parked (it
rewrites one position and is never read) until the next request loads over it. Generation runs on this thread,
never on the web server's event loop: tokens reach the caller through `Request.on_event`, called from here.

With `compile=True` each decode step is one torch.compile graph over a static-shape cache (as `Engine(compile=True)`):
one graph per combination of row widths in a step (rows at one mode: one graph), and no early exit or looped
models, whose steps depend on values known only at run time.

Rows batch together when their loops and adaptive policy agree (a looped model's iterations and an exit policy are
per step, not per row); a request whose differ waits until the running ones finish. Speculative requests
(`Request.speculative`, infer/speculative.py) batch with those of the same draft and compute: each step is then one
speculative round for every row (the draft's cache beside the model's), and gives each row up to k + 1 tokens (a
tool call ends a row's round early; its output is drafted as forced tokens). With early exit or a looped model's
adaptive exit, each token's decisions (exit layer and gates, or iterations) are kept, and the request's FLOPs are
counted from them.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..infer.sampling import SamplingParams, sample, sampled_vocab
from ..infer.speculative import Draft, SpeculativeDecoder
from ..infer.tool_use import Tool, ToolUse
from ..model.cache import InferenceCache
from ..model.compute import Compute
from ..model.exits import Adaptive
from ..model.looped import Loops


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts (HTTP 429)."""


@dataclass
class Token:
    """One generated token, as the caller sees it."""

    id: int
    forced: bool  # put there by a tool call, not sampled
    logprob: float | None = None  # log-probability under the model (before temperature and filters)
    top: list[tuple[int, float]] | None = None  # the most likely tokens and their log-probabilities


@dataclass
class Request:
    """A prompt to complete and how. `on_event(kind, payload)` is called on the scheduler's thread: ("token",
    Token), then once ("done", finish_reason) or ("error", message). `stop_strings` end the row when its text
    contains one (the caller cuts the text there)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_tokens: frozenset = frozenset()
    stop_strings: tuple[str, ...] = ()
    compute: Compute = field(default_factory=Compute)
    top_logprobs: int | None = None  # None: no log-probabilities; k >= 0: the token's and the k most likely
    tool: Tool | None = None
    speculative: Draft | None = None  # decode with this draft, verified by the model (the output is the model's)
    on_event: Callable[[str, object], None] = lambda kind, payload: None
    # filled in by the scheduler
    tokens: list[int] = field(default_factory=list)
    flops: float = 0.0  # forward FLOPs spent on it (prompt and reply), set when it finishes
    # per token (prompt, then reply), with adaptive compute: (exit layer, gates evaluated), or a loop count
    decisions: list[tuple] = field(default_factory=list)
    # speculative decoding: draft tokens proposed and accepted, tokens the draft read, and tokens the model read
    # beyond those it kept (rejected drafts): the compute speculation adds
    drafted: int = 0
    accepted: int = 0
    draft_reads: int = 0
    rejected_reads: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        """The caller is gone: the scheduler frees the slot before its next step."""
        self.cancelled = True


@dataclass
class _Row:
    request: Request
    generator: torch.Generator
    tools: ToolUse | None
    widths: tuple
    next_token: int = 0
    text_tail: list[int] = field(default_factory=list)


class Scheduler:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 64, compile: bool = False):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = next(model.parameters()).device
        if compile and model.config.loop is not None:
            raise ValueError("compile: looped models decode eagerly; serve them without --compile")
        self.compiled = compile
        self.decode_step = torch.compile(model, dynamic=False) if compile else model
        self.context = model.config.sequence_len
        self.waiting: collections.deque[Request] = collections.deque()
        self.rows: list[_Row | None] = [None] * max_batch
        self.group: tuple | None = None  # (loops, adaptive) of the running rows
        self.cache: InferenceCache | None = None
        self.decoder: SpeculativeDecoder | None = None  # for a speculative group; its cache is then `cache`
        self.wake = threading.Condition()
        self.stats = collections.Counter()  # requests, prompt/completion tokens, flops, cancelled, steps
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="adamba-scheduler", daemon=True)

    # --- the caller's side (any thread) ----------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.wake:
            self._stop = True
            self.wake.notify()
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue `request` (QueueFull when max_queue are already waiting); its events follow on_event."""
        if len(request.prompt) + 1 > self.context:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; the model's context is {self.context} "
                             "(sequence_len), which must also hold at least one new token")
        request.compute.check(self.model.config)
        if request.speculative is not None:
            request.speculative.check(self.model.config)
            if self.compiled or request.compute.adaptive is not None:
                raise ValueError("compute.speculative: decodes eagerly and without adaptive exits (not on a server "
                                 "started with --compile, nor with compute.adaptive)")
        if self.compiled and request.compute.adaptive is not None:
            raise ValueError("compute.adaptive: this server decodes with compiled steps (--compile), which run fixed "
                             "widths; early exit needs a server without --compile")
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue={self.max_queue})")
            self.waiting.append(request)
            self.wake.notify()

    @property
    def active(self) -> int:
        return sum(row is not None for row in self.rows)

    # --- the scheduler's thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self._stop and not self.waiting and not self.active:
                        self.wake.wait(timeout=1.0)
                    if self._stop:
                        return
                self._drop_cancelled()
                self._admit()
                if self.active:
                    try:
                        self._step()
                    except Exception as error:  # a bug must not hang every client: fail the batch, keep serving
                        for slot, row in enumerate(self.rows):
                            if row is not None:
                                self._finish(slot, None, f"generation failed: {type(error).__name__}: {error}")

    def _drop_cancelled(self) -> None:
        with self.wake:
            kept = [r for r in self.waiting if not r.cancelled]
            self.stats["cancelled"] += len(self.waiting) - len(kept)
            self.waiting = collections.deque(kept)
        for slot, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                self.stats["cancelled"] += 1
                self.rows[slot] = None

    def _admit(self) -> None:
        """Prefill waiting requests into free slots while their loops/adaptive policy match the running rows'."""
        while None in self.rows:
            with self.wake:
                if not self.waiting:
                    return
                request = self.waiting[0]
                group = self._group(request)
                if self.active and group != self.group:
                    return  # it waits for the running rows to finish
                self.waiting.popleft()
            if not self.active and group != self.group:
                self.cache = self.decoder = None  # a looped model's loop slots depend on the loops
            self.group = group
            slot = self.rows.index(None)
            try:
                self._prefill(slot, request)
            except Exception as error:  # this request fails; its slot must not stay taken
                if self.rows[slot] is not None and self.rows[slot].request is request:
                    self.rows[slot] = None
                request.on_event("error", f"{type(error).__name__}: {error}")

    def _group(self, request: Request) -> tuple:
        """What rows sharing a step must agree on: loops and adaptive policy; for a looped model or speculative
        decoding, everything."""
        compute = request.compute
        if request.speculative is not None:
            return compute, request.speculative
        return (compute,) if self.model.config.loop is not None else (compute.loops, compute.adaptive)

    def _prefill(self, slot: int, request: Request) -> None:
        model, compute = self.model, request.compute
        if self.cache is None:
            if request.speculative is not None:
                self.decoder = SpeculativeDecoder(model, request.speculative, self.max_batch, self.context, compute,
                                                  request.params, None, sampled_vocab(model, self.tokenizer))
                self.cache = self.decoder.cache
            else:
                self.cache = InferenceCache(model, self.max_batch, self.context, compute=compute,
                                            static=self.compiled)
        alone = InferenceCache(model, 1, len(request.prompt), compute=compute)
        ids = torch.tensor([request.prompt], device=self.device)
        logits, decisions = self._forward(ids, alone, compute)
        request.decisions += decisions[0]
        logits = logits[:, -1]
        self.cache.load_row(slot, alone)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(request.seed if request.seed is not None else int(time.time_ns() % 2**63))
        if request.speculative is not None:  # the draft reads the prompt too
            draft = self.decoder.draft_compute
            alone = InferenceCache(model, 1, len(request.prompt), compute=draft)
            model(ids, cache=alone, compute=draft)
            self.decoder.draft_cache.load_row(slot, alone)
            self.decoder.lag[slot] = False
            self.decoder.set_sampler(slot, request.params, generator)
        widths = tuple(model.config.width_values(compute.width)) if model.config.loop is None else ()
        tools = ToolUse(self.tokenizer, request.tool, 1) if request.tool is not None else None
        row = _Row(request, generator, tools, widths)
        self.rows[slot] = row
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += len(request.prompt)
        self._emit(slot, logits[0])

    def _step(self) -> None:
        """One decode step for the slots up to the last occupied one (requests take the lowest free slot, so a
        light load runs a small batch; compiled steps keep every slot, for one graph): occupied rows feed their
        last token, free ones a dummy and stay parked."""
        if self.decoder is not None:
            self._speculative_step()
            return
        n = self.max_batch if self.compiled else 1 + max(i for i, row in enumerate(self.rows) if row is not None)
        rows = self.rows[:n]
        cache = self.cache if n == self.max_batch else self.cache.first_rows(n)
        ids = torch.tensor([[row.next_token if row is not None else 0] for row in rows], device=self.device)
        parked = cache.lengths.clone()
        logits, decisions = self._forward(ids, cache, self._step_compute(rows))
        if cache is not self.cache:
            self.cache.absorb(cache)
        logits = logits[:, -1]
        for row, made in zip(rows, decisions, strict=True):
            if row is not None:
                row.request.decisions += made
        free = torch.tensor([row is None for row in rows], device=self.device)
        cache.lengths.copy_(torch.where(free, parked, cache.lengths))
        self.stats["steps"] += 1
        for slot in range(n):
            if self.rows[slot] is not None:
                self._emit(slot, logits[slot])

    def _speculative_step(self) -> None:
        """One speculative round for the slots up to the last occupied one; each row's tokens are then emitted one
        by one, as plain steps would (a row that stops mid-round drops the rest)."""
        n = 1 + max(i for i, row in enumerate(self.rows) if row is not None)
        rows = self.rows[:n]
        last = torch.tensor([row.next_token if row is not None else 0 for row in rows], device=self.device)
        active = torch.tensor([row is not None for row in rows], device=self.device)
        lag = self.decoder.lag[:n].tolist()
        forced = [list(row.tools.pending[0]) if row is not None and row.tools is not None else [] for row in rows]
        tokens, accepted, logits = self.decoder.round(last, active, forced if any(forced) else None)
        k = tokens.size(1) - 1
        kept = accepted.tolist()
        self.stats["steps"] += 1
        for slot, (row, made, n_ok, lagged) in enumerate(zip(rows, tokens.tolist(), accepted.tolist(), lag,
                                                             strict=True)):
            if row is None:
                continue
            request = row.request
            request.drafted, request.accepted = request.drafted + k, request.accepted + n_ok
            request.draft_reads += k + int(lagged)
            for j in range(n_ok + 1):
                if self.rows[slot] is not row:  # it stopped
                    break
                was_forced = row.tools is not None and bool(row.tools.pending[0])
                self._emit(slot, logits[slot, j], made[j])
                if row.tools is not None and not was_forced and row.tools.pending[0]:  # a tool call just ended:
                    kept[slot] = j  # its output comes next, not the rest of the drafts
                    break
            request.rejected_reads += k - kept[slot]  # read by the model, then dropped
        self.decoder.commit(torch.tensor(kept, device=self.device))

    def _forward(self, ids: torch.Tensor, cache: InferenceCache, compute: Compute) -> tuple[torch.Tensor, list]:
        """(logits, per row the decisions its tokens made: [] unless compute is adaptive)."""
        adaptive_loops = isinstance(compute.loops, Loops) and compute.loops.exit is not None
        policy = compute.adaptive
        decides = policy is not None and (policy.exit or policy.expand is not None)  # not just per-row widths
        if not decides and not adaptive_loops:
            step = self.decode_step if cache is self.cache else self.model  # prefills and views run eagerly
            return step(ids, cache=cache, compute=compute), [[] for _ in range(ids.size(0))]
        out = self.model(ids, cache=cache, compute=compute, outputs=True)
        if adaptive_loops:
            return out.logits, [[(int(n),) for n in row] for row in out.loops.tolist()]
        pairs = torch.stack([out.exits.exit_layer, out.exits.gates], dim=-1).tolist()
        return out.logits, [[tuple(p) for p in row] for row in pairs]

    def _spent(self, request: Request) -> float:
        """Forward FLOPs of the request so far, by the project's convention (eval/chat_eval.py): every prompt and
        reply token at the forward FLOPs per token of a sequence that long, at the compute it ran -- with adaptive
        compute, each token at its own exit layer and gates, or its own number of iterations (plus the "kl"
        criterion's probes)."""
        length = len(request.prompt) + len(request.tokens)
        model, compute = self.model, request.compute
        if request.speculative is not None:  # the draft's reads, and the model's reads of rejected drafts
            draft = model.count_flops(length, request.speculative.compute()).forward
            return (length + request.rejected_reads) * model.count_flops(length, compute).forward + \
                (len(request.prompt) + request.draft_reads) * draft
        if not request.decisions:
            return length * model.count_flops(length, compute).forward
        costs: dict[tuple, float] = {}
        kl = isinstance(compute.loops, Loops) and compute.loops.exit == "kl"
        for decision in request.decisions:
            if decision not in costs:
                if len(decision) == 1:
                    costs[decision] = model.count_flops(length, Compute(width=compute.width, loops=decision[0]),
                                                        probes=decision[0] - 1 if kl else 0).forward
                else:
                    costs[decision] = model.count_flops(length, compute, exit_layer=decision[0],
                                                        gates=decision[1]).forward
        return sum(costs[d] for d in request.decisions)

    def _step_compute(self, rows: list[_Row | None]) -> Compute:
        if self.model.config.loop is not None:  # looped models batch one compute choice (see the module doc)
            return self.group[0]
        loops, adaptive = self.group
        widths = {row.widths for row in rows if row is not None}
        if len(widths) == 1:
            return Compute(width=list(widths.pop()), loops=loops, adaptive=adaptive)
        full = tuple(self.model.config.width_values(None))
        row_widths = tuple(row.widths if row is not None else full for row in rows)
        return Compute(loops=loops, adaptive=_with_rows(adaptive, row_widths))

    def _emit(self, slot: int, logits: torch.Tensor, chosen: int | None = None) -> None:
        """Choose row `slot`'s next token from its logits (or take the one speculative decoding `chosen` from them),
        report it, and finish the row if it stops."""
        row = self._row(slot)
        request = row.request
        vocab = self.tokenizer.vocab_size
        if logits.size(-1) > vocab:  # nanochat pads the vocabulary: ids past the tokenizer's never come out
            logits = logits.clone()
            logits[vocab:] = -math.inf
        token = sample(logits[None], request.params, row.generator) if chosen is None else torch.tensor([chosen])
        forced = False
        if row.tools is not None:
            token, flags = row.tools.choose(token)
            forced = flags[0]
        token = int(token[0])
        if token in request.stop_tokens and not forced:
            self._finish(slot, "stop")
            return
        request.tokens.append(token)
        self.stats["completion_tokens"] += 1
        if row.tools is not None:
            row.tools.observe(0, token)
        request.on_event("token", _token(token, forced, logits, request.top_logprobs))
        row.next_token = token
        if request.stop_strings and any(s in self.tokenizer.decode(request.tokens[-64:]) for s in request.stop_strings):
            self._finish(slot, "stop")
        elif len(request.tokens) >= request.max_tokens or len(request.prompt) + len(request.tokens) >= self.context:
            self._finish(slot, "length")

    def _row(self, slot: int) -> _Row:
        row = self.rows[slot]
        assert row is not None
        return row

    def _finish(self, slot: int, reason: str | None, error: str | None = None) -> None:
        request = self._row(slot).request
        self.rows[slot] = None
        request.flops = self._spent(request)
        self.stats["flops"] += request.flops
        if error is not None:
            request.on_event("error", error)
        else:
            request.on_event("done", reason)


def _with_rows(adaptive: Adaptive | None, row_widths: tuple) -> Adaptive:
    """The step's adaptive policy (none: no exits) with each row's widths."""
    base = adaptive if adaptive is not None else Adaptive(exit=False)
    return Adaptive(exit=base.exit, threshold=base.threshold, expand=base.expand, row_widths=row_widths)


def _token(token: int, forced: bool, logits: torch.Tensor, top: int | None) -> Token:
    if top is None:
        return Token(token, forced)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    best = torch.topk(logp, top) if top else None
    return Token(token, forced, float(logp[token]),
                 [] if best is None else list(zip(best.indices.tolist(), best.values.tolist(), strict=True)))
