"""What every surgery shares: reading the model to grow, the record of what is new, writing the grown checkpoint.

A surgery reads an adamba checkpoint (or a nanochat folder), builds the grown model from a derived and validated
`ModelConfig`, and writes it with `checkpoint.save_checkpoint` (atomic, with sha256 of every file), so it loads
with the same strict key check as any checkpoint: every key the model has, none it lacks, every shape right
(the public forks' surgery instead wrote keys the model did not have and loaded with strict=False, leaving
weights and rotary buffers uninitialised).

The checkpoint's meta.json gets `extra["growth"]`, the record training stages read (train/stages.py):

    op          "add-mamba", "widen" or "deepen"
    from        the model config before the surgery
    new_blocks  indices of the blocks the surgery inserted (empty for widen)
    history     one line per earlier surgery of this lineage, oldest first
    ...         the operation's own settings (pattern, width, init)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import latest_checkpoint, load_checkpoint, read_meta, resolve_run, run_dir, save_checkpoint
from ..config import ModelConfig
from ..data.tokenizer import Tokenizer
from ..model import AdambaLM
from ..nanochat import load_nanochat, read_nanochat_config

GROWTH = "growth"  # the key in a checkpoint's meta["extra"]


@dataclass
class Source:
    """The model a surgery starts from."""

    model: AdambaLM
    tokenizer: Tokenizer | None
    growth: dict | None  # the source checkpoint's growth record, if it was grown before
    description: str


def load_source(checkpoint: str | None = None, nanochat: str | None = None) -> Source:
    """Load an adamba checkpoint or a nanochat folder (exactly one of them) on the CPU, in float32."""
    if (checkpoint is None) == (nanochat is None):
        raise ValueError("checkpoint: give either an adamba checkpoint (CKPT) or --from-nanochat PATH, not both")
    if nanochat is not None:
        model, tokenizer = load_nanochat(nanochat)
        return Source(model, tokenizer, None, f"nanochat {nanochat}")
    ckpt = load_checkpoint(resolve_run(checkpoint))
    return Source(ckpt.model, ckpt.tokenizer, ckpt.meta.get("extra", {}).get(GROWTH), str(ckpt.path))


def source_config(checkpoint: str | None = None, nanochat: str | None = None) -> ModelConfig:
    """The config of a surgery's source from its metadata alone (a dry run reads no weights)."""
    if (checkpoint is None) == (nanochat is None):
        raise ValueError("checkpoint: give either an adamba checkpoint (CKPT) or --from-nanochat PATH, not both")
    if nanochat is not None:
        return read_nanochat_config(nanochat)
    found = latest_checkpoint(resolve_run(checkpoint))
    if found is None:
        raise ValueError(f"checkpoint: no checkpoint found at {checkpoint}")
    return ModelConfig.from_dict(read_meta(found)["model_config"])


def supported(config: ModelConfig) -> None:
    """Surgery grows blocks and widths; the adaptive heads (exit and expansion gates, the width predictor) are
    sized and indexed by both, so a model with them is refused rather than grown into a mismatched one."""
    adaptive = [name for name in ("min_exit_layer", "expansion_gates", "predictor_layers") if getattr(config, name)]
    if adaptive:
        raise ValueError(f"{adaptive[0]}: surgery does not grow early-exit gates or the width predictor yet; grow a "
                         f"model without them ({', '.join(adaptive)} unset) and add them when training the result")


def count_params(config: ModelConfig) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return AdambaLM(config).num_params()


def record(op: str, before: ModelConfig, new_blocks: list[int], previous: dict | None, **settings) -> dict:
    history = [*previous.get("history", []), summary(previous)] if previous else []
    return {"op": op, "from": before.to_dict(), "new_blocks": new_blocks, "history": history, **settings}


def summary(growth: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in growth.items() if k not in ("op", "from", "new_blocks", "history"))
    return f"{growth['op']}({settings})"


@torch.no_grad()
def max_logit_change(before: AdambaLM, after: AdambaLM, tokens: int = 16, seed: int = 0) -> float:
    """max |logits(after) - logits(before)| on a fixed random batch: 0 up to rounding when growth is exact."""
    config = before.config
    idx = torch.randint(0, config.vocab_size, (2, min(tokens, config.sequence_len)),
                        generator=torch.Generator().manual_seed(seed))
    was = before.training, after.training
    before.eval()
    after.eval()
    change = (after(idx) - before(idx)).abs().max().item()
    before.train(was[0])
    after.train(was[1])
    return change


def save_grown(out: str, model: AdambaLM, tokenizer: Tokenizer | None, growth: dict, source: str) -> Path:
    """Write the grown model as step 0 of run `out` (a run name under $ADAMBA_HOME/checkpoints, or a folder)."""
    directory = Path(out) if "/" in out else run_dir(out)
    return save_checkpoint(directory, model, step=0, tokenizer=tokenizer,
                           extra={GROWTH: growth, "grown_from": source})
