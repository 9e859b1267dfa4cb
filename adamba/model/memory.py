"""Per-GPU memory of training a model under DDP and under FSDP (`adamba plan memory`).

Counted exactly from the model's parameter groups (the optimizer each parameter gets, train/optim.py):
- weights: float32 master copies, 4 B a parameter (adamba keeps float32 parameters and autocasts to bf16);
- gradients: float32, 4 B a parameter;
- optimizer state: AdamW's two moments (8 B) for embeddings, lm_head, scalars and gates; Muon's momentum (4 B) for
  block matrices, and with the polar step NorMuon's second moment, one float per neuron of each matrix (along its
  longer side, train/muon.py's neuron_dim).
DDP holds all of it on every GPU. FSDP (fully_shard, every block a unit) holds 1/N of it, plus what is gathered
while one unit runs: its parameters (attention blocks in the compute dtype, Mamba blocks in float32:
train/fsdp.py), twice (the running unit and the prefetched next), and
for Muon's whole-matrix step the largest matrix's gradient and momentum at float32 on its owner.

Estimated, not counted: activations saved for backward, per micro-batch of device_batch_size x sequence_len
tokens at the compute dtype -- an attention block's 34 s b h bytes at 16 bits (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", eq. 2 with flash attention, which drops its 5 a s^2 b
term; scaled by the dtype and the MLP width), a Mamba block's saved inputs and outputs of its projections, conv
and scan (the tensors its backward reads), and the float32 logits and their softmax (2 x 4 B x vocab a token).
With --activation-checkpointing: each block's input, and one block's activations at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ATTENTION, MAMBA, MAMBA2, ModelConfig, TrainConfig
from .mamba import dt_rank_for
from .model import AdambaLM

GIB = 1024 ** 3
ADAM_GROUPS = ("embedding", "unembedding", "scalar", "no_decay", "adaptive")


@dataclass(frozen=True)
class MemoryPlan:
    gpus: int
    params: int
    weights: float  # bytes per GPU under DDP (all of them)
    gradients: float
    optimizer: float
    activations: float  # an estimate, per micro-batch
    gathered: float  # FSDP's transient full-size buffers per GPU

    def ddp(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.activations}

    def fsdp(self) -> dict[str, float]:
        n = self.gpus
        return {"weights": self.weights / n, "gradients": self.gradients / n, "optimizer": self.optimizer / n,
                "activations": self.activations, "gathered": self.gathered}

    def table(self, gpu_memory_gib: float) -> str:
        rows = [("DDP", self.ddp()), (f"FSDP over {self.gpus}", self.fsdp())]
        keys = ["weights", "gradients", "optimizer", "activations", "gathered"]
        lines = ["| per GPU (GiB) | " + " | ".join(keys) + " | total | fits in " + f"{gpu_memory_gib:g} GiB |",
                 "|---|" + "---:|" * (len(keys) + 2)]
        for name, parts in rows:
            total = sum(parts.values())
            cells = [f"{parts[k] / GIB:.2f}" if k in parts else "-" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {total / GIB:.2f} | "
                         f"{'yes' if total <= gpu_memory_gib * GIB else 'no'} |")
        return "\n".join(lines)


def _optimizer_bytes(groups: dict[str, list[torch.Tensor]], polar: bool) -> float:
    adam = sum(p.numel() for name in ADAM_GROUPS for p in groups.get(name, ()))
    matrices = groups.get("matrix", [])
    muon = sum(p.numel() for p in matrices)
    second = sum(max(p.shape) for p in matrices) if polar else 0
    return 8.0 * adam + 4.0 * (muon + second)


def activation_bytes(config: ModelConfig, tokens: int, dtype_bytes: int, checkpointed: bool = False) -> float:
    """Saved-for-backward bytes of one micro-batch of `tokens` tokens (module docstring: an estimate). With
    activation checkpointing (train/fsdp.py) each block keeps only its input, and one block at a time holds its own
    activations again while the backward recomputes it."""
    blocks = _block_activations(config, tokens, dtype_bytes)
    kept = len(blocks) * tokens * config.n_embd * dtype_bytes + max(blocks) if checkpointed else sum(blocks)
    return kept + 2 * 4.0 * tokens * config.vocab_size  # float32 logits and their softmax


def _block_activations(config: ModelConfig, tokens: int, dtype_bytes: int) -> list[float]:
    d = config.n_embd
    out = []
    for kind in config.block_pattern:
        total = 0.0
        if kind == ATTENTION:
            # Korthikanti's 34 = 11 (attention, 16-bit) + 19 (MLP of 4d, 16-bit) + 4 (two masks / norms); ours:
            # the same terms at this dtype and MLP width
            total += tokens * d * (11 + 19 * config.mlp_ratio / 4) * dtype_bytes / 2 + 4 * tokens * d
        elif kind == MAMBA:
            inner, rank, n = config.mamba_expand * d, dt_rank_for(d, config.mamba_dt_rank), config.mamba_d_state
            # norm input, in_proj out (x, z), conv out, x_proj out (dt, B, C), dt, scan out, gated out
            total += tokens * (d + 2 * inner + inner + rank + 2 * n + inner + inner + inner) * dtype_bytes
        elif kind == MAMBA2:
            inner, g, n = config.mamba2_expand * d, config.mamba2_ngroups, config.mamba2_d_state
            heads = inner // config.mamba2_headdim
            # norm input, in_proj out (z, xBC, dt), conv out (xBC), scan out, gated-norm out
            total += tokens * (d + 2 * (inner + 2 * g * n) + heads + inner + 2 * g * n + inner + inner) * dtype_bytes
        if kind != ATTENTION and config.mamba_use_mlp:
            total += tokens * d * 19 * config.mlp_ratio / 4 * dtype_bytes / 2
        out.append(total)
    return out


def plan_memory(model_config: ModelConfig, train_config: TrainConfig, gpus: int,
                compute_bytes: int = 2) -> MemoryPlan:
    """The per-GPU bytes of training `model_config` on `gpus` GPUs (compute_bytes: 2 for bf16 autocast)."""
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus: must be a positive integer, got {gpus!r}")
    with torch.device("meta"):  # shapes only: planning allocates nothing
        model = AdambaLM(model_config)
    groups = model.param_groups()
    params = sum(p.numel() for p in model.parameters())
    blocks = [(compute_bytes if block.kind == ATTENTION else 4) * sum(p.numel() for p in block.parameters())
              for block in model.blocks]
    largest = max((p.numel() for p in groups.get("matrix", [])), default=0)
    gathered = 2 * max(blocks, default=0) + 2 * 4.0 * largest
    return MemoryPlan(gpus, params, 4.0 * params, 4.0 * params,
                      _optimizer_bytes(groups, train_config.muon == "polar"),
                      activation_bytes(model_config, train_config.device_batch_size * model_config.sequence_len,
                                       compute_bytes, train_config.activation_checkpointing), gathered)
