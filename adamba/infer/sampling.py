"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p and min-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p (Holtzman et al. 2019)
    min_p: float | None = None  # keep tokens at least min_p times as likely as the most likely one

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def sampled_vocab(model, tokenizer) -> int | None:
    """How many ids may be sampled, where the model's vocabulary is padded past its tokenizer's (nanochat rounds it up
    to a multiple of 64 for fast matmuls; ids past the tokenizer's could not be decoded); None: every id."""
    padded = tokenizer is not None and model.config.vocab_size > tokenizer.vocab_size
    return tokenizer.vocab_size if padded else None


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from (..., V): temperature, top-k, min-p and top-p applied, renormalised
    (speculative decoding compares two such distributions). Not for greedy decoding (temperature 0)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p is not None:
        probs = probs.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if params.top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the more likely ones before it already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p * sorted_probs.sum(-1, keepdim=True)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs / probs.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), 1, generator=generator).squeeze(-1)
