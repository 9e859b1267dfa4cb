"""Conversations from a JSONL file in nanochat's customjson format: one JSON list of messages per line, user and
assistant alternating from the user (an optional system message first). Checked on load, so a bad line is named
before any training starts. The identity set that ships with adamba (identity.jsonl) is one such file."""

from __future__ import annotations

import json
from pathlib import Path

from .base import Task

IDENTITY = Path(__file__).with_name("identity.jsonl")


def _check(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: must be a non-empty JSON list of messages, like "
                         '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]')
    first = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, message in enumerate(messages):
        expected = "system" if i < first else ("user", "assistant")[(i - first) % 2]
        if not isinstance(message, dict) or message.get("role") != expected:
            role = message.get("role") if isinstance(message, dict) else message
            raise ValueError(f"{where}: message {i} has role {role!r} where {expected!r} was expected; messages "
                             "must alternate user/assistant, starting with the user")
        if not isinstance(message.get("content"), str) or not message["content"]:
            raise ValueError(f"{where}: message {i} needs a non-empty string 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the answer to learn)")
    return messages


class CustomJSON(Task):
    kind = "generative"

    def __init__(self, path: str | Path, name: str | None = None):
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"conversations: {path} does not exist")
        self.name = name or path.stem
        self.items = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                messages = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            self.items.append({"messages": _check(messages, where)})
        if not self.items:
            raise ValueError(f"conversations: {path} holds no conversations")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def identity() -> CustomJSON:
    """Who the model is: short conversations in which it says it is adamba (for training; not scored)."""
    return CustomJSON(IDENTITY, "identity")
