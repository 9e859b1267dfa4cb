"""The arithmetic of GRPO (Shao et al. 2024, DeepSeekMath), with DAPO's token-level normalisation (Yu et al. 2025).

For each prompt a group of G completions is sampled and scored; a completion's advantage is its reward minus its
group's mean (optionally divided by the group's standard deviation, GRPO's eq. 3). Every sampled token of it
carries that advantage in PPO's clipped surrogate (Schulman et al. 2017):

    per token  -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta KL,   rho = pi(token) / pi_old(token)

with KL the unbiased, non-negative k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 (GRPO's
eq. 4). The loss is the sum over every sampled token of the batch divided by their number (DAPO: each token counts
the same, so long completions are not diluted). Tokens a tool forced and prompt tokens carry no loss.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """rewards (P, G), a row per prompt: reward - its row's mean, and divided by the row's std if asked."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    return advantages


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(target) under the sampling distribution softmax(logits / temperature); logits (B, T, V), targets
    (B, T). The temperature must be the one the tokens were sampled at, or the ratio is not the policy's."""
    logits = logits.float() / temperature
    return torch.gather(torch.log_softmax(logits, dim=-1), -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled by pi: zero where the two agree, never negative."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                normaliser: float, *, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0,
                ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate (plus beta KL) summed over `mask`ed tokens and divided by `normaliser` (the number of
    sampled tokens in the whole batch, so a batch split into minibatches sums to the same loss). logp, old_logp,
    ref_logp, mask (B, T); advantages (B,), one per completion. Returns (loss, statistics)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    stats = {"clipped_tokens": ((ratio.detach() != clipped.detach()).float() * mask).sum().item()}
    if kl_coef:
        if ref_logp is None:
            raise ValueError("kl_coef: a KL penalty needs the reference model's log-probabilities (ref_logp)")
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + kl_coef * kl
        stats["kl_sum"] = (kl.detach() * mask).sum().item()
    return (per_token * mask).sum() / normaliser, stats


def pass_at_k(correct: list[list[bool]], k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021, eq. 1) averaged over problems: 1 - C(n - c, k) / C(n, k)
    for a problem with c right answers among n >= k samples."""
    total = 0.0
    for samples in correct:
        n, c = len(samples), sum(samples)
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
        miss = 1.0  # C(n-c, k) / C(n, k) as a product, exact for small n
        for i in range(k):
            miss *= max(n - c - i, 0) / (n - i)
        total += 1 - miss
    return total / len(correct)
