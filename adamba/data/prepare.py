"""Tokenizer and tokenized data for a training run, trained or tokenized once and cached under $ADAMBA_HOME."""

from __future__ import annotations

from pathlib import Path

from ..common import print0, wait_for_rank0
from .corpus import TEXT_FIELD, Corpus, open_corpus
from .dataset import TokenizedCorpus, split_key
from .tokenizer import Tokenizer, tokenizer_dir

TOKENIZER_TRAIN_CHARS = 2_000_000_000  # nanochat trains its tokenizer on ~2B characters


def training_texts(corpus: Corpus, val_fraction: float, max_chars: int = TOKENIZER_TRAIN_CHARS):
    """Training documents only, so the tokenizer never sees validation text."""
    seen = 0
    for doc in corpus.documents():
        if split_key(doc) < val_fraction:
            continue
        yield doc
        seen += len(doc)
        if seen >= max_chars:
            return


def default_tokenizer_name(corpus: Corpus, vocab_size: int) -> str:
    return f"{corpus.name}-{vocab_size}"


def get_tokenizer(corpus: Corpus, name: str | None, vocab_size: int, val_fraction: float) -> Tokenizer:
    """Load the named tokenizer (a name under $ADAMBA_HOME/tokenizers or a path), or train and cache one."""
    if name is not None:
        path = Path(name) if Path(name).exists() else tokenizer_dir(name)
        return Tokenizer.load(path)
    directory = tokenizer_dir(default_tokenizer_name(corpus, vocab_size))
    if not (directory / "tokenizer.pkl").exists():
        print0(f"training a {vocab_size}-token BPE tokenizer on {corpus.name} ...")
        Tokenizer.train(training_texts(corpus, val_fraction), vocab_size, directory.name).save(directory)
        print0(f"saved tokenizer to {directory}")
    return Tokenizer.load(directory)


def prepare_data(data: str, tokenizer_name: str | None, vocab_size: int, val_fraction: float,
                 rank: int = 0, progress: bool = True, text_field: str = TEXT_FIELD) -> TokenizedCorpus:
    """Rank 0 trains the tokenizer and tokenizes the corpus; the other ranks then read the caches."""
    if rank != 0:
        wait_for_rank0()
    corpus = open_corpus(data, text_field)
    tokenizer = get_tokenizer(corpus, tokenizer_name, vocab_size, val_fraction)
    tokenized = TokenizedCorpus(corpus, tokenizer, val_fraction, progress=progress and rank == 0)
    if rank == 0:
        wait_for_rank0()
    return tokenized
