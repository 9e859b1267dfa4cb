"""Import checkpoints written by nanochat (karpathy/nanochat): the October 2025 architecture (e.g. nanochat-d32)
and today's (since March 2026), told apart by their keys.

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

Today's nanochat (commit a825e63 of 14 March 2026, and later) adds, and an AdambaLM with the matching recipe options
(model/recipe.py, attention.py) computes:

    resid_lambdas, x0_lambdas (n_layer,)      before block i: x <- resid[i] x + x0[i] x0   (ResidualScalars)
    smear_gate.weight (1, 24), smear_lambda   the previous token's embedding, gated in      (Smear)
    backout_lambda                            x <- x - lambda h_{n_layer // 2} before the final norm (Backout)
    value_embeds.{i}.weight (V', kv_dim),     on layers i with i % 2 == (n_layer - 1) % 2: v += 3 sigmoid(x[:12]
    transformer.h.{i}.attn.ve_gate.weight     Wg) E[token] per K/V head                    (value embeddings)

with rotary base 100000, queries and keys times 1.2 after QK-norm, and short windows of ceil(sequence_len / 4 /
128) * 128 tokens to the left. Its tables have the vocabulary padded to a multiple of 64 (V'); the padding rows
are never read (token ids are below vocab_size) and its logits are cropped, so we drop them. The checkpoints in
between (January to March 2026: value embeddings and residual scalars but no smear, with other gate widths, QK
scales and windows) are refused by name rather than loaded approximately.
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

# The two generations we import, named by when nanochat's architecture took that form.
OCTOBER_2025, MARCH_2026 = "2025-10", "2026-03"
_RECIPE_TOP_KEYS = {"resid_lambdas": "scalars.resid", "x0_lambdas": "scalars.x0", "smear_gate.weight":
                    "smear.gate.weight", "smear_lambda": "smear.scale", "backout_lambda": "backout.scale"}
_VE_GATE_KEY = re.compile(r"transformer\.h\.(\d+)\.attn\.ve_gate\.weight")
_VALUE_EMBED_KEY = re.compile(r"value_embeds\.(\d+)\.weight")
_PAD_VOCAB_TO = 64  # nanochat pads its token tables to a multiple of this (since December 2025)
_TOKEN_TABLES = ("wte.weight", "lm_head.weight", "value_embed.weight")


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


def _strip(key):
    return key[len(COMPILE_PREFIX):] if isinstance(key, str) and key.startswith(COMPILE_PREFIX) else key


def nanochat_generation(keys) -> str:
    """OCTOBER_2025 or MARCH_2026, from a state dict's keys; the generations in between are refused."""
    names = {_strip(k) for k in keys}
    if "smear_gate.weight" in names:
        return MARCH_2026
    between = sorted(n for n in names if isinstance(n, str) and (n in _RECIPE_TOP_KEYS or _VE_GATE_KEY.fullmatch(n)
                                                                 or _VALUE_EMBED_KEY.fullmatch(n)))
    if between:
        raise CheckpointError(f"nanochat state dict: keys {between[:4]}{' ...' if len(between) > 4 else ''} without "
                              "smear_gate.weight: a checkpoint from nanochat's January-March 2026 code, whose value "
                              "gates, QK scale and windows changed between commits; adamba imports the October "
                              "2025 architecture and today's (smear and backout, since March 2026) -- re-save it "
                              "with today's nanochat, or train on from one of those")
    return OCTOBER_2025


def generation_of(config: ModelConfig) -> str:
    """The nanochat generation an imported config comes from (today's has smear; October 2025's has none)."""
    return MARCH_2026 if config.smear else OCTOBER_2025


def nanochat_config(meta: dict, generation: str = OCTOBER_2025) -> ModelConfig:
    """The ModelConfig of the model a nanochat meta_NNNNNN.json describes, for weights of `generation`."""
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
    # nanochat's 'S' window is (left, 0) in flash-attention terms: a query sees itself and the `left` tokens before
    # it, left = sequence_len // 2 in the October 2025 code and ceil(sequence_len / 4 / 128) * 128 (flash-attention's
    # tile) today. Our short_window counts the query too, hence the + 1. Like ours, nanochat tiles the pattern over
    # the layers and gives the last layer full context ('L' is left = sequence_len: all of a sequence).
    short_window = None
    if isinstance(seq_len, int) and not isinstance(seq_len, bool):
        short_window = (seq_len // 2 if generation == OCTOBER_2025 else -(-seq_len // 4 // 128) * 128) + 1
    recipe = {} if generation == OCTOBER_2025 else dict(
        rope_base=100000.0, qk_scale=1.2, residual_scalars=True, value_embeds="alternating", smear=True,
        backout=True)  # after block n_layer // 2, as nanochat
    try:
        return ModelConfig(**fields, block_pattern="T", mlp_ratio=4, logit_softcap=15.0,
                           **{"rope_base": 10000.0, **recipe}, window_pattern=window_pattern,
                           short_window=short_window)
    except ValueError as err:
        raise ValueError(f"nanochat model_config: {err}") from None


def _target(name, n_layer: int, generation: str) -> str | None:
    """AdambaLM's key for a nanochat key (its compile prefix stripped), None if `generation` has no such key."""
    if not isinstance(name, str):
        return None
    match = _BLOCK_KEY.fullmatch(name)
    if match and int(match.group(1)) < n_layer:
        return f"blocks.{int(match.group(1))}.{match.group(2)}.weight"
    if generation == OCTOBER_2025:
        return _TOP_KEYS.get(name)
    gate, table = _VE_GATE_KEY.fullmatch(name), _VALUE_EMBED_KEY.fullmatch(name)
    if gate and int(gate.group(1)) < n_layer:
        return f"blocks.{int(gate.group(1))}.attn.ve_gate.weight"
    if table and int(table.group(1)) < n_layer:
        return f"blocks.{int(table.group(1))}.attn.value_embed.weight"
    return _TOP_KEYS.get(name) or _RECIPE_TOP_KEYS.get(name)


def convert_state_dict(state: dict, n_layer: int, generation: str = OCTOBER_2025,
                       vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Rename a nanochat state dict of `generation` to AdambaLM's keys (float32), token tables cropped from
    nanochat's padded vocabulary to `vocab_size`. Unrecognised keys raise CheckpointError."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    duplicates: list[str] = []
    padded = None if vocab_size is None else -(-vocab_size // _PAD_VOCAB_TO) * _PAD_VOCAB_TO
    for key, value in state.items():
        target = _target(_strip(key), n_layer, generation)
        if target is None or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            unknown.append(str(key))
            continue
        if target in out:
            duplicates.append(str(key))
            continue
        if padded != vocab_size and target.endswith(_TOKEN_TABLES) and value.size(0) == padded:
            value = value[:vocab_size]  # rows of nanochat's vocabulary padding: never read, or cropped from logits
        out[target] = value.detach().to(torch.float32)
    if unknown:
        layers = f"transformer.h.{{0..{n_layer - 1}}}"
        today = "" if generation == OCTOBER_2025 else \
            f", {layers}.attn.ve_gate.weight, value_embeds.{{i}}.weight, {', '.join(_RECIPE_TOP_KEYS)}"
        raise CheckpointError(f"nanochat state dict: unrecognised key(s) {sorted(unknown)} (expected, for "
                              f"nanochat's {generation} architecture, transformer.wte.weight, "
                              f"{layers}.attn.c_q/c_k/c_v/c_proj.weight, {layers}.mlp.c_fc/c_proj.weight, "
                              f"lm_head.weight{today}, as floating-point tensors)")
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


def read_nanochat_config(folder: str | Path, step: int | None = None) -> ModelConfig:
    """The ModelConfig of a nanochat checkpoint folder's `step` (default: the latest), from its meta and the names
    of its weights (memory-mapped, not read)."""
    folder = Path(folder)
    step = find_nanochat_step(folder, step)
    return _config_of(folder, step, _load_tensors(folder / f"model_{step:06d}.pt"))


def _config_of(folder: Path, step: int, tensors: dict) -> ModelConfig:
    """The config of `step`'s meta for weights with the keys of `tensors` (which tell the generation)."""
    meta_path, weights = folder / f"meta_{step:06d}.json", folder / f"model_{step:06d}.pt"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
    try:
        generation = nanochat_generation(tensors)
    except CheckpointError as err:
        raise CheckpointError(f"{weights}: {err}") from None
    try:
        return nanochat_config(meta, generation)
    except ValueError as err:
        raise CheckpointError(f"{meta_path}: {err}") from None


def load_nanochat(path: str | Path, step: int | None = None,
                  device: torch.device | str = "cpu") -> tuple[AdambaLM, Tokenizer | None]:
    """Load a nanochat checkpoint folder as an AdambaLM (eval mode) and its tokenizer.pkl (None if absent)."""
    folder = Path(path)
    step = find_nanochat_step(folder, step)
    meta_path, weights = folder / f"meta_{step:06d}.json", folder / f"model_{step:06d}.pt"
    tensors = _load_tensors(weights)
    config = _config_of(folder, step, tensors)
    state = convert_state_dict(tensors, config.n_layer, generation_of(config), config.vocab_size)
    del tensors
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
