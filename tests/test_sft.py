"""Supervised fine-tuning: packed conversation rows, loss only on the assistant, nanochat's schedule, exact resume."""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import WORDS, tiny_config, tiny_train_config

from adamba.chat.render import render_conversation
from adamba.checkpoint import load_checkpoint, run_dir
from adamba.config import SFT_TRAIN_DEFAULTS, SFTConfig, TrainConfig
from adamba.data.conversations import ConversationLoader
from adamba.train.optim import lr_multiplier
from adamba.train.sft import sft, sft_train_config
from adamba.train.trainer import train


def echo_conversations(n: int, seed: int = 0) -> list[dict]:
    """'say X Y' -> 'X Y': short conversations of varied lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
        out.append({"messages": [{"role": "user", "content": f"say {words}"},
                                 {"role": "assistant", "content": words}]})
    return out


def whole(tokenizer):
    return lambda c: render_conversation(tokenizer, c, math.inf)


def test_rows_hold_whole_conversations_and_targets_only_the_assistant(tokenizer):
    conversations = echo_conversations(40)
    loader = ConversationLoader(conversations, whole(tokenizer), 2, 32, pad_id=tokenizer.bos_id, seed=3)
    rendered = [render_conversation(tokenizer, c, math.inf) for c in conversations]
    # every conversation appears exactly once per epoch, unsplit; the rest of a row is padding (bos, mask 0)
    unused = [(list(i), list(m)) for i, m in rendered]
    for row in loader.rows(0):
        ids, mask, p = row[0].tolist(), row[1].tolist(), 0
        assert ids[0] == tokenizer.bos_id
        while p < len(ids):
            match = next((r for r in unused if ids[p:p + len(r[0])] == r[0] and mask[p:p + len(r[0])] == r[1]), None)
            if match is None:
                assert (ids[p], mask[p]) == (tokenizer.bos_id, 0), "neither a whole conversation nor padding"
                p += 1
            else:
                unused.remove(match)
                p += len(match[0])
    assert unused == []
    # targets: the next token where the mask is 1, else -1 (hand rule, applied to the packed row)
    x, y = next(loader)
    row = loader.rows(0)[0]
    want = [int(row[0, t + 1]) if row[1, t + 1] == 1 else -1 for t in range(32)]
    assert y[0].tolist() == want and x[0].tolist() == row[0, :32].tolist()
    # rows are a pure function of (seed, epoch); ranks share them out without overlap
    again = ConversationLoader(conversations, whole(tokenizer), 2, 32, pad_id=tokenizer.bos_id, seed=3)
    assert np.array_equal(again.rows(1), loader.rows(1)) and not np.array_equal(loader.rows(0), loader.rows(1))
    ranks = [ConversationLoader(conversations, whole(tokenizer), 1, 32, pad_id=tokenizer.bos_id, seed=3, rank=r,
                                world_size=2) for r in range(2)]
    first = [next(r)[0][0].tolist() for r in ranks]
    assert first == [loader.rows(0)[0, 0, :32].tolist(), loader.rows(0)[1, 0, :32].tolist()]


def test_conversations_without_an_assistant_token_in_the_context_are_dropped_not_nan(tokenizer):
    long_user = {"messages": [{"role": "user", "content": " ".join(WORDS)}, {"role": "assistant", "content": "ok"}]}
    conversations = echo_conversations(30) + [long_user] * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = ConversationLoader(conversations, whole(tokenizer), 2, 32, pad_id=tokenizer.bos_id)
    messages = " ".join(str(w.message) for w in caught)
    assert loader.dropped == 3 and "3 conversations had no assistant token" in messages and "truncated" in messages
    for _ in range(loader.batches_in(0)):
        _, y = next(loader)
        assert bool((y != -1).any(dim=1).all())  # every row has something to learn: the loss is never 0/0
    with pytest.raises(ValueError, match="none of the 3 conversations has an assistant token"):
        ConversationLoader([long_user] * 3, whole(tokenizer), 2, 32, pad_id=tokenizer.bos_id)


def test_the_schedule_is_nanochats_linear_decay_at_a_fraction_of_the_rates():
    config = TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS})
    tuned = sft_train_config(SFTConfig(base="x", init_lr_frac=0.02), config, steps=10)
    assert tuned.matrix_lr == pytest.approx(0.02 * config.matrix_lr)
    assert tuned.embedding_lr == pytest.approx(0.02 * config.embedding_lr) and tuned.num_iterations == 10
    assert [lr_multiplier(s, tuned) for s in range(10)] == pytest.approx([(10 - s) / 10 for s in range(10)])


@pytest.fixture
def base(corpus_dir):
    train(tiny_config(), tiny_train_config(corpus_dir, run_name="base", num_iterations=2), progress=False)
    return "base"


def test_sft_resumed_midway_equals_the_uninterrupted_run_and_learns_the_echo(base):
    conversations, held_out = echo_conversations(64), echo_conversations(16, seed=1)
    common = dict(device_batch_size=2, total_batch_size=2 * 32, eval_every=3, device="cpu", seed=5)
    straight = sft(SFTConfig(base=base, num_iterations=6, init_lr_frac=1.0),
                   TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, **common, "run_name": "straight"}),
                   conversations, held_out, progress=False)
    sft(SFTConfig(base=base, num_iterations=6, init_lr_frac=1.0),
        TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, **common, "run_name": "halves", "save_every": 3}),
        conversations, held_out, progress=False)
    # keep only the step-3 checkpoint, as if the run had been killed after it, and resume
    final = load_checkpoint(run_dir("halves")).path
    for p in final.iterdir():
        p.unlink()
    final.rmdir()
    resumed = sft(SFTConfig(base=base, num_iterations=6, init_lr_frac=1.0),
                  TrainConfig.from_dict({**SFT_TRAIN_DEFAULTS, **common, "run_name": "halves", "save_every": 3}),
                  conversations, held_out, resume=True, progress=False)
    a, b = load_checkpoint(run_dir("straight")).model, load_checkpoint(run_dir("halves")).model
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    losses = {r["step"]: r["val_loss"] for r in straight.metrics if "val_loss" in r}
    assert losses[6] < losses[0]  # the held-out echo loss falls
    assert [r["step"] for r in resumed.metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]
