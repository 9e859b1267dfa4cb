"""The inference engine: prefill each prompt in one pass, then decode token by token through the cache.

Batched rows may have prompts of different lengths: prompts are right-padded, prefilled together (causal
attention keeps padding from reaching real tokens), and each row's length is then set to its own prompt
length, so its first new token overwrites the padding. Rows stop on their own (stop token, stop string,
max_new_tokens, or the model's context); a finished row stays in the batch but no longer advances.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..model.cache import InferenceCache
from ..model.compute import Compute
from .sampling import SamplingParams, sample, sampled_vocab
from .speculative import Draft, SpeculativeDecoder
from .tool_use import Tool, ToolCall, ToolUse


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop token or string), "length" (max_new_tokens or context)
    forced: list[bool] = field(default_factory=list)  # per token: forced by a tool call, not sampled
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop_token: int | None = None  # the stop token that ended the row (not part of `tokens`), if one did
    # speculative decoding: draft tokens proposed for this row, and how many the model accepted (a tool's forced
    # output, drafted as itself, counts as both)
    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class _Limits:
    """When a row stops: a stop token or string, max_new_tokens, or no room left in the cache."""

    stop_tokens: frozenset
    stop_strings: Sequence[str]
    max_new_tokens: int
    capacity: int


class Engine:
    """`compile=True` runs each decode step as one compiled graph (torch.compile over a static-shape cache, see
    `InferenceCache`): a small model's step is mostly per-op overhead, which the compiled graph fuses away (the
    speed-ups are in BENCHMARKS.md, "elastic"). It costs one compilation (seconds to a minute) per batch size and
    width, holds K/V for the model's whole context from the start, and needs what torch.compile needs (a C++
    compiler on a CPU, Triton on a GPU). Prefill runs eagerly. Not for looped models or adaptive exits, whose
    steps depend on values only known at run time, nor for speculative decoding (its rounds run eagerly)."""

    def __init__(self, model, tokenizer=None, *, compile: bool = False, speculative: Draft | None = None):
        """`speculative`: decode with the model's own narrow slice or early exit as a draft (speculative.py),
        for every call that does not pass its own."""
        self.model, self.tokenizer = model, tokenizer
        if speculative is not None:
            speculative.check(model.config)
        self.speculative = speculative
        if compile and model.config.loop is not None:
            raise ValueError("compile: looped models (config.loop) decode eagerly; use Engine(model) without compile")
        self.decode_step = torch.compile(model, dynamic=False) if compile else model
        self.compiled = compile
        self.vocab = sampled_vocab(model, tokenizer)

    def _check(self, prompts: Sequence[Sequence[int]], compute: Compute, stop_strings: Sequence[str],
               draft: Draft | None) -> Compute:
        """The call's compute choice, once its prompts, compute, stop strings and draft are checked."""
        compute.check(self.model.config)
        if draft is not None:
            draft.check(self.model.config)
            if self.compiled or compute.adaptive is not None:
                raise ValueError("speculative: decodes eagerly and without adaptive exits; use an Engine without "
                                 "compile, or drop adaptive")
        if self.compiled and compute.adaptive is not None:
            raise ValueError("adaptive: a compiled engine (compile=True) decodes at fixed widths; use an Engine "
                             "without compile for adaptive exits")
        if stop_strings:
            self._need_tokenizer("stop_strings")
        if not prompts:
            raise ValueError("prompts: give at least one prompt")
        context = self.model.config.sequence_len
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; give at least one token (e.g. <|bos|>)")
            if len(prompt) > context:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens, more than the model's context of "
                                 f"{context} (sequence_len); shorten the prompt")
        return compute

    @torch.no_grad()
    def steps(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, params: SamplingParams | None = None,
              *, seed: int | None = None, stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (),
              completions: list[Completion] | None = None, compute: Compute | None = None,
              tool: Tool | None = None, speculative: Draft | None = None) -> Iterator[list[tuple[int, int]]]:
        """Decode all prompts together; yield, per step, the (row, token) pairs produced in that step.

        Pass a list as `completions` to receive each row's tokens and finish reason; a stop token ends
        its row and is not part of the completion. `compute` (model/compute.py) is used for every token: a
        Matryoshka width, a looped model's iterations per token (an int or a `looped.Loops` plan: adaptive exit,
        kv_budget, warm start), and an adaptive policy whose gates decide per token whether to exit early (exited
        tokens still leave their state in every later layer) or expand; with its `predictor`, each row's widths are
        chosen from its prompt before prefill, within the width as a budget. Rows may exit or run at different
        widths in one step. `tool` (e.g. tools.calculator.calculate): run on each row's <|python_start|> ...
        <|python_end|> call, its result forced into the row (tool_use.py); None: tool calls are not executed.
        `speculative` (default: the engine's): a draft whose tokens the model verifies k at a time, a step then
        yielding up to k + 1 tokens per row, with the output the model alone gives (speculative.py)."""
        draft = speculative if speculative is not None else self.speculative
        compute = self._check(prompts, compute or Compute(), stop_strings, draft)
        params = params or SamplingParams()
        model = self.model
        device = next(model.parameters()).device
        B = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        capacity = min(model.config.sequence_len, int(lengths.max()) + max_new_tokens)
        ids = torch.zeros(B, int(lengths.max()), dtype=torch.long, device=device)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        if draft is not None:  # room to verify k + 1 tokens past the last one kept
            decoder = SpeculativeDecoder(model, draft, B, min(model.config.sequence_len, capacity + draft.k + 1),
                                         compute, params, generator, self.vocab)
        else:  # a compiled step holds K/V for the whole context: one graph serves every generation of this batch size
            cache = InferenceCache(model, B, model.config.sequence_len if self.compiled else capacity,
                                   compute=compute, static=self.compiled)
        rows = completions if completions is not None else []
        rows[:] = [Completion() for _ in range(B)]
        limits = _Limits(frozenset(stop_tokens), stop_strings, max_new_tokens, capacity)
        tools = ToolUse(self._need_tokenizer("tool"), tool, B) if tool is not None else None
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        any_parked = False
        if compute.adaptive is not None:
            compute = replace(compute, adaptive=compute.adaptive.for_prompts(model, ids, lengths, compute.width))
        was_training = model.training
        model.eval()
        try:
            if draft is not None:
                logits = decoder.prefill(ids, lengths)
                next_ids = sample(logits, params, generator)
                produced = self._record(rows, next_ids.tolist(), None, tools, limits, lengths.tolist())
                if produced:
                    yield produced
                yield from self._speculate(decoder, rows, next_ids, lengths.tolist(), limits, tools)
                return
            cache.valid = lengths  # right padding: each row's next token overwrites its padding
            logits = model(ids, cache=cache, compute=compute)[torch.arange(B, device=device), lengths - 1]
            for _ in range(max_new_tokens):
                if self.vocab is not None:
                    logits[:, self.vocab:] = float("-inf")
                next_ids, forced = sample(logits, params, generator), None
                if tools is not None:
                    next_ids, forced = tools.choose(next_ids)
                # lengths: one read per step, not one per row
                produced = self._record(rows, next_ids.tolist(), forced, tools, limits, cache.lengths.tolist())
                for b, row in enumerate(rows):
                    if row.finish_reason and not finished[b]:
                        finished[b] = any_parked = True
                        cache.lengths[b] -= 1  # park the row on its last slot, which it rewrites from now on
                if produced:
                    yield produced
                if all(row.finish_reason for row in rows):
                    break
                parked = cache.lengths.clone() if any_parked else None
                logits = self.decode_step(next_ids[:, None], cache=cache, compute=compute)[:, -1]
                if parked is not None:
                    cache.lengths.copy_(torch.where(finished, parked, cache.lengths))
        finally:
            model.train(was_training)

    def _speculate(self, decoder: SpeculativeDecoder, rows: list[Completion], last: torch.Tensor,
                   prompt_lengths: list[int], limits: _Limits,
                   tools: ToolUse | None) -> Iterator[list[tuple[int, int]]]:
        """Speculative rounds until every row has finished; each yields the tokens the round gave every row, taken
        one at a time as plain decoding would: a row that stops mid-round drops the rest, and one whose tool call
        ends mid-round keeps the tokens up to it (the tool's output, forced, is drafted in the next round)."""
        active = torch.tensor([not row.finish_reason for row in rows], device=last.device)
        while bool(active.any()):
            forced = [list(queue) for queue in tools.pending] if tools is not None else []
            tokens, accepted, _ = decoder.round(last, active, forced if any(forced) else None)
            tokens, kept = tokens.tolist(), accepted.tolist()
            for row, n, running in zip(rows, kept, active.tolist(), strict=True):
                if running:
                    row.drafted, row.accepted = row.drafted + len(tokens[0]) - 1, row.accepted + n
            produced = []
            for j in range(len(tokens[0])):
                step = [row_tokens[j] if j <= n else None for row_tokens, n in zip(tokens, kept, strict=True)]
                flags = None
                if tools is not None:  # a forced token was drafted as itself: take it off the row's queue
                    flags = [token is not None and bool(queue) for token, queue in zip(step, tools.pending,
                                                                                        strict=True)]
                    for queue, flag in zip(tools.pending, flags, strict=True):
                        if flag:
                            queue.popleft()
                held = [length + len(row.tokens) for length, row in zip(prompt_lengths, rows, strict=True)]
                produced += self._record(rows, step, flags, tools, limits, held)
                for b, token in enumerate(step):  # a call just ended: its output comes next, not the drafts
                    if token is not None and tools is not None and not flags[b] and tools.pending[b]:
                        kept[b] = j
            decoder.commit(torch.tensor(kept, device=last.device))
            if produced:
                yield produced
            last = torch.tensor([row_tokens[n] for row_tokens, n in zip(tokens, kept, strict=True)],
                                device=last.device)
            active = torch.tensor([not row.finish_reason for row in rows], device=last.device)

    def _record(self, rows: list[Completion], tokens: list[int | None], forced: list[bool] | None,
                tools: ToolUse | None, limits: _Limits, held: list[int]) -> list[tuple[int, int]]:
        """Append each unfinished row's token (a stop token ends the row instead, unless a tool forced it) and
        end rows that reach a limit; returns the (row, token) pairs produced. None: no token for that row."""
        produced = []
        for b, token in enumerate(tokens):
            row = rows[b]
            if row.finish_reason or token is None:
                continue
            was_forced = forced is not None and forced[b]
            if token in limits.stop_tokens and not was_forced:
                row.finish_reason, row.stop_token = "stop", token
                continue
            row.tokens.append(token)
            row.forced.append(was_forced)
            produced.append((b, token))
            call = tools.observe(b, token) if tools is not None else None
            if call is not None:
                row.tool_calls.append(call)
            if limits.stop_strings and any(s in self.tokenizer.decode(row.tokens[-64:]) for s in limits.stop_strings):
                row.finish_reason = "stop"
            elif len(row.tokens) == limits.max_new_tokens or held[b] >= limits.capacity:
                row.finish_reason = "length"  # no room left in the context for this token
        return produced

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer: Engine(model, tokenizer)")
        return self.tokenizer

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 params: SamplingParams | None = None, **kwargs) -> list[Completion]:
        completions: list[Completion] = []
        for _ in self.steps(prompts, max_new_tokens, params, completions=completions, **kwargs):
            pass
        return completions

    def stream(self, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams | None = None,
               **kwargs) -> Iterator[int]:
        """Tokens of one prompt as they are produced."""
        for produced in self.steps([prompt], max_new_tokens, params, **kwargs):
            for _, token in produced:
                yield token

    def complete(self, prompt: str, max_new_tokens: int, params: SamplingParams | None = None,
                 stop_strings: Sequence[str] = (), **kwargs) -> str:
        """Text in, text out: the prompt starts with <|bos|>; the result ends before any stop string."""
        self._need_tokenizer("complete()")
        stops = [self.tokenizer.bos_id, *kwargs.pop("stop_tokens", ())]
        [completion] = self.generate([self.tokenizer.encode(prompt, bos=True)], max_new_tokens, params,
                                     stop_tokens=stops, stop_strings=stop_strings, **kwargs)
        text = self.tokenizer.decode(completion.tokens)
        cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
        return text[:cut]
