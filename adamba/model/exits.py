"""Per-token early exit and expansion, and the gates that decide them (issue 6).

Exit after block k (k blocks ran) gives logits through the shared final norm, lm_head and softcap
(`AdambaLM.head`), so an exit at k is exactly the model truncated to its first k blocks.

One definition of a per-token exit, used by the full forward, decoding, the FLOP counter and training:
token t with exit layer e_t runs blocks < e_t normally; for every block j >= e_t its residual stays frozen at
h_{e_t}, but block j still runs its *state update* on that frozen input, so later tokens see a consistent cache
(CALM's state propagation, Schuster et al. 2022, "Confident Adaptive Language Modeling", §3.3): attention layers
write the K/V computed from rms_norm(h_{e_t}), Mamba / Mamba-2 layers advance their conv and SSM state with
h_{e_t} as input. In a full forward that is simply

    x_{j+1}[t] = x_j[t] if t exited at or before j else block_j(x_j)[t],

with every block applied to the whole sequence (attention of active tokens reads the K/V of exited tokens computed
from their frozen input; Mamba scans over every token). The head on x_L then gives each token its exit's logits.
The seeds decided one exit per batch and left deeper layers without K/V for exited tokens; here every token
decides alone and every layer's state stays complete.

Decisions come from gates: a ConfidenceGate per exit layer reads each token's normalised hidden state (detached:
the gate learns to judge the model, not to change it) and gives P(this exit's next-token choice agrees with the
full model's); the token exits where it reaches the layer's threshold (calibrated by `adamba calibrate`, else the
seeds' fixed 0.95). An ExpansionGate after each block k >= 0.75 n_layer gives P(the narrow run agrees with the
full-width model); below its threshold (the seeds' 0.5) the token's remaining attention layers run at twice their
width, capped at n_embd.

The decisions are made by an `ExitPolicy` at the fixed point before each block of the forward's one loop
(forward_pass.py) and reach the block as its context's `frozen` tokens and widths; each block kind implements the
rule itself (attention.py, mamba.py). Compute: a block with some active tokens runs on every token and keeps the
frozen ones' input (exact and simple); the FLOP counter (`count_flops(exit_layer=..., gates=...)`) counts what
each token's decisions require -- the block for active tokens, only the state update for exited ones -- which is
what a decode step does when its rows agree (batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .flops import count_flops
from .init import init_linear_
from .norm import rms_norm
from .predictor import LayerDimPredictor, predict_widths

SEED_EXIT_THRESHOLD = 0.95  # the seeds' fixed ConfidenceGate threshold
SEED_EXPAND_THRESHOLD = 0.5  # the seeds' fixed ExpansionGate threshold


class Gate(nn.Module):
    """A per-token confidence: a 2-layer MLP on the token's normalised hidden state, giving a logit.

    The input is detached, so the gate's loss never moves the language model. Trained with BCE against an honest
    label (train/losses.py), so its sigmoid is a probability the thresholds can be calibrated against -- the
    seeds' gate saw only the last token of an un-normalised residual, with an MSE target that never reached its
    own threshold."""

    def __init__(self, n_embd: int, hidden: int, norm_width: int | None = None):
        super().__init__()
        self.norm_width = norm_width  # the model's residual norm (norm.py)
        self.fc = nn.Linear(n_embd, hidden)
        self.out = nn.Linear(hidden, 1)

    @torch.no_grad()
    def init_weights(self) -> None:
        init_linear_(self.fc)
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.out.weight)  # starts at confidence 0.5 for every token
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (...,) for hidden states (..., n_embd)."""
        x = rms_norm(h.detach(), self.norm_width).to(self.fc.weight.dtype)
        return self.out(F.gelu(self.fc(x))).squeeze(-1)


class AdaptiveHeads(nn.Module):
    """The adaptive-compute modules of a model: ConfidenceGates (per exit layer), ExpansionGates and the
    LayerDimPredictor, each present only where the config asks for it. `thresholds` holds calibrated exit
    thresholds ({layer: threshold}, set by `adamba calibrate` through the checkpoint loader), or None."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h, c = config.n_embd, config.gate_hidden, config.norm_width
        self.exit_gates = nn.ModuleDict({str(k): Gate(d, h, c) for k in config.exit_layers})
        self.expansion_gates = nn.ModuleDict({str(k): Gate(d, h, c) for k in config.expansion_layers}
                                             if config.expansion_gates else {})
        self.predictor = LayerDimPredictor(config) if config.predictor_layers else None
        self.thresholds: dict[int, float] | None = None

    @staticmethod
    def wanted(config: ModelConfig) -> bool:
        return bool(config.exit_layers or config.expansion_gates or config.predictor_layers)

    def init_weights(self) -> None:
        for gate in [*self.exit_gates.values(), *self.expansion_gates.values()]:
            gate.init_weights()
        if self.predictor is not None:
            self.predictor.init_weights()


@dataclass(frozen=True)
class Adaptive:
    """A test-time compute policy: `model(idx, compute=Compute(adaptive=Adaptive(...)))`, and
    the same `compute=` of `Engine.generate`.

    exit: use the ConfidenceGates (per-token early exit).
    threshold: exit where the gate's confidence >= threshold: a float for every exit layer, a {layer: float}
        table, or None: the checkpoint's calibrated thresholds if any, else the seeds' fixed 0.95.
    expand: ExpansionGate threshold (the seeds used 0.5); None: no expansion.
    predictor: choose per-row widths with the LayerDimPredictor from the prompt (`Engine.steps` does, through
        `predictor.predict_widths`); `budget` caps its choice (a compute mode name or a width), `price` moves it
        toward cheaper (> 0) or wider (< 0) levels.
    row_widths: per row, per-layer widths (the predictor's choice, fixed for the whole generation); they
        replace the compute choice's `width`. Rows at different widths run together: attention treats each token
        at its own width (`AttentionBlock.mixed`), which is exact since rows never attend to each other."""

    exit: bool = True
    threshold: float | dict | None = None
    expand: float | None = None
    predictor: bool = False
    budget: Any = None
    price: float = 0.0
    row_widths: tuple | None = None

    def __post_init__(self) -> None:
        values = self.threshold.values() if isinstance(self.threshold, dict) else \
            [] if self.threshold is None else [self.threshold]
        for v in values:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
                raise ValueError(f"adaptive.threshold: thresholds must be numbers, got {v!r}")
        if not isinstance(self.exit, bool) or not isinstance(self.predictor, bool):
            raise ValueError("adaptive.exit, adaptive.predictor: must be true or false")
        if self.expand is not None and (not isinstance(self.expand, (int, float)) or not 0 <= self.expand <= 1):
            raise ValueError(f"adaptive.expand: must be a threshold in [0, 1] or None, got {self.expand!r}")

    def for_prompts(self, model, ids: torch.Tensor, lengths: torch.Tensor, width=None) -> Adaptive:
        """This policy for a batch of right-padded prompts ids (B, T) with `lengths` real tokens: with `predictor`,
        each row's widths chosen from its own prompt (within `budget`, else `width`, as the cap)."""
        if not self.predictor or self.row_widths is not None:
            return self
        plans = predict_widths(model, ids, lengths, self.budget if self.budget is not None else width, self.price)
        return replace(self, row_widths=tuple(tuple(plan) for plan in plans))

    @classmethod
    def seeds(cls) -> Adaptive:
        """The seeds' V2 policy: exit above 0.95, expand below 0.5."""
        return cls(threshold=SEED_EXIT_THRESHOLD, expand=SEED_EXPAND_THRESHOLD)

    def exit_thresholds(self, model) -> dict[int, float]:
        """{exit layer: threshold} for `model` (empty when exits are off)."""
        layers = model.config.exit_layers
        if not self.exit:
            return {}
        if not layers:
            if self.threshold is not None:
                raise ValueError("adaptive.threshold: this model has no exit gates (config.min_exit_layer is None)")
            return {}
        if isinstance(self.threshold, dict):
            unknown = sorted(set(self.threshold) - set(layers))
            if unknown:
                raise ValueError(f"adaptive.threshold: layers {unknown} are not exit layers ({layers})")
            return {k: float(self.threshold.get(k, math.inf)) for k in layers}
        if self.threshold is not None:
            return dict.fromkeys(layers, float(self.threshold))
        calibrated = model.adaptive_heads.thresholds
        return dict(calibrated) if calibrated is not None else dict.fromkeys(layers, SEED_EXIT_THRESHOLD)


@dataclass
class ExitRecord:
    """What each token of the latest adaptive forward did: its exit layer (n_layer = none), how many gates it
    evaluated, and the width each layer ran at for it (n_embd = full; Mamba layers are always full)."""

    exit_layer: torch.Tensor  # (B, T) long
    gates: torch.Tensor  # (B, T) long
    widths: torch.Tensor  # (B, T, n_layer) long
    confidence: dict[int, torch.Tensor] = field(default_factory=dict)  # exit layer -> (B, T) gate confidences

    def token_flops(self, config: ModelConfig, context: int | None = None) -> torch.Tensor:
        """(B, T) float64: the forward FLOPs each token's decisions cost, from the one FLOP counter (each distinct
        (exit layer, gates, widths) is counted once)."""
        rows = torch.cat([self.exit_layer[..., None], self.gates[..., None], self.widths], dim=-1).cpu()
        unique, inverse = rows.flatten(0, 1).unique(dim=0, return_inverse=True)
        costs = torch.tensor([count_flops(config, context, config.layer_widths(row[2:]), exit_layer=row[0],
                                          gates=row[1]).forward for row in unique.tolist()], dtype=torch.float64)
        return costs[inverse].view(rows.shape[:2])

    def flops(self, config: ModelConfig, context: int | None = None) -> float:
        """Mean forward FLOPs per token these decisions cost."""
        return float(self.token_flops(config, context).mean())


def _level_above(config: ModelConfig, width: int) -> int:
    """The smallest Matryoshka level >= width (capped at n_embd)."""
    return next((w for w in config.matryoshka_levels if w >= width), config.n_embd)


class ExitPolicy:
    """The per-token decisions of one forward with early exit or expansion, made at the fixed point before each
    block (`decide`) and read by the block through its context (`block_fields`): which tokens are frozen, and at
    which width each token runs. The decisions end in `record` (the forward's `exits` output).

    exit_layers: (B, T) integers in [0, n_layer], each token's exit layer (n_layer: none), the reference with
    decisions given. adaptive: an `Adaptive` policy whose gates decide on the fly, layer by layer (a decision at
    layer k reads h_k, which depends only on earlier layers, so a full forward and decoding decide alike)."""

    def __init__(self, model, shape: tuple[int, int], device, widths: list[int | None],
                 exit_layers: torch.Tensor | None, adaptive: Adaptive | None):
        config = model.config
        self.config, self.heads = config, model.adaptive_heads
        L, d = config.n_layer, config.n_embd
        B, T = shape
        self.exit_layers = _checked_exit_layers(exit_layers, adaptive, shape, L, device)
        # per-row widths alone (exit off) need no gates; anything else does
        if adaptive is not None and self.heads is None and (adaptive.exit or adaptive.expand is not None
                                                            or adaptive.predictor):
            raise ValueError("adaptive: this model has no gates (set min_exit_layer / expansion_gates in its config)")
        self.thresholds = adaptive.exit_thresholds(model) if adaptive is not None else {}
        self.expand = adaptive.expand if adaptive is not None else None
        if self.expand is not None and not self.heads.expansion_gates:
            raise ValueError("adaptive.expand: this model has no ExpansionGates (config.expansion_gates is false)")
        if adaptive is not None and adaptive.row_widths is not None:
            rows = [config.width_values(list(plan)) for plan in adaptive.row_widths]
            if len(rows) != B:
                raise ValueError(f"adaptive.row_widths: {len(rows)} rows of widths for a batch of {B}")
            token_widths = torch.tensor(rows, device=device)[:, None, :].expand(B, T, L).clone()
        else:
            token_widths = torch.tensor(config.width_values(widths), device=device).expand(B, T, L).clone()
        exit_at = self.exit_layers if self.exit_layers is not None else \
            torch.full((B, T), L, dtype=torch.long, device=device)
        self.record = ExitRecord(exit_at, torch.zeros(B, T, dtype=torch.long, device=device), token_widths)
        self.active: torch.Tensor | None = None  # (B, T) once a token may have exited; None: every token is active
        # tokens may run attention at different widths (expansion, per-row plans): then they are given per token
        self.mixed = bool((token_widths != token_widths[:1, :1]).any())
        if self.expand is not None:  # width -> the level twice as wide, as a lookup table
            self._doubled = torch.tensor([_level_above(config, 2 * w) for w in range(d + 1)], device=device)

    def _live(self, x: torch.Tensor) -> torch.Tensor:
        return self.active if self.active is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def decide(self, i: int, x: torch.Tensor) -> None:
        """Before block i, on its input h_i: exit gates (or the given exit layers) and expansion gates."""
        record = self.record
        if self.exit_layers is not None:
            self.active = self.exit_layers > i
        elif i in self.thresholds:
            confidence = torch.sigmoid(self.heads.exit_gates[str(i)](x).float())
            live = self._live(x)
            record.gates += live
            record.confidence[i] = confidence
            leave = live & (confidence >= self.thresholds[i])
            record.exit_layer = torch.where(leave, i, record.exit_layer)
            self.active = live & ~leave
        if self.expand is not None and str(i) in self.heads.expansion_gates:
            # a token unsure of its narrow run doubles the width of every remaining attention layer (cap n_embd)
            live = self._live(x)
            record.gates += live
            unsure = live & (torch.sigmoid(self.heads.expansion_gates[str(i)](x).float()) < self.expand)
            if bool(unsure.any()):
                self.mixed = True
                rest = torch.arange(self.config.n_layer, device=x.device) >= i
                record.widths = torch.where(unsure[..., None] & rest, self._doubled[record.widths], record.widths)

    def block_fields(self, i: int) -> dict:
        """BlockContext fields of block i: one width for every token unless they differ, and the frozen tokens."""
        frozen = None if self.active is None or bool(self.active.all()) else ~self.active
        if self.mixed:
            return {"width": None, "token_widths": self.record.widths[..., i], "frozen": frozen}
        return {"width": self.config.block_width(int(self.record.widths[0, 0, i])), "frozen": frozen}


def _checked_exit_layers(exit_layers, adaptive, shape, n_layer: int, device) -> torch.Tensor | None:
    if exit_layers is None:
        return None
    if adaptive is not None:
        raise ValueError("exit_layers: give exit decisions or an adaptive policy, not both")
    if tuple(exit_layers.shape) != tuple(shape) or exit_layers.dtype.is_floating_point \
            or exit_layers.dtype == torch.bool:
        raise ValueError(f"exit_layers: must be an integer tensor shaped {tuple(shape)}, got {exit_layers.dtype} "
                         f"{tuple(exit_layers.shape)}")
    exit_layers = exit_layers.to(device=device, dtype=torch.long)
    if bool(((exit_layers < 0) | (exit_layers > n_layer)).any()):
        raise ValueError(f"exit_layers: every value must be in [0, n_layer={n_layer}] (n_layer means no exit)")
    return exit_layers
