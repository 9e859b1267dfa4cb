"""Quality against compute for every compute mode of one checkpoint: the table behind `adamba modes` and the
Markdown + PNG report of `adamba eval elastic`. FLOPs come from the one FLOP counter; bpb is measured on
held-out data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402

from ..common import adamba_home  # noqa: E402
from .bpb import evaluate_bpb  # noqa: E402


@dataclass
class ModeRow:
    mode: str
    widths: list  # per layer: an int for attention layers, "full" for Mamba
    flops: float  # forward FLOPs per token
    fraction: float  # of the full model's
    bpb: float | None


def mode_rows(model, data=None, *, context: int | None = None, tokens: int = 0, batch_size: int = 8) -> list[ModeRow]:
    config = model.config
    device = next(model.parameters()).device
    full = model.count_flops(context).forward
    rows = []
    for mode in config.compute_modes:
        widths = [w or (config.n_embd if kind == "T" else "full")
                  for kind, w in zip(config.block_pattern, config.layer_widths(mode), strict=True)]
        flops = model.count_flops(context, width=mode).forward
        bpb = None
        if data is not None and tokens:
            bpb = evaluate_bpb(model, data, batch_size=batch_size, seq_len=config.sequence_len, max_tokens=tokens,
                               device=device, width=mode)
        rows.append(ModeRow(mode, widths, flops, flops / full, bpb))
    return rows


def markdown_table(rows: list[ModeRow]) -> str:
    lines = ["| mode | width per layer | FLOPs/token | of full | val bpb |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r.mode} | {' '.join(map(str, r.widths))} | {r.flops:.3g} | {100 * r.fraction:.1f}% | "
              f"{'-' if r.bpb is None else f'{r.bpb:.4f}'} |" for r in rows]
    return "\n".join(lines)


def write_elastic_report(name: str, rows: list[ModeRow], context: int, source: str) -> Path:
    out = adamba_home() / "reports" / name
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    measured = [r for r in rows if r.bpb is not None]
    ax.plot([r.flops for r in measured], [r.bpb for r in measured], marker="o")
    for r in measured:
        ax.annotate(r.mode, (r.flops, r.bpb), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel=f"forward FLOPs per token (context {context})", ylabel="held-out val bpb",
           title=f"compute modes of {name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "elastic.png", dpi=110)
    plt.close(fig)
    path = out / "elastic.md"
    path.write_text(f"# Compute modes: {name}\n\nCheckpoint: `{source}`. FLOPs/token of a forward at context "
                    f"{context}, everything counted (attention at its width, Mamba at full width, lm_head).\n\n"
                    f"{markdown_table(rows)}\n\n![bpb against FLOPs](elastic.png)\n")
    return path
