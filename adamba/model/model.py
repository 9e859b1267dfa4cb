"""AdambaLM: token embedding -> norm -> blocks -> norm -> lm_head -> logit softcap.

With only attention blocks this computes exactly nanochat's (October 2025) GPT forward. The model is meant
to be built on the meta device and then materialised by `init_weights()` (see `AdambaLM.build`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ATTENTION, MAMBA, MAMBA2, ModelConfig, require_loop
from . import kernels, pretrained
from .attention import AttentionBlock
from .cache import InferenceCache
from .compute import Compute
from .context import BlockContext
from .exits import AdaptiveHeads, ExitPolicy
from .flops import FlopCount, count_flops
from .forward_pass import ForwardOutput, ForwardPass
from .looped import Recurrence
from .mamba import MambaBlock
from .mamba2 import Mamba2Block
from .norm import rms_norm
from .recipe import Backout, ResidualScalars, Smear
from .rotary import rotary_tables


def build_block(kind: str, config: ModelConfig, window: int | None, layer: int) -> nn.Module:
    if kind == ATTENTION:
        return AttentionBlock(config.n_embd, config.n_head, config.n_kv_head,
                              config.mlp_ratio * config.n_embd, window, config.norm_width,
                              config.vocab_size if layer in config.value_embed_layers else None, config.qk_scale)
    if kind == MAMBA:
        return MambaBlock(config.n_embd, config.mamba_d_state, config.mamba_d_conv, config.mamba_expand,
                          config.mamba_dt_rank, config.mlp_ratio * config.n_embd if config.mamba_use_mlp else None,
                          config.norm_width)
    if kind == MAMBA2:
        return Mamba2Block(config.n_embd, config.mamba2_d_state, config.mamba2_d_conv, config.mamba2_expand,
                           config.mamba2_headdim, config.mamba2_ngroups, config.mamba2_chunk_size,
                           config.mlp_ratio * config.n_embd if config.mamba_use_mlp else None, config.norm_width)
    raise ValueError(f"block_pattern: block kind {kind!r} is not available")


class AdambaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(
            build_block(kind, config, window, i)
            for i, (kind, window) in enumerate(zip(config.block_pattern, config.attention_windows(), strict=True)))
        # Looped depth (config.loop): the recurrence's own weights; the looped layers are among `blocks`.
        self.loop = Recurrence(config) if config.loop is not None else None
        # Adaptive compute (exits.py): exit / expansion gates and the width predictor, where the config has them.
        self.adaptive_heads = AdaptiveHeads(config) if AdaptiveHeads.wanted(config) else None
        # Today's nanochat recipe outside the blocks (recipe.py), where the config asks for it.
        self.scalars = ResidualScalars(config.n_layer) if config.residual_scalars else None
        self.smear = Smear() if config.smear else None
        self.backout = Backout(config.backout_at) if config.backout else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        cos, sin = rotary_tables(config.sequence_len, config.model_head_dim, config.rope_base,
                                 device=self.wte.weight.device)
        # Derived from the config, so not saved in checkpoints (persistent=False).
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        if self.wte.weight.device.type != "meta":
            self.init_weights()

    @classmethod
    def build(cls, config: ModelConfig, device: torch.device | str = "cpu") -> AdambaLM:
        """Allocate on the meta device (no memory, no init cost), then materialise on `device`. On a GPU, the
        state-space kernels are resolved first (kernels.py), and config values they cannot take fail here."""
        kernels.check_config(config, torch.device(device))
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @classmethod
    def from_pretrained(cls, source: str | Path, device: torch.device | str = "cpu",
                        revision: str | None = None) -> AdambaLM:
        """The model of a folder written by `adamba export hf`, or of a Hugging Face hub repository id
        (owner/name; needs huggingface_hub), in eval mode (pretrained.py)."""
        folder = pretrained.resolve_folder(source, revision)
        model = cls.build(pretrained.read_config(folder), device)
        pretrained.load_state(folder, model)
        pretrained.load_calibration(folder, model)
        return model.eval()

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's initialisation, block by block.

        - Embedding ~ N(0, 1): the embedding is normalised right away, so its scale is irrelevant.
        - lm_head = 0, so the first logits are uniform.
        - Each block initialises itself (`init_weights`): attention and MLP matrices with nanochat's rule
          (`init.init_linear_`), Mamba mixers with the reference scheme; every projection that writes into
          the residual stream starts at zero, so each block starts as the identity.
        - Rotary tables are recomputed, since `to_empty` leaves buffers uninitialised.
        - A loop's inject starts as [I | 0] (it reads only its input; see looped.py).
        """
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.blocks:
            block.init_weights()
        if self.loop is not None:
            self.loop.init_weights()
        if self.adaptive_heads is not None:
            self.adaptive_heads.init_weights()
        for option in (self.scalars, self.smear, self.backout):
            if option is not None:
                option.init_weights()
        cos, sin = rotary_tables(self.config.sequence_len, self.config.model_head_dim,
                                 self.config.rope_base, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer family: 2-D block matrices (Muon); embedding, lm_head, other block
        parameters, and those a block lists in `no_decay_parameters()` (decay rates, skips, biases) for AdamW."""
        groups: dict[str, list[nn.Parameter]] = {"matrix": [], "scalar": [], "no_decay": [],
                                                 "embedding": [self.wte.weight], "unembedding": [self.lm_head.weight]}
        no_decay = {id(p) for block in self.blocks if hasattr(block, "no_decay_parameters")
                    for p in block.no_decay_parameters()}
        # value embeddings (attention.py) are token embeddings, trained like wte, though they sit in blocks
        tables = [block.attn.value_embed.weight for block in self.blocks
                  if getattr(getattr(block, "attn", None), "value_embed", None) is not None]
        groups["embedding"] += tables
        for p in [*self.blocks.parameters(), *(self.loop.parameters() if self.loop is not None else ())]:
            if any(p is table for table in tables):
                continue
            kind = "no_decay" if id(p) in no_decay else "matrix" if p.ndim == 2 else "scalar"
            groups[kind].append(p)
        # the recipe's residual scalars, smear and backout (recipe.py): scalars and one tiny gate, for AdamW
        for option in (self.scalars, self.smear, self.backout):
            if option is not None:
                groups["scalar"] += list(option.parameters())
        # gates and width predictor: small classifiers on detached inputs, trained by AdamW (train/losses.py)
        groups["adaptive"] = list(self.adaptive_heads.parameters()) if self.adaptive_heads is not None else []
        return groups

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def count_flops(self, context: int | None = None, compute: Compute | None = None, *, probes: int = 0,
                    exit_layer: int | None = None, gates: int = 0) -> FlopCount:
        """FLOPs per token at a compute choice (its width and, for looped models, its whole number of loops;
        None: mean_recurrence). `probes`: extra coda + lm_head passes per token (a looped model's "kl" exit).
        `exit_layer` / `gates`: a token that exits after that block, having evaluated that many gates (exits.py)."""
        compute = compute or Compute()
        compute.check(self.config)
        if self.loop is not None:
            return self.loop.count_flops(context, compute, probes)
        if probes:
            require_loop(self.config, "probes")
        return count_flops(self.config, context, compute.layer_widths(self.config), exit_layer=exit_layer,
                           gates=gates, depth=compute.depth)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                compute: Compute | None = None, cache: InferenceCache | None = None, loss_reduction: str = "mean",
                exit_layers: torch.Tensor | None = None, width_probs: torch.Tensor | None = None,
                hidden_layers=(), outputs: bool = False):
        """Logits (B, T, vocab) in float32, or with `targets` the cross-entropy (targets -1 are ignored); with
        `outputs`, a ForwardOutput (logits, loss, the inputs of `hidden_layers`, exit and loop records).

        `compute` (compute.py): the width, loop count and adaptive policy to run at; None is the full model.
        With a `cache`, idx holds the next T tokens of each row: they are appended to the rows' state
        (row b at positions cache.lengths[b] onwards) and only their logits are computed.
        `width_probs` (B, n_layer, n_levels): per-row probabilities over the levels, mixing the nested widths'
        outputs (the width predictor's training). `exit_layers` (B, T): each token's early-exit layer (n_layer:
        none), decisions given instead of taken by the gates."""
        if idx.ndim != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        compute = compute or Compute()
        compute.check(self.config)
        x, cos, sin = self.embed(idx, cache)
        if self.loop is None:
            widths = compute.layer_widths(self.config)
            adaptive = compute.adaptive
            exits = ExitPolicy(self, idx.shape, idx.device, widths, exit_layers, adaptive) \
                if exit_layers is not None or adaptive is not None else None
            run = ForwardPass(self, cos, sin, cache, widths, exits, hidden_layers, width_probs, x0=x, tokens=idx)
            out = self.run_layers(x, range(compute.depth or len(self.blocks)), run)
            logits, ran = self.final_logits(out, run.backout_mid), None
        else:
            if exit_layers is not None:
                raise ValueError("exit_layers: early exit is not defined for looped models (use "
                                 "Compute(loops=Loops(exit=...)))")
            run = ForwardPass(self, cos, sin, cache, hidden_layers=hidden_layers, width_probs=width_probs, x0=x,
                              tokens=idx)
            logits, ran = self.loop(x, self, run, compute)
        if cache is not None:
            cache.finish(idx.size(1))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                                            ignore_index=-1, reduction=loss_reduction)
        if outputs:
            return ForwardOutput(logits, loss, run.hidden, run.exits.record if run.exits is not None else None, ran,
                                 run.backout_mid)
        return logits if loss is None else loss

    def embed(self, idx: torch.Tensor, cache: InferenceCache | None = None) -> tuple:
        """(normalised token embeddings (B, T, D), rotary cos, sin of their positions)."""
        T = idx.size(1)
        if cache is None:
            if T > self.config.sequence_len:
                raise ValueError(f"input has {T} tokens, more than the model's sequence_len="
                                 f"{self.config.sequence_len}; crop the input")
            cos, sin = self.cos[:T], self.sin[:T]
        else:
            if idx.size(0) != cache.batch:
                raise ValueError(f"idx has {idx.size(0)} rows but the cache was made for {cache.batch}")
            positions = cache.begin(T)
            cos, sin = self.cos[positions], self.sin[positions]
        x = rms_norm(self.wte(idx), self.config.norm_width)
        if self.smear is not None:
            x = self.smear(x, None if cache is None else cache.smear_state, None if cache is None else cache.valid)
        # the float64 rotary tables, cast once here rather than in every attention layer (a decode step is
        # dominated by per-op overhead)
        return x, cos.to(x.dtype), sin.to(x.dtype)

    def run_layers(self, x: torch.Tensor, layers, run) -> torch.Tensor:
        """The one loop over blocks: blocks `layers` in order on the residual stream x, each preceded by the fixed
        point where the call's policies act (`run.enter`: exits, expansion, kept hidden states, a loop's stopped
        tokens) and applied with its context (`run.apply`)."""
        for i in layers:
            x = run.apply(i, self.blocks[i], run.enter(i, x))
        return x

    def context(self, T: int) -> BlockContext:
        """The context of a plain full forward over T positions, for calling one block alone."""
        return BlockContext(self.cos[:T], self.sin[:T], levels=tuple(self.config.matryoshka_levels))

    @torch.no_grad()
    def hidden_after(self, idx: torch.Tensor, n_layers: int) -> torch.Tensor:
        """h_n: the residual stream after the first n_layers blocks at full width, without a cache (what the width
        predictor reads)."""
        x, cos, sin = self.embed(idx)
        return self.run_layers(x, range(n_layers), ForwardPass(self, cos, sin, x0=x, tokens=idx))

    def final_logits(self, x: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a residual x taken as the stack's output, with backout (recipe.py) where the config has it:
        `mid` is the residual after the backout layer, None for a residual from at or before that layer (an early
        exit, a truncated stack), which then backs out its own value -- what a token frozen there computes in the
        full forward, whose later blocks pass it through unchanged."""
        if self.backout is not None:
            x = self.backout(x, x if mid is None else mid)
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the last hidden state: lm_head(norm(x)) in at least float32, softcapped."""
        logits = self.lm_head(rms_norm(x, self.config.norm_width))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32; fp64 stays
        cap = self.config.logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return logits
