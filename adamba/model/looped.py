"""Looped depth recurrence (Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent
Depth Approach", the Huginn model): prelude -> recurrent block x r -> coda, with r chosen at call time.

    e       = rms_norm(prelude(x))                  the input every iteration re-reads
    s_0     = e ("prelude" init) or N(0, sigma^2)   ("random" init)
    s_{i+1} = rms_norm(R(inject([e, s_i])))         R: the recurrent layers (any block kinds), each optionally
                                                    followed by a learnable RMSNorm (sandwich_norm)
    logits  = head(coda(s_r))

`inject` is one Linear(2D -> D) initialised to [I | 0], so an untrained loop reads only its input and every r
gives the same output; training teaches it to use the state. Its input half is applied once per call, not once
per iteration (the same numbers: W [e; s] = W_e e + W_s s). Widths (a `Compute`'s width): prelude and coda layers
take it as a non-looped model does; a callable `width(i)` gives iteration i's choice for the recurrent layers
(anything `ModelConfig.layer_widths` takes; prelude and coda then run at full width). `inject` always runs at full
width.

The number of iterations (a `Compute`'s `loops`) is an int, a `Loops` plan (adaptive exit, cache options) or a
(B, T) tensor of per-token counts. A token that stops after n iterations presents itself to every later iteration as it
was at its last one: each recurrent layer reads, for that token, the input it had at iteration n - 1. For attention
this is Huginn's "latest available" K/V; a full forward with per-token counts computes it by substituting those
inputs, and decoding reproduces it exactly (tests/test_loops.py). Adaptive exit decides each token's count as it
goes. The "latent" criterion depends only on the token's own loop, so a multi-token call decides what token-by-token
decoding would; "kl" probes the coda, which in a multi-token call sees earlier tokens of the same call while they
still iterate, so there its counts can differ from decoding's (the output is still that of the counts it chose).

Inference cache: each recurrent layer keeps one state per loop iteration (exact, the default), or `kv_budget`
slots shared by iteration number modulo the budget (approximate; each token leaves in a shared slot what its
latest iteration there wrote). Slots a token did not reach are filled by the same rule: attention copies the
token's K/V from its latest slot; other states (Mamba) run the layer on the token's last input, which costs a
step per skipped slot.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, require_loop
from .flops import FlopCount, count_flops
from .norm import rms_norm

# Per-token exit criteria compared between successive iterations, with Huginn's default thresholds
# (generate_with_adaptive_compute in seal-rg/recurrent-pretraining).
KL_EXIT_THRESHOLD = 5e-4  # "kl": KL(p_{i-1} || p_i) of the next-token distributions, in nats
LATENT_EXIT_THRESHOLD = 0.03  # "latent": relative change of the state, |s_i - s_{i-1}| / |s_i|
EXIT_THRESHOLDS = {"kl": KL_EXIT_THRESHOLD, "latent": LATENT_EXIT_THRESHOLD}


@dataclass(frozen=True)
class Loops:
    """A test-time compute plan for a looped model: `model(idx, compute=Compute(loops=Loops(...)))`, and
    the same `compute=` of `Engine.generate` and `InferenceCache`.

    r: iterations (with `exit`, the most any token runs); None means the config's mean_recurrence.
    exit: None, "kl" or "latent": stop each token once successive iterations agree within `threshold`
        (None: the criterion's default above). Checked from the second iteration on; "kl" runs the coda and
        head after every iteration (its FLOPs count them, see `count_flops(probes=)`).
    kv_budget: state slots per recurrent layer in an inference cache; None is one per iteration (exact).
    warm_start: in an inference cache, the first new token of a row starts from the final state of the row's
        previous token instead of the configured initial state (Huginn's "continuous compute")."""

    r: int | None = None
    exit: str | None = None
    threshold: float | None = None
    kv_budget: int | None = None
    warm_start: bool = False

    def __post_init__(self) -> None:
        for name in ("r", "kv_budget"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"loops.{name}: must be a positive integer or None, got {value!r}")
        if self.exit is not None and self.exit not in EXIT_THRESHOLDS:
            raise ValueError(f"loops.exit: unknown criterion {self.exit!r}; use one of {sorted(EXIT_THRESHOLDS)}")
        if self.threshold is not None:
            if self.exit is None:
                raise ValueError("loops.threshold: given without an exit criterion (set exit='kl' or 'latent')")
            if not isinstance(self.threshold, (int, float)) or self.threshold <= 0:
                raise ValueError(f"loops.threshold: must be > 0, got {self.threshold!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"loops.warm_start: must be true or false, got {self.warm_start!r}")


def as_plan(config: ModelConfig, loops) -> Loops:
    """`loops` as a Loops plan; per-token count tensors are not plans (see Recurrence.forward)."""
    require_loop(config)
    if loops is None:
        return Loops(config.loop.mean_recurrence)
    if isinstance(loops, Loops):
        return loops if loops.r is not None else Loops(config.loop.mean_recurrence, loops.exit, loops.threshold,
                                                        loops.kv_budget, loops.warm_start)
    if isinstance(loops, int) and not isinstance(loops, bool):
        return Loops(loops)
    raise ValueError(f"loops: expected an int, a Loops plan or a (batch, time) tensor of counts, got {loops!r}")


def cache_slots(config: ModelConfig, compute) -> tuple[int, bool, bool]:
    """(state slots per recurrent layer, whether iterations share them, warm start) of an inference cache for
    a compute choice (None: the default)."""
    if compute is not None:
        compute.check(config)
    loops = compute.loops if compute is not None else None
    if config.loop is None:
        return 0, False, False
    if isinstance(loops, torch.Tensor):
        raise ValueError("loops: a cache is sized by the most iterations a token may run (an int or a Loops "
                         "plan), not by a tensor of per-token counts")
    plan = as_plan(config, loops)
    slots = plan.r if plan.kv_budget is None else min(plan.kv_budget, plan.r)
    return slots, slots < plan.r, plan.warm_start


def _snapshot(state) -> dict | None:
    """A copy of a state that re-running a layer on the same tokens would change (a running summary such as
    Mamba's); None for states that declare such re-runs harmless (`idempotent`: they rewrite the same entries)."""
    if getattr(state, "idempotent", False):
        return None
    return {name: t.clone() for name, t in vars(state).items() if isinstance(t, torch.Tensor)}


def _restore(state, snapshot: dict | None) -> None:
    for name, t in (snapshot or {}).items():
        getattr(state, name).copy_(t)


class Recurrence(nn.Module):
    """The loop's own weights (inject, sandwich norms) and the looped forward over the model's blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.n_embd
        self.inject = nn.Linear(2 * d, d, bias=False)
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in config.loop.recurrent_layers) \
            if config.loop.sandwich_norm else None
        # The fixed random initial states used outside training, one per position (derived from the config, so
        # not saved): a full forward and token-by-token decoding then start every position from the same state.
        self.register_buffer("noise", torch.empty(config.sequence_len, d), persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        d = self.config.n_embd
        self.inject.weight.zero_()
        self.inject.weight[:, :d].copy_(torch.eye(d))  # [I | 0]: read the input, ignore the state
        for norm in self.norms or ():
            norm.reset_parameters()
        generator = torch.Generator().manual_seed(self.config.loop.init_seed)
        self.noise.copy_(torch.randn(self.noise.shape, generator=generator) * self.config.loop.init_sigma)

    def iteration_widths(self, width) -> tuple[list, Callable[[int], list] | None]:
        """(per-layer widths of the prelude and coda, iteration -> per-layer widths or None = the same)."""
        if callable(width):
            memo: dict[int, list] = {}

            def at(i: int) -> list:
                if i not in memo:
                    memo[i] = self.config.layer_widths(width(i))
                return memo[i]
            return [None] * self.config.n_layer, at
        return self.config.layer_widths(width), None

    def count_flops(self, context: int | None, compute, probes: int) -> FlopCount:
        loops = compute.loops
        r = self.config.loop.mean_recurrence if loops is None else loops
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"loops: FLOPs are counted for a whole number of iterations >= 1, got {loops!r}")
        static, at = self.iteration_widths(compute.width)
        return count_flops(self.config, context, static, loops=r, probes=probes,
                           loop_widths=None if at is None else [at(i) for i in range(r)])

    def initial_state(self, e: torch.Tensor, cache) -> torch.Tensor:
        loop = self.config.loop
        if loop.init_state == "prelude":
            s = e
        elif self.training:  # fresh noise every step (Huginn), from the seeded global generator
            s = torch.randn_like(e) * loop.init_sigma
        else:
            T = e.size(1)
            positions = torch.arange(T, device=e.device) if cache is None else \
                cache.lengths[:, None] + torch.arange(T, device=e.device)
            s = self.noise[positions].to(e.dtype).expand_as(e)
        if cache is not None and cache.warm_start and cache.loop_last is not None:
            first = torch.where((cache.lengths > 0)[:, None], cache.loop_last.to(s.dtype), s[:, 0])
            s = torch.cat([first[:, None], s[:, 1:]], dim=1)
        return s

    # Under torch.compile, trace the blocks but not this loop (as Huginn does): a traced loop would be compiled
    # again for every r that training draws, and the exit/cache bookkeeping is data-dependent Python anyway.
    @torch._dynamo.disable(recursive=False)
    def forward(self, x: torch.Tensor, model, run, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, iterations each token ran (B, T)) of the looped model for the embedded, normalised tokens x
        (B, T, D) at `compute` (its width and loops); the blocks run through `model.run_layers` with the call's
        walk `run` (forward_pass.py)."""
        loop = self.config.loop
        B, T, D = x.shape
        counts, plan = self._plan(compute.loops, B, T, x.device)
        r, exit = plan.r, plan.exit
        threshold = plan.threshold or EXIT_THRESHOLDS.get(exit)
        cache = run.cache
        if cache is not None and r > cache.loop_slots and not cache.loop_shared:
            raise ValueError(f"loops: {r} iterations, but the cache holds {cache.loop_slots} slots per recurrent "
                             f"layer; make it with InferenceCache(..., compute=Compute(loops={r})), or share slots "
                             "with kv_budget")
        static, at = self.iteration_widths(compute.width)
        run.widths = static
        x = model.run_layers(x, loop.prelude_layers, run)
        e = rms_norm(x, self.config.norm_width)
        s = self.initial_state(e, cache)
        slots = _Slots(cache)

        def coda_logits(s: torch.Tensor) -> torch.Tensor:
            if cache is not None:  # a probe (exit="kl") may have run the coda on these tokens already
                for i in loop.coda_layers:
                    slots.rewind(i, cache.states[i], keep=exit == "kl")
            return model.final_logits(model.run_layers(s, loop.coda_layers, run), run.backout_mid)

        # Tokens still iterating: None while every token runs every iteration (training, a plain int r).
        active = torch.ones(B, T, dtype=torch.bool, device=x.device) if exit is not None else None
        ran = counts if counts is not None else torch.full((B, T), r, dtype=torch.long, device=x.device)
        step = _Iteration(run, self, slots, at)
        # Truncated backprop (Huginn): the first r - k iterations run without gradient, the last k with it.
        # Adaptive exit is for inference, where r is only a cap: it truncates nothing.
        no_grad_until = r - min(r, loop.backprop_depth) if exit is None else 0
        w_e, w_s = self.inject.weight[:, :D], self.inject.weight[:, D:]
        e_in = F.linear(e, w_e)  # the input's half of inject: the same every iteration
        previous = logits = None
        done = 0
        for iteration in range(r):
            if counts is not None:
                active = counts > iteration
            with torch.no_grad() if iteration < no_grad_until else nullcontext():
                step.begin(iteration, active)
                h = model.run_layers(e_in + F.linear(s, w_s), loop.recurrent_layers, step)
                # a norm after each loop keeps the state's scale fixed however long it runs
                h = rms_norm(h, self.config.norm_width)
                new = h if active is None else torch.where(active[..., None], h, s)
            done = iteration + 1
            if exit is not None:
                if exit == "kl":
                    logits = coda_logits(new)
                    current = F.log_softmax(logits.float(), dim=-1)
                    change = None if previous is None else (previous.exp() * (previous - current)).sum(-1)
                    previous = current
                else:
                    change = (new - s).norm(dim=-1) / new.norm(dim=-1) if iteration > 0 else None
                if change is not None:
                    stop = active & (change < threshold)
                    ran = torch.where(stop, done, ran)
                    active = active & ~stop
            s = new
            if exit is not None and not bool(active.any()):
                break
        if exit is not None:
            ran = torch.where(active, done, ran)
        if cache is not None:
            with torch.no_grad():
                self._fill_skipped_slots(model, step, done)
            self._keep_final_state(cache, s)
        # With "kl" the last probe ran the coda on every token's final state: its logits are the output.
        return (logits if exit == "kl" else coda_logits(s)), ran

    def _plan(self, loops, B: int, T: int, device) -> tuple[torch.Tensor | None, Loops]:
        """(per-token counts or None, the plan) of a call's `loops`."""
        if not isinstance(loops, torch.Tensor):
            return None, as_plan(self.config, loops)
        if loops.shape != (B, T) or loops.dtype.is_floating_point or loops.dtype == torch.bool:
            raise ValueError(f"loops: a tensor of per-token counts must be integer, shaped {(B, T)}; got "
                             f"{loops.dtype} {tuple(loops.shape)}")
        counts = loops.to(device=device, dtype=torch.long)
        if bool((counts < 1).any()):
            raise ValueError("loops: every token needs at least one iteration")
        return counts, Loops(int(counts.max()))

    def _keep_final_state(self, cache, s: torch.Tensor) -> None:
        """Warm start: each row's final state at its last real token, for the row's next call."""
        if not cache.warm_start:
            return
        B, T = s.shape[:2]
        end = cache.valid - 1 if cache.valid is not None else torch.full((B,), T - 1, device=s.device)
        final = s[torch.arange(B, device=s.device), end.clamp(min=0)]
        if cache.loop_last is None:
            cache.loop_last = final.detach().clone()
        else:
            real = (cache.valid > 0) if cache.valid is not None else torch.ones_like(end, dtype=torch.bool)
            cache.loop_last = torch.where(real[:, None], final.detach(), cache.loop_last)

    def _fill_skipped_slots(self, model, step: _Iteration, done: int) -> None:
        """Slots this call's tokens did not reach (slot >= iterations run) get what those tokens would write
        there by the rule above: their last input. Attention copies the K/V of the previous slot (the same
        numbers); other states run the layer on that input."""
        cache = step.slots.cache
        for slot in range(done, cache.loop_slots):
            step.begin(slot, None)
            for j, i in enumerate(self.config.loop.recurrent_layers):
                target, source = cache.states[i][slot], cache.states[i][slot - 1]
                if hasattr(target, "copy_new"):
                    target.copy_new(source, cache, step.last_in[j].size(1))
                else:
                    step.run.apply(i, model.blocks[i], step.last_in[j], step.run.context(i, target, step.widths))


class _Slots:
    """Which state of an inference cache each recurrent layer's iteration uses, and the rewinding shared slots
    and exit probes need: a layer re-run on the same tokens must start from the state their predecessor left."""

    def __init__(self, cache):
        self.cache = cache
        self.snapshots: dict = {}  # contents of non-idempotent states before this call first wrote them

    def state(self, i: int, iteration: int):
        cache = self.cache
        if cache is None:
            return None
        slot = iteration % cache.loop_slots
        if cache.loop_shared:  # a later iteration re-uses the slot: start from the token's predecessor again
            self.rewind((i, slot), cache.states[i][slot], keep=True)
        return cache.states[i][slot]

    def rewind(self, key, state, keep: bool) -> None:
        """Before `state` runs again on this call's tokens: restore what it held before the call, or (`keep`)
        remember that if this is its first run."""
        if key in self.snapshots:
            _restore(state, self.snapshots[key])
        elif keep:
            self.snapshots[key] = _snapshot(state)


class _Iteration:
    """The walk's view for one iteration of the recurrent layers: each layer's state slot and the iteration's
    widths, tokens that stopped iterating re-presenting the input they had at their last iteration, and the
    sandwich norm after each layer."""

    def __init__(self, run, recurrence: Recurrence, slots: _Slots, at):
        self.run, self.slots, self.at = run, slots, at
        self.norms = recurrence.norms
        self.index = {i: j for j, i in enumerate(recurrence.config.loop.recurrent_layers)}
        self.last_in: list[torch.Tensor | None] = [None] * len(self.index)  # each layer's latest input per token
        self.iteration, self.active, self.widths = 0, None, run.widths

    def begin(self, iteration: int, active: torch.Tensor | None) -> None:
        self.iteration, self.active = iteration, active
        self.widths = self.run.widths if self.at is None else self.at(iteration)

    def enter(self, i: int, h: torch.Tensor) -> torch.Tensor:
        j = self.index[i]
        if self.active is not None and self.iteration > 0:  # stopped tokens re-present their last input
            h = torch.where(self.active[..., None], h, self.last_in[j])
        self.last_in[j] = h
        return self.run.enter(i, h)

    def apply(self, i: int, block, h: torch.Tensor) -> torch.Tensor:
        ctx = self.run.context(i, self.slots.state(i, self.iteration), self.widths)
        mid = self.run.backout_mid
        h = self.run.apply(i, block, h, ctx)
        if i == self.run.backout_layer and self.active is not None and mid is not None:
            # a stopped token's backout residual stays the one from its last iteration, as in decoding it alone
            self.run.backout_mid = torch.where(self.active[..., None], h, mid)
        return self.norms[self.index[i]](h) if self.norms is not None else h
