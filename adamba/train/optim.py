"""Optimizers as in nanochat: Muon for the 2-D matrices inside blocks, AdamW for everything else.

Muon (Jordan et al. 2024) orthogonalises each matrix's momentum with a Newton-Schulz iteration; we use
torch's implementation with the original shape-dependent step scale sqrt(max(1, rows/cols)). Embedding and
lm_head learning rates are scaled by (d_model/768)^-0.5, nanochat's rule for transferring them across widths.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig

MUON_MOMENTUM = 0.95
MUON_WARMUP_MOMENTUM = 0.85  # momentum ramps from here to MUON_MOMENTUM over the first steps
MUON_MOMENTUM_WARMUP_STEPS = 300


def build_optimizers(model, config: TrainConfig) -> list[torch.optim.Optimizer]:
    # Frozen parameters (a training stage, train/stages.py) get no optimizer state at all
    groups = {name: [p for p in params if p.requires_grad] for name, params in model.param_groups().items()}
    scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        {"params": groups["unembedding"], "lr": config.unembedding_lr * scale},
        {"params": groups["embedding"], "lr": config.embedding_lr * scale},
    ]
    if groups["scalar"]:
        adam_groups.append({"params": groups["scalar"], "lr": config.scalar_lr})
    if groups["no_decay"]:
        adam_groups.append({"params": groups["no_decay"], "lr": config.scalar_lr, "weight_decay": 0.0})
    if groups.get("adaptive"):  # exit / expansion gates and the width predictor (model/exits.py)
        adam_groups.append({"params": groups["adaptive"], "lr": config.adaptive_lr, "weight_decay": 0.0})
    adam_groups = [group for group in adam_groups if group["params"]]
    fused = next(model.parameters()).device.type == "cuda"
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=config.weight_decay, fused=fused)
    ] if adam_groups else []
    if groups["matrix"]:
        optimizers.append(torch.optim.Muon(groups["matrix"], lr=config.matrix_lr, momentum=MUON_MOMENTUM,
                                           weight_decay=config.weight_decay, adjust_lr_fn="original"))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warmup, constant, then linear warmdown to final_lr_frac (nanochat's trapezoid)."""
    n = config.num_iterations
    warmup = round(config.warmup_ratio * n)
    warmdown = round(config.warmdown_ratio * n)
    if step < warmup:
        return (step + 1) / warmup
    if step <= n - warmdown:
        return 1.0
    progress = (n - step) / warmdown
    return progress + (1 - progress) * config.final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * MUON_WARMUP_MOMENTUM + frac * MUON_MOMENTUM


def set_schedule(optimizers: list[torch.optim.Optimizer], step: int, config: TrainConfig) -> float:
    mult = lr_multiplier(step, config)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
        if isinstance(opt, torch.optim.Muon):
            for group in opt.param_groups:
                group["momentum"] = muon_momentum(step)
    return mult
