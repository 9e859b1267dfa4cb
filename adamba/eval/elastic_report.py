"""Quality against compute for every compute mode of one checkpoint: the table behind `adamba modes` and the
Markdown + PNG report of `adamba eval elastic`. FLOPs come from the one FLOP counter; bpb is measured on
held-out data, with a bootstrap interval and a paired interval of the difference from full width (eval/bpb.py).
Modes that run the same widths (Ghost and Whisper at small n_embd) are one computation and one row."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..common import write_atomic
from ..model.compute import Compute
from .bpb import BpbEstimate, measure_bpb
from .plots import plot_intervals
from .report_files import plt, report_dir, save_figure


@dataclass
class ModeRow:
    modes: list[str]  # every compute mode that runs these widths
    widths: list  # per layer: an int for attention layers, "full" for Mamba
    flops: float  # forward FLOPs per token
    fraction: float  # of the full model's
    estimate: BpbEstimate | None
    full: BpbEstimate | None = None  # the full-width model on the same batches, for the paired difference

    @property
    def mode(self) -> str:
        return " = ".join(self.modes)

    @property
    def bpb(self) -> float | None:
        return None if self.estimate is None else self.estimate.bpb


def mode_rows(model, data=None, *, context: int | None = None, tokens: int = 0, batch_size: int = 8) -> list[ModeRow]:
    config = model.config
    device = next(model.parameters()).device

    def estimate(width) -> BpbEstimate | None:
        if data is None or not tokens:
            return None
        return measure_bpb(model, data, batch_size=batch_size, seq_len=config.sequence_len, max_tokens=tokens,
                           device=device, compute=Compute(width))

    full_flops = model.count_flops(context).forward
    full = estimate(None)
    rows = []
    for modes in config.distinct_modes():
        layer_widths = config.layer_widths(modes[0])
        widths = [w or (config.n_embd if kind == "T" else "full")
                  for kind, w in zip(config.block_pattern, layer_widths, strict=True)]
        flops = model.count_flops(context, Compute(modes[0])).forward
        at_full = all(w is None for w in layer_widths)
        rows.append(ModeRow(modes, widths, flops, flops / full_flops, full if at_full else estimate(modes[0]), full))
    return rows


INTERVAL_NOTE = ("Intervals are 95% bootstrap intervals over the validation batches; \"vs full width\" is the paired "
                 "interval of the difference on the same batches: a mode differs from full width only where it "
                 "excludes 0.")


def markdown_table(rows: list[ModeRow]) -> str:
    """Modes with val bpb, its 95% bootstrap interval over validation batches, and the paired difference from
    full width (its interval excluding 0 is what says a mode is really worse or better)."""
    lines = ["| mode | width per layer | FLOPs/token | of full | val bpb (95% interval) | vs full width (95%) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        bpb = difference = "-"
        if r.estimate is not None:
            bpb = r.estimate.describe()
            delta, low, high = r.estimate.difference(r.full)
            difference = "(control)" if r.estimate is r.full else f"{delta:+.4f} ({low:+.4f} to {high:+.4f})"
        lines.append(f"| {r.mode} | {' '.join(map(str, r.widths))} | {r.flops:.3g} | {100 * r.fraction:.1f}% | "
                     f"{bpb} | {difference} |")
    return "\n".join(lines)


def write_elastic_report(name: str, rows: list[ModeRow], context: int, source: str) -> Path:
    out = report_dir(name)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set(xlabel=f"forward FLOPs per token (context {context})", ylabel="held-out val bpb (95% interval)",
           title=f"compute modes of {name}")
    ax.grid(alpha=0.3)
    measured = [r for r in rows if r.estimate is not None]
    plot_intervals(ax, [r.flops for r in measured], [r.estimate for r in measured], [r.mode for r in measured],
                   marker="o")
    save_figure(fig, out / "elastic.png")
    return write_atomic(out / "elastic.md",
                        f"# Compute modes: {name}\n\nCheckpoint: `{source}`. FLOPs/token of a forward at context "
                        f"{context}, everything counted (attention at its width, Mamba at full width, lm_head). "
                        f"{INTERVAL_NOTE}\n\n"
                        f"{markdown_table(rows)}\n\n![bpb against FLOPs](elastic.png)\n")
