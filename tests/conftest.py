"""Hermetic fixtures: a temporary $ADAMBA_HOME per test, a small seeded corpus and tokenizer, tiny models."""

from __future__ import annotations

import random

import pytest
import torch

# One thread per test process: tests start subprocesses (torchrun, kill/resume), and several multi-threaded
# torch processes on two cores slow each other down many times over.
torch.set_num_threads(1)
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

WORDS = ("the king queen lord lady castle sword crown night day love war peace speak hear see go come thou thee "
         "my mine our good ill fair foul sweet bitter heaven earth fire water death life prince duke father mother "
         "brother sister daughter son friend enemy ghost witch storm sea ship island forest garden tower gate "
         "honour glory shame grief joy fortune nature reason madness wisdom folly heart blood tears gold silver "
         "horse hound falcon raven rose thorn summer winter morning evening yesterday tomorrow swear pray weep "
         "laugh fight flee sleep dream wake remember forget betray forgive command obey whisper").split()


def make_documents(n_docs: int = 120, seed: int = 0) -> list[str]:
    """Seeded pseudo-English: sentences of a small vocabulary, so BPE has real structure to learn."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                     for _ in range(rng.randint(3, 15))]
        docs.append(" ".join(sentences) + "\n")
    return docs


@pytest.fixture(autouse=True)
def adamba_home(tmp_path, monkeypatch):
    home = tmp_path / "adamba_home"
    monkeypatch.setenv("ADAMBA_HOME", str(home))
    torch.manual_seed(0)
    return home


@pytest.fixture
def corpus_dir(tmp_path):
    """A local corpus of .jsonl files (two shards)."""
    import json

    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = make_documents()
    for i, chunk in enumerate((docs[:60], docs[60:])):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in chunk))
    return folder


@pytest.fixture
def tokenizer():
    from adamba.data.tokenizer import Tokenizer

    return Tokenizer.train(make_documents(), 512, "test")


def tiny_config(**overrides):
    from adamba import ModelConfig

    fields = dict(vocab_size=512, n_layer=2, n_embd=64, n_head=4, sequence_len=32)
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_train_config(corpus_dir, **overrides):
    from adamba import TrainConfig

    fields = dict(run_name="test", data=str(corpus_dir), tokenizer_vocab_size=512, device_batch_size=4,
                  total_batch_size=4 * 32, num_iterations=4, eval_every=0, eval_tokens=256, device="cpu",
                  val_fraction=0.1)
    fields.update(overrides)
    return TrainConfig(**fields)


class Killed(Exception):
    """Stands for the process dying (tests that kill a run in-process)."""


def straight_and_resumed_losses(model_config, corpus_dir, monkeypatch, *, kill_after: int, **train_overrides):
    """{step: loss} of an uninterrupted run, and of the same run killed right after step `kill_after`'s checkpoint
    and resumed (in-process: trainer.save_checkpoint raises once that checkpoint is written)."""
    import json

    from adamba.checkpoint import run_dir
    from adamba.train import trainer

    def losses(run: str) -> dict[int, float]:
        lines = (run_dir(run) / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    trainer.train(model_config, tiny_train_config(corpus_dir, run_name="straight", **train_overrides), progress=False)
    save = trainer.save_checkpoint

    def save_then_die(*args, step: int, **kwargs):
        path = save(*args, step=step, **kwargs)
        if step == kill_after:
            raise Killed
        return path

    killed = tiny_train_config(corpus_dir, run_name="killed", **train_overrides)
    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        trainer.train(model_config, killed, progress=False)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    trainer.train(model_config, killed, resume=True, progress=False)
    return losses("straight"), losses("killed")
