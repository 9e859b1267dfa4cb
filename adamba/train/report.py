"""A run report: Markdown with the numbers that matter and a PNG of the loss curves, under
$ADAMBA_HOME/reports/<run>/."""

from __future__ import annotations

from pathlib import Path

from ..common import write_atomic
from ..eval.report_files import plt, report_dir, save_figure


def plot_curves(metrics: list[dict], path: Path, title: str) -> Path:
    train = [m for m in metrics if "loss" in m]
    val = [m for m in metrics if "val_bpb" in m]
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([m["step"] for m in train], [m["loss"] for m in train], lw=1)
    ax_loss.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    ax_bpb.plot([m["step"] for m in val], [m["val_bpb"] for m in val], marker="o")
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="held-out val bpb")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(run: str, *, summary: dict[str, str], metrics: list[dict], samples: list[tuple[str, str]],
                 model_description: str, sections: dict[str, str] | None = None) -> Path:
    """`samples` are (heading, text) pairs; `sections` are extra (title, Markdown) parts before the samples."""
    out = report_dir(run)
    plot = plot_curves(metrics, out / "loss.png", f"adamba run '{run}'")
    val = [m for m in metrics if "val_bpb" in m]
    lines = [f"# Run report: {run}", "", f"Model: `{model_description}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary.items()]
    lines += ["", "## Held-out validation", "", "| step | val bpb |", "|---:|---:|"]
    lines += [f"| {m['step']} | {m['val_bpb']:.4f} |" for m in val]
    lines += ["", f"![loss curves]({plot.name})", ""]
    for title, body in (sections or {}).items():
        lines += [f"## {title}", "", body, ""]
    lines += ["## Samples", ""]
    for heading, text in samples:
        lines += [f"{heading}:", "", "```", text, "```", ""]
    return write_atomic(out / "report.md", "\n".join(lines))
