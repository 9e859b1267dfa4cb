"""Checkpoints: written atomically, verified on load, enough to resume training exactly.

    checkpoints/<run>/step_NNNNNN/
        model.safetensors   weights
        shards/             instead of model.safetensors, from an FSDP run (train/fsdp.py): weights and optimizer
                            states as torch.distributed.checkpoint files, one per rank, readable by any number
        optimizer.pt        optimizer states, RNG states (absent in weights-only checkpoints)
        tokenizer.pkl       the tokenizer the model was trained with
        meta.json           format, step, model and train config, loader state, and each file's sha256
        calibration.json    optional: early-exit thresholds from `adamba calibrate` (eval/calibrate.py), a sidecar
                            bound to the weights' sha256 and carrying its own, written atomically

Everything is written into a temporary sibling folder which is renamed into place only when complete,
so a crash leaves either the previous checkpoint or the new one, never half of one. The hashes in
meta.json catch files that were truncated or corrupted later.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .common import DistInfo, adamba_home, atomic_directory, file_sha256, print0
from .config import ModelConfig
from .data.tokenizer import Tokenizer
from .model import AdambaLM
from .model.calibration_file import read_calibration, write_calibration
from .model.pretrained import weight_mismatches

FORMAT = "adamba-checkpoint"
VERSION = 1
WEIGHTS, OPTIMIZER, TOKENIZER, META = "model.safetensors", "optimizer.pt", "tokenizer.pkl", "meta.json"
SHARDS = "shards"  # an FSDP run's torch.distributed.checkpoint folder: {"model": ..., "optimizers": {"0": ...}}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def run_dir(run: str) -> Path:
    return adamba_home() / "checkpoints" / run


def resolve_run(name: str | Path) -> Path:
    """A checkpoint or run folder, or the name of a run under $ADAMBA_HOME/checkpoints."""
    path = Path(name)
    return path if path.exists() else run_dir(str(name))


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The highest step_NNNNNN folder under a run folder (or the folder itself if it is a checkpoint)."""
    directory = Path(directory)
    if (directory / META).exists():
        return directory
    steps = sorted(p for p in directory.glob("step_*") if re.fullmatch(r"step_\d{6,}", p.name))
    return steps[-1] if steps else None


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: Python's, NumPy's, torch's CPU generator and, on a GPU, its own device's only
    (a process computes on one GPU; the states of every visible GPU would not restore onto fewer GPUs)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def all_ranks_rng_states(device: torch.device, info: DistInfo) -> list[dict]:
    """Every rank's `rng_state`, in rank order, for rank 0 to save. A collective: every rank calls it."""
    state = rng_state(device)
    if not info.enabled:
        return [state]
    states: list = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(saved: list[dict] | dict, device: torch.device, info: DistInfo) -> None:
    """Each rank takes back the states it saved (`all_ranks_rng_states`). A run resumed on another number of ranks
    cannot continue exactly anyway (the data is sharded otherwise), so its ranks keep their fresh seeds, and say so."""
    if isinstance(saved, dict):  # checkpoints of version 1 before per-rank states: one process's states
        saved = [saved]
    if len(saved) != info.world_size:
        print0(f"resume: the checkpoint holds the RNG states of {len(saved)} rank(s), this run has "
               f"{info.world_size}; each rank keeps its fresh seed, so the run does not continue exactly")
        return
    state = saved[info.rank]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # older checkpoints held every visible GPU's state: this device's, if it was there
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(directory: str | Path, model: AdambaLM, *, step: int, train_config: dict | None = None,
                    optimizers: list[torch.optim.Optimizer] | None = None, loader_state: dict | None = None,
                    tokenizer: Tokenizer | None = None, extra: dict | None = None,
                    rng_states: list[dict] | None = None, shards: Path | None = None) -> Path:
    """Write `directory`/step_NNNNNN atomically and return its path. With `optimizers`, optimizer.pt holds their
    states and `rng_states` (every rank's, from `all_ranks_rng_states`; default: this process's). `shards`: a
    torch.distributed.checkpoint folder every rank of an FSDP run wrote (train/fsdp.py), moved in as shards/ in
    place of model.safetensors and the optimizer states."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / step_dir_name(step)
    with atomic_directory(final) as tmp:
        if shards is not None:
            os.replace(shards, tmp / SHARDS)
        else:
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            safetensors.torch.save_file(state, tmp / WEIGHTS)
        if optimizers is not None:
            if rng_states is None:
                rng_states = [rng_state(next(model.parameters()).device)]
            states = None if shards is not None else [opt.state_dict() for opt in optimizers]
            torch.save({"optimizers": states, "rng": rng_states}, tmp / OPTIMIZER)
        if tokenizer is not None:
            tokenizer.save(tmp)
        meta = {
            "format": FORMAT, "version": VERSION, "step": step,
            "model_config": model.config.to_dict(), "train_config": train_config,
            "loader": loader_state, "extra": extra or {},
            "files": {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        # Plain writes inside the temporary folder: atomic_directory fsyncs them and renames the folder.
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return final


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    model: AdambaLM
    tokenizer: Tokenizer | None
    optimizer_state: dict | None = field(default=None, repr=False)
    calibration: dict | None = None  # calibration.json's contents (eval/calibrate.py), if the checkpoint has one

    @property
    def step(self) -> int:
        return self.meta["step"]


def read_meta(path: Path) -> dict:
    meta_path = path / META
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: missing; {path} is not an adamba checkpoint folder")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err}); the file is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not an adamba checkpoint (format {meta.get('format')!r})"
                              if isinstance(meta, dict) else f"{meta_path}: not an adamba checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint format version {meta.get('version')}, "
                              f"this adamba reads version {VERSION}")
    for key in ("step", "model_config", "files"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: missing the {key!r} entry")
    return meta


def _verify(path: Path, meta: dict, name: str) -> Path:
    file = path / name
    if not file.exists():
        raise CheckpointError(f"{file}: missing from the checkpoint")
    expected = meta["files"].get(name)
    if expected is not None and file_sha256(file) != expected:
        raise CheckpointError(f"{file}: contents do not match the checksum in meta.json "
                              "(truncated or corrupted after saving)")
    return file


def load_weights_into(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a state dict that must match the model exactly; otherwise list every difference."""
    problems = weight_mismatches(model, state)
    if problems:
        raise CheckpointError(f"{source}: weights do not match the model: {problems}")
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", *,
                    with_optimizer: bool = False) -> Checkpoint:
    """Load a checkpoint folder, or the latest one of a run folder."""
    given = Path(path)
    found = latest_checkpoint(given) if given.is_dir() else None
    if found is None:
        raise CheckpointError(f"{given}: no checkpoint found (expected meta.json or step_NNNNNN folders)")
    meta = read_meta(found)
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except ValueError as err:
        raise CheckpointError(f"{found / META}: invalid model_config: {err}") from None
    model = AdambaLM.build(config, device)
    if SHARDS in {name.split("/")[0] for name in meta["files"]}:
        _load_shards(found, meta, model)
    else:
        weights = _verify(found, meta, WEIGHTS)
        try:
            state = safetensors.torch.load_file(weights, device=str(device))
        except Exception as err:
            raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from None
        load_weights_into(model, state, str(weights))
    calibration = _load_calibration(found, meta, model)
    tokenizer = Tokenizer.load(_verify(found, meta, TOKENIZER)) if TOKENIZER in meta["files"] else None
    optimizer_state = None
    if with_optimizer:
        opt_file = _verify(found, meta, OPTIMIZER)
        try:
            # Our own file; it holds Python/NumPy RNG states, which need full unpickling.
            # Optimizer.load_state_dict moves each state to its parameter's device.
            optimizer_state = torch.load(io.BytesIO(opt_file.read_bytes()), map_location="cpu",
                                         weights_only=False)
        except Exception as err:
            raise CheckpointError(f"{opt_file}: unreadable optimizer state ({err})") from None
    return Checkpoint(found, meta, model, tokenizer, optimizer_state, calibration)


def read_shards(state: dict, folder: Path) -> None:
    """Fill `state`'s tensors (plain, or DTensor shards) from a torch.distributed.checkpoint folder."""
    with warnings.catch_warnings():  # in one process DCP warns that it assumes one process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder)


def _load_shards(path: Path, meta: dict, model: AdambaLM) -> None:
    """The weights of an FSDP run's shards/ (torch.distributed.checkpoint), read whole into `model`, in one
    process or on every rank of a group (then each reads them all)."""
    for name in meta["files"]:
        if name.startswith(f"{SHARDS}/"):
            _verify(path, meta, name)
    state = model.state_dict()
    try:
        read_shards({"model": state}, path / SHARDS)
    except Exception as err:
        raise CheckpointError(f"{path / SHARDS}: unreadable or not this model's shards ({err})") from None
    model.load_state_dict(state, strict=True)


def save_calibration(path: Path, meta: dict, calibration: dict) -> Path:
    """Write `calibration` (JSON-able; `thresholds` maps exit layer -> threshold or None = never exit) beside the
    checkpoint in `path`, atomically, bound to the checkpoint's weights."""
    if WEIGHTS not in meta["files"]:
        raise CheckpointError(f"{path}: a sharded (FSDP) checkpoint; write it as one file first (adamba export "
                              "unsharded) and calibrate that")
    return write_calibration(path, meta["files"][WEIGHTS], calibration)


def _load_calibration(path: Path, meta: dict, model: AdambaLM) -> dict | None:
    """Read calibration.json if there is one, verify it, and give the model its exit thresholds."""
    try:
        return read_calibration(path, meta["files"].get(WEIGHTS), WEIGHTS, model)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
