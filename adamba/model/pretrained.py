"""The Hugging Face folder format of an AdambaLM (what `adamba export hf` writes), read back by
`AdambaLM.from_pretrained`, from a local folder or a hub repository:

    config.json          {"model_type": "adamba", "architectures": ["AdambaLM"], "adamba_format": 1, ...every
                         ModelConfig field}
    model.safetensors    the state dict, float32
    tokenizer.pkl        the tokenizer (tiktoken, as in checkpoints), if the model has one
    calibration.json     the early-exit thresholds, if the checkpoint was calibrated (calibration_file.py), bound
                         to model.safetensors
    README.md            the model card

A repository id ("owner/name") is fetched with huggingface_hub (`pip install adamba[hub]`), cached by it.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from ..common import file_sha256
from ..config import ModelConfig
from .calibration_file import CALIBRATION, read_calibration

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
MODEL_TYPE, FORMAT = "adamba", 1
HF_KEYS = ("model_type", "architectures", "adamba_format")  # config.json's keys that are not ModelConfig fields


def weight_mismatches(model: torch.nn.Module, state: dict) -> str | None:
    """Every way `state` differs from the model's state dict (missing, unexpected, wrong shape), or None."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
             f"shape mismatches {wrong}" if wrong else ""]
    return "; ".join(p for p in parts if p) or None


def hf_config(config: ModelConfig) -> dict:
    return {"model_type": MODEL_TYPE, "architectures": ["AdambaLM"], "adamba_format": FORMAT, **config.to_dict()}


def resolve_folder(source: str | Path, revision: str | None = None) -> Path:
    """A local folder as it is; otherwise `source` is a hub repository id, downloaded (or found in the cache)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or str(source).count("/") != 1 or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"{source}: not a folder with {CONFIG_FILE} and {WEIGHTS_FILE}, nor a hub "
                                "repository id like owner/name")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{source}: loading from the Hugging Face hub needs huggingface_hub "
                          "(pip install 'adamba[hub]'), or pass a local folder") from None
    return Path(snapshot_download(str(source), revision=revision,
                                  allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, CALIBRATION, "tokenizer.pkl",
                                                  "README.md"]))


def read_config(folder: Path) -> ModelConfig:
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; an adamba model folder holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} (adamba export hf writes them)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path}: model_type is {data.get('model_type') if isinstance(data, dict) else None!r}, "
                         f"not {MODEL_TYPE!r}: not an adamba model")
    if data.get("adamba_format") != FORMAT:
        raise ValueError(f"{path}: adamba_format {data.get('adamba_format')!r}; this adamba reads format {FORMAT}")
    try:
        return ModelConfig.from_dict({k: v for k, v in data.items() if k not in HF_KEYS})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def load_state(folder: Path, model: torch.nn.Module) -> None:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; an adamba model folder holds {WEIGHTS_FILE}")
    try:
        state = safetensors.torch.load_file(path, device=str(next(model.parameters()).device))
    except Exception as err:
        raise ValueError(f"{path}: unreadable safetensors file ({err})") from None
    problems = weight_mismatches(model, state)
    if problems:
        raise ValueError(f"{path}: weights do not match {CONFIG_FILE}: {problems}")
    model.load_state_dict(state, strict=True)


def load_calibration(folder: Path, model: torch.nn.Module) -> dict | None:
    """The folder's calibration.json, if any, verified against its model.safetensors and applied to the exit gates."""
    return read_calibration(folder, file_sha256(folder / WEIGHTS_FILE), WEIGHTS_FILE, model)
