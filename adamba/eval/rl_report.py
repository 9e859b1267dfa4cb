"""The report of an RL run (train/rl.py): held-out pass@1 / pass@k and FLOPs per answer at each evaluation, and the
training reward, as Markdown and a PNG."""

from __future__ import annotations

from collections.abc import Sequence

from ..common import write_atomic
from .report_files import plt, report_dir, save_figure


def evaluation_table(records: Sequence[dict], k: int) -> str:
    rows = [r for r in records if "pass@1" in r]
    lines = [f"| step | pass@1 | pass@{k} | forward FLOPs per answer |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {100 * r['pass@1']:.1f}% | {100 * r[f'pass@{k}']:.1f}% | "
              f"{r['eval_flops_per_answer']:.3g} |" for r in rows]
    return "\n".join(lines)


def write_rl_report(name: str, records: Sequence[dict], k: int, settings: dict, task: str) -> tuple:
    """reports/<name>/rl.md and rl.png (held-out pass@1 and pass@k, and the training reward, against the step)."""
    out = report_dir(name)
    evals = [r for r in records if "pass@1" in r]
    steps = [r for r in records if "reward" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set(xlabel="RL step", ylabel="fraction", title=f"RL on {task}: {name}", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.plot([r["step"] for r in evals], [r["pass@1"] for r in evals], marker="o", label="held-out pass@1")
    ax.plot([r["step"] for r in evals], [r[f"pass@{k}"] for r in evals], marker="s", label=f"held-out pass@{k}")
    ax.plot([r["step"] for r in steps], [r["correct"] for r in steps], alpha=0.5, label="training rollouts correct")
    ax.legend(fontsize=8)
    png = save_figure(fig, out / "rl.png")
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    summary = (f"pass@1 {100 * first['pass@1']:.1f}% -> {100 * last['pass@1']:.1f}%, pass@{k} "
               f"{100 * first[f'pass@{k}']:.1f}% -> {100 * last[f'pass@{k}']:.1f}%" if evals else "no evaluation")
    settings_text = ", ".join(f"{key} {value!r}" for key, value in settings.items())
    md = write_atomic(out / "rl.md", f"# RL on {task}: {name}\n\nHeld-out problems, {k} samples each at the rollout "
                                     f"temperature: {summary}.\n\n{evaluation_table(records, k)}\n\n"
                                     f"![pass@k and reward](rl.png)\n\nSettings: {settings_text}.\n")
    return md, png
