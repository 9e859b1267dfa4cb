"""Optimizers as in nanochat: Muon for the 2-D matrices inside blocks, AdamW for everything else.

Muon (Jordan et al. 2024) orthogonalises each matrix's momentum with a Newton-Schulz iteration (`--muon classic`,
the default; `--muon polar` is today's step, train/muon.py); we use
torch's implementation with the original shape-dependent step scale sqrt(max(1, rows/cols)), except that off
CUDA the iteration runs in float32 (`Muon` below). Embedding and
lm_head learning rates are scaled by (d_model/768)^-0.5, nanochat's rule for transferring them across widths.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.distributed.tensor import DTensor

from ..config import TrainConfig
from .fsdp import shard_like, whole
from .muon import PolarMuon

LEARNING_RATES = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "adaptive_lr")
MUON_MOMENTUM = 0.95
MUON_WARMUP_MOMENTUM = 0.85  # momentum ramps from here to MUON_MOMENTUM over the first steps
MUON_MOMENTUM_WARMUP_STEPS = 300


class Muon(torch.optim.Muon):
    """torch's Muon; on CUDA unchanged, elsewhere the same update with the Newton-Schulz iteration in float32.

    torch (like Jordan's reference) casts the momentum to bfloat16 for the iteration, which is what tensor
    cores want. A CPU without native bf16 matmul (AVX2 only) emulates it: there the five quintic steps on a
    256 x 1024 matrix took 0.80 s in bf16 against 0.04 s in float32, and Muon's step was 9 of a training step's
    10 s (BENCHMARKS.md, "Muon on CPU"). float32 is also the more exact orthogonalisation. Same state
    ("momentum_buffer") and hyperparameters, so checkpoints move freely between devices.
    """

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        if any(p.is_cuda for p in params) and not any(isinstance(p, DTensor) for p in params):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            momentum, lr = group["momentum"], group["lr"]
            for param, grad, buf in zip(params, grads, buffers, strict=True):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                # whole matrices under FSDP (fsdp.py): gathered, orthogonalised, this rank's rows kept
                update = shard_like(newton_schulz_float32(whole(update), group["ns_coefficients"], group["ns_steps"],
                                                          group["eps"]), param)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * muon_lr_scale(param.shape, group["adjust_lr_fn"]))
        return loss


def newton_schulz_float32(grad: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """The quintic iteration X <- aX + (bA + cA^2)X, A = XX^T (Jordan et al. 2024), on the wide orientation."""
    a, b, c = coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius norm >= spectral norm, so the iteration starts inside (0, 1]
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(grad.dtype)


def muon_lr_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch's step-size adjustment: "original" sqrt(max(1, rows/cols)), "match_rms_adamw" 0.2 sqrt(max dim)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


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
    if groups["matrix"] and config.muon == "polar":
        optimizers.append(PolarMuon(groups["matrix"], lr=config.matrix_lr, momentum=MUON_MOMENTUM,
                                    weight_decay=config.weight_decay, beta2=config.muon_beta2,
                                    equilibrate=config.muon_equilibrate, renormalise=config.muon_renormalise,
                                    cautious=config.muon_cautious_wd))
    elif groups["matrix"]:
        optimizers.append(Muon(groups["matrix"], lr=config.matrix_lr, momentum=MUON_MOMENTUM,
                                weight_decay=config.weight_decay, adjust_lr_fn="original"))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def describe_muon(config: TrainConfig) -> str:
    if config.muon == "classic":
        return "Muon: classic (Newton-Schulz quintic, decoupled weight decay)"
    options = [f"NorMuon beta2={config.muon_beta2:g}" if config.muon_beta2 else "no NorMuon",
               "MuonEq" if config.muon_equilibrate else "no MuonEq", "Muon+" if config.muon_renormalise else "no Muon+",
               "cautious weight decay" if config.muon_cautious_wd else "plain weight decay"]
    return f"Muon: polar (Polar Express, {', '.join(options)})"


def fine_tuning_config(config: TrainConfig, init_lr_frac: float, steps: int) -> TrainConfig:
    """`config` with every learning rate times init_lr_frac and the schedule over `steps` (SFT and RL start from a
    trained model at a fraction of the pretraining rates, as nanochat does)."""
    scaled = {name: getattr(config, name) * init_lr_frac for name in LEARNING_RATES}
    return dataclasses.replace(config, num_iterations=steps, **scaled)


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
        if isinstance(opt, (torch.optim.Muon, PolarMuon)):
            for group in opt.param_groups:
                group["momentum"] = muon_momentum(step)
    return mult
