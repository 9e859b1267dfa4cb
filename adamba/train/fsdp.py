"""FSDP2 (`--fsdp`, under torchrun): each rank holds 1/N of every parameter, gradient and optimizer state, for
models whose ~16 bytes a parameter DDP cannot fit on one GPU (model/memory.py says which fits).

- Sharding: every block is one `fully_shard` unit, the rest (embeddings, lm_head, scalars, loop, heads) the root
  unit; a unit's parameters are gathered for its forward and backward, then freed. Mixed precision: parameters
  gathered in the compute dtype (bf16 under autocast on GPUs), gradients reduce-scattered in float32, master
  weights float32 on their shards.
- Muon needs whole matrices (its orthogonalisation is not elementwise): `whole` all-gathers a matrix's update on
  every rank, each rank orthogonalises it, and `shard_like` keeps the rank's own rows (a local slice, no
  communication). Every rank so repeats every matrix's iteration; the alternative, one owner rank per matrix and a
  scatter of its result, saves that compute for a second collective, and is left for when profiles show it.
  AdamW is elementwise and runs on the shards as they are.
- Activation checkpointing (`--activation-checkpointing`, with or without FSDP): `checkpoint_blocks`.
- Checkpoints: the full model and optimizer states are gathered with torch.distributed.checkpoint's state-dict
  API and rank 0 writes the ordinary checkpoint, so any number of ranks, one included, loads or resumes it. (A
  model too large to gather on one host needs DCP's sharded files instead: not built yet.)
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Shard `model` in place: one unit per block, then the root. Rank 0's weights first go to every rank (as DDP
    does when it wraps a model): each rank initialised its own from its own seed."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


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


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (the same on every rank) laid out as `param`: this rank's shard of it, taken locally."""
    if not isinstance(param, DTensor):
        return full
    mesh = param.device_mesh
    replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, param.placements)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer whole, on the CPU (a collective: every rank calls it)."""
    return get_model_state_dict(model, options=FULL)


def full_optimizer_states(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    return [get_optimizer_state_dict(model, opt, options=FULL) for opt in optimizers]


def saved_by_name(states: list[dict]) -> bool:
    """Whether optimizer states are full_optimizer_states' (keyed by parameter name), not Optimizer.state_dict's
    (keyed by index)."""
    return any(isinstance(key, str) for state in states for key in state.get("state", {}))


def load_full_optimizer_states(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                               states: list[dict]) -> None:
    """Each rank keeps its shards of full optimizer states (as full_optimizer_states wrote them)."""
    for opt, state in zip(optimizers, states, strict=True):
        set_optimizer_state_dict(model, opt, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
