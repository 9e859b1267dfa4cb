"""Tool calls inside generation, per row of a batch (nanochat's engine protocol).

A row that emits <|python_start|> starts a tool call; the tokens up to <|python_end|> are its input. At
<|python_end|> the tool runs on that text, and its result is *forced* into the row as
<|output_start|> result <|output_end|>: those tokens are fed to the model one per step like sampled ones, but
they are not sampled (and are marked `forced`, so training on the completion masks them). A tool that returns None
(a refused or failing call) forces nothing, and the row samples on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tool = Callable[[str], "str | None"]


@dataclass(frozen=True)
class ToolCall:
    row: int
    expression: str
    result: str | None


class ToolUse:
    """The tool-call state of every row of one generation."""

    def __init__(self, tokenizer, tool: Tool, rows: int):
        self.tokenizer, self.tool = tokenizer, tool
        self.start, self.end = tokenizer.special_id("<|python_start|>"), tokenizer.special_id("<|python_end|>")
        self.output_start = tokenizer.special_id("<|output_start|>")
        self.output_end = tokenizer.special_id("<|output_end|>")
        self.expression: list[list[int] | None] = [None] * rows  # the open call's tokens, per row
        self.pending: list[deque[int]] = [deque() for _ in range(rows)]  # tokens still to force, per row
        self.calls: list[ToolCall] = []

    def choose(self, sampled: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """The next token of each row: its next forced token where one is pending, else the sampled one."""
        forced = [bool(queue) for queue in self.pending]
        if any(forced):
            sampled = sampled.clone()
            for b, queue in enumerate(self.pending):
                if queue:
                    sampled[b] = queue.popleft()
        return sampled, forced

    def observe(self, row: int, token: int) -> ToolCall | None:
        """Row `row` produced `token`; at the end of a call, run the tool and queue its output."""
        if token == self.start:
            self.expression[row] = []
        elif token == self.end and self.expression[row] is not None:
            expression = self.tokenizer.decode(self.expression[row])
            self.expression[row] = None
            call = ToolCall(row, expression, self.tool(expression))
            self.calls.append(call)
            if call.result is not None:
                self.pending[row].extend([self.output_start, *self.tokenizer.encode(call.result), self.output_end])
            return call
        elif self.expression[row] is not None:
            self.expression[row].append(token)
        return None
