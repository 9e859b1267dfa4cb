"""The report of `adamba eval core`: per task and compute mode, accuracy and centred accuracy; CORE per mode against
the FLOPs it spent; Markdown, CSV and PNG under reports/<name>/."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from ..common import write_atomic
from .core import CORE_LABELS, CORE_TASK_COUNT
from .report_files import plt, report_dir, save_figure
from .scores import TaskScore, centred_mean


def counted(scores: Sequence[TaskScore], from_bundle: bool) -> list[TaskScore]:
    """The scores the metric averages: every bundle task, or the offline tasks that are CORE's (not the cloze)."""
    return [s for s in scores if from_bundle or s.task in CORE_LABELS]


def metric_name(scores: Sequence[TaskScore], from_bundle: bool) -> str:
    """CORE only for the whole bundle; anything less says how much of it it is."""
    tasks = len({s.task for s in counted(scores, from_bundle)})
    return "CORE" if from_bundle and tasks == CORE_TASK_COUNT else \
        f"CORE-{'bundle' if from_bundle else 'offline'}, {tasks} of {CORE_TASK_COUNT} tasks"


def markdown(scores: Sequence[TaskScore], modes: Sequence[str], from_bundle: bool) -> str:
    name = metric_name(scores, from_bundle)
    tasks = list(dict.fromkeys(s.task for s in scores))
    cell = {(s.task, s.mode): s for s in scores}
    lines = ["| task | kind | items | chance | " + " | ".join(f"{m}: accuracy (centred)" for m in modes) + " |",
             "|---|---|---:|---:|" + "---:|" * len(modes)]
    for task in tasks:
        first = next(s for s in scores if s.task == task)
        lines.append(f"| {task} | {first.kind} | {first.total} | {100 * first.baseline:.1f}% | " + " | ".join(
            f"{100 * cell[task, m].accuracy:.1f}% ({cell[task, m].centred:+.3f})" for m in modes) + " |")
    per_mode = {m: [s for s in counted(scores, from_bundle) if s.mode == m] for m in modes}
    lines.append(f"| **{name}** | | | | " + " | ".join(f"**{centred_mean(per_mode[m]):.4f}**" for m in modes) + " |")
    lines.append("| forward FLOPs spent (all tasks) | | | | " + " | ".join(
        f"{sum(s.flops for s in scores if s.mode == m):.3g}" for m in modes) + " |")
    extra = sorted({s.task for s in scores} - {s.task for s in counted(scores, from_bundle)})
    if extra:
        lines.append(f"\nNot part of the metric (not CORE tasks): {', '.join(extra)}.")
    cropped = sum(s.cropped for s in scores)
    note = f"\n\n{cropped} requests were longer than the model's context and lost their start." if cropped else ""
    return "\n".join(lines) + note


def write_core_report(name: str, scores: Sequence[TaskScore], modes: Sequence[str], from_bundle: bool,
                      source: str) -> tuple:
    out = report_dir(name)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["task", "kind", "mode", "correct", "total", "accuracy", "baseline", "centred", "flops",
                     "cropped"])
    for s in scores:
        writer.writerow([s.task, s.kind, s.mode, s.correct, s.total, f"{s.accuracy:.6f}", f"{s.baseline:.6f}",
                         f"{s.centred:.6f}", f"{s.flops:.6g}", s.cropped])
    csv_path = write_atomic(out / "core.csv", buffer.getvalue())
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    per_mode = {m: [s for s in counted(scores, from_bundle) if s.mode == m] for m in modes}
    flops = [sum(s.flops for s in per_mode[m]) for m in modes]
    values = [centred_mean(per_mode[m]) for m in modes]
    left.plot(flops, values, marker="o")
    for m, x, y in zip(modes, flops, values, strict=True):
        left.annotate(m, (x, y), fontsize=8, textcoords="offset points", xytext=(4, 4))
    left.set(xlabel="forward FLOPs spent", ylabel="centred accuracy, mean", title=metric_name(scores, from_bundle))
    left.grid(alpha=0.3)
    tasks = list(dict.fromkeys(s.task for s in scores))
    width = 0.8 / len(modes)
    cell = {(s.task, s.mode): s for s in scores}
    for j, m in enumerate(modes):
        right.bar([i + j * width for i in range(len(tasks))], [cell[t, m].centred for t in tasks], width, label=m)
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=7)
    right.axhline(0, color="black", linewidth=0.8)
    right.set(ylabel="centred accuracy (0 = chance)", title="per task")
    right.legend(fontsize=8)
    fig.tight_layout()
    png = save_figure(fig, out / "core.png")
    md = write_atomic(out / "core.md", f"# {metric_name(scores, from_bundle)}: {name}\n\nCheckpoint: {source}. "
                                       "Centred accuracy = (accuracy - chance) / (1 - chance); the metric is its "
                                       "mean over tasks (DCLM's CORE methodology).\n\n"
                                       f"{markdown(scores, modes, from_bundle)}\n\n![CORE](core.png)\n\n"
                                       "Per task and mode: core.csv.\n")
    return md, csv_path, png
