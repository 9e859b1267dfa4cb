"""`adamba surgery widen`: grow the residual width D -> D', the attention heads (at a fixed head size), the MLP
neurons and Mamba's d_inner (= expand * width), so that the model computes exactly what it did and the old model
is its D-wide Matryoshka slice.

Layout. Every old weight keeps its place: the residual's old coordinates are the first D of D', old heads the
first heads, old MLP neurons the first, old Mamba-1 channels the first of each of in_proj's x and z halves, old
Mamba-2 heads the first of their group (the heads of a group share B and C). `Layout` maps each parameter's old
entries to their new positions; the trainer's `new-dims` stage masks the same entries (train/stages.py).

Exactness. Every new weight is of one of three kinds:
- constrained, zero: those through which something new could reach something old. New residual coordinates are
  written by nothing: the rows D: of every matrix that writes the residual (attention and MLP c_proj, Mamba
  out_proj) and the embedding's columns D: are zero, so those coordinates stay exactly 0. Old outputs read no new
  unit: the c_proj / out_proj columns of new heads, MLP neurons and Mamba-1 channels are zero, and so are the
  columns of Mamba-1's x_proj rows for dt, B and C (B and C are shared by all channels) over new channels, and
  dt_proj's new rank columns for old channels. New Mamba-2 channels are gated off (their z rows are zero, and
  y * silu(0) = 0), since its gated norm mixes all channels of a group. A loop's inject writes no new
  coordinate from an old one.
- free: entries that read only zeros at init (the new residual columns of input matrices and of lm_head), or
  belong to new units whose way out is constrained to zero. Any value there is exact; the init methods below
  differ only in these entries.
- old: copied unchanged.
New residual coordinates are exactly zero, so every residual norm sees the old vector padded with zeros, which
norm.py (ModelConfig.norm_width) makes exactly the old norm, at full width and at every Matryoshka width.
Mamba-2's gated norm does the same per group (GatedRMSNorm's count). A loop's learnable sandwich norms absorb
the factor sqrt(D / D') in their gain instead (exact up to their eps of ~1e-7).

Both sides of every product still train: a zero output column gets gradient from its unit's (nonzero)
activation, a zero residual row from the free input columns that read it; Mamba-2's zero z rows get gradient
through out_proj's new columns, which are therefore drawn at random rather than zero.

Init methods for the free entries of matrices (Linear and Embedding weights). All four keep the function exactly,
since none writes a constrained entry; other parameters of new units (conv taps, decays, skips, dt biases, norm
gains) take the fresh model's init, except under copy-scale. The seeds' "LoRA-style" and copy/SVD widening
changed the function because they put their values into constrained entries too.
- zero: the constrained entries are zero and the free ones are what a fresh model of the new width draws
  (matrices a fresh model zeroes entirely, output projections and lm_head, are drawn with `init_linear_`'s std).
- lora: free entries are a rank-r product A B (A, B Gaussian), scaled to zero's std; the constrained entries are
  LoRA's own start, the product with B = 0 (Hu et al. 2021, "LoRA"): new directions start low-rank.
- copy-scale: new units copy old ones (new index i reads old index i mod n_old within its part), matrices scaled
  by `scale`, other parameters copied as they are (the seeds' "copy + scale"; Net2WiderNet, Chen et al. 2016,
  copies units too, but splits their outgoing weights, which here are constrained to zero instead).
- svd: with W = U S V^T the old matrix (top `rank` singular triplets, all by default), new rows are Gaussian
  mixtures of the rows of S V^T and new columns of the columns of U S, with variance 1 / n_old, so new units read
  the old layer's principal directions with its spectrum (the seeds' "SVD extension").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import ATTENTION, MAMBA, MAMBA2, ModelConfig
from ..model import AdambaLM
from ..model.mamba import dt_rank_for
from .growth import supported

INITS = {"zero": True, "lora": True, "copy-scale": True, "svd": True}  # method -> preserves the function
LORA_RANK = 8  # lora's rank when none is given


@dataclass(frozen=True)
class Axis:
    """One dimension of a grown parameter: its new length, where the old entries go, and for every new position
    the old index it copies under copy-scale (itself for old positions)."""

    size: int
    old: torch.Tensor
    source: torch.Tensor

    @staticmethod
    def prefix(n_old: int, n_new: int) -> Axis:
        """Old entries first; new index i copies old index i mod n_old."""
        return Axis(n_new, torch.arange(n_old), torch.arange(n_new) % n_old)

    @staticmethod
    def cat(*axes: Axis) -> Axis:
        """Parts laid end to end (e.g. in_proj's x and z halves); each part grows on its own."""
        new_offsets = [sum(a.size for a in axes[:i]) for i in range(len(axes))]
        old_offsets = [sum(len(a.old) for a in axes[:i]) for i in range(len(axes))]
        return Axis(sum(a.size for a in axes), torch.cat([a.old + o for a, o in zip(axes, new_offsets, strict=True)]),
                    torch.cat([a.source + o for a, o in zip(axes, old_offsets, strict=True)]))

    @staticmethod
    def grouped(n_old: int, n_new: int, groups: int, width: int) -> Axis:
        """Heads of `width` channels in `groups` equal groups: old heads first within their group."""
        per_old, per_new = n_old // groups, n_new // groups
        h, k = torch.arange(n_old), torch.arange(n_new)
        head_old = (h // per_old) * per_new + h % per_old
        head_src = (k // per_new) * per_old + (k % per_new) % per_old
        c, c_new = torch.arange(n_old * width), torch.arange(n_new * width)
        return Axis(n_new * width, head_old[c // width] * width + c % width,
                    head_src[c_new // width] * width + c_new % width)

    @property
    def new(self) -> torch.Tensor:
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[self.old] = False
        return keep.nonzero().flatten()


def _grid(indices: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Index tensors, one per dimension, broadcast against each other (an outer product of indices)."""
    n = len(indices)
    return tuple(t.view([-1 if d == k else 1 for d in range(n)]) for k, t in enumerate(indices))


class Layout:
    """Where each parameter's old entries go, and which new entries are constrained to zero (module docstring)."""

    def __init__(self, old: ModelConfig, new: ModelConfig):
        D, D2 = old.n_embd, new.n_embd
        resid = Axis.prefix(D, D2)
        self.resid = resid
        self.axes: dict[str, tuple[Axis | None, ...]] = {"wte.weight": (None, resid), "lm_head.weight": (None, resid)}
        self.zeros: dict[str, list[tuple[torch.Tensor | None, ...]]] = {"wte.weight": [(None, resid.new)]}
        self.gains: dict[str, float] = {}  # old entries multiplied by this (learnable norm gains)
        hidden = Axis.prefix(old.mlp_ratio * D, new.mlp_ratio * D2)
        hd = old.model_head_dim
        for i, kind in enumerate(old.block_pattern):
            p = f"blocks.{i}."
            if kind == ATTENTION:
                q = Axis.prefix(old.n_head * hd, new.n_head * hd)
                kv = Axis.prefix(old.n_kv_head * hd, new.n_kv_head * hd)
                self.axes |= {p + "attn.c_q.weight": (q, resid), p + "attn.c_k.weight": (kv, resid),
                              p + "attn.c_v.weight": (kv, resid), p + "attn.c_proj.weight": (resid, q)}
                self.zeros[p + "attn.c_proj.weight"] = [(resid.new, None), (None, q.new)]
                if i in old.value_embed_layers:  # a new head's value embedding reaches only that head
                    self.axes |= {p + "attn.value_embed.weight": (None, kv),
                                  p + "attn.ve_gate.weight": (Axis.prefix(old.n_kv_head, new.n_kv_head), None)}
            if kind == ATTENTION or old.mamba_use_mlp:
                self.axes |= {p + "mlp.c_fc.weight": (hidden, resid), p + "mlp.c_proj.weight": (resid, hidden)}
                self.zeros[p + "mlp.c_proj.weight"] = [(resid.new, None), (None, hidden.new)]
            if kind == MAMBA:
                self._mamba(p + "mixer.", old, new)
            elif kind == MAMBA2:
                self._mamba2(p + "mixer.", old, new)
        # the recipe's scalars and smear gate (model/recipe.py) do not grow: the gate reads the first channels
        recipe = {"residual_scalars": ("scalars.resid", "scalars.x0"), "smear": ("smear.scale", "smear.gate.weight"),
                  "backout": ("backout.scale",)}
        for option, names in recipe.items():
            if getattr(old, option):
                self.axes |= {name: (None,) * (2 if name.endswith("gate.weight") else 1) for name in names}
        if old.loop is not None:
            columns = Axis.cat(resid, resid)  # inject reads [e, s]
            self.axes["loop.inject.weight"] = (resid, columns)
            self.zeros["loop.inject.weight"] = [(resid.new, columns.old)]
            if old.loop.sandwich_norm:
                for j in range(old.loop.recur):
                    self.axes[f"loop.norms.{j}.weight"] = (resid,)
                    self.gains[f"loop.norms.{j}.weight"] = math.sqrt(D / D2)

    def _mamba(self, p: str, old: ModelConfig, new: ModelConfig) -> None:
        resid = self.resid
        inner = Axis.prefix(old.mamba_expand * old.n_embd, new.mamba_expand * new.n_embd)
        rank = Axis.prefix(dt_rank_for(old.n_embd, old.mamba_dt_rank), dt_rank_for(new.n_embd, new.mamba_dt_rank))
        state = Axis.prefix(old.mamba_d_state, new.mamba_d_state)
        x_rows = Axis.cat(rank, state, state)  # dt, B, C
        self.axes |= {p + "in_proj.weight": (Axis.cat(inner, inner), resid), p + "conv1d.weight": (inner, None, None),
                      p + "conv1d.bias": (inner,), p + "x_proj.weight": (x_rows, inner),
                      p + "dt_proj.weight": (inner, rank), p + "dt_proj.bias": (inner,), p + "A_log": (inner, None),
                      p + "D": (inner,), p + "out_proj.weight": (resid, inner)}
        self.zeros |= {p + "x_proj.weight": [(x_rows.old, inner.new)], p + "dt_proj.weight": [(inner.old, rank.new)],
                       p + "out_proj.weight": [(resid.new, None), (None, inner.new)]}

    def _mamba2(self, p: str, old: ModelConfig, new: ModelConfig) -> None:
        resid, hd, groups = self.resid, old.mamba2_headdim, old.mamba2_ngroups
        n_old, n_new = old.mamba2_expand * old.n_embd // hd, new.mamba2_expand * new.n_embd // hd
        heads, inner = Axis.grouped(n_old, n_new, groups, 1), Axis.grouped(n_old, n_new, groups, hd)
        bc = Axis.prefix(groups * old.mamba2_d_state, groups * new.mamba2_d_state)
        conv = Axis.cat(inner, bc, bc)  # x, B, C
        self.axes |= {p + "in_proj.weight": (Axis.cat(inner, conv, heads), resid),  # z, (x, B, C), dt
                      p + "conv1d.weight": (conv, None, None), p + "conv1d.bias": (conv,), p + "dt_bias": (heads,),
                      p + "A_log": (heads,), p + "D": (heads,), p + "norm.weight": (inner,),
                      p + "out_proj.weight": (resid, inner)}
        # z comes first in in_proj, so its new rows are inner.new
        self.zeros |= {p + "in_proj.weight": [(inner.new, None)], p + "out_proj.weight": [(resid.new, None)]}

    def old_index(self, name: str, shape: torch.Size) -> tuple[torch.Tensor, ...]:
        """Index of the old entries in the new parameter (dimensions that do not grow keep their size)."""
        return _grid([a.old if a is not None else torch.arange(n) for a, n in zip(self.axes[name], shape, strict=True)])

    def source_index(self, name: str, shape: torch.Size) -> tuple[torch.Tensor, ...]:
        """For every new entry, the old entry copy-scale copies."""
        return _grid([a.source if a is not None else torch.arange(n)
                      for a, n in zip(self.axes[name], shape, strict=True)])

    def zero_mask(self, name: str, shape: torch.Size) -> torch.Tensor:
        mask = torch.zeros(shape, dtype=torch.bool)
        for region in self.zeros.get(name, []):
            mask[_grid([t if t is not None else torch.arange(n) for t, n in zip(region, shape, strict=True)])] = True
        return mask

    def old_mask(self, name: str, shape: torch.Size) -> torch.Tensor:
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[self.old_index(name, shape)] = True
        return mask


def widened_config(config: ModelConfig, width: int) -> ModelConfig:
    """The config of the model widened to `width`: heads at the same size and K/V grouping, d_inner per expand,
    dt_rank per its rule, norm_width set (norm.py), Matryoshka levels: the old ones and the new width's defaults
    (so the old width stays a slice); compute modes re-derived for the new width."""
    supported(config)
    D, hd = config.n_embd, config.model_head_dim
    if not isinstance(width, int) or isinstance(width, bool) or width <= D:
        raise ValueError(f"width: must be an integer above the model's n_embd={D}, got {width!r}")
    if width % hd:
        raise ValueError(f"width: {width} is not a whole number of heads of size {hd} (heads grow at a fixed size); "
                         f"use a multiple of {hd}")
    n_head, group = width // hd, config.n_head // config.n_kv_head
    if n_head % group:
        raise ValueError(f"width: {n_head} heads do not form whole K/V groups of {group} query heads; use a multiple "
                         f"of {hd * group}")
    fields = config.to_dict() | {"n_embd": width, "n_head": n_head, "n_kv_head": n_head // group,
                                 "norm_width": config.norm_width or D, "matryoshka_levels": None,
                                 "compute_modes": None}
    try:
        derived = ModelConfig.from_dict(fields)
        return ModelConfig.from_dict(fields | {"matryoshka_levels": sorted(set(derived.matryoshka_levels)
                                                                           | set(config.matryoshka_levels))})
    except ValueError as err:
        raise ValueError(f"width: {width} does not give a valid model: {err}") from None


def _init_linear_std(shape: torch.Size) -> float:
    fan_out, fan_in = shape
    return 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))


def _randn(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=like.device, dtype=like.dtype)


def _free_matrix(init: str, fresh: torch.Tensor, old: torch.Tensor, layout: Layout, name: str,
                 gen: torch.Generator, rank: int | None, scale: float) -> torch.Tensor:
    """Values for a grown matrix's free entries (the caller writes only those); `fresh` is the fresh model's."""
    base = fresh if bool(fresh.any()) else _randn(fresh.shape, gen, fresh) * _init_linear_std(fresh.shape)
    if init == "zero":
        return base
    if init == "copy-scale":
        return old[layout.source_index(name, fresh.shape)] * scale
    if init == "lora":
        r = rank or LORA_RANK
        product = _randn((fresh.size(0), r), gen, fresh) @ _randn((r, fresh.size(1)), gen, fresh)
        return product * (base.std() / product.std())
    U, S, Vh = torch.linalg.svd(old.float(), full_matrices=False)
    k = min(rank or len(S), len(S))
    sides = []
    for basis, axis, n_new in ((U[:, :k], layout.axes[name][0], fresh.size(0)),
                               (Vh[:k].T, layout.axes[name][1], fresh.size(1))):
        if axis is None:
            sides.append(basis)
            continue
        side = _randn((n_new, k), gen, basis) / math.sqrt(len(axis.old))
        side[axis.old] = basis
        sides.append(side)
    return ((sides[0] * S[:k]) @ sides[1].T).to(fresh.dtype)


@torch.no_grad()
def widen(model: AdambaLM, width: int, init: str = "zero", *, rank: int | None = None, scale: float = 0.1,
          seed: int = 0) -> AdambaLM:
    """The model widened to `width` by the init method `init` (module docstring); the result computes the same."""
    if init not in INITS:
        raise ValueError(f"init: unknown method {init!r}; use one of {sorted(INITS)}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank: must be a positive integer, got {rank!r}")
    config = widened_config(model.config, width)
    layout = Layout(model.config, config)
    with torch.random.fork_rng(devices=[]):  # the fresh init draws from the global generator
        torch.manual_seed(seed)
        grown = AdambaLM.build(config, model.wte.weight.device).to(model.wte.weight.dtype)
    names = {name for name, _ in grown.named_parameters()}
    if names != set(layout.axes):  # a parameter this layout does not know would silently keep a fresh init
        raise RuntimeError(f"widen: no layout for {sorted(names - set(layout.axes))}, "
                           f"stale layout for {sorted(set(layout.axes) - names)}")
    matrices = {f"{name}.weight" for name, m in grown.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    gen = torch.Generator().manual_seed(seed)
    old_state = model.state_dict()
    for name, p in grown.named_parameters():
        old = old_state[name].to(p.dtype)
        zero = layout.zero_mask(name, p.shape).to(p.device)
        free = ~(layout.old_mask(name, p.shape).to(p.device) | zero)
        if name in matrices:
            p.copy_(torch.where(free, _free_matrix(init, p, old, layout, name, gen, rank, scale), p))
        elif init == "copy-scale":
            p.copy_(torch.where(free, old[layout.source_index(name, p.shape)], p))
        p[layout.old_index(name, p.shape)] = old * layout.gains.get(name, 1.0)
        p.masked_fill_(zero, 0.0)
    grown.train(model.training)
    return grown


def old_entry_masks(old: ModelConfig, model: AdambaLM) -> dict[str, torch.Tensor]:
    """For each parameter of a widened model, True where the entry was copied from the model before widening."""
    layout = Layout(old, model.config)
    return {name: layout.old_mask(name, p.shape).to(p.device) for name, p in model.named_parameters()}
