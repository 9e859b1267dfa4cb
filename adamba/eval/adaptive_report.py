"""`adamba eval adaptive CKPT`: quality against compute for every adaptive choice of one checkpoint, on held-out data.

Curves, all measured on the same held-out tokens and priced by the one FLOP counter:
- exit: the ConfidenceGates at a sweep of thresholds (and the calibrated one, if any);
- depth: every token exits after block k (the truncated model; no later layer runs, so no propagation);
- width: each Matryoshka compute mode;
- predictor: the LayerDimPredictor under each mode's width as a budget, and at a sweep of prices;
- expand: the ExpansionGates at a sweep of thresholds from each narrower mode.
Quality is held-out bits per byte and next-token (argmax) agreement with the full model. When the model has a
predictor, every curve is scored on the tokens after the first `start` of each row (the prompt it reads), so all
points see the same tokens. Writes Markdown and a PNG (bpb and agreement against FLOPs/token); every bpb has its
95% bootstrap interval over the held-out batches (eval/bpb.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..common import write_atomic
from ..model.compute import Compute
from ..model.exits import Adaptive
from ..model.flops import count_flops
from ..model.predictor import predict_widths, predictor_flops
from .bpb import BpbEstimate
from .calibrate import Run, Sweep, measure
from .plots import plot_intervals
from .report_files import plt, report_dir, save_figure

REPORT_GRID = (0.999, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
PRICES = (-16.0, -4.0, -1.0, 0.0, 1.0, 4.0, 16.0, 64.0)  # logits per unit of FLOPs fraction


@dataclass
class Point:
    curve: str
    label: str
    flops: float  # forward FLOPs per token, from the counter
    fraction: float  # of the full model's
    estimate: BpbEstimate
    agreement: float  # next-token argmax agreement with the full model
    mean_exit: float
    exits: list[int]  # tokens per exit layer 0..n_layer (n_layer: no exit)
    widths: list[int]  # (token, attention layer) pairs per Matryoshka level

    @property
    def bpb(self) -> float:
        return self.estimate.bpb


def predictor_runs(model, start: int, context: int) -> list[Run]:
    """The predictor under every mode's width as a budget, and at each price with no budget. Its MLP runs once
    per row; its FLOPs are spread over the row's scored tokens."""
    config = model.config
    per_token = predictor_flops(config) / (context - start)

    def plan(budget=None, price: float = 0.0):
        def kwargs(x: torch.Tensor) -> dict:
            plans = predict_widths(model, x[:, :start], budget=budget, price=price)
            return {"compute": Compute(adaptive=Adaptive(exit=False, row_widths=tuple(tuple(p) for p in plans)))}
        return kwargs

    runs = [Run(f"budget {' = '.join(modes)}", plan(budget=modes[0]), extra=per_token)
            for modes in config.distinct_modes()]
    return runs + [Run(f"price {p:g}", plan(price=p), extra=per_token) for p in PRICES]


def adaptive_runs(model, context: int, thresholds=REPORT_GRID, start: int = 0) -> dict[str, list[Run]]:
    """Every curve's runs for `model` (see the module doc)."""
    config = model.config
    heads = model.adaptive_heads
    curves: dict[str, list[Run]] = {"width": [Run(" = ".join(modes), {"compute": Compute(modes[0])})
                                              for modes in config.distinct_modes()]}
    if config.exit_layers:
        exit_runs = [Run(f">= {t:g}", {"compute": Compute(adaptive=Adaptive(threshold=t))}) for t in thresholds]
        if heads.thresholds is not None:
            exit_runs.append(Run("calibrated", {"compute": Compute(adaptive=Adaptive())}))
        curves["exit"] = exit_runs
        depth = []
        for k in [*config.exit_layers, config.n_layer]:
            truncated = count_flops(config, context, depth=k).forward
            depth.append(Run(f"k={k}", lambda x, k=k: {"exit_layers": torch.full(x.shape, k, device=x.device)},
                             flops=truncated))
        curves["depth"] = depth
    if heads is not None and heads.predictor is not None:
        curves["predictor"] = predictor_runs(model, start, context)
    if heads is not None and heads.expansion_gates:
        curves["expand"] = [Run(f"{' = '.join(modes)} < {t:g}",
                                {"compute": Compute(modes[0], adaptive=Adaptive(exit=False, expand=t))})
                            for modes in config.distinct_modes() if config.compute_modes[modes[0]] < config.n_embd
                            for t in (0.3, 0.5, 0.7, 0.9)]
    return curves


def adaptive_points(model, batches, token_bytes, *, thresholds=REPORT_GRID,
                    start: int | None = None) -> tuple[list[Point], int]:
    """Measure every curve; returns the points and the number of tokens scored per point."""
    config = model.config
    context = batches[0][0].size(1)
    if start is None:
        start = min(64, context // 4) if config.predictor_layers else 0
    curves = adaptive_runs(model, context, thresholds, start)
    runs = [run for group in curves.values() for run in group]
    result: Sweep = measure(model, batches, runs, token_bytes, start=start)
    rows = result.rows()
    names = [curve for curve, group in curves.items() for _ in group]
    points = [Point(curve, label, float(rows["flops"][r]), float(rows["flops"][r]) / result.full_flops,
                    result.estimate(r), 1 - float(rows["risk"][r]), float(rows["mean_exit"][r]),
                    result.exit_hist[r].astype(int).tolist(), result.width_hist[r].astype(int).tolist())
              for r, (curve, label) in enumerate(zip(names, result.labels, strict=True))]
    return points, int(rows["tokens"])


def markdown(points: list[Point], levels: list[int]) -> str:
    lines = ["| curve | choice | FLOPs/token | of full | val bpb (95% interval) | agreement | mean exit | "
             f"exits per layer | widths ({'/'.join(map(str, levels))}) |", "|---|---|---:|---:|---:|---:|---:|---|---|"]
    lines += [f"| {p.curve} | {p.label} | {p.flops:.4g} | {100 * p.fraction:.1f}% | {p.estimate.describe()} | "
              f"{100 * p.agreement:.2f}% | {p.mean_exit:.2f} | {' '.join(map(str, p.exits))} | "
              f"{' '.join(map(str, p.widths))} |" for p in points]
    return "\n".join(lines)


def plot(points: list[Point], path: Path, title: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for curve in dict.fromkeys(p.curve for p in points):
        group = sorted((p for p in points if p.curve == curve), key=lambda p: p.flops)
        style = {"marker": "o", "ls": "-"} if curve in ("width", "depth") else {"marker": ".", "ls": "--"}
        plot_intervals(axes[0], [p.flops for p in group], [p.estimate for p in group], band=True, label=curve,
                       **style)
        axes[1].plot([p.flops for p in group], [p.agreement for p in group], label=curve, **style)
    axes[0].set(xlabel="forward FLOPs per token", ylabel="held-out val bpb (95% interval)",
                title="quality against compute")
    axes[1].set(xlabel="forward FLOPs per token", ylabel="next-token agreement with the full model",
                title="agreement against compute")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def write_adaptive_report(name: str, points: list[Point], model, tokens: int, source: str,
                          calibration: dict | None) -> Path:
    out = report_dir(name)
    plot(points, out / "adaptive.png", f"adaptive compute of {name}")
    config = model.config
    cal = "none (the seeds' fixed 0.95 is the default threshold)" if calibration is None else \
        (f"threshold {calibration['threshold']} for delta={calibration['delta']}, epsilon={calibration['epsilon']} "
         f"on {calibration['tokens']:,} tokens")
    return write_atomic(
        out / "adaptive.md",
        f"# Adaptive compute: {name}\n\nCheckpoint: `{source}` ({config.describe()}). {tokens:,} held-out tokens "
        f"per point; FLOPs/token from the FLOP counter (exited tokens pay their state propagation, gates and the "
        f"predictor's MLP count). Calibration: {cal}.\n\n{markdown(points, config.matryoshka_levels)}\n\n"
        "![quality against FLOPs](adaptive.png)\n")


def margin_at_equal_flops(points: list[Point], curve: str, baseline: str = "width") -> list[tuple[str, float, float]]:
    """For each point of `curve`: (label, its bpb, the baseline's bpb interpolated at the same FLOPs); points
    outside the baseline's FLOPs range are left out."""
    base = sorted((p for p in points if p.curve == baseline), key=lambda p: p.flops)
    xs, ys = np.array([p.flops for p in base]), np.array([p.bpb for p in base])
    return [(p.label, p.bpb, float(np.interp(p.flops, xs, ys))) for p in points
            if p.curve == curve and xs[0] <= p.flops <= xs[-1]]

