"""The report of an RL run (train/rl.py): held-out pass@1 / pass@k and FLOPs per answer at each evaluation, and the
training reward, as Markdown and a PNG. A compute-aware run (a FLOPs price) also shows the FLOPs it spent against
full width, and the widths chosen for easy and hard problems before and after; `write_price_report` puts several
runs side by side: the accuracy-FLOPs curve over the price."""

from __future__ import annotations

from collections.abc import Sequence

from ..common import write_atomic
from .report_files import plt, report_dir, save_figure

EASY = 0.5  # a held-out problem is easy when the starting model solved at least this share of its samples


def evaluation_table(records: Sequence[dict], k: int) -> str:
    rows = [r for r in records if "pass@1" in r]
    aware = any("eval_flops_frac" in r for r in rows)
    lines = [f"| step | pass@1 | pass@{k} | forward FLOPs per answer |" + (" of full width |" if aware else ""),
             "|---:|---:|---:|---:|" + ("---:|" if aware else "")]
    lines += [f"| {r['step']} | {100 * r['pass@1']:.1f}% | {100 * r[f'pass@{k}']:.1f}% | "
              f"{r['eval_flops_per_answer']:.3g} |" + (f" {100 * r['eval_flops_frac']:.1f}% |" if aware else "")
              for r in rows]
    return "\n".join(lines)


def difficulty_table(records: Sequence[dict], levels: Sequence[int]) -> str:
    """Easy against hard held-out problems (split by the first evaluation's solve rate), at the first and the last
    evaluation: their pass@1, FLOPs against full width and the share of each width the choosable layers took."""
    evals = [r for r in records if "problems" in r]
    if not evals:
        return ""
    first, last = evals[0], evals[-1]
    easy = {p["item"] for p in first["problems"] if p["solved"] >= EASY * p["samples"]}
    widths = " | ".join(f"width {w}" for w in levels)
    lines = [f"| step | problems | n | pass@1 | FLOPs of full width | {widths} |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(levels)]
    means = {}
    for record in (first, last) if last is not first else (first,):
        for label, keep in (("easy", True), ("hard", False)):
            group = [p for p in record["problems"] if (p["item"] in easy) == keep]
            if not group:
                continue
            chosen = [sum(p["levels"][j] for p in group) for j in range(len(levels))]
            total = max(sum(chosen), 1)
            pass1 = sum(p["solved"] for p in group) / sum(p["samples"] for p in group)
            means[record["step"], label] = sum(p["flops_frac"] for p in group) / len(group)
            lines.append(f"| {record['step']} | {label} | {len(group)} | {100 * pass1:.1f}% | "
                         f"{100 * means[record['step'], label]:.1f}% | "
                         + " | ".join(f"{100 * c / total:.0f}%" for c in chosen) + " |")
    step = last["step"]
    if (step, "easy") in means and (step, "hard") in means:
        hard, easy = means[step, "hard"], means[step, "easy"]
        verdict = "about as much compute as" if abs(hard - easy) < 0.005 else \
            "more compute than" if hard > easy else "less compute than"
        lines.append(f"\nAt step {step}, hard problems got {verdict} easy ones ({100 * hard:.1f}% against "
                     f"{100 * easy:.1f}% of full width).")
    return (f"Easy problems: those the starting model solved in at least {EASY:.0%} of its samples at the first "
            f"evaluation; hard: the rest. Width shares are over the layers whose width the predictor chooses.\n\n"
            + "\n".join(lines))


def write_rl_report(name: str, records: Sequence[dict], k: int, settings: dict, task: str,
                    levels: Sequence[int] = ()) -> tuple:
    """reports/<name>/rl.md and rl.png (held-out pass@1 and pass@k, and the training reward, against the step; a
    compute-aware run adds FLOPs against full width)."""
    out = report_dir(name)
    evals = [r for r in records if "pass@1" in r]
    steps = [r for r in records if "reward" in r]
    aware = any("flops_frac" in r for r in steps)
    fig, axes = plt.subplots(1, 2 if aware else 1, figsize=(12 if aware else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.set(xlabel="RL step", ylabel="fraction", title=f"RL on {task}: {name}", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.plot([r["step"] for r in evals], [r["pass@1"] for r in evals], marker="o", label="held-out pass@1")
    ax.plot([r["step"] for r in evals], [r[f"pass@{k}"] for r in evals], marker="s", label=f"held-out pass@{k}")
    ax.plot([r["step"] for r in steps], [r["correct"] for r in steps], alpha=0.5, label="training rollouts correct")
    ax.legend(fontsize=8)
    if aware:
        ax = axes[0, 1]
        ax.set(xlabel="RL step", ylabel="FLOPs per answer / full width", title="compute spent")
        ax.grid(alpha=0.3)
        ax.plot([r["step"] for r in steps], [r["flops_frac"] for r in steps], alpha=0.6, label="training rollouts")
        ax.plot([r["step"] for r in evals], [r["eval_flops_frac"] for r in evals], marker="o", label="held-out")
        ax.legend(fontsize=8)
    png = save_figure(fig, out / "rl.png")
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    summary = (f"pass@1 {100 * first['pass@1']:.1f}% -> {100 * last['pass@1']:.1f}%, pass@{k} "
               f"{100 * first[f'pass@{k}']:.1f}% -> {100 * last[f'pass@{k}']:.1f}%" if evals else "no evaluation")
    settings_text = ", ".join(f"{key} {value!r}" for key, value in settings.items())
    difficulty = difficulty_table(records, levels)
    md = write_atomic(out / "rl.md", f"# RL on {task}: {name}\n\nHeld-out problems, {k} samples each at the rollout "
                                     f"temperature: {summary}.\n\n{evaluation_table(records, k)}\n\n"
                                     + (f"{difficulty}\n\n" if difficulty else "")
                                     + f"![pass@k and reward](rl.png)\n\nSettings: {settings_text}.\n")
    return md, png


def write_price_report(name: str, runs: Sequence[tuple[str, float, int, Sequence[dict]]]) -> tuple:
    """reports/<name>/rl_price.md and .png: compute-aware runs (name, FLOPs price, seed, metrics) at their last
    held-out evaluation -- pass@1 against FLOPs per answer -- each against the price-0 run of its seed, and per
    price the mean and range over seeds."""
    rows = []
    for run, price, seed, records in sorted(runs, key=lambda r: (r[1], r[2])):
        evals = [r for r in records if "eval_flops_frac" in r]
        if not evals:
            raise ValueError(f"{run}: no compute-aware evaluation in its metrics (was it run with --flops-price?)")
        rows.append({"run": run, "price": price, "seed": seed, "first": evals[0], "last": evals[-1]})
    controls = {row["seed"]: row["last"] for row in rows if row["price"] == 0}
    for row in rows:
        control = controls.get(row["seed"])
        row["d_pass"] = None if control is None else row["last"]["pass@1"] - control["pass@1"]
        row["d_flops"] = None if control is None else \
            row["last"]["eval_flops_per_answer"] / control["eval_flops_per_answer"] - 1
    lines = ["| run | price | seed | pass@1 start -> end | FLOPs per answer | of full width | pass@1 vs price 0 | "
             "FLOPs vs price 0 |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        first, last = row["first"], row["last"]
        lines.append(f"| {row['run']} | {row['price']:g} | {row['seed']} | {100 * first['pass@1']:.1f}% -> "
                     f"{100 * last['pass@1']:.1f}% | {last['eval_flops_per_answer']:.3g} | "
                     f"{100 * last['eval_flops_frac']:.1f}% | {_signed(row['d_pass'], 100, ' pts')} | "
                     f"{_signed(row['d_flops'], 100, '%')} |")
    prices = sorted({row["price"] for row in rows})
    summary = ["| price | seeds | pass@1, mean (range) | FLOPs per answer, mean | pass@1 vs price 0 | "
               "FLOPs vs price 0 |", "|---:|---:|---|---:|---:|---:|"]
    for price in prices:
        group = [row for row in rows if row["price"] == price]
        passes = [row["last"]["pass@1"] for row in group]
        paired = [row for row in group if row["d_pass"] is not None]
        summary.append(f"| {price:g} | {len(group)} | {100 * sum(passes) / len(passes):.1f}% "
                       f"({100 * min(passes):.1f}-{100 * max(passes):.1f}) | "
                       f"{sum(row['last']['eval_flops_per_answer'] for row in group) / len(group):.3g} | "
                       + (f"{100 * sum(r['d_pass'] for r in paired) / len(paired):+.1f} pts | "
                          f"{100 * sum(r['d_flops'] for r in paired) / len(paired):+.1f}% |" if paired else "— | — |"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set(xlabel="held-out FLOPs per answer", ylabel="held-out pass@1",
           title="compute-aware RL: accuracy against compute over the FLOPs price")
    ax.grid(alpha=0.3)
    for price in prices:
        group = [row for row in rows if row["price"] == price]
        ax.scatter([row["last"]["eval_flops_per_answer"] for row in group], [row["last"]["pass@1"] for row in group],
                   label=f"λ = {price:g}")
    ax.legend(fontsize=8)
    out = report_dir(name)
    png = save_figure(fig, out / "rl_price.png")
    md = write_atomic(out / "rl_price.md", "# Compute-aware RL: accuracy against FLOPs over the price\n\n"
                                           "Each run at its last held-out evaluation, against the price-0 run of "
                                           "the same seed.\n\n" + "\n".join(summary) + "\n\n" + "\n".join(lines)
                                           + "\n\n![pass@1 against FLOPs](rl_price.png)\n")
    return md, png


def _signed(value: float | None, scale: float, unit: str) -> str:
    return "—" if value is None else f"{scale * value:+.1f}{unit}"
