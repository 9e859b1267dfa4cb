"""FSDP2 (`--fsdp`, under torchrun): each rank holds 1/N of every parameter, gradient and optimizer state, for
models whose ~16 bytes a parameter DDP cannot fit on one GPU (model/memory.py says which fits).

- Sharding: every block is one `fully_shard` unit, the rest (embeddings, lm_head, scalars, loop, heads) the root
  unit; a unit's parameters are gathered for its forward and backward, then freed. Mixed precision: master
  weights float32 on their shards, gradients reduce-scattered in float32; attention blocks (only matrices, which
  autocast multiplies in bf16 anyway) are gathered in the compute dtype, Mamba blocks and the root in float32:
  gathered in bf16, Mamba's A_log, D and dt bias would be rounded before the scans that need them in float32,
  and the head computes its logits in float32.
- Muon needs whole matrices (its orthogonalisation is not elementwise): `whole` all-gathers a matrix's update on
  every rank, each rank orthogonalises it, and `shard_like` keeps the rank's own rows (a local slice, no
  communication). Every rank so repeats every matrix's iteration; the alternative, one owner rank per matrix and a
  scatter of its result, saves that compute for a second collective, and is left for when profiles show it.
  AdamW is elementwise and runs on the shards as they are.
- Activation checkpointing (`--activation-checkpointing`, with or without FSDP): `checkpoint_blocks`.
- Decoding (samples, fine-tuning's chat evaluation): every forward of a sharded model is a collective, so ranks
  decoding different prompts, or stopping at different steps, would wait on each other for ever. `inference_copy`
  gathers the weights once into an ordinary model on each rank (4 bytes a parameter, against training's ~16 split
  over the ranks), which then decodes alone as a single process does.
- Checkpoints: every rank writes its shards of the weights and optimizer states (torch.distributed.checkpoint)
  into the checkpoint's shards/ folder; rank 0 adds the rest (configs, loader, every rank's RNG, tokenizer) and
  renames the folder into place. DCP reshards on load, so any number of ranks -- one included, without FSDP --
  loads or resumes it, and `adamba export unsharded` writes it as the ordinary one-file checkpoint.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate

from ..checkpoint import read_shards
from ..config import ATTENTION
from ..model import AdambaLM


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Shard `model` in place: one unit per block, then the root. Rank 0's weights first go to every rank (as DDP
    does when it wraps a model): each rank initialised its own from its own seed."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    low = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                               reduce_dtype=torch.float32)
    full = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=low if block.kind == ATTENTION else full)
    fully_shard(model, mp_policy=full)
    return model


def inference_copy(model: AdambaLM) -> AdambaLM:
    """An ordinary (unsharded) copy of a sharded model on this rank, in eval mode, for decoding without collectives;
    gathering it is a collective, so every rank calls this together. An unsharded model is returned as it is."""
    if not isinstance(model, FSDPModule):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    device = next(iter(state.values())).device
    copy = AdambaLM.build(model.config, device)
    copy.load_state_dict(state)
    if model.adaptive_heads is not None:  # calibrated exit thresholds are an attribute, not a weight
        copy.adaptive_heads.thresholds = model.adaptive_heads.thresholds
    return copy.eval()


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing (`--activation-checkpointing`): each block keeps only its input for the backward,
    which recomputes the rest (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): activation
    memory of one block instead of all, for about one more forward. Training passes only; decoding (a cache) and
    no-grad passes run the block as it is. Applied to the forward, so parameter names, hooks and FSDP units are
    unchanged."""
    for block in model.blocks:
        block.forward = functools.partial(_recomputed, block.forward)


def _recomputed(forward, x: torch.Tensor, ctx) -> torch.Tensor:
    if not torch.is_grad_enabled() or ctx.cache is not None:
        return forward(x, ctx)
    return torch.utils.checkpoint.checkpoint(forward, x, ctx, use_reentrant=False)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a shard (all-gathered), or `t` itself when it is not sharded."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (in place: its storage), or `t` itself when it is not sharded."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) laid out as `param`: this rank's shard of it, taken locally."""
    if not isinstance(param, DTensor):
        return full
    mesh = param.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, param.placements)


def save_shards(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], folder: Path) -> None:
    """Every rank writes its shards of the weights and optimizer states to `folder` (torch.distributed.checkpoint;
    a collective). Any number of ranks, one included, reads them back (load_shards, checkpoint.load_checkpoint)."""
    state = {"model": get_model_state_dict(model),
             "optimizers": {str(i): get_optimizer_state_dict(model, opt) for i, opt in enumerate(optimizers)}}
    dcp.save(state, checkpoint_id=folder)


def load_shard_optimizer_states(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                                folder: Path) -> None:
    """The optimizer states of save_shards' `folder`, resharded for this run (FSDP on any number of ranks, or a
    plain model in one process)."""
    states = {str(i): get_optimizer_state_dict(model, opt) for i, opt in enumerate(optimizers)}  # its layout
    read_shards({"optimizers": states}, folder)
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(model, opt, optim_state_dict=states[str(i)])
