"""Process-wide helpers: where files live and how they are written, which device and dtype to use, seeding,
torch.distributed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.distributed as dist


def adamba_home() -> Path:
    """Everything a run writes lives under $ADAMBA_HOME (default ~/.cache/adamba)."""
    home = Path(os.environ.get("ADAMBA_HOME") or Path.home() / ".cache" / "adamba")
    home.mkdir(parents=True, exist_ok=True)
    return home


# Every file adamba writes goes through the helpers below: written to a temporary sibling, fsynced, then renamed
# onto its name, so a crash or a full disk leaves the old file or the whole new one, never a partial one that
# would later read as a corrupt checkpoint, a truncated token cache or a half report. (Append-only logs, such as
# metrics.jsonl, are the exception: a torn last line is all a crash can cost them.)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace_file(source: str | Path, path: str | Path) -> None:
    """Make the complete file `source` durable, then rename it onto `path` atomically (same filesystem)."""
    _fsync(Path(source))
    os.replace(source, path)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once: os.umask can only be read by setting it, which races with threads


@contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file object to write `path`'s new contents into (for writers that stream: np.savez, pickle, savefig);
    `path` changes only when the block ends without an error. Text modes write UTF-8."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(fd, 0o666 & ~_UMASK)  # mkstemp makes the file owner-only; give it what open() would have
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        replace_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically and return `path`."""
    with atomic_writer(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
    return Path(path)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to fill with `path`'s new contents; when the block ends without an error, its
    files are fsynced and it takes `path`'s place (an existing `path` is moved aside first, then deleted)."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        if path.exists():  # os.replace cannot replace a non-empty folder: swap it out first
            trash = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, trash / path.name)
            os.replace(tmp, path)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pick_device(name: str = "auto") -> torch.device:
    """The device a process computes on. Under torchrun each process owns one GPU, so "auto" and an index-less
    "cuda" both mean cuda:LOCAL_RANK (torch.cuda.set_device and DDP's device_ids need the index)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name} asked for, but this torch sees no CUDA GPU (a CPU build of torch, or "
                             "no driver); install the torch build for your CUDA, or use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype: bfloat16 where the GPU computes it natively (Ampere or newer), float32 elsewhere (CPU bf16
    matmuls are slow, and on older GPUs torch only emulates bf16, several times slower than float32)."""
    native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "auto":
        return torch.bfloat16 if native_bf16 else torch.float32
    if name == "bfloat16" and device.type == "cuda" and not native_bf16:
        raise ValueError(f"dtype: bfloat16 is only emulated on {torch.cuda.get_device_name(device)} (it needs "
                         "compute capability 8.0, Ampere, or newer); use --dtype float32")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision at `dtype` on `device`; nothing at float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


# Ranks wait for rank 0's one-off work (training the tokenizer, tokenizing an `hf:` dataset) on a CPU (gloo) group
# of their own: NCCL's default 10-minute timeout would abort them long before a large dataset is tokenized, and
# raising it for the whole run would let a real hang in training go unnoticed as long.
PREPARE_TIMEOUT_ENV = "ADAMBA_PREPARE_TIMEOUT_S"
PREPARE_TIMEOUT_S = 6 * 3600
_prepare_group = None


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    global _prepare_group
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        timeout = float(os.environ.get(PREPARE_TIMEOUT_ENV, PREPARE_TIMEOUT_S))
        _prepare_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
    return info


def wait_for_rank0() -> None:
    """A barrier for rank 0's one-off work, with a timeout of hours ($ADAMBA_PREPARE_TIMEOUT_S, default 6 h)."""
    if dist.is_initialized():
        dist.barrier(group=_prepare_group)


def shutdown_distributed() -> None:
    """Leave the process group (NCCL warns of leaked resources, and may hang at exit, without it)."""
    global _prepare_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _prepare_group = None


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)
