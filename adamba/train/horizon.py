"""nanochat's training horizon from the depth dial (scripts/base_train.py, since January 2026): how many tokens to
train on, in batches of what size, at what learning rates and weight decay.

- Tokens: D = target_param_data_ratio x N, N the "scaling parameters" -- the matrices inside the blocks and the
  lm_head (not the token embeddings, value embeddings, scalars, norms or gates' biases), the count nanochat found
  to give the cleanest scaling laws. nanochat's ratio is 12 (Chinchilla's is 20).
- Batch (with total_batch_size = -1): B = B_ref (D / D_ref)^0.383, rounded to a power of two (Bergsma et al. 2025,
  "Power Lines", arXiv:2505.13738: B_opt grows as D^0.383), where B_ref = 2^19 tokens is the batch nanochat measured
  best for its d12 reference model and D_ref that model's horizon at the same ratio. We then round B up to a
  multiple of one micro-step over all ranks (device_batch_size x sequence_len x world_size).
- Learning rates x sqrt(B / B_ref) (the square-root rule for Adam, which nanochat also applies to Muon), and weight
  decay lambda x sqrt(B / B_ref) x D_ref / D, which keeps the AdamW timescale B / (eta lambda D) of Wang & Aitchison
  2024 (arXiv:2405.13698) constant. Both only with the automatic batch: a batch the user chose keeps the user's
  learning rates and weight decay.

The reference model is nanochat's d12 (a transformer, width 768 at head size 128) at the run's vocabulary and
sequence length, whatever the run's own blocks are: B_ref and D_ref were measured there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..config import ModelConfig, TrainConfig
from ..model import AdambaLM
from .optim import LEARNING_RATES

REFERENCE_DEPTH = 12
REFERENCE_BATCH = 2 ** 19  # tokens
BATCH_EXPONENT = 0.383


def scaling_params(config: ModelConfig) -> int:
    """N: the block matrices (Muon's parameters) and the lm_head."""
    with torch.device("meta"):
        model = AdambaLM(config)
    return sum(p.numel() for p in model.param_groups()["matrix"]) + model.lm_head.weight.numel()


def reference_config(config: ModelConfig) -> ModelConfig:
    return ModelConfig(depth=REFERENCE_DEPTH, sequence_len=config.sequence_len, vocab_size=config.vocab_size)


@dataclass(frozen=True)
class Horizon:
    params: int  # N
    tokens: int  # D
    reference_tokens: float  # D_ref
    batch: int
    auto_batch: bool
    iterations: int
    lr_scale: float
    weight_decay: float

    def describe(self) -> str:
        batch = f"batch {self.batch:,} tokens" + (" (automatic: B_ref (D / D_ref)^0.383)" if self.auto_batch else "")
        scaled = f"; learning rates x {self.lr_scale:.4f}, weight decay {self.weight_decay:.4g}" \
            if self.auto_batch else ""
        return (f"horizon: {self.tokens:,} tokens = ratio x {self.params:,} scaling parameters (D_ref "
                f"{self.reference_tokens:,.0f}); {batch}; {self.iterations:,} steps{scaled}")


def plan_horizon(model_config: ModelConfig, config: TrainConfig, world_size: int = 1) -> Horizon | None:
    """The horizon `config` asks for (None: a fixed num_iterations, target_param_data_ratio = 0)."""
    ratio = config.target_param_data_ratio
    if ratio <= 0:
        return None
    params = scaling_params(model_config)
    tokens = int(ratio * params)
    reference_tokens = ratio * scaling_params(reference_config(model_config))
    auto = config.total_batch_size == -1
    batch = config.total_batch_size
    lr_scale, weight_decay = 1.0, config.weight_decay
    if auto:
        batch = 2 ** round(math.log2(REFERENCE_BATCH * (tokens / reference_tokens) ** BATCH_EXPONENT))
        micro = config.device_batch_size * model_config.sequence_len * world_size
        batch = max(1, math.ceil(batch / micro)) * micro
        lr_scale = math.sqrt(batch / REFERENCE_BATCH)
        weight_decay = config.weight_decay * lr_scale * reference_tokens / tokens
    return Horizon(params, tokens, reference_tokens, batch, auto, max(1, tokens // batch), lr_scale, weight_decay)


def apply_horizon(config: TrainConfig, horizon: Horizon | None) -> TrainConfig:
    """`config` with the horizon's batch, steps, learning rates and weight decay."""
    if horizon is None:
        return config
    rates = {name: getattr(config, name) * horizon.lr_scale for name in LEARNING_RATES}
    return dataclasses.replace(config, total_batch_size=horizon.batch, num_iterations=horizon.iterations,
                               weight_decay=horizon.weight_decay, **rates)
