"""Configuration dataclasses: every field is validated here, so bad input fails early with a clear message.

`ModelConfig` has one size dial, `depth` (as in nanochat): width = depth x aspect_ratio rounded up to the
head dim, heads = width / head_dim. Any derived field can be overridden explicitly. `TrainConfig` holds
everything a training run needs beyond the model. Both round-trip through plain dicts (JSON/TOML).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

# Block kinds and the names users may write for them.
ATTENTION = "T"
MAMBA = "M"
MAMBA2 = "M2"
BLOCK_ALIASES = {
    "t": ATTENTION, "transformer": ATTENTION, "attention": ATTENTION, "attn": ATTENTION,
    "m": MAMBA, "mamba": MAMBA, "mamba1": MAMBA,
    "m2": MAMBA2, "mamba2": MAMBA2,
}
AVAILABLE_BLOCKS = {ATTENTION, MAMBA, MAMBA2}
TRAIN_STAGES = ("mamba-only", "new-dims", "all")  # TrainConfig.stage (train/stages.py)
FLOAT8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # TrainConfig.float8: torchao's recipe names


VALUE_GATE_CHANNELS = 12  # nanochat's value-embedding gate reads the first 12 channels of the layer input
SMEAR_GATE_CHANNELS = 24  # and its smear gate the first 24 of the embedding


def _fail(field_name: str, problem: str, fix: str = "") -> None:
    message = f"{field_name}: {problem}"
    if fix:
        message += f" ({fix})"
    raise ValueError(message)


def _block_kind(token: str, where: str) -> str:
    kind = BLOCK_ALIASES.get(token.strip().lower())
    if kind is None:
        _fail("block_pattern", f"unknown block kind {token!r} {where}",
              "use T/transformer for attention, M/mamba for Mamba-1, M2/mamba2 for Mamba-2")
    return kind


def parse_block_pattern(pattern: str | list | tuple) -> list[str]:
    """Parse `"TMTM"`, `"T*12 M*8"`, `"TM*10"`, `"T, M"`, `["T", "mamba"]` into a list of block kinds."""
    if isinstance(pattern, (list, tuple)):
        if not pattern:
            _fail("block_pattern", "is empty", "give at least one block kind, e.g. 'T'")
        kinds: list[str] = []
        for i, token in enumerate(pattern):
            if not isinstance(token, str):
                _fail("block_pattern", f"item {i} is {token!r}, not a string")
            kinds.extend(parse_block_pattern(token))
        return kinds
    if not isinstance(pattern, str):
        _fail("block_pattern", f"must be a string or a list of strings, got {type(pattern).__name__}")
    tokens = [t for t in re.split(r"[\s,]+", pattern.strip()) if t]
    if not tokens:
        _fail("block_pattern", "is empty", "give at least one block kind, e.g. 'T'")
    kinds = []
    for token in tokens:
        match = re.fullmatch(r"\(?([A-Za-z0-9]+)\)?\s*\*\s*(\d+)", token)
        if match:  # "T*12", or a group: "TM*10" / "(TM)*10"
            group, count = parse_block_pattern(match.group(1)), int(match.group(2))
            if count < 1:
                _fail("block_pattern", f"repeat count in {token!r} must be at least 1")
            kinds.extend(group * count)
        elif token.lower() in BLOCK_ALIASES and len(token) > 2:
            kinds.append(BLOCK_ALIASES[token.lower()])
        elif re.fullmatch(r"(?:M2|T|M)+", token, flags=re.IGNORECASE):
            kinds.extend(_block_kind(k, f"in {token!r}")
                         for k in re.findall(r"M2|T|M", token, flags=re.IGNORECASE))
        else:
            _fail("block_pattern", f"cannot parse {token!r}",
                  "write letters like 'TTMM', repeats like 'T*12 M*8', or long names like 'mamba'")
    return kinds


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, f"must be a positive integer, got {value!r}")


def parse_width(value: Any) -> Any:
    """A compute choice as a user writes it: a mode name ("ghost"), a width ("256") or a per-layer list
    ("64,64,128"); "" or None is full width (None, its one meaning). Non-strings are returned as they are."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if not text:
        return None
    if "," in text:
        try:
            return [int(part) for part in text.split(",")]
        except ValueError:
            _fail("width", f"{value!r} is not a comma-separated list of widths", "write e.g. 64,64,128")
    return int(text) if text.isdigit() else text


def require_loop(config: ModelConfig, what: str = "loops") -> None:
    """The one error for a loop setting given to a model without a loop."""
    if config.loop is None:
        _fail(what, "this model has no loop (config.loop is None)")


@dataclass
class LoopConfig:
    """Looped depth (Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning", the Huginn model):
    the first `prelude` layers run once, the next `recur` layers iterate r times, the last `coda` layers run once.
    Block kinds come from block_pattern. r is chosen per call (adamba/model/looped.py); training samples it."""

    prelude: int = 2
    recur: int = 4
    coda: int = 2
    mean_recurrence: int = 4  # r-bar: the training distribution's mean, and the default r at inference
    r_max: int | None = None  # training draws are clamped to [1, r_max]; None: 4 * mean_recurrence
    backprop_depth: int = 8  # k: gradients flow through the last k iterations only (truncated backprop)
    init_state: str = "prelude"  # what the first iteration reads as state: "prelude" (its output) or "random"
    # Std of the random initial state: Huginn's sqrt(2/5), at our unit-RMS embeddings (its state is also N(0, .))
    init_sigma: float = 0.6325
    init_seed: int = 0  # seeds the fixed random initial states used outside training (so decoding is exact)
    sandwich_norm: bool = False  # a learnable RMSNorm after each recurrent block, as in Huginn's sandwich blocks

    def __post_init__(self) -> None:
        for name in ("prelude", "coda"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(f"loop.{name}", f"must be a non-negative integer, got {value!r}")
        for name in ("recur", "mean_recurrence", "backprop_depth"):
            _positive_int(f"loop.{name}", getattr(self, name))
        if self.r_max is None:
            self.r_max = 4 * self.mean_recurrence
        _positive_int("loop.r_max", self.r_max)
        if self.r_max < self.mean_recurrence:
            _fail("loop.r_max", f"{self.r_max} is below mean_recurrence={self.mean_recurrence}")
        if self.init_state not in ("prelude", "random"):
            _fail("loop.init_state", f"unknown {self.init_state!r}", "use prelude or random")
        if not isinstance(self.init_sigma, (int, float)) or isinstance(self.init_sigma, bool) or self.init_sigma <= 0:
            _fail("loop.init_sigma", f"must be > 0, got {self.init_sigma!r}")
        if not isinstance(self.init_seed, int) or isinstance(self.init_seed, bool):
            _fail("loop.init_seed", f"must be an integer, got {self.init_seed!r}")
        if not isinstance(self.sandwich_norm, bool):
            _fail("loop.sandwich_norm", f"must be true or false, got {self.sandwich_norm!r}")

    @property
    def layers(self) -> int:
        return self.prelude + self.recur + self.coda

    @property
    def prelude_layers(self) -> range:
        return range(self.prelude)

    @property
    def recurrent_layers(self) -> range:
        return range(self.prelude, self.prelude + self.recur)

    @property
    def coda_layers(self) -> range:
        return range(self.prelude + self.recur, self.layers)


def _loop_config(value: Any) -> LoopConfig | None:
    """ModelConfig.loop from None, a LoopConfig, a table (dict / TOML) or a flag ("prelude=2,recur=4,coda=2")."""
    if value is None or isinstance(value, LoopConfig):
        return value
    if isinstance(value, str):
        table = {}
        for item in (part.strip() for part in value.split(",") if part.strip()):
            key, sep, text = item.partition("=")
            if not sep:
                _fail("loop", f"cannot parse {item!r}", "write fields as name=value, e.g. 'prelude=2,recur=4,coda=2'")
            lowered = text.strip().lower()
            table[key.strip()] = (lowered == "true" if lowered in ("true", "false") else
                                  int(lowered) if re.fullmatch(r"-?\d+", lowered) else
                                  float(lowered) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", lowered) else text.strip())
        value = table
    if not isinstance(value, dict):
        _fail("loop", f"must be a table of loop fields (or None), got {type(value).__name__}")
    known = {f.name for f in fields(LoopConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        _fail("loop", f"unknown field(s) {unknown}", f"known fields are {sorted(known)}")
    return LoopConfig(**value)


@dataclass
class ModelConfig:
    """Architecture of an AdambaLM. Unset sizes are derived from `depth` (default 12)."""

    sequence_len: int = 1024
    vocab_size: int = 65536
    depth: int | None = None
    size: int | None = None  # width dial: n_embd = size x aspect_ratio, rounded up to head_dim (None: depth)
    n_layer: int | None = None
    n_embd: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    aspect_ratio: int = 64  # width per unit of depth, as in nanochat
    head_dim: int = 128  # target head size when heads are derived from the width
    mlp_ratio: int = 4
    block_pattern: Any = "T"
    # Per-layer attention windows, nanochat style: 'L' = full context, 'S' = `short_window` tokens.
    # The pattern tiles over the attention layers; the last attention layer always sees full context.
    window_pattern: str = "L"
    short_window: int | None = None
    logit_softcap: float = 15.0  # logits = c * tanh(logits / c); 0 disables
    rope_base: float = 10000.0
    # Today's nanochat recipe (since March 2026; model/recipe.py), each off by default:
    residual_scalars: bool = False  # before block i: x <- resid_lambdas[i] x + x0_lambdas[i] x0 (x0: the embedding)
    # Attention layers whose values get a token's value embedding through a per-head gate (ResFormer): a list of
    # layers, or "alternating" (every other attention layer, the last one included, as nanochat); None: none.
    value_embeds: Any = None  # attention layers with value embeddings: "alternating", a list or "1,3"; None: none
    smear: bool = False  # each position adds a gated share of the previous token's normalised embedding
    backout: bool = False  # subtract backout_lambda x the residual after block `backout_layer` before the final norm
    backout_layer: int | None = None  # None: n_layer // 2
    qk_scale: float = 1.0  # queries and keys times this after QK-norm (nanochat today: 1.2)
    # Set by `adamba surgery widen` to the width the model had before it was first widened (None: never widened).
    # Every parameter-free RMSNorm over the residual stream (and Mamba-2's gated norm) then divides the sum of
    # squares by at most this many coordinates, so zero new coordinates leave the norm, and the function, as
    # they were (adamba/model/norm.py explains the math).
    norm_width: int | None = None
    # Mamba blocks ('M'): the reference module's hyperparameters
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: Any = "auto"  # "auto" = ceil(n_embd / 16), or an integer
    mamba_use_mlp: bool = False  # an MLP after the mixer, as in attention blocks (Mamba-1 and Mamba-2 blocks)
    # Mamba-2 blocks ('M2'): the reference `Mamba2` module's hyperparameters. d_inner = expand * n_embd is split
    # into d_inner / headdim heads, each with one scalar decay; ngroups groups of heads share B and C.
    mamba2_d_state: int = 64
    mamba2_headdim: int = 64
    mamba2_ngroups: int = 1
    mamba2_chunk_size: int = 64  # steps per chunk of the SSD scan (affects speed, not results)
    mamba2_expand: int = 2
    mamba2_d_conv: int = 4
    # Matryoshka widths of attention/MLP layers (Mamba, embeddings and lm_head stay at full width).
    # None: powers of two times the head size, up to n_embd (always included).
    matryoshka_levels: Any = None
    # Named compute modes -> width. None: the seeds' proportions (Ghost 128 but at most D/4, Whisper D/4,
    # Normal D/2, Think D), each rounded up to the nearest level.
    compute_modes: Any = None
    # Looped depth (LoopConfig: prelude, recur, coda, mean_recurrence, ...); None: every layer runs once.
    loop: Any = None
    # Adaptive compute (model/exits.py, model/predictor.py). Early exit after block k, for k >= min_exit_layer
    # (None: no exits): the shared final norm, lm_head and softcap give its logits, so an exit at k is exactly
    # the model truncated to its first k blocks; a ConfidenceGate per exit layer decides, token by token.
    min_exit_layer: int | None = None
    gate_hidden: int = 64  # hidden units of each ConfidenceGate / ExpansionGate (a 2-layer MLP per layer)
    # An ExpansionGate after every block k >= 0.75 n_layer: low confidence doubles the Matryoshka width of the
    # remaining attention layers (capped at n_embd), as the seeds' V2 describes.
    expansion_gates: bool = False
    # LayerDimPredictor: reads the hidden states after the first `predictor_layers` blocks (run at full width),
    # mean-pooled over the prompt, and picks a Matryoshka level for each later attention layer; 0: none.
    predictor_layers: int = 0
    predictor_hidden: int = 128

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "aspect_ratio", "head_dim", "mlp_ratio"):
            _positive_int(name, getattr(self, name))
        self._derive_layers()
        self._derive_width()
        self._check_positions()
        self._check_mamba()
        self._check_norm_width()
        self._check_mamba2()
        self._check_matryoshka()
        self._check_adaptive()
        self._check_recipe()

    def _check_recipe(self) -> None:
        """Today's nanochat options (model/recipe.py)."""
        for name in ("residual_scalars", "smear", "backout"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.value_embeds, str) and re.fullmatch(r"\d+(,\d+)*", self.value_embeds):  # a flag's "1,3"
            self.value_embeds = [int(i) for i in self.value_embeds.split(",")]
        if self.value_embeds not in (None, "alternating"):
            if not isinstance(self.value_embeds, (list, tuple)) or \
                    any(not isinstance(i, int) or isinstance(i, bool) for i in self.value_embeds):
                _fail("value_embeds", f"must be \"alternating\" or a list of layer indices, got {self.value_embeds!r}")
            self.value_embeds = sorted(set(self.value_embeds))
            attention = [i for i, kind in enumerate(self.block_pattern) if kind == ATTENTION]
            bad = [i for i in self.value_embeds if i not in attention]
            if bad:
                _fail("value_embeds", f"layers {bad} are not attention layers", f"attention layers: {attention}")
        if self.value_embed_layers and self.n_embd < VALUE_GATE_CHANNELS:
            _fail("value_embeds", f"the gate reads {VALUE_GATE_CHANNELS} channels, more than n_embd={self.n_embd}")
        if self.smear and self.n_embd < SMEAR_GATE_CHANNELS:
            _fail("smear", f"the gate reads {SMEAR_GATE_CHANNELS} channels, more than n_embd={self.n_embd}")
        if self.backout_layer is not None and (not isinstance(self.backout_layer, int) or
                                               not 0 <= self.backout_layer < self.n_layer):
            _fail("backout_layer", f"must be a layer index in [0, {self.n_layer - 1}], got {self.backout_layer!r}")
        if not isinstance(self.qk_scale, (int, float)) or self.qk_scale <= 0:
            _fail("qk_scale", f"must be > 0, got {self.qk_scale!r}")

    def _derive_layers(self) -> None:
        """n_layer (from the loop, depth or the pattern's length; else 12) and block_pattern, one kind per layer."""
        kinds = parse_block_pattern(self.block_pattern)
        if self.depth is not None:
            _positive_int("depth", self.depth)
        self.loop = _loop_config(self.loop)
        if self.loop is not None and self.depth is not None and self.n_layer is None \
                and self.depth != self.loop.layers:
            _fail("loop", f"prelude + recur + coda = {self.loop.layers} layers, but depth={self.depth}",
                  "set the width of a looped model with `size`, or make depth agree")
        if self.n_layer is None:
            if self.loop is not None:
                self.n_layer = self.loop.layers
            elif self.depth is not None:
                self.n_layer = self.depth
            elif len(kinds) > 1:
                self.n_layer = len(kinds)
            else:
                self.n_layer = 12
        _positive_int("n_layer", self.n_layer)
        if self.loop is not None and self.n_layer != self.loop.layers:
            _fail("loop", f"prelude + recur + coda = {self.loop.layers} layers, but n_layer={self.n_layer}")
        if self.n_layer % len(kinds):
            _fail("block_pattern", f"has {len(kinds)} blocks, which does not tile n_layer={self.n_layer}",
                  "give one kind per layer, or a pattern whose length divides n_layer")
        self.block_pattern = kinds * (self.n_layer // len(kinds))
        missing = sorted({k for k in self.block_pattern if k not in AVAILABLE_BLOCKS})
        if missing:
            _fail("block_pattern", f"block kind(s) {missing} are not available yet",
                  "use 'T' (attention), 'M' (Mamba-1) and 'M2' (Mamba-2) blocks in this version")

    def _derive_width(self) -> None:
        """n_embd from the width dial (size, else depth, else n_layer), and the query and K/V heads."""
        if self.size is not None:
            _positive_int("size", self.size)
        size = self.size if self.size is not None else self.depth if self.depth is not None else self.n_layer
        if self.n_embd is None:
            self.n_embd = math.ceil(size * self.aspect_ratio / self.head_dim) * self.head_dim
        _positive_int("n_embd", self.n_embd)
        if self.n_head is None:
            self.n_head = max(1, self.n_embd // self.head_dim)
        _positive_int("n_head", self.n_head)
        if self.n_embd % self.n_head:
            _fail("n_head", f"{self.n_head} does not divide n_embd={self.n_embd}")
        if (self.n_embd // self.n_head) % 2:
            _fail("n_head", f"gives an odd head size {self.n_embd // self.n_head}",
                  "rotary embeddings need an even head size")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _positive_int("n_kv_head", self.n_kv_head)
        if self.n_head % self.n_kv_head:
            _fail("n_kv_head", f"{self.n_kv_head} does not divide n_head={self.n_head}",
                  "grouped-query attention shares each K/V head among a whole number of query heads")

    def _check_positions(self) -> None:
        """Attention windows, the logit softcap and the rotary base."""
        if not isinstance(self.window_pattern, str) or not re.fullmatch(r"[SLsl]+", self.window_pattern):
            _fail("window_pattern", f"must be letters S (short) and L (long), got {self.window_pattern!r}")
        self.window_pattern = self.window_pattern.upper()
        if self.short_window is None:
            self.short_window = max(1, self.sequence_len // 2)
        _positive_int("short_window", self.short_window)
        if not isinstance(self.logit_softcap, (int, float)) or self.logit_softcap < 0:
            _fail("logit_softcap", f"must be >= 0 (0 disables it), got {self.logit_softcap!r}")
        if not isinstance(self.rope_base, (int, float)) or self.rope_base <= 0:
            _fail("rope_base", f"must be > 0, got {self.rope_base!r}")

    def _check_mamba(self) -> None:
        for name in ("mamba_d_state", "mamba_d_conv", "mamba_expand"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.mamba_dt_rank, str) and self.mamba_dt_rank.isdigit():
            self.mamba_dt_rank = int(self.mamba_dt_rank)  # from a command-line flag
        if self.mamba_dt_rank != "auto":
            _positive_int("mamba_dt_rank", self.mamba_dt_rank)
        if not isinstance(self.mamba_use_mlp, bool):
            _fail("mamba_use_mlp", f"must be true or false, got {self.mamba_use_mlp!r}")

    def _check_norm_width(self) -> None:
        if self.norm_width is not None:
            _positive_int("norm_width", self.norm_width)
            if self.norm_width > self.n_embd:
                _fail("norm_width", f"{self.norm_width} exceeds n_embd={self.n_embd}",
                      "it is the width before widening, so at most n_embd; leave it unset for an unwidened model")

    def _check_adaptive(self) -> None:
        _positive_int("gate_hidden", self.gate_hidden)
        _positive_int("predictor_hidden", self.predictor_hidden)
        if self.min_exit_layer is not None:
            if not isinstance(self.min_exit_layer, int) or isinstance(self.min_exit_layer, bool) \
                    or not 1 <= self.min_exit_layer < self.n_layer:
                _fail("min_exit_layer", f"must be an integer in [1, n_layer - 1 = {self.n_layer - 1}] or None, "
                      f"got {self.min_exit_layer!r}", "an exit after block k needs 1 <= k < n_layer")
            if self.loop is not None:
                _fail("min_exit_layer", "early exit is not defined for looped models",
                      "looped models exit by their own criteria (loops=Loops(exit='kl'))")
        if not isinstance(self.expansion_gates, bool):
            _fail("expansion_gates", f"must be true or false, got {self.expansion_gates!r}")
        if self.expansion_gates:
            if self.loop is not None:
                _fail("expansion_gates", "not defined for looped models")
            if not self.expansion_layers:
                _fail("expansion_gates", f"n_layer={self.n_layer} has no layer k >= 0.75 n_layer with a block after it")
            if ATTENTION not in self.block_pattern[self.expansion_layers[0]:]:
                _fail("expansion_gates", f"no attention layer at or after layer {self.expansion_layers[0]} "
                      f"(0.75 n_layer), so expanding would change nothing",
                      "only attention/MLP layers have Matryoshka widths")
        if not isinstance(self.predictor_layers, int) or isinstance(self.predictor_layers, bool) \
                or not 0 <= self.predictor_layers < self.n_layer:
            _fail("predictor_layers", f"must be an integer in [0, n_layer - 1 = {self.n_layer - 1}], "
                  f"got {self.predictor_layers!r}", "0 disables the width predictor")
        if self.predictor_layers:
            if self.loop is not None:
                _fail("predictor_layers", "the width predictor is not defined for looped models")
            if ATTENTION not in self.block_pattern[self.predictor_layers:]:
                _fail("predictor_layers", f"no attention layer after the first {self.predictor_layers}, so "
                      "there is no width to predict")

    @property
    def exit_layers(self) -> list[int]:
        """Layers k after whose block a token may exit (k blocks ran); empty without min_exit_layer."""
        return [] if self.min_exit_layer is None else list(range(self.min_exit_layer, self.n_layer))

    @property
    def expansion_layers(self) -> list[int]:
        """Layers k >= 0.75 n_layer after whose block an ExpansionGate may widen the remaining layers."""
        return list(range(max(1, math.ceil(0.75 * self.n_layer)), self.n_layer))

    def _check_mamba2(self) -> None:
        for name in ("mamba2_d_state", "mamba2_headdim", "mamba2_ngroups", "mamba2_chunk_size", "mamba2_expand",
                     "mamba2_d_conv"):
            _positive_int(name, getattr(self, name))
        if MAMBA2 not in self.block_pattern:  # the shapes below only matter where an M2 block exists
            return
        d_inner = self.mamba2_expand * self.n_embd
        if d_inner % self.mamba2_headdim:
            _fail("mamba2_headdim", f"{self.mamba2_headdim} does not divide d_inner = mamba2_expand * n_embd = "
                  f"{d_inner}", "each head is mamba2_headdim channels wide")
        nheads = d_inner // self.mamba2_headdim
        if nheads % self.mamba2_ngroups:
            _fail("mamba2_ngroups", f"{self.mamba2_ngroups} does not divide the {nheads} heads "
                  f"(d_inner {d_inner} / mamba2_headdim {self.mamba2_headdim})",
                  "each group of heads shares one B and C")

    def _check_matryoshka(self) -> None:
        hd = self.model_head_dim
        if self.matryoshka_levels is None:
            levels, w = [], hd
            while w < self.n_embd:
                levels.append(w)
                w *= 2
            self.matryoshka_levels = levels + [self.n_embd]
        levels = self.matryoshka_levels
        if isinstance(levels, str) and re.fullmatch(r"\d+(,\d+)*", levels):  # from a flag: "128,256,512"
            levels = [int(w) for w in levels.split(",")]
        if not isinstance(levels, (list, tuple)) or not levels or not all(
                isinstance(w, int) and not isinstance(w, bool) for w in levels):
            _fail("matryoshka_levels", f"must be a list of integer widths, got {levels!r}")
        bad = [w for w in levels if w <= 0 or w > self.n_embd or w % hd]
        if bad:
            _fail("matryoshka_levels", f"widths {bad} are not whole numbers of heads up to n_embd={self.n_embd}",
                  f"use multiples of the head size {hd}")
        self.matryoshka_levels = sorted(set(levels) | {self.n_embd})
        if self.compute_modes is None:
            d = self.n_embd
            targets = {"ghost": min(128, d // 4), "whisper": d // 4, "normal": d // 2, "think": d}
            self.compute_modes = {name: next(w for w in self.matryoshka_levels if w >= min(t, self.n_embd))
                                  for name, t in targets.items()}
        if not isinstance(self.compute_modes, dict) or not self.compute_modes:
            _fail("compute_modes", f"must be a table of mode name -> width, got {self.compute_modes!r}")
        for name, width in self.compute_modes.items():
            if width not in self.matryoshka_levels:
                _fail("compute_modes", f"mode {name!r} has width {width!r}, not one of matryoshka_levels "
                      f"{self.matryoshka_levels}")

    def layer_widths(self, width: Any = None) -> list[int | None]:
        """Per-layer widths for a compute choice: None (full), a width, a mode name, or a per-layer list.
        Non-attention layers always run at full width (None)."""
        if width is None:
            return [None] * self.n_layer
        if isinstance(width, str):
            if width.lower() not in self.compute_modes:
                _fail("width", f"unknown compute mode {width!r}", f"use one of {sorted(self.compute_modes)}")
            width = self.compute_modes[width.lower()]
        widths = list(width) if isinstance(width, (list, tuple)) else [width] * self.n_layer
        if len(widths) != self.n_layer:
            _fail("width", f"a per-layer list needs {self.n_layer} widths, got {len(widths)}")
        for w in widths:
            if w is not None and w not in self.matryoshka_levels:
                _fail("width", f"{w!r} is not a Matryoshka level", f"use one of {self.matryoshka_levels}")
        return [None if kind != ATTENTION or w in (None, self.n_embd) else w
                for kind, w in zip(self.block_pattern, widths, strict=True)]

    def width_values(self, width: Any = None) -> list[int]:
        """layer_widths as numbers, n_embd for full width: the form tensors and level tables need (blocks take
        layer_widths, where full width is None; `block_width` turns a number back)."""
        return [w or self.n_embd for w in self.layer_widths(width)]

    def block_width(self, width: int) -> int | None:
        """A width as a number (n_embd = full) in the form blocks take (None = full)."""
        return None if width == self.n_embd else width

    def distinct_modes(self) -> list[list[str]]:
        """The compute modes grouped by the widths they run (at small n_embd Ghost and Whisper are one width):
        one computation, and one row in every report, per group."""
        groups: dict[tuple, list[str]] = {}
        for mode in self.compute_modes:
            groups.setdefault(tuple(self.layer_widths(mode)), []).append(mode)
        return list(groups.values())

    @property
    def model_head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attention_windows(self) -> list[int | None]:
        """Attention window per layer (None = full causal context; None for non-attention layers)."""
        attention_layers = [i for i, k in enumerate(self.block_pattern) if k == ATTENTION]
        windows: list[int | None] = [None] * self.n_layer
        for j, layer in enumerate(attention_layers):
            short = self.window_pattern[j % len(self.window_pattern)] == "S"
            if short and layer != attention_layers[-1]:
                windows[layer] = self.short_window
        return windows

    def describe(self) -> str:
        pattern = "".join(self.block_pattern)
        return (f"n_layer={self.n_layer} n_embd={self.n_embd} n_head={self.n_head} "
                f"n_kv_head={self.n_kv_head} head_dim={self.model_head_dim} vocab_size={self.vocab_size} "
                f"sequence_len={self.sequence_len} blocks={pattern} windows={self.window_pattern}"
                + (f" loop={self.loop.prelude}+{self.loop.recur}x{self.loop.mean_recurrence}+{self.loop.coda}"
                   if self.loop is not None else "") + self.describe_recipe())

    @property
    def value_embed_layers(self) -> list[int]:
        """The layers with value embeddings; "alternating": every other attention layer, back from the last one
        (nanochat's i % 2 == (n_layer - 1) % 2 in an all-attention stack). Kept unresolved in the field, so a
        config derived with other layers (dataclasses.replace) alternates over its own."""
        if self.value_embeds == "alternating":
            return sorted([i for i, kind in enumerate(self.block_pattern) if kind == ATTENTION][::-1][::2])
        return list(self.value_embeds or ())

    @property
    def backout_at(self) -> int:
        """The block whose output backout subtracts (backout_layer; None: n_layer // 2, as nanochat)."""
        return self.n_layer // 2 if self.backout_layer is None else self.backout_layer

    def describe_recipe(self) -> str:
        """Today's nanochat options in use (model/recipe.py), or '' for the October-2025 architecture."""
        parts = [name for name in ("residual_scalars", "smear") if getattr(self, name)]
        if self.value_embed_layers:
            parts.append(f"value_embeds={','.join(map(str, self.value_embed_layers))}")
        if self.backout:
            parts.append(f"backout@{self.backout_at}")
        if self.qk_scale != 1.0:
            parts.append(f"qk_scale={self.qk_scale:g}")
        return f" recipe={'+'.join(parts)}" if parts else ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return _from_dict(cls, data, "model config")


@dataclass
class TrainConfig:
    """A training run: data, batch, optimizer, schedule, evaluation and checkpointing."""

    run_name: str = "default"  # checkpoints go to $ADAMBA_HOME/checkpoints/<run>/
    data: str = "embedded"  # 'embedded', a local file/folder, or 'hf:<owner>/<dataset>'
    text_field: str = "text"  # the text of a .jsonl object or a .parquet column
    tokenizer: str | None = None  # a tokenizer name under $ADAMBA_HOME/tokenizers (None: one trained for the data)
    tokenizer_vocab_size: int = 4096  # for a tokenizer trained on the fly (the model takes its size)
    val_fraction: float = 0.05
    device_batch_size: int = 8
    total_batch_size: int = 8 * 256  # tokens per optimizer step, over all ranks and micro-steps; -1: nanochat's rule
    num_iterations: int = 100
    # > 0: train on this many tokens per scaling parameter instead of num_iterations (nanochat: 12; train/horizon.py)
    target_param_data_ratio: float = 0.0
    time_budget_s: float = 0.0  # > 0: stop (and save) once this much wall time has passed
    matrix_lr: float = 0.02  # Muon
    # Muon's step: "classic" (Newton-Schulz, as nanochat in October 2025) or "polar" (nanochat since March 2026:
    # Polar Express, with the options below; train/muon.py)
    muon: str = "classic"  # classic (Newton-Schulz, October 2025) or polar (today's nanochat step)
    muon_beta2: float = 0.9  # polar: NorMuon's second-moment decay per neuron; 0 turns NorMuon off
    muon_equilibrate: bool = True  # polar: MuonEq row equilibration before the orthogonalisation
    muon_renormalise: bool = True  # polar: Muon+ renormalisation to sqrt(min(rows, cols)) after it
    muon_cautious_wd: bool = True  # polar: weight decay only where the update and the weight agree in sign
    embedding_lr: float = 0.2  # AdamW
    unembedding_lr: float = 0.004  # AdamW
    scalar_lr: float = 0.004  # AdamW, for non-matrix block parameters (Mamba's A_log, D, dt bias, conv)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    grad_clip: float = 0.0  # 0 disables
    dtype: str = "auto"  # auto: bfloat16 on capable GPUs, float32 elsewhere
    device: str = "auto"
    compile: bool | None = None  # None: on for CUDA, off on CPU
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state over ranks (train/fsdp.py)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward: less memory
    # float8 training matmuls through torchao (model/float8.py): None (off), "tensorwise", "rowwise" or
    # "rowwise_with_gw_hp"; GPUs of compute capability 8.9 or later
    float8: str | None = None
    eval_every: int = 50  # steps; 0 disables periodic evaluation
    eval_tokens: int = 32768  # validation tokens per bpb evaluation
    sample_every: int = 0  # steps; 0 disables periodic samples
    save_every: int = 0  # steps; 0 saves only at the end
    seed: int = 42
    wandb: bool = False
    # Matryoshka training: every optimizer micro-step also trains narrower slices of the model.
    matryoshka: bool = False
    # "sandwich": full, smallest and `matryoshka_middle` random middle widths per micro-step (Yu & Huang 2019,
    # slimmable networks); "sample": one random level per micro-step (MatFormer, Devvrit et al. 2023).
    matryoshka_rule: str = "sandwich"
    matryoshka_middle: int = 1
    matryoshka_per_layer: bool = False  # sampled widths differ per layer (True) or are one per model (False)
    # Without --matryoshka: train at this one compute choice (a mode name or width; None = full). A model
    # trained only at width w is the independent control a Matryoshka slice of width w is compared against.
    width: Any = None
    # lambda of the energy penalty lambda * E[FLOPs/token] / FLOPs(full) (train/energy.py). It needs something that
    # chooses widths to have a gradient: the LayerDimPredictor (predictor_weight > 0); with sampled or fixed widths
    # the trainer says so and leaves the loss alone.
    energy_weight: float = 0.0
    # Adaptive compute (train/losses.py), all off by default. Early-exit loss (LayerSkip, Elhoushi et al. 2024):
    # CE of every exit layer's logits (weights growing with depth, summing to 1) and/or KL from the final layer's
    # distribution, each layer switched on by a curriculum ("gradual": from the last exit to the first over the
    # first `exit_curriculum` fraction of the steps; "none": all from step 0).
    exit_loss_weight: float = 0.0
    exit_kl_weight: float = 0.0
    exit_curriculum: str = "gradual"
    exit_curriculum_fraction: float = 0.5
    # ConfidenceGate / ExpansionGate training: BCE against the honest label "this exit's (or this narrow run's)
    # next-token choice agrees with the full model's" ("argmax"), or "KL(full || exit) < gate_kl_delta" ("kl").
    gate_loss_weight: float = 0.0
    gate_label: str = "argmax"
    gate_kl_delta: float = 0.1
    adaptive_lr: float = 0.003  # AdamW learning rate of the gates and the width predictor
    # LayerDimPredictor training: CE of the Gumbel-softmax mixture of widths + energy_weight * E[FLOPs]/F(full).
    predictor_weight: float = 0.0
    predictor_temperature: float = 1.0  # Gumbel-softmax temperature (straight-through: hard in the forward)
    predictor_context: int = 64  # prompt tokens per row the predictor reads; the loss counts the tokens after them
    # Looped models: 0 draws each micro-step's loop count from the Poisson-lognormal (train/loops.py); r > 0
    # trains every micro-step at r iterations (the fixed-r control that sampled r is compared against).
    fixed_loops: int = 0
    # Growth (adamba/surgery, train/stages.py): start from a checkpoint's weights (a run name or folder, e.g. a
    # surgery's output) with a fresh optimizer and schedule; the model flags are then ignored.
    init_from: str | None = None
    # What trains after a surgery: "mamba-only" (only the Mamba blocks the surgery inserted), "new-dims" (after
    # widening: only the new dimensions), "all"; None: everything, as in any run.
    stage: str | None = None
    metrics_file: str | None = None  # JSONL; default <checkpoint dir>/metrics.jsonl

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.dtype == "float16":  # its narrow exponent underflows gradients unless the loss is scaled
            _fail("dtype", "float16 training needs loss scaling (a GradScaler), which adamba does not do",
                  "use bfloat16 (GPUs from Ampere on) or float32")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            _fail("dtype", f"unknown dtype {self.dtype!r}", "use auto, float32 or bfloat16")
        if self.float8 not in (None, *FLOAT8_RECIPES):
            _fail("float8", f"unknown recipe {self.float8!r}", f"use {', '.join(FLOAT8_RECIPES)}, or leave it off")
        self._check_widths()
        self._check_adaptive()
        if self.stage is not None and self.stage not in TRAIN_STAGES:
            _fail("stage", f"unknown stage {self.stage!r}", f"use one of {', '.join(TRAIN_STAGES)}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.run_name):
            _fail("run_name", f"{self.run_name!r} is not a valid folder name", "use letters, digits, '.', '_', '-'")

    def _check_numbers(self) -> None:
        """Batch, schedule, evaluation and optimizer numbers."""
        if not isinstance(self.target_param_data_ratio, (int, float)) or self.target_param_data_ratio < 0:
            _fail("target_param_data_ratio", f"must be a non-negative number, got {self.target_param_data_ratio!r}")
        if self.total_batch_size == -1 and not self.target_param_data_ratio:
            _fail("total_batch_size", "-1 (the automatic batch) follows from the token horizon",
                  "set target_param_data_ratio too (nanochat: 12), or give a batch in tokens")
        for name in ("device_batch_size", "total_batch_size", "num_iterations", "tokenizer_vocab_size"):
            if not (name == "total_batch_size" and self.total_batch_size == -1):
                _positive_int(name, getattr(self, name))
        for name in ("eval_every", "sample_every", "save_every", "eval_tokens", "fixed_loops"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                _fail(name, f"must be a non-negative integer, got {value!r}")
        for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay", "grad_clip",
                     "time_budget_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                _fail(name, f"must be a non-negative number, got {value!r}")
        for name in ("val_fraction", "warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                _fail(name, f"must be between 0 and 1, got {value!r}")
        if self.warmup_ratio + self.warmdown_ratio > 1:
            _fail("warmdown_ratio", "warmup_ratio + warmdown_ratio exceeds 1")
        if self.muon not in ("classic", "polar"):
            _fail("muon", f"unknown Muon step {self.muon!r}", "use classic or polar")
        if not isinstance(self.muon_beta2, (int, float)) or not 0 <= self.muon_beta2 < 1:
            _fail("muon_beta2", f"must be in [0, 1), got {self.muon_beta2!r}", "0 turns NorMuon off")

    def _check_widths(self) -> None:
        """Matryoshka training, or one fixed width, and the energy penalty's weight."""
        if self.matryoshka_rule not in ("sandwich", "sample"):
            _fail("matryoshka_rule", f"unknown rule {self.matryoshka_rule!r}", "use sandwich or sample")
        if not isinstance(self.matryoshka_middle, int) or self.matryoshka_middle < 0:
            _fail("matryoshka_middle", f"must be a non-negative integer, got {self.matryoshka_middle!r}")
        if self.width is not None and self.matryoshka:
            _fail("width", "a fixed training width and --matryoshka exclude each other",
                  "use matryoshka to train every width, or width to train one")
        self.width = parse_width(self.width)  # from a command-line flag or a TOML string
        if not isinstance(self.energy_weight, (int, float)) or self.energy_weight < 0:
            _fail("energy_weight", f"must be a non-negative number, got {self.energy_weight!r}")

    def _check_adaptive(self) -> None:
        """Early-exit, gate and width-predictor training terms."""
        for name in ("exit_loss_weight", "exit_kl_weight", "gate_loss_weight", "adaptive_lr", "predictor_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                _fail(name, f"must be a non-negative number, got {value!r}")
        if self.exit_curriculum not in ("gradual", "none"):
            _fail("exit_curriculum", f"unknown curriculum {self.exit_curriculum!r}", "use gradual or none")
        if not isinstance(self.exit_curriculum_fraction, (int, float)) or not 0 <= self.exit_curriculum_fraction <= 1:
            _fail("exit_curriculum_fraction", f"must be between 0 and 1, got {self.exit_curriculum_fraction!r}")
        if self.gate_label not in ("argmax", "kl"):
            _fail("gate_label", f"unknown label {self.gate_label!r}", "use argmax or kl")
        for name in ("gate_kl_delta", "predictor_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                _fail(name, f"must be > 0, got {value!r}")
        _positive_int("predictor_context", self.predictor_context)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return _from_dict(cls, data, "train config")


def _from_dict(cls, data: dict, what: str):
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a table of fields, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**data)


@dataclass
class SFTConfig:
    """Supervised fine-tuning (train/sft.py): what to fine-tune on what. The batch, learning rates, schedule,
    Matryoshka and checkpointing are a TrainConfig's, with SFT's defaults (SFT_TRAIN_DEFAULTS); its data, tokenizer
    and num_iterations fields are not used (SFT_IGNORED: the conversations and the base's tokenizer replace them)."""

    base: str = ""  # the checkpoint to fine-tune: run name, run folder or checkpoint folder (nanochat imports too)
    mixture: str = "offline"  # training conversations (adamba/tasks/mixtures.py): offline, or smoltalk (hf:)
    num_epochs: int = 1  # passes over the mixture, when num_iterations is 0
    num_iterations: int = 0  # optimizer steps; 0: num_epochs over the mixture
    init_lr_frac: float = 0.02  # nanochat: fine-tuning starts at this fraction of the configured learning rates
    val_conversations: int = 256  # held-out conversations (the tasks' test splits) for the validation loss
    chat_eval_every: int = 0  # steps between small chat evaluations; 0: only at the end
    chat_eval_items: int = 32  # items per task in those evaluations

    def __post_init__(self) -> None:
        if not self.base:
            _fail("base", "no checkpoint to fine-tune", "give a run name, run folder or checkpoint folder")
        for name in ("num_epochs", "val_conversations", "chat_eval_items"):
            _positive_int(name, getattr(self, name))
        for name in ("num_iterations", "chat_eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                _fail(name, f"must be a non-negative integer, got {value!r}")
        if not isinstance(self.init_lr_frac, (int, float)) or not 0 < self.init_lr_frac <= 1:
            _fail("init_lr_frac", f"must be in (0, 1], got {self.init_lr_frac!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SFTConfig:
        return _from_dict(cls, data, "sft config")


# nanochat's chat_sft schedule: no warmup, linear decay to 0 over the whole run; small batches of conversations.
SFT_TRAIN_DEFAULTS = dict(run_name="sft", warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0,
                          device_batch_size=4, eval_every=50, eval_tokens=16384)
SFT_IGNORED = ("data", "text_field", "tokenizer", "tokenizer_vocab_size", "val_fraction", "num_iterations",
               "init_from", "sample_every")


@dataclass
class RLConfig:
    """Reinforcement learning on verifiable rewards (train/rl.py): GRPO from a chat checkpoint. Learning rates,
    device, dtype, seed, run name, grad_clip and save_every are a TrainConfig's (RL_TRAIN_DEFAULTS)."""

    base: str = ""  # the chat checkpoint to improve: run name, run folder or checkpoint folder
    task: str = "arithmetic"  # the task whose checker is the reward (tasks/mixtures.py: RL_TASKS)
    num_steps: int = 60  # RL steps (each: rollouts, then ppo_epochs x minibatches optimizer steps)
    prompts_per_step: int = 16  # problems per step, over all ranks
    samples_per_prompt: int = 8  # G: completions sampled per problem, the group their advantages compare within
    max_new_tokens: int = 48  # longest completion
    temperature: float = 1.0  # sampling temperature of the rollouts (the log-probabilities use the same)
    top_k: int = 0  # 0: sample the full distribution, so the ratio is exactly the policy's
    init_lr_frac: float = 0.05  # nanochat: RL starts at this fraction of the configured learning rates
    scale_by_std: bool = False  # divide advantages by the group's std (GRPO) or not (nanochat, Dr. GRPO)
    ppo_epochs: int = 1  # optimisation passes over each step's rollouts
    minibatches: int = 1  # optimizer steps per pass (1 pass x 1 minibatch: on-policy, the ratio is 1)
    clip_low: float = 0.2  # PPO's clip range below 1
    clip_high: float = 0.2  # and above (DAPO's clip-higher: 0.28)
    kl_coef: float = 0.0  # beta of the k3 KL penalty to the frozen starting model (0: no reference is kept)
    eval_every: int = 20  # steps between held-out evaluations (0: only at the start and the end)
    eval_items: int = 100  # held-out problems per evaluation
    eval_samples: int = 8  # samples per held-out problem: pass@1 and pass@k with k = this
    # Compute-aware RL: None trains at full width; a number lambda >= 0 samples each completion's per-layer widths
    # from the width predictor (its log-probability gets the completion's advantage) and rewards
    # correct - lambda * FLOPs spent / FLOPs of the prompt and a max_new_tokens answer at full width (0: the width
    # choice is learnt, unpriced: the control)
    flops_price: float | None = None  # lambda; None: full width, no compute choice
    predictor_layers: int = 1  # blocks the width predictor reads, when RL adds one to a model that has none

    def __post_init__(self) -> None:
        if not self.base:
            _fail("base", "no checkpoint to improve", "give a run name, run folder or checkpoint folder")
        for name in ("num_steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs",
                     "minibatches", "eval_items", "eval_samples"):
            _positive_int(name, getattr(self, name))
        if self.samples_per_prompt < 2:
            _fail("samples_per_prompt", "a group needs at least 2 samples (advantages compare within it)")
        for name in ("top_k", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                _fail(name, f"must be a non-negative integer, got {value!r}")
        for name in ("temperature", "init_lr_frac"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                _fail(name, f"must be > 0, got {getattr(self, name)!r}")
        for name in ("clip_low", "clip_high", "kl_coef"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                _fail(name, f"must be >= 0, got {getattr(self, name)!r}")
        if self.flops_price is not None and (not isinstance(self.flops_price, (int, float))
                                             or isinstance(self.flops_price, bool) or not self.flops_price >= 0):
            _fail("flops_price", f"must be a number >= 0, got {self.flops_price!r}", "omit it to train at full width")
        _positive_int("predictor_layers", self.predictor_layers)
        if self.clip_low >= 1:
            _fail("clip_low", f"must be below 1 (the ratio is clipped to 1 - clip_low), got {self.clip_low!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RLConfig:
        return _from_dict(cls, data, "rl config")


# nanochat's chat_rl.py; "grpo": DeepSeekMath's choices (std-scaled advantages, KL 0.04 to the reference) with
# PPO's clipped ratio over two passes of two minibatches.
RL_PRESETS = {
    "nanochat": dict(prompts_per_step=16, samples_per_prompt=16, max_new_tokens=256, temperature=1.0, top_k=50,
                     init_lr_frac=0.05, scale_by_std=False, ppo_epochs=1, minibatches=1, kl_coef=0.0),
    "grpo": dict(scale_by_std=True, kl_coef=0.04, ppo_epochs=2, minibatches=2, clip_low=0.2, clip_high=0.2),
}
# nanochat's RL schedule: no warmup, learning rates decay linearly to 0 over the run.
# The width predictor's rate (compute-aware RL only; nothing else RL trains uses it): at pretraining's 0.003 times
# init_lr_frac it barely moves in 30 steps, at 0.05 the priced choice is learnt (BENCHMARKS.md, "rl").
RL_TRAIN_DEFAULTS = dict(run_name="rl", warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0, adaptive_lr=0.05)
RL_TRAIN_FIELDS = ("run_name", "matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "adaptive_lr",
                   "weight_decay", "warmup_ratio", "warmdown_ratio", "final_lr_frac", "grad_clip", "dtype", "device",
                   "compile", "fsdp", "save_every", "seed", "muon", "muon_beta2", "muon_equilibrate",
                   "muon_renormalise", "muon_cautious_wd", "float8", "activation_checkpointing")
RL_IGNORED = tuple(f.name for f in fields(TrainConfig) if f.name not in RL_TRAIN_FIELDS)


@dataclass
class RunConfig:
    """A TOML file with optional [model] and [train] tables."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def read_toml(path: str | Path, what: str = "config file") -> dict:
    """A TOML file as a dict; a missing or malformed file is a ValueError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{what} {path} is not valid TOML: {err}") from None


def load_toml(path: str | Path, model_overrides: dict | None = None,
              train_overrides: dict | None = None) -> RunConfig:
    """Read a run config from TOML; overrides (e.g. from CLI flags) win over the file."""
    path = Path(path)
    data = read_toml(path)
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ValueError(f"config file {path}: unknown table(s) {unknown}; use [model] and [train]")
    model = {**data.get("model", {}), **(model_overrides or {})}
    train = {**data.get("train", {}), **(train_overrides or {})}
    return RunConfig(ModelConfig.from_dict(model), TrainConfig.from_dict(train))
