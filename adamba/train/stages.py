"""Training stages after a surgery (adamba/surgery): what trains, read from the checkpoint's growth record.

- "mamba-only": only the Mamba blocks the latest surgery inserted train; every other parameter is frozen
  (requires_grad False) and so gets no optimizer state (optim.build_optimizers skips it). The seeds' stage 1: the
  new blocks learn to use a frozen trained stack, with the optimizer memory of the frozen part saved.
- "new-dims": after `widen`, only the new dimensions train. The old entries (the old model, its D-wide slice) are
  masked two ways: their gradient is zeroed before the optimizer step (and before clipping measures it), so the
  update is computed from the new entries alone, and they are written back after every step, because Muon's
  orthogonalisation (and weight decay) spreads an update over the whole matrix, masked entries included. So they
  stay bitwise what they were. Costs one bool per entry and a copy of the old entries -- under FSDP of this rank's
  shard only (`hold` shards each mask as its parameter is sharded).
- "all": everything trains (with --matryoshka, every width too); it only checks that there is a growth record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import MAMBA, MAMBA2, ModelConfig
from ..surgery.widen import old_entry_masks
from .fsdp import local, shard_like


def optimizer_state_bytes(model, params) -> int:
    """Bytes of optimizer state for `params` as optim.build_optimizers would hold it: Muon keeps one momentum
    buffer per block matrix, AdamW two moments for every other parameter."""
    wanted = {id(p) for p in params}
    return sum((1 if family == "matrix" else 2) * p.numel() * p.element_size()
               for family, group in model.param_groups().items() for p in group if id(p) in wanted)


@dataclass
class Stage:
    name: str
    trainable: int  # parameters (entries) that train
    total: int
    state_bytes: int  # optimizer state of what trains
    full_state_bytes: int  # optimizer state had everything trained
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # name -> old entries, whole
    held: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)

    @torch.no_grad()
    def hold(self, model) -> None:
        """Keep the old entries' values as this process holds the parameters -- whole, or under FSDP its shards
        (call it after sharding, before the first step): (parameter, local mask, local old values)."""
        self.held = []
        for name, p in model.named_parameters():
            if name in self.masks:
                mask = local(shard_like(self.masks[name].to(p.device), p))
                self.held.append((p, mask, local(p)[mask].clone()))

    @torch.no_grad()
    def before_step(self) -> None:
        """Zero the old entries' gradients: the update is computed from the new entries alone."""
        for p, mask, _ in self.held:
            if p.grad is not None:
                local(p.grad).masked_fill_(mask, 0)

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the masked (old) entries back: exactly the values they had when the stage began."""
        for p, mask, values in self.held:
            local(p).masked_scatter_(mask, values)

    def describe(self) -> str:
        mib = self.state_bytes / 2**20
        text = f"stage {self.name}: training {self.trainable:,} of {self.total:,} parameters"
        if self.masks:
            text += " (the old entries are masked, and keep optimizer state)"
        if self.state_bytes == self.full_state_bytes:
            return f"{text}; optimizer state {mib:,.1f} MiB"
        return (f"{text}; optimizer state {mib:,.1f} MiB instead of {self.full_state_bytes / 2**20:,.1f} MiB "
                f"({(self.full_state_bytes - self.state_bytes) / 2**20:,.1f} MiB saved)")


def apply_stage(model, stage: str | None, growth: dict | None) -> Stage | None:
    """Freeze or mask `model` for `stage` (None: nothing to do); `growth` is the checkpoint's growth record."""
    if stage is None:
        return None
    if growth is None:
        raise ValueError(f"stage: {stage!r} needs a grown model, but the checkpoint has no growth record; start "
                         "from a surgery's output with --init-from (adamba surgery add-mamba|widen|deepen)")
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    full = optimizer_state_bytes(model, params)
    if stage == "all":
        return Stage(stage, total, total, full, full)
    if stage == "mamba-only":
        blocks = [i for i in growth["new_blocks"] if model.config.block_pattern[i] in (MAMBA, MAMBA2)]
        if not blocks:
            raise ValueError(f"stage: 'mamba-only' trains the Mamba blocks a surgery inserted, but the latest "
                             f"surgery ({growth['op']}) inserted none; run `adamba surgery add-mamba` first, or use "
                             "--stage all")
        trained = {id(p) for i in blocks for p in model.blocks[i].parameters()}
        for p in params:
            p.requires_grad_(id(p) in trained)
        kept = [p for p in params if p.requires_grad]
        return Stage(stage, sum(p.numel() for p in kept), total, optimizer_state_bytes(model, kept), full)
    if growth["op"] != "widen":
        raise ValueError(f"stage: 'new-dims' trains the dimensions `adamba surgery widen` added, but the latest "
                         f"surgery was {growth['op']}; widen first, or use --stage all")
    masks = old_entry_masks(ModelConfig.from_dict(growth["from"]), model)
    old = sum(int(m.sum()) for m in masks.values())
    return Stage(stage, total - old, total, full, full, masks)
