"""Import checkpoints written by nanochat (karpathy/nanochat, October 2025 architecture, e.g. nanochat-d32).

nanochat saves a checkpoint as a folder:

    model_NNNNNN.pt      torch state dict: transformer.wte.weight, transformer.h.{i}.attn.c_q/c_k/c_v/c_proj.weight,
                         transformer.h.{i}.mlp.c_fc/c_proj.weight, lm_head.weight (keys may carry torch.compile's
                         `_orig_mod.` prefix; tensors are often bfloat16)
    meta_NNNNNN.json     {"step": N, "model_config": {sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd},
                         ...training metadata}
    optim_NNNNNN*.pt     optimizer state (ignored here)
    tokenizer.pkl        optional: a pickled tiktoken Encoding (the same format as ours)

nanochat's forward is embedding -> parameter-free RMSNorm -> blocks (x + attn(norm(x)), x + mlp(norm(x)); rotary
base 10000 in the half-split layout, then parameter-free QK RMSNorm, causal GQA softmax attention; relu^2 MLP of
width 4*n_embd; no biases) -> norm -> lm_head -> 15*tanh(logits/15). An AdambaLM made only of attention ('T')
blocks computes exactly this, so the import is an exact renaming of weights (cast to float32): nothing is
approximated, dropped or filled in. Anything we cannot represent (an unknown config field, an unknown weight, a
wrong shape) is an error that names it, never silently skipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_weights_into
from .config import ModelConfig
from .data.tokenizer import Tokenizer
from .model import AdambaLM

MODEL_FILE = re.compile(r"model_(\d+)\.pt")
COMPILE_PREFIX = "_orig_mod."
TOKENIZER_FILE = "tokenizer.pkl"

# model_config fields that map one to one onto ModelConfig fields of the same name.
_SAME_NAME = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
_REQUIRED = _SAME_NAME
# Fields later nanochat versions added that we can represent faithfully.
_MAPPED = ("window_pattern",)

_BLOCK_KEY = re.compile(r"transformer\.h\.(\d+)\.(attn\.(?:c_q|c_k|c_v|c_proj)|mlp\.(?:c_fc|c_proj))\.weight")
_TOP_KEYS = {"transformer.wte.weight": "wte.weight", "lm_head.weight": "lm_head.weight"}


def _model_files(folder: Path) -> dict[int, Path]:
    files = {}
    for path in folder.iterdir():
        match = MODEL_FILE.fullmatch(path.name)
        if match and path.is_file():
            files[int(match.group(1))] = path
    return files


def find_nanochat_step(folder: str | Path, step: int | None = None) -> int:
    """The step to load from a nanochat checkpoint folder: `step` if given, else the latest model_NNNNNN.pt."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder; expected a nanochat checkpoint folder holding "
                                "model_NNNNNN.pt and meta_NNNNNN.json")
    if not folder.is_dir():
        raise ValueError(f"{folder}: is a file; pass the nanochat checkpoint folder that holds "
                         "model_NNNNNN.pt and meta_NNNNNN.json")
    files = _model_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no model_NNNNNN.pt files; expected a nanochat checkpoint folder "
                                "holding model_NNNNNN.pt and meta_NNNNNN.json")
    if step is None:
        step = max(files)
    elif not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step: must be a non-negative integer, got {step!r}")
    elif step not in files:
        raise FileNotFoundError(f"{folder}: no model_{step:06d}.pt; the steps there are {sorted(files)}")
    meta = folder / f"meta_{step:06d}.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: missing; nanochat writes it beside {files[step].name} "
                                "(it holds the model_config needed to rebuild the model)")
    return step


def nanochat_config(meta: dict) -> ModelConfig:
    """The ModelConfig of the model a nanochat meta_NNNNNN.json describes."""
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise ValueError("nanochat meta: expected a JSON object with a 'model_config' object")
    given = meta["model_config"]
    unknown = sorted(set(given) - set(_SAME_NAME) - set(_MAPPED))
    if unknown:
        raise ValueError(f"nanochat model_config: unknown field(s) {unknown} that adamba cannot represent; "
                         f"known fields are {sorted(_SAME_NAME + _MAPPED)}")
    missing = [k for k in _REQUIRED if k not in given]
    if missing:
        raise ValueError(f"nanochat model_config: missing field(s) {missing}")
    fields = {k: given[k] for k in _SAME_NAME}
    window_pattern = given.get("window_pattern", "L")
    if not isinstance(window_pattern, str):
        raise ValueError(f"nanochat model_config: window_pattern must be a string, got {window_pattern!r}")
    seq_len = given["sequence_len"]
    # nanochat's 'S' window is (sequence_len // 2, 0) in flash-attention terms: a query sees itself and the
    # sequence_len // 2 tokens before it. Our short_window counts the query too, hence the + 1. Like ours,
    # nanochat tiles the pattern over the layers and gives the last layer full context.
    short_window = seq_len // 2 + 1 if isinstance(seq_len, int) and not isinstance(seq_len, bool) else None
    try:
        return ModelConfig(**fields, block_pattern="T", mlp_ratio=4, logit_softcap=15.0, rope_base=10000.0,
                           window_pattern=window_pattern, short_window=short_window)
    except ValueError as err:
        raise ValueError(f"nanochat model_config: {err}") from None


def convert_state_dict(state: dict, n_layer: int) -> dict[str, torch.Tensor]:
    """Rename a nanochat state dict to AdambaLM's keys (float32). Unrecognised keys raise CheckpointError."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    duplicates: list[str] = []
    for key, value in state.items():
        name = key[len(COMPILE_PREFIX):] if isinstance(key, str) and key.startswith(COMPILE_PREFIX) else key
        target = None
        if isinstance(name, str):
            target = _TOP_KEYS.get(name)
            match = _BLOCK_KEY.fullmatch(name)
            if match and int(match.group(1)) < n_layer:
                target = f"blocks.{int(match.group(1))}.{match.group(2)}.weight"
        if target is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            unknown.append(str(key))
            continue
        if target in out:
            duplicates.append(str(key))
            continue
        out[target] = value.detach().to(torch.float32)
    if unknown:
        layers = f"transformer.h.{{0..{n_layer - 1}}}"
        raise CheckpointError(f"nanochat state dict: unrecognised key(s) {sorted(unknown)} (expected "
                              f"transformer.wte.weight, {layers}.attn.c_q/c_k/c_v/c_proj.weight, "
                              f"{layers}.mlp.c_fc/c_proj.weight and lm_head.weight, as floating-point tensors)")
    if duplicates:
        raise CheckpointError(f"nanochat state dict: key(s) {sorted(duplicates)} appear both with and without "
                              f"the {COMPILE_PREFIX!r} prefix")
    return out


def _load_tensors(path: Path) -> dict:
    try:
        try:  # memory-map: a d32 checkpoint is ~4 GB of bfloat16
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable nanochat weights file ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_nanochat(path: str | Path, step: int | None = None,
                  device: torch.device | str = "cpu") -> tuple[AdambaLM, Tokenizer | None]:
    """Load a nanochat checkpoint folder as an AdambaLM (eval mode) and its tokenizer.pkl (None if absent)."""
    folder = Path(path)
    step = find_nanochat_step(folder, step)
    meta_path = folder / f"meta_{step:06d}.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
    try:
        config = nanochat_config(meta)
    except ValueError as err:
        raise CheckpointError(f"{meta_path}: {err}") from None
    weights = folder / f"model_{step:06d}.pt"
    state = convert_state_dict(_load_tensors(weights), config.n_layer)
    model = AdambaLM.build(config, device)
    try:
        load_weights_into(model, state, str(weights))
    except CheckpointError as err:
        raise CheckpointError(f"{err} (model_config from {meta_path.name})") from None
    del state
    model.eval()

    tokenizer = None
    if (folder / TOKENIZER_FILE).exists():
        try:
            tokenizer = Tokenizer.load(folder / TOKENIZER_FILE)
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(f"{folder / TOKENIZER_FILE}: {tokenizer.vocab_size} tokens, more than the "
                                  f"model's vocab_size={config.vocab_size}")
    return model, tokenizer
