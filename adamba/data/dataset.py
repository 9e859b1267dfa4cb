"""Token ids of a corpus, cached per shard under $ADAMBA_HOME/tokens/, with a deterministic train/val split.

Each document is stored with a leading <|bos|>. Its split is fixed by a hash of its text: a document whose
hash maps into [0, val_fraction) is validation data, whatever the shard order, the number of shards read
or the tokenizer, so validation text never leaks into training when a corpus grows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from ..common import adamba_home, atomic_writer
from .corpus import Corpus
from .tokenizer import Tokenizer

ENCODE_BATCH = 256  # documents per tiktoken batch


def split_key(text: str) -> float:
    """A number in [0, 1) fixed by the document's text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") / 2**64


@dataclass
class TokenShard:
    tokens: np.ndarray  # all documents' ids, each document starting with <|bos|>
    offsets: np.ndarray  # document i is tokens[offsets[i]:offsets[i + 1]]
    keys: np.ndarray  # split_key of each document

    def documents(self, mask: np.ndarray) -> list[np.ndarray]:
        return [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in np.flatnonzero(mask)]


def _tokenize_shard(docs: list[str], tokenizer: Tokenizer) -> TokenShard:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    pieces, lengths = [], []
    for start in range(0, len(docs), ENCODE_BATCH):
        for ids in tokenizer.encode_batch(docs[start:start + ENCODE_BATCH], bos=True):
            pieces.append(np.asarray(ids, dtype=dtype))
            lengths.append(len(ids))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenShard(tokens, offsets, np.array([split_key(d) for d in docs], dtype=np.float64))


class TokenizedCorpus:
    """The corpus's shards as token ids; tokenized once, then read from the cache."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, val_fraction: float = 0.05,
                 progress: bool = True):
        self.corpus, self.tokenizer, self.val_fraction = corpus, tokenizer, val_fraction
        self.cache_dir = adamba_home() / "tokens" / corpus.name / tokenizer.fingerprint
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.paths = [self.cache_dir / f"shard_{i:05d}_{key}.npz" for i, key in enumerate(corpus.shard_keys)]
        todo = [i for i, p in enumerate(self.paths) if not p.exists()]
        for i in tqdm(todo, desc=f"tokenizing {corpus.name}", unit="shard", disable=not progress or not todo):
            shard = _tokenize_shard(corpus.read_shard(i), tokenizer)
            with atomic_writer(self.paths[i]) as f:  # a cache file that exists is complete
                np.savez(f, tokens=shard.tokens, offsets=shard.offsets, keys=shard.keys)
        self._threshold = self._val_threshold()

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, i: int, *names: str):
        try:
            with np.load(self.paths[i]) as f:  # an .npz reads only the members asked for
                arrays = [f[name] for name in names]
        except Exception as err:
            raise ValueError(f"token cache {self.paths[i]} is unreadable ({err}); delete it to re-tokenize") \
                from None
        return arrays[0] if len(arrays) == 1 else arrays

    def shard(self, i: int) -> TokenShard:
        return TokenShard(*self._read(i, "tokens", "offsets", "keys"))

    def _val_threshold(self) -> float:
        """val_fraction, raised just enough to hold out one document if the corpus is tiny."""
        if self.val_fraction == 0:
            return 0.0
        keys = [self._read(i, "keys") for i in range(len(self))]
        smallest = min((float(k.min()) for k in keys if len(k)), default=1.0)
        return max(self.val_fraction, np.nextafter(smallest, 1.0))

    def split_documents(self, i: int, split: str) -> list[np.ndarray]:
        shard = self.shard(i)
        is_val = shard.keys < self._threshold
        return shard.documents(is_val if split == "val" else ~is_val)
