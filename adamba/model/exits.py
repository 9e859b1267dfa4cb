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

Compute: the reference paths here run a block on every token and select (exact and simple); the FLOP counter
(`count_flops(exit_layer=..., gates=...)`) counts what each token's decisions require -- the block for active
tokens, only the state update for exited ones -- which is what a decode step does when its rows agree (batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ATTENTION, ModelConfig
from .attention import window_mask
from .flops import count_flops
from .init import init_linear_
from .norm import rms_norm
from .predictor import LayerDimPredictor, predict_widths
from .rotary import apply_rotary

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
    """A test-time compute policy: `model(idx, adaptive=Adaptive(...))`, `Engine.generate(..., adaptive=...)`.

    exit: use the ConfidenceGates (per-token early exit).
    threshold: exit where the gate's confidence >= threshold: a float for every exit layer, a {layer: float}
        table, or None: the checkpoint's calibrated thresholds if any, else the seeds' fixed 0.95.
    expand: ExpansionGate threshold (the seeds used 0.5); None: no expansion.
    predictor: choose per-row widths with the LayerDimPredictor from the prompt (`Engine.steps` does, through
        `predictor.predict_widths`); `budget` caps its choice (a compute mode name or a width), `price` moves it
        toward cheaper (> 0) or wider (< 0) levels.
    row_widths: per row, per-layer widths (the predictor's choice, fixed for the whole generation); they replace
        the forward's `width`. Rows at different widths run together: attention treats each token at its own width
        (`mixed_width_block`), which is exact since rows never attend to each other."""

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


def propagate(block: nn.Module, x: torch.Tensor, cos, sin, cache, state, width: int | None) -> None:
    """Only the state update of a block, for tokens whose residual is frozen at x (CALM's state propagation):
    attention writes the K/V of rms_norm(x) (at a Matryoshka width, of its first `width` coordinates, keeping x as
    the layer input the cache needs for heads a wider query asks for later); Mamba advances its conv and SSM state
    with rms_norm(x) as input. Nothing else of the block runs."""
    if block.kind == ATTENTION:
        attn = block.attn
        if width is None:
            state.update(*attn.project_kv(rms_norm(x, block.norm_width), cos, sin, attn.n_kv_head), cache)
        else:
            state.update(*attn.project_kv(rms_norm(x[..., :width], block.norm_width), cos, sin,
                                          attn.heads_at(width)[1]), cache, residual=x)
    else:
        block.mixer(rms_norm(x, block.norm_width), state, cache.valid, output=False)


def _run(block, x, cos, sin, cache, state, width) -> torch.Tensor:
    return block(x, cos, sin, cache, state) if width is None else block(x, cos, sin, cache, state, width)


def _level_above(config: ModelConfig, width: int) -> int:
    """The smallest Matryoshka level >= width (capped at n_embd)."""
    return next((w for w in config.matryoshka_levels if w >= width), config.n_embd)


def mixed_kv(attn, x: torch.Tensor, cos, sin, widths: torch.Tensor,
             levels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V (B, T, heads, head_dim) of tokens at per-token widths (B, T), for the heads the widest one has: a
    token's own heads from its own width, a head it lacks from the smallest level that has it -- what the cache
    holds for it once a wider query has asked (attention.py `fill_heads`)."""
    distinct = sorted(set(widths.unique().tolist()))
    n_kv_max = attn.heads_at(distinct[-1])[1]
    k = v = None
    first = 0
    for level in levels:  # every head from the smallest level that has it ...
        last = min(attn.heads_at(level)[1], n_kv_max)
        if last > first:
            kl, vl = attn.project_kv(rms_norm(x[..., :level], attn.norm_width), cos, sin, last)
            k = kl[:, :, first:last] if k is None else torch.cat([k, kl[:, :, first:last]], dim=2)
            v = vl[:, :, first:last] if v is None else torch.cat([v, vl[:, :, first:last]], dim=2)
        first = max(first, last)
    for w in distinct:  # ... then each token's own heads from its own width
        n = attn.heads_at(w)[1]
        kw, vw = attn.project_kv(rms_norm(x[..., :w], attn.norm_width), cos, sin, n)
        mine = (widths == w)[..., None, None]
        k = torch.cat([torch.where(mine, kw, k[:, :, :n]), k[:, :, n:]], dim=2)
        v = torch.cat([torch.where(mine, vw, v[:, :, :n]), v[:, :, n:]], dim=2)
    return k, v


def mixed_width_block(block, x: torch.Tensor, cos, sin, cache, state, widths: torch.Tensor,
                      levels: list[int]) -> torch.Tensor:
    """An attention block in which token t runs at width widths[t] (B, T), as decoding the tokens one by one at
    those widths would (the cache's nested-head rule, attention.py `fill_heads`): a token's K/V heads are those
    its own width computes; a head it lacks is computed from its layer input at the smallest level that has it.
    Each distinct width's queries attend over those K/V; the block's output for a token is its own width's."""
    attn = block.attn
    d = x.size(-1)
    distinct = sorted(set(widths.unique().tolist()))
    if len(distinct) == 1:
        return _run(block, x, cos, sin, cache, state, None if distinct[0] == d else distinct[0])
    B, T, _ = x.shape
    hd = attn.head_dim
    k, v = mixed_kv(attn, x, cos, sin, widths, levels)
    n_kv_max = k.size(2)
    if state is not None:
        if n_kv_max > state.min_heads:
            attn.fill_heads(state, cache, n_kv_max, cache.end(T))
        keys, values = state.update(k, v, cache, residual=x)
        mask, causal = cache.attention_mask(T, attn.window)
    else:
        keys, values = k.transpose(1, 2), v.transpose(1, 2)
        mask, causal = (None, True) if attn.window is None or attn.window >= T else \
            (window_mask(T, T, attn.window, x.device), False)
    out = x
    for w in distinct:
        n_q, n_kv = attn.heads_at(w)
        h = x[..., :w]
        q = F.linear(rms_norm(h, block.norm_width), attn.c_q.weight[:n_q * hd, :w]).view(B, T, n_q, hd)
        q = rms_norm(apply_rotary(q, cos, sin))
        kk, vv = keys[:, :n_kv], values[:, :n_kv]
        gqa = n_kv != n_q
        if gqa and n_q % n_kv:  # a width whose query heads fill the last K/V group only partly
            kk, vv = (t.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)[:, :n_q] for t in (kk, vv))
            gqa = False
        y = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask, is_causal=causal,
                                           enable_gqa=gqa)
        h = h + F.linear(y.transpose(1, 2).reshape(B, T, -1), attn.c_proj.weight[:w, :n_q * hd])
        h = h + block.mlp(rms_norm(h, block.norm_width), None if w == d else w)
        out = torch.where((widths == w)[..., None], torch.cat([h, x[..., w:]], dim=-1), out)
    return out


def run_adaptive(model, x: torch.Tensor, cos, sin, cache, widths: list[int | None],
                 exit_layers: torch.Tensor | None, adaptive) -> torch.Tensor:
    """The blocks of a non-looped model with per-token exits and expansion; returns x_L (see the module doc).

    exit_layers: (B, T) integers in [0, n_layer], each token's exit layer (n_layer: none), the reference with
    decisions given. adaptive: an `Adaptive` policy whose gates decide on the fly, layer by layer (a decision at
    layer k reads h_k, which depends only on earlier layers, so a full forward and decoding decide alike); or a
    training objective of train/losses.py, which runs its own pass (`adaptive.run`). The decisions are left in
    `model.last_adaptive` (an ExitRecord)."""
    if adaptive is not None and not isinstance(adaptive, Adaptive):
        return adaptive.run(model, x, cos, sin, cache, widths)
    config = model.config
    L, d = config.n_layer, config.n_embd
    B, T, _ = x.shape
    if exit_layers is not None:
        if adaptive is not None:
            raise ValueError("exit_layers: give exit decisions or an adaptive policy, not both")
        if exit_layers.shape != (B, T) or exit_layers.dtype.is_floating_point or exit_layers.dtype == torch.bool:
            raise ValueError(f"exit_layers: must be an integer tensor shaped {(B, T)}, got {exit_layers.dtype} "
                             f"{tuple(exit_layers.shape)}")
        exit_layers = exit_layers.to(device=x.device, dtype=torch.long)
        if bool(((exit_layers < 0) | (exit_layers > L)).any()):
            raise ValueError(f"exit_layers: every value must be in [0, n_layer={L}] (n_layer means no exit)")
    heads = model.adaptive_heads
    if adaptive is not None and heads is None:
        raise ValueError("adaptive: this model has no gates (set min_exit_layer / expansion_gates in its config)")
    thresholds = adaptive.exit_thresholds(model) if adaptive is not None else {}
    expand = adaptive.expand if adaptive is not None else None
    if expand is not None and not heads.expansion_gates:
        raise ValueError("adaptive.expand: this model has no ExpansionGates (config.expansion_gates is false)")
    states = cache.states if cache is not None else [None] * L
    exit_at = exit_layers if exit_layers is not None else torch.full((B, T), L, dtype=torch.long, device=x.device)
    gates = torch.zeros(B, T, dtype=torch.long, device=x.device)
    if adaptive is not None and adaptive.row_widths is not None:
        rows = [[w or d for w in config.layer_widths(list(plan))] for plan in adaptive.row_widths]
        if len(rows) != B:
            raise ValueError(f"adaptive.row_widths: {len(rows)} rows of widths for a batch of {B}")
        token_widths = torch.tensor(rows, device=x.device)[:, None, :].expand(B, T, L).clone()
    else:
        token_widths = torch.tensor([w or d for w in widths], device=x.device).expand(B, T, L).clone()
    record = ExitRecord(exit_at, gates, token_widths)
    active = None  # (B, T) bool once a token may have exited; None: every token is active
    # tokens may run attention at different widths (expansion, per-row plans): then mixed_width_block runs it
    mixed = bool((token_widths != token_widths[:1, :1]).any())
    doubled = torch.tensor([_level_above(config, 2 * w) for w in range(d + 1)], device=x.device)
    for i, block in enumerate(model.blocks):
        if exit_layers is not None:
            active = exit_layers > i
        elif i in thresholds:
            confidence = torch.sigmoid(heads.exit_gates[str(i)](x).float())
            live = active if active is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            record.gates += live
            record.confidence[i] = confidence
            leave = live & (confidence >= thresholds[i])
            record.exit_layer = torch.where(leave, i, record.exit_layer)
            active = live & ~leave
        if expand is not None and str(i) in heads.expansion_gates:
            # a token unsure of its narrow run doubles the width of every remaining attention layer (cap n_embd)
            live = active if active is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            record.gates += live
            unsure = live & (torch.sigmoid(heads.expansion_gates[str(i)](x).float()) < expand)
            if bool(unsure.any()):
                mixed = True
                rest = torch.arange(L, device=x.device) >= i
                record.widths = torch.where(unsure[..., None] & rest, doubled[record.widths], record.widths)
        state = states[i]
        # one width for every token unless mixed: the forward's, or the rows' shared plan
        width = None if mixed or record.widths[0, 0, i] == d else int(record.widths[0, 0, i])
        if active is not None and not bool(active.any()):
            if state is None:  # nothing to compute, and no state to leave for later tokens
                continue
            if mixed and block.kind == ATTENTION:  # the K/V of tokens at their own widths
                k, v = mixed_kv(block.attn, x, cos, sin, record.widths[..., i], config.matryoshka_levels)
                state.update(k, v, cache, residual=x)
            else:
                propagate(block, x, cos, sin, cache, state, width)
            continue
        if mixed and block.kind == ATTENTION:
            out = mixed_width_block(block, x, cos, sin, cache, state, record.widths[..., i],
                                    config.matryoshka_levels)
        else:
            out = _run(block, x, cos, sin, cache, state, width)
        x = out if active is None or bool(active.all()) else torch.where(active[..., None], out, x)
    model.last_adaptive = record
    return x
