"""Training objectives of adaptive compute (issue 6): early-exit losses, honest gate labels, the width predictor.

Each objective computes its loss from what one forward returns (`model(..., outputs=True)`: the logits and the
hidden states it was asked for): `objective.loss(train_model, model, x, y, compute)`, where `train_model` is the
model as the trainer runs it (compiled, DDP) and `model` the module itself, whose `head` turns an exit layer's
hidden state into logits. Nothing of training runs inside the model.

- Early exit (LayerSkip, Elhoushi et al. 2024, §3.2): the CE of every exit layer's logits -- the shared head on
  h_k, so training makes the truncated models usable -- and/or KL(final || exit), the final layer's distribution
  (detached) as teacher. Layer k's weight grows with k (deep exits matter more and are easier), the weights sum to
  1, and a "gradual" curriculum switches exits on from the last to the first over a fraction of the run.
- Gates (the seeds' "shadow loss" made honest): each ConfidenceGate is trained with BCE against "exit k's
  next-token argmax equals the final layer's" (or KL(final || exit) < delta), each ExpansionGate against "this
  narrow run's final argmax equals the full-width model's". Inputs are detached, so the gates only learn to judge.
- Width predictor: a straight-through Gumbel-softmax (Jang et al. 2017) over each choosable layer's levels, a
  mixture of the nested widths' block outputs (all levels together cost about as much as 1.4 full layers), and
  loss = CE + energy_weight * E[FLOPs] / FLOPs(full) with E[FLOPs] from train/energy.py: the energy penalty's
  gradient reaches the predictor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ATTENTION, ModelConfig, TrainConfig
from ..model.compute import Compute
from ..model.flops import count_flops
from ..model.predictor import choosable, reading_flops
from .energy import expected_flops


def check_adaptive_training(model: ModelConfig, config: TrainConfig) -> None:
    """Every adaptive training term needs the modules it trains."""
    if (config.exit_loss_weight or config.exit_kl_weight) and model.min_exit_layer is None:
        raise ValueError("exit_loss_weight: early-exit losses need exit layers (set the model's min_exit_layer)")
    if config.gate_loss_weight and model.min_exit_layer is None and not model.expansion_gates:
        raise ValueError("gate_loss_weight: the model has no gates (set min_exit_layer or expansion_gates)")
    if config.predictor_weight and not model.predictor_layers:
        raise ValueError("predictor_weight: the model has no width predictor (set predictor_layers)")
    if config.predictor_weight and config.predictor_context >= model.sequence_len:
        raise ValueError(f"predictor_context: {config.predictor_context} leaves no tokens to predict in rows of "
                         f"sequence_len={model.sequence_len}")


def exit_weights(model: ModelConfig, config: TrainConfig, step: int) -> dict[int, float]:
    """{exit layer: weight of its loss at this step}: weights proportional to k, summing to 1 over every exit
    layer; under the "gradual" curriculum layer k joins once step >= (L-1-k) / n_exits * fraction * num_iterations
    (the last exit first)."""
    layers = model.exit_layers
    total = sum(layers)
    ramp = config.exit_curriculum_fraction * config.num_iterations if config.exit_curriculum == "gradual" else 0
    return {k: k / total for k in layers
            if step >= (model.n_layer - 1 - k) / len(layers) * ramp}


def _agree(final: torch.Tensor, other: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The honest label: `other`'s next-token choice agrees with `final`'s (argmax), or KL(final || other) is
    below gate_kl_delta ("kl")."""
    if config.gate_label == "argmax":
        return (final.argmax(-1) == other.argmax(-1)).float()
    p, q = F.log_softmax(final.float(), -1), F.log_softmax(other.float(), -1)
    return ((p.exp() * (p - q)).sum(-1) < config.gate_kl_delta).float()


class ExitTraining:
    """The plain forward at one width, plus early-exit CE/KL and gate BCE. `full_logits`: the full-width model's
    logits on this micro-batch (detached), needed to label ExpansionGates in a narrow pass; None otherwise."""

    def __init__(self, model: ModelConfig, config: TrainConfig, step: int, narrow: bool,
                 full_logits: torch.Tensor | None = None):
        self.config, self.full_logits = config, full_logits
        self.weights = exit_weights(model, config, step) if config.exit_loss_weight or config.exit_kl_weight else {}
        self.gated = model.exit_layers if config.gate_loss_weight else []
        self.expansion = model.expansion_layers if config.gate_loss_weight and model.expansion_gates and narrow \
            else []
        self.keep = set(self.weights) | set(self.gated) | set(self.expansion)
        self.hidden: dict[int, torch.Tensor] = {}
        self.terms: dict[str, float] = {}

    def loss(self, train_model, model, x: torch.Tensor, targets: torch.Tensor, compute: Compute) -> torch.Tensor:
        """The pass at `compute` (width, loops) and its exit and gate terms."""
        out = train_model(x, targets, compute=compute, hidden_layers=self.keep, outputs=True)
        self.hidden = out.hidden
        logits, ce = out.logits, out.loss
        flat = targets.reshape(-1)
        self.ce = ce.detach()
        total = ce
        final = self.final = logits.detach()
        real = (targets != -1).float()
        # an exit after the backout layer backs out its residual, one at or before it its own (final_logits)
        after_backout = lambda k: out.backout_mid if model.backout is not None and k > model.backout.layer else None  # noqa: E731
        exit_logits = {k: model.final_logits(self.hidden[k], after_backout(k))
                       for k in sorted(set(self.weights) | set(self.gated))}
        if self.weights and self.config.exit_loss_weight:
            exit_ce = sum(w * F.cross_entropy(exit_logits[k].view(-1, logits.size(-1)), flat, ignore_index=-1)
                          for k, w in self.weights.items())
            total = total + self.config.exit_loss_weight * exit_ce
            self.terms["exit_ce"] = exit_ce.item()
        if self.weights and self.config.exit_kl_weight:
            teacher = F.log_softmax(final.float(), -1)
            kl = sum(w * ((teacher.exp() * (teacher - F.log_softmax(exit_logits[k].float(), -1))).sum(-1) * real)
                     .sum() / real.sum().clamp(min=1) for k, w in self.weights.items())
            total = total + self.config.exit_kl_weight * kl
            self.terms["exit_kl"] = kl.item()
        bce, agreement = [], []
        heads = model.adaptive_heads
        for k in self.gated:
            label = _agree(final, exit_logits[k].detach(), self.config)
            bce.append(F.binary_cross_entropy_with_logits(heads.exit_gates[str(k)](self.hidden[k]), label,
                                                          weight=real))
            agreement.append(((label * real).sum() / real.sum().clamp(min=1)).item())
        for k in self.expansion:
            label = _agree(self.full_logits, final, self.config)
            bce.append(F.binary_cross_entropy_with_logits(heads.expansion_gates[str(k)](self.hidden[k]), label,
                                                          weight=real))
        if bce:
            gate_bce = sum(bce) / len(bce)
            total = total + self.config.gate_loss_weight * gate_bce
            self.terms["gate_bce"] = gate_bce.item()
        if agreement:
            self.terms["exit_agreement"] = sum(agreement) / len(agreement)  # how often exits match (the labels)
        return total


class PredictorTraining:
    """The width predictor's pass: a straight-through Gumbel-softmax mixture of every allowed level in each
    choosable attention layer; the loss counts the tokens after the `predictor_context` prompt tokens it read, plus
    energy_weight * E[FLOPs] / FLOPs(full)."""

    def __init__(self, model: ModelConfig, config: TrainConfig):
        self.config = config
        self.full = count_flops(model).forward
        self.probs: torch.Tensor | None = None
        self.terms: dict[str, float] = {}

    def loss(self, train_model, model, x: torch.Tensor, targets: torch.Tensor, compute: Compute) -> torch.Tensor:
        """The predictor reads the prompt's hidden states after the first predictor_layers blocks (detached: a
        pass without gradient), picks levels by Gumbel-softmax, and the forward mixes those widths' outputs."""
        if compute != Compute():
            raise ValueError(f"predictor_weight: the width predictor's pass chooses its own widths, not {compute}")
        hidden = model.hidden_after(x, model.config.predictor_layers)
        scores = model.adaptive_heads.predictor(hidden[:, :self.config.predictor_context])
        self.probs = F.gumbel_softmax(scores, tau=self.config.predictor_temperature, hard=True)  # (B, L, levels)
        targets = targets.clone()
        targets[:, :self.config.predictor_context] = -1  # the predictor read these; score what comes after
        ce = train_model(x, targets, width_probs=self.probs)
        self.ce = ce.detach()
        energy = expected_flops(model.config, self.probs.double()).mean() / self.full
        self.terms = {"predictor_ce": ce.item(), "predictor_flops_frac": energy.item()}
        return ce + self.config.energy_weight * energy.to(ce.dtype)


def mixture_train_flops(model: ModelConfig) -> float:
    """Training FLOPs per token of a PredictorTraining pass: every allowed level of each choosable layer runs, and
    the predictor's input (the first predictor_layers blocks) is computed once more, forward only."""
    levels = [w for w in model.matryoshka_levels if w != model.n_embd]
    windows = model.attention_windows()
    extra = 0.0
    for i in choosable(model):
        for w in levels:
            layer = count_flops(model, layers=[(i, ATTENTION, windows[i], w)])
            extra += layer.projections + layer.attention
    return 3 * (count_flops(model).forward + extra) + reading_flops(model)


def exit_train_flops(model: ModelConfig, objective: ExitTraining) -> float:
    """Training FLOPs per token an ExitTraining pass adds to the plain forward: an lm_head per exit used, a gate
    MLP per gate trained (gates are trained on detached inputs, so their backward stops at the gate)."""
    head = 2 * model.n_embd * model.vocab_size
    gate = 2 * (model.n_embd * model.gate_hidden + model.gate_hidden)
    exits = len(set(objective.weights) | set(objective.gated))
    return 3 * (exits * head + (len(objective.gated) + len(objective.expansion)) * gate)


class AdaptiveStep:
    """The trainer's view of the adaptive terms of one optimizer step: each pass's objective, the extra
    training FLOPs it costs, and the mean of each logged term over the passes that produced it."""

    def __init__(self, model: ModelConfig, config: TrainConfig, step: int):
        self.model, self.config, self.step = model, config, step
        self.exits = bool(config.exit_loss_weight or config.exit_kl_weight or config.gate_loss_weight)
        self.full_logits: torch.Tensor | None = None
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def objective(self, model, x: torch.Tensor, width) -> ExitTraining | None:
        """The objective of a pass at `width` on micro-batch x (None: a plain pass). A narrow pass that trains
        ExpansionGates needs the full-width logits: those of this micro-batch's full pass, else a no-grad one."""
        if not self.exits:
            return None
        narrow = width is not None
        if narrow and self.model.expansion_gates and self.config.gate_loss_weight and self.full_logits is None:
            with torch.no_grad():
                self.full_logits = model(x)
        return ExitTraining(self.model, self.config, self.step, narrow, self.full_logits if narrow else None)

    def finished(self, objective, width) -> None:
        if objective is None:
            return
        if width is None and isinstance(objective, ExitTraining):
            self.full_logits = objective.final
        for name, value in objective.terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def next_micro_batch(self) -> None:
        self.full_logits = None

    def train_flops(self, objective) -> float:
        """Training FLOPs per token a pass costs beyond its plain forward + backward."""
        if isinstance(objective, ExitTraining):
            return exit_train_flops(self.model, objective)
        return 0.0

    def record(self) -> dict[str, float]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}
