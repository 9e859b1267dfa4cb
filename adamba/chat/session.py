"""A conversation with a chat model: the history, the compute mode, and replies streamed through the engine.

The prompt is the whole history rendered as nanochat does (render.render_prompt) and ends with
<|assistant_start|>. When the history no longer fits the context with room for a reply, the oldest turns are
dropped and the session says so (nanochat's chat CLI crashed there). Tool calls are executed by the engine
(the calculator by default) and reported as events, and the reply is kept in the history as the parts the model
produced (text, python, python_output), so the next prompt shows the model exactly what it saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..infer.engine import Completion, Engine
from ..infer.sampling import SamplingParams
from ..infer.speculative import Draft
from ..infer.tool_use import ToolCall
from ..model.compute import Compute
from ..tools.calculator import calculate
from .render import render_prompt

MIN_REPLY = 32  # tokens of room a prompt must leave for the reply; older turns are dropped to keep it


@dataclass(frozen=True)
class Event:
    """What a reply produces, in order: "text" (a piece of the reply), "tool" (a finished tool call, in `call`),
    "notice" (something the user should know, e.g. that history was trimmed)."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


class ChatSession:
    def __init__(self, model, tokenizer, *, compute: Compute | None = None,
                 tool: Callable[[str], str | None] | None = calculate, params: SamplingParams | None = None,
                 max_new_tokens: int = 256, seed: int | None = None, speculative: Draft | None = None):
        """`speculative`: replies decoded with this draft (infer/speculative.py): the same replies, verified."""
        self.model, self.tokenizer, self.tool = model, tokenizer, tool
        self.compute = compute or Compute()
        self.params = params or SamplingParams(temperature=0.6, top_k=50)
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.engine = Engine(model, tokenizer, speculative=speculative)
        self.system: str | None = None
        self.turns: list[dict] = []  # user and assistant messages, alternating
        self.stops = [tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id]
        self.opens = {tokenizer.special_id("<|python_start|>"), tokenizer.special_id("<|output_start|>")}
        self.closes = {tokenizer.special_id("<|python_end|>"), tokenizer.special_id("<|output_end|>")}

    def set_mode(self, text: str) -> str:
        """Switch the compute mode ("ghost", "normal", a width, "" for full); returns its description."""
        self.compute = Compute.parse(self.model.config, width=text, names={"width": "mode"})
        widths = self.model.config.layer_widths(self.compute.width)
        return "full width" if all(w is None for w in widths) else f"widths {widths}"

    def clear(self) -> None:
        self.turns = []

    def messages(self, turns: list[dict]) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + turns

    def prompt(self, user_text: str) -> tuple[list[int], int]:
        """The prompt for a new user message, and how many earlier turns were dropped to fit it."""
        turns = [*self.turns, {"role": "user", "content": user_text}]
        limit = self.model.config.sequence_len - MIN_REPLY
        dropped = 0
        ids = render_prompt(self.tokenizer, self.messages(turns))
        while len(ids) > limit and len(turns) > 1:
            turns, dropped = turns[2:], dropped + 2  # the oldest user message and its reply
            ids = render_prompt(self.tokenizer, self.messages(turns))
        if len(ids) > limit:
            raise ValueError(f"the message is too long: its prompt is {len(ids)} tokens and the model's context is "
                             f"{self.model.config.sequence_len} with {MIN_REPLY} kept for the reply; shorten it")
        return ids, dropped

    def reply(self, user_text: str) -> Iterator[Event]:
        prompt, dropped = self.prompt(user_text)
        if dropped:
            self.turns = self.turns[dropped:]
            yield Event("notice", f"history trimmed: the {dropped // 2} oldest exchange(s) no longer fit the "
                                  f"context of {self.model.config.sequence_len} tokens and were dropped")
        room = min(self.max_new_tokens, self.model.config.sequence_len - len(prompt))
        completions: list[Completion] = []
        shown_calls, in_tool = 0, False  # inside a call or its output: shown as a "tool" event instead of text
        decoder = self.tokenizer.incremental_decoder()
        for produced in self.engine.steps([prompt], room, self.params, seed=self.seed, stop_tokens=self.stops,
                                          completions=completions, compute=self.compute, tool=self.tool):
            for _, token in produced:
                if token in self.opens or token in self.closes:
                    in_tool = token in self.opens
                elif not in_tool and token not in self.tokenizer.special_ids:
                    piece = self.tokenizer.token_piece(decoder, token)
                    if piece:
                        yield Event("text", piece)
            while shown_calls < len(completions[0].tool_calls):
                yield Event("tool", call=completions[0].tool_calls[shown_calls])
                shown_calls += 1
        done = completions[0]
        if done.finish_reason == "length":
            yield Event("notice", f"the reply was cut at {len(done.tokens)} tokens")
        self.turns += [{"role": "user", "content": user_text},
                       {"role": "assistant", "content": assistant_parts(self.tokenizer, done.tokens)}]


def assistant_parts(tokenizer, tokens: list[int]) -> list[dict]:
    """A reply's tokens as nanochat's assistant parts: text, python (a tool call), python_output (its result)."""
    kinds = {tokenizer.special_id("<|python_start|>"): "python", tokenizer.special_id("<|output_start|>"):
             "python_output"}
    ends = {tokenizer.special_id("<|python_end|>"), tokenizer.special_id("<|output_end|>")}
    parts, kind, current = [], "text", []

    def flush() -> None:
        if current:
            parts.append({"type": kind, "text": tokenizer.decode(current)})
        current.clear()

    for token in tokens:
        if token in kinds:
            flush()
            kind = kinds[token]
        elif token in ends:
            flush()
            kind = "text"
        else:
            current.append(token)
    flush()
    return parts
