"""Byte-level BPE: trained with rustbpe, run with tiktoken (fast batch encoding), GPT-4-style pre-split.

Saved as a pickled `tiktoken.Encoding` in `tokenizer.pkl`, the same file format nanochat uses, so a
nanochat tokenizer loads unchanged.
"""

from __future__ import annotations

import codecs
import hashlib
import pickle
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import rustbpe
import tiktoken
import torch

from ..common import adamba_home, atomic_writer

# GPT-4's split pattern with digit runs of at most two (nanochat's choice for small vocabularies).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
# Document boundary first, then the chat-turn markers (nanochat's set, so its checkpoints line up).
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding):
        self.enc = encoding
        self.bos_id = self.special_id("<|bos|>")

    # --- training and persistence -------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, name: str = "adamba") -> Tokenizer:
        """Learn merges on `texts` so that the vocabulary (bytes + merges + special tokens) is exactly
        `vocab_size`; raises ValueError if that is impossible."""
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size: {vocab_size!r} is too small; a byte-level BPE needs 256 byte tokens "
                             f"plus {len(SPECIAL_TOKENS)} special tokens, so at least {MIN_VOCAB}")
        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), n_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(piece): rank for piece, rank in trainer.get_mergeable_ranks()}
        if len(ranks) != n_ranks:
            raise ValueError(f"vocab_size: the corpus is too small for {vocab_size} tokens: it only supports "
                             f"{len(ranks) + len(SPECIAL_TOKENS)}; use a smaller vocab_size or more text")
        special = {tok: n_ranks + i for i, tok in enumerate(SPECIAL_TOKENS)}
        return cls(tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special))

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "tokenizer.pkl"
        with atomic_writer(path) as f:
            pickle.dump(self.enc, f)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.pkl` (a file, or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.pkl"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path}; train one with `adamba tokenizer train`")
        try:
            with open(path, "rb") as f:
                enc = pickle.load(f)
        except Exception as err:
            raise ValueError(f"{path} is not a readable tokenizer file: {err}") from None
        if not isinstance(enc, tiktoken.Encoding):
            raise ValueError(f"{path} holds a {type(enc).__name__}, not a tiktoken Encoding")
        if "<|bos|>" not in enc.special_tokens_set:
            raise ValueError(f"{path}: the tokenizer has no <|bos|> special token")
        return cls(enc)

    # --- encoding -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def special_id(self, token: str) -> int:
        return self.enc.encode_single_token(token)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.enc._special_tokens.values())

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], bos: bool = False, num_threads: int = 4) -> list[list[int]]:
        batch = self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [[self.bos_id, *ids] for ids in batch] if bos else batch

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Text pieces as token ids arrive; a character whose bytes span several tokens comes out whole."""
        decoder = self.incremental_decoder()
        for i in ids:
            piece = self.token_piece(decoder, i)
            if piece:
                yield piece
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def incremental_decoder(self) -> codecs.IncrementalDecoder:
        """A UTF-8 decoder for token bytes fed one token at a time (`token_piece`)."""
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token_piece(self, decoder: codecs.IncrementalDecoder, token: int) -> str:
        """The text one more token completes (possibly ""), for a caller that pushes tokens as they come."""
        return decoder.decode(self.enc.decode_single_token_bytes(token))

    @cached_property
    def token_bytes(self) -> torch.Tensor:
        """UTF-8 byte length of each token id; special tokens count 0 bytes (they are not text)."""
        special = set(self.enc._special_tokens.values())
        return torch.tensor([0 if i in special else len(self.enc.decode_single_token_bytes(i))
                             for i in range(self.vocab_size)], dtype=torch.int64)

    @cached_property
    def fingerprint(self) -> str:
        """Short hash of the vocabulary, to key caches of token ids made with this tokenizer."""
        h = hashlib.sha256(self.enc._pat_str.encode())
        for piece, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(piece + rank.to_bytes(4, "little"))
        h.update(repr(sorted(self.enc._special_tokens.items())).encode())
        return h.hexdigest()[:12]


def compression(tokenizer: Tokenizer, texts: Iterator[str]) -> tuple[int, int]:
    """(bytes, tokens) over texts: bytes per token measures how well the tokenizer compresses them."""
    n_bytes = n_tokens = 0
    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(tokenizer.encode(text))
    return n_bytes, n_tokens


def tokenizer_dir(name: str) -> Path:
    return adamba_home() / "tokenizers" / name
