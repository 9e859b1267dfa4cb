"""Sampling by full recompute: each new token re-runs the whole (cropped) sequence. Simple and exact;
the cached engine is the fast path."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V); temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, seed: int | None = None, stop_ids: set[int] | None = None) -> list[int]:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token (e.g. <|bos|>)")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    context = model.config.sequence_len
    out: list[int] = []
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(ids[:, -context:])[:, -1, :]
        nxt = sample_next(logits, temperature, top_k, generator)
        token = int(nxt.item())
        if stop_ids and token in stop_ids:
            break
        out.append(token)
        ids = torch.cat([ids, nxt], dim=1)
    model.train(was_training)
    return out


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, **kwargs) -> str:
    ids = tokenizer.encode(prompt, bos=True)
    return tokenizer.decode(generate(model, ids, max_new_tokens, stop_ids={tokenizer.bos_id}, **kwargs))
