"""The chat format against an independent implementation of nanochat's rendering rules, written here from its
description, on a nanochat-format tokenizer.pkl as well as ours."""

import pickle
import warnings

import pytest
import tiktoken

from adamba.chat.render import render_conversation, render_for_completion, render_prompt
from adamba.data.tokenizer import SPLIT_PATTERN, Tokenizer

NANOCHAT_SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                     "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


def reference(enc: tiktoken.Encoding, conversation: dict, max_tokens: int = 10**9) -> tuple[list[int], list[int]]:
    """nanochat's rules, token by token: (token, supervised?) pairs, built straight from tiktoken."""
    sp = enc.encode_single_token
    messages = [dict(m) for m in conversation["messages"]]
    if messages[0]["role"] == "system":
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    pairs = [(sp("<|bos|>"), 0)]
    for turn, message in enumerate(messages):
        assert message["role"] == ("user", "assistant")[turn % 2]
        if message["role"] == "user":
            pairs += [(sp("<|user_start|>"), 0)] + [(t, 0) for t in enc.encode_ordinary(message["content"])] \
                + [(sp("<|user_end|>"), 0)]
            continue
        pairs.append((sp("<|assistant_start|>"), 0))
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            body = enc.encode_ordinary(part["text"])
            if part["type"] == "text":
                pairs += [(t, 1) for t in body]
            elif part["type"] == "python":
                pairs += [(t, 1) for t in [sp("<|python_start|>"), *body, sp("<|python_end|>")]]
            else:
                pairs += [(t, 0) for t in [sp("<|output_start|>"), *body, sp("<|output_end|>")]]
        pairs.append((sp("<|assistant_end|>"), 1))
    pairs = pairs[:max_tokens]
    return [t for t, _ in pairs], [m for _, m in pairs]


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi, how are you?"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3*7?"},
                  {"role": "assistant", "content": "21"}]},
    {"messages": [{"role": "user", "content": "What is 12 * 34?"},
                  {"role": "assistant", "content": [
                      {"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "12*34"},
                      {"type": "python_output", "text": "408"}, {"type": "text", "text": "It is 408."}]}]},
]


def nanochat_tokenizer(tmp_path) -> Tokenizer:
    """A tokenizer.pkl as nanochat writes one: a pickled tiktoken Encoding, byte ranks then its special tokens."""
    ranks = {bytes([b]): b for b in range(256)}
    for i, merge in enumerate([b"th", b"he", b"in", b" t", b"er", b"an"]):
        ranks[merge] = 256 + i
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                            special_tokens={tok: len(ranks) + i for i, tok in enumerate(NANOCHAT_SPECIALS)})
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    return Tokenizer.load(tmp_path)


@pytest.fixture(params=["adamba", "nanochat"])
def any_tokenizer(request, tokenizer, tmp_path):
    return tokenizer if request.param == "adamba" else nanochat_tokenizer(tmp_path)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_render_matches_nanochats_rules(any_tokenizer, conversation):
    ids, mask = render_conversation(any_tokenizer, conversation, 10**9)
    assert (ids, mask) == reference(any_tokenizer.enc, conversation)
    # the prompt for the last reply is everything before it, then <|assistant_start|>
    prompt = render_for_completion(any_tokenizer, conversation)
    before = {"messages": conversation["messages"][:-1]}
    assert prompt == reference(any_tokenizer.enc, before)[0] + [any_tokenizer.special_id("<|assistant_start|>")]
    assert prompt == render_prompt(any_tokenizer, before["messages"])
    # and it is a prefix of the whole rendering, so training and inference agree
    assert ids[:len(prompt)] == prompt


def test_mask_by_hand(tokenizer):
    """Supervised: assistant text, the tool call with its delimiters, <|assistant_end|>; not the tool output."""
    ids, mask = render_conversation(tokenizer, CONVERSATIONS[2])
    sp = tokenizer.special_id
    supervised = {sp("<|python_start|>"), sp("<|python_end|>"), sp("<|assistant_end|>")}
    unsupervised = {sp("<|bos|>"), sp("<|user_start|>"), sp("<|user_end|>"), sp("<|assistant_start|>"),
                    sp("<|output_start|>"), sp("<|output_end|>")}
    assert all(m == 1 for t, m in zip(ids, mask, strict=True) if t in supervised)
    assert all(m == 0 for t, m in zip(ids, mask, strict=True) if t in unsupervised)
    out = ids.index(sp("<|output_start|>"))
    assert tokenizer.decode(ids[out + 1:ids.index(sp("<|output_end|>"))]) == "408"
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == \
        "Let me compute. <|python_start|>12*34<|python_end|>It is 408.<|assistant_end|>"


def test_truncation_warns_and_cuts(any_tokenizer):
    full = reference(any_tokenizer.enc, CONVERSATIONS[1])
    with pytest.warns(UserWarning, match="cut to 9"):
        got = render_conversation(any_tokenizer, CONVERSATIONS[1], 9)
    assert got == (full[0][:9], full[1][:9])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render_conversation(any_tokenizer, CONVERSATIONS[1], len(full[0]))  # exactly fits: no warning


@pytest.mark.parametrize("messages, field", [
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant' where 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "message 1 .after the system"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "message 2 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}],
     "message 1 part 0"),
    ([{"role": "user"}], "message 0 .user. has no 'content'"),
    ([], "non-empty list"),
])
def test_bad_conversations_name_the_message(tokenizer, messages, field):
    with pytest.raises(ValueError, match=field):
        render_conversation(tokenizer, {"messages": messages})


def test_completion_needs_an_assistant_message_last(tokenizer):
    with pytest.raises(ValueError, match="ending with the assistant"):
        render_for_completion(tokenizer, {"messages": [{"role": "user", "content": "hi"}]})
