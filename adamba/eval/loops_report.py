"""Quality against compute for the loop counts of one looped checkpoint: the table and the Markdown + PNG report of
`adamba eval loops CKPT`.

Rows: a fixed number of iterations r for every token; adaptive exit (looped.py) at several thresholds of each of
Huginn's criteria (Geiping et al. 2025), capped at the largest r; and one per-iteration width schedule (the first
half of mean_recurrence's iterations at half width, the rest at full width). bpb is measured on held-out data in
full forward passes; FLOPs/token come from the one FLOP counter: for adaptive exit, the mean over the scored
tokens of each token's own count, including the "kl" criterion's extra coda + lm_head probes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..common import write_atomic
from ..config import require_loop
from ..model.compute import Compute
from ..model.looped import Loops
from .bpb import BpbEstimate, measure_bpb
from .plots import place_labels, plot_intervals
from .report_files import plt, report_dir, save_figure

LOOP_COUNTS = (1, 2, 4, 8, 16, 32)
# Around Huginn's defaults (looped.KL_EXIT_THRESHOLD, LATENT_EXIT_THRESHOLD): ten times looser and tighter.
EXIT_SWEEP = {"latent": (0.3, 0.1, 0.03, 0.01), "kl": (5e-3, 5e-4, 5e-5)}


@dataclass
class LoopRow:
    kind: str  # "fixed", "exit" or "width"
    label: str
    loops: float  # mean iterations per token
    flops: float  # forward FLOPs per token
    estimate: BpbEstimate | None

    @property
    def bpb(self) -> float | None:
        return None if self.estimate is None else self.estimate.bpb


def loop_rows(model, data=None, *, context: int | None = None, tokens: int = 0, batch_size: int = 8,
              counts=LOOP_COUNTS, sweep: dict | None = None) -> list[LoopRow]:
    config = model.config
    require_loop(config, "eval loops")
    device = next(model.parameters()).device
    sweep = EXIT_SWEEP if sweep is None else sweep

    def bpb(compute: Compute) -> BpbEstimate | None:
        if data is None or not tokens:
            return None
        return measure_bpb(model, data, batch_size=batch_size, seq_len=config.sequence_len, max_tokens=tokens,
                           device=device, compute=compute)

    rows = [LoopRow("fixed", f"r = {r}", r, model.count_flops(context, Compute(loops=r)).forward,
                    bpb(Compute(loops=r)))
            for r in counts]
    for criterion, thresholds in sweep.items():
        for threshold in thresholds:
            value = bpb(Compute(loops=Loops(max(counts), exit=criterion, threshold=threshold)))
            histogram = dict(value.loops) if value is not None else {max(counts): 1}  # unmeasured: count the cap
            n = sum(histogram.values())
            probes = {r: r - 1 if criterion == "kl" else 0 for r in histogram}
            flops = sum(c * model.count_flops(context, Compute(loops=r), probes=probes[r]).forward
                        for r, c in histogram.items()) / n
            rows.append(LoopRow("exit", f"exit {criterion} < {threshold:g} (r <= {max(counts)})",
                                sum(r * c for r, c in histogram.items()) / n, flops, value))
    r_bar = config.loop.mean_recurrence
    half = next(w for w in config.matryoshka_levels if w >= config.n_embd // 2)
    if r_bar > 1 and half < config.n_embd:
        def width(i: int) -> int | None:
            return half if i < r_bar // 2 else None
        rows.append(LoopRow("width", f"r = {r_bar}, iterations 0-{r_bar // 2 - 1} at width {half}", r_bar,
                            model.count_flops(context, Compute(width, r_bar)).forward, bpb(Compute(width, r_bar))))
    return rows


def markdown_table(rows: list[LoopRow], reference_flops: float) -> str:
    """The rows with bpb, its 95% bootstrap interval, and the paired difference from the fixed row at
    mean_recurrence (the one whose FLOPs are `reference_flops`), where that row is measured."""
    control = next((r.estimate for r in rows if r.kind == "fixed" and r.flops == reference_flops), None)
    lines = ["| compute | mean loops | FLOPs/token | of mean_recurrence | val bpb (95% interval) | "
             "vs mean_recurrence (95%) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpb = difference = "-"
        if r.estimate is not None:
            bpb = r.estimate.describe()
            if r.estimate is control:
                difference = "(control)"
            elif control is not None:
                delta, low, high = r.estimate.difference(control)
                difference = f"{delta:+.4f} ({low:+.4f} to {high:+.4f})"
        lines.append(f"| {r.label} | {r.loops:.2f} | {r.flops:.3g} | {100 * r.flops / reference_flops:.1f}% | "
                     f"{bpb} | {difference} |")
    return "\n".join(lines)


def write_loops_report(name: str, rows: list[LoopRow], reference_flops: float, context: int, source: str) -> Path:
    out = report_dir(name)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set(xscale="log", xlabel=f"forward FLOPs per token (context {context})",
           ylabel="held-out val bpb (95% interval)", title=f"loop counts of {name}")
    ax.grid(alpha=0.3)
    measured = [r for r in rows if r.estimate is not None]
    for kind, style in (("fixed", dict(marker="o")), ("exit", dict(marker="s", linestyle="none")),
                        ("width", dict(marker="^", linestyle="none"))):
        group = [r for r in measured if r.kind == kind]
        if group:
            plot_intervals(ax, [r.flops for r in group], [r.estimate for r in group], label=kind, **style)
    if measured:
        ax.legend()
        place_labels(ax, [r.flops for r in measured], [r.estimate.interval()[1] for r in measured],
                     [r.label.split(" (")[0] for r in measured], fontsize=7)
    save_figure(fig, out / "loops.png")
    return write_atomic(
        out / "loops.md",
        f"# Loop counts: {name}\n\nCheckpoint: `{source}`. FLOPs/token of a forward at context {context}, everything "
        "counted (prelude, every iteration of the recurrent layers and inject, coda, lm_head; adaptive exit: each "
        "token's own count, plus the coda + lm_head probes of the kl criterion). Adaptive exit is measured in full "
        "forward passes: with kl, a token's probes see earlier tokens of the pass while they still iterate, so its "
        "exits can differ slightly from token-by-token decoding (latent exits are the same). Intervals are 95% "
        "bootstrap intervals over the validation batches; the difference from mean_recurrence is paired (same "
        "batches) and says a row differs only where it excludes 0.\n\n"
        f"{markdown_table(rows, reference_flops)}\n\n![bpb against FLOPs](loops.png)\n")
