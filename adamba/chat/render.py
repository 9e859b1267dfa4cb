"""Conversations as tokens, by nanochat's rules, so its chat checkpoints see exactly what they were trained on.

A conversation is `{"messages": [{"role", "content"}, ...]}`. A leading system message is merged into the first
user message (nanochat's tokenizer has no system token); then user and assistant strictly alternate, starting with
the user. An assistant's content is text, or a list of parts: `text`, `python` (a tool call, wrapped in
<|python_start|> ... <|python_end|>) and `python_output` (the tool's result, in <|output_start|> ... <|output_end|>).

The mask says what fine-tuning learns (nanochat's chat_sft): 1 on what the assistant writes -- its text, its tool
calls with their delimiters, and <|assistant_end|> (so it learns to stop) -- and 0 on <|bos|>, user turns,
<|assistant_start|> (always given) and tool outputs (the tool writes those, and the engine forces them).
"""

from __future__ import annotations

import math
import warnings

ROLES = ("user", "assistant")
PART_TYPES = ("text", "python", "python_output")


def _merged_messages(conversation: dict) -> list[dict]:
    """The messages with a leading system message folded into the first user message, roles checked."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation: needs a non-empty list under 'messages', e.g. "
                         "{'messages': [{'role': 'user', 'content': 'hi'}]}")
    if messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("conversation: message 1 (after the system message) must come from the user")
        if not isinstance(messages[0].get("content"), str) or not isinstance(messages[1].get("content"), str):
            raise ValueError("conversation: the system message and the first user message must be text")
        first = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [first, *messages[2:]]
        offset = 1  # message numbers in errors count the original list
    else:
        offset = 0
    for i, message in enumerate(messages):
        expected = ROLES[i % 2]
        if not isinstance(message, dict) or message.get("role") != expected:
            role = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"conversation: message {i + offset} has role {role!r} where {expected!r} was "
                             "expected; messages alternate user/assistant, starting with the user (a system "
                             "message may come first)")
        if "content" not in message:
            raise ValueError(f"conversation: message {i + offset} ({expected}) has no 'content'")
    return messages


def render_conversation(tokenizer, conversation: dict, max_tokens: int | float = 2048) -> tuple[list[int], list[int]]:
    """(ids, mask) of the whole conversation, cut to `max_tokens` (with a warning when anything is cut)."""
    special = tokenizer.special_id
    ids: list[int] = [tokenizer.bos_id]
    mask: list[int] = [0]

    def add(tokens: list[int], value: int) -> None:
        ids.extend(tokens)
        mask.extend([value] * len(tokens))

    for i, message in enumerate(_merged_messages(conversation)):
        content = message["content"]
        if message["role"] == "user":
            if not isinstance(content, str):
                raise ValueError(f"conversation: message {i} (user) content must be text, not "
                                 f"{type(content).__name__}")
            add([special("<|user_start|>"), *tokenizer.encode(content), special("<|user_end|>")], 0)
            continue
        add([special("<|assistant_start|>")], 0)
        for part in _parts(content, i):
            text = tokenizer.encode(part["text"])
            if part["type"] == "text":
                add(text, 1)
            elif part["type"] == "python":
                add([special("<|python_start|>"), *text, special("<|python_end|>")], 1)
            else:
                add([special("<|output_start|>"), *text, special("<|output_end|>")], 0)
        add([special("<|assistant_end|>")], 1)
    if len(ids) > max_tokens:
        warnings.warn(f"a conversation of {len(ids)} tokens was cut to {max_tokens}", stacklevel=2)
        cut = int(max_tokens)
        ids, mask = ids[:cut], mask[:cut]
    return ids, mask


def _parts(content, index: int) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"conversation: message {index} (assistant) content must be text or a list of parts, "
                         f"not {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ValueError(f"conversation: message {index} part {j} must be {{'type': one of {PART_TYPES}, "
                             f"'text': str}}, got {part!r}")
    return content


def render_for_completion(tokenizer, conversation: dict) -> list[int]:
    """The prompt that asks for the conversation's last (assistant) message: everything before it, then
    <|assistant_start|>."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("conversation: render_for_completion needs a conversation ending with the assistant "
                         "message to be completed")
    return render_prompt(tokenizer, messages[:-1])


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt for the assistant's next reply to `messages` (which end with the user)."""
    ids, _ = render_conversation(tokenizer, {"messages": messages}, math.inf)
    return ids + [tokenizer.special_id("<|assistant_start|>")]
