"""October 2025's nanochat recipe against today's (value embeddings, residual scalars, smear, backout, QK scale
1.2, the Polar-Express Muon step), and each option's contribution: today's recipe with that one option removed
(leave-one-out ablation), for a transformer and for the demo's hybrid.

Every run is trained by the same trainer on the embedded corpus with the same tokenizer, seed, data order, batch,
schedule and number of steps, so all see exactly the same tokens; val bpb is measured on the same held-out
scenes. The October-2025 recipe is the control. An option's contribution is the val bpb lost when it alone is
removed from today's recipe (positive: the option helps). Prints a table, writes a PNG, ends with one JSON line.

    python benchmarks/recipe.py                     # 2 stacks x 8 recipes at the demo's size (time: BENCHMARKS.md)
    python benchmarks/recipe.py --stacks hybrid --steps 400
    python benchmarks/recipe.py --smoke             # seconds: the benchmark runs end to end
"""

from __future__ import annotations

import argparse
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from bench_utils import parse_args  # noqa: E402

from adamba import AdambaLM, ModelConfig, TrainConfig  # noqa: E402
from adamba.common import adamba_home  # noqa: E402
from adamba.train.trainer import train  # noqa: E402

# today's nanochat, as options of our config (model/recipe.py, attention.py, train/muon.py)
TODAY_MODEL = dict(residual_scalars=True, value_embeds="alternating", smear=True, backout=True, qk_scale=1.2)
TODAY_TRAIN = dict(muon="polar")
# leave-one-out: the option and what removing it sets back
ABLATIONS = {"value_embeds": ("model", None), "residual_scalars": ("model", False), "smear": ("model", False),
             "backout": ("model", False), "qk_scale": ("model", 1.0), "muon": ("train", "classic")}
STACKS = {"transformer": "T", "hybrid": "TM"}  # the demo's hybrid alternates attention and Mamba


def recipes() -> dict[str, tuple[dict, dict]]:
    """name -> (ModelConfig overrides, TrainConfig overrides)."""
    out = {"october-2025": ({}, {}), "today": (dict(TODAY_MODEL), dict(TODAY_TRAIN))}
    for option, (where, off) in ABLATIONS.items():
        model, train_ = dict(TODAY_MODEL), dict(TODAY_TRAIN)
        (model if where == "model" else train_)[option] = off
        out[f"today - {option}"] = (model, train_)
    return out


def draw(results: dict[str, dict[str, dict]], path) -> None:
    """Final val bpb of each recipe against the October-2025 control, one panel per stack (the curves of a short
    run lie on top of each other, so bars show the differences)."""
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (stack, runs) in zip(axes[0], results.items(), strict=True):
        control = runs.get("october-2025", next(iter(runs.values())))["val_bpb"]
        names = list(runs)
        gaps = [100 * (runs[n]["val_bpb"] - control) / control for n in names]
        ax.barh(names, gaps, color=["tab:blue" if n == "october-2025" else "tab:orange" if n == "today" else
                                    "tab:gray" for n in names])
        ax.axvline(0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set(xlabel="final held-out val bpb vs october-2025 (%, lower is better)", title=f"{stack}")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--depth", type=int, default=4, help="layers; width = 64 x depth (nanochat's depth dial)")
    parser.add_argument("--stacks", default=",".join(STACKS), help=f"which of {', '.join(STACKS)}")
    parser.add_argument("--recipes", default=None, help="comma-separated names (default: all); see recipes()")
    parser.add_argument("--sequence-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per evaluation")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order (the same for every run)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parse_args(parser, smoke=dict(steps=2, depth=2, sequence_len=32, batch_size=2, grad_accum=1,
                                         eval_tokens=256, recipes="october-2025,today,today - smear"))
    if args.threads:
        torch.set_num_threads(args.threads)
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    if unknown := sorted(set(stacks) - set(STACKS)):
        parser.error(f"--stacks: unknown {unknown}; choose from {', '.join(STACKS)}")
    chosen = recipes()
    if args.recipes:
        names = [r.strip() for r in args.recipes.split(",") if r.strip()]
        if unknown := sorted(set(names) - set(chosen)):
            parser.error(f"--recipes: unknown {unknown}; choose from {', '.join(chosen)}")
        chosen = {name: chosen[name] for name in names}

    results: dict[str, dict[str, dict]] = {}
    for stack in stacks:
        results[stack] = {}
        for name, (model_overrides, train_overrides) in chosen.items():
            model_config = ModelConfig(depth=args.depth, head_dim=64, sequence_len=args.sequence_len,
                                       vocab_size=4096, block_pattern=STACKS[stack], **model_overrides)
            config = TrainConfig(run_name=f"recipe-{stack}-{name.replace(' ', '')}", data="embedded",
                                 tokenizer_vocab_size=4096, device_batch_size=args.batch_size,
                                 total_batch_size=args.batch_size * args.sequence_len * args.grad_accum,
                                 num_iterations=args.steps, eval_every=max(1, args.steps // 5),
                                 eval_tokens=args.eval_tokens, device=args.device, seed=args.seed,
                                 **train_overrides)
            started = time.perf_counter()
            result = train(model_config, config, progress=False)
            with torch.device("meta"):
                model = AdambaLM(model_config)
            results[stack][name] = {
                "val_bpb": result.final_val_bpb, "initial_val_bpb": result.initial_val_bpb,
                "params": model.num_params(), "train_flops_per_token": model.count_flops().train,
                "minutes": (time.perf_counter() - started) / 60,
                "curve": [(m["step"], m["val_bpb"]) for m in result.metrics if "val_bpb" in m]}

    plot = adamba_home() / "reports" / "recipe.png"
    draw(results, plot)

    summary = {}
    print("\n| stack | recipe | params | train FLOPs/token | val bpb | vs october-2025 | removing it costs "
          "| minutes |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for stack, runs in results.items():
        control, today = runs.get("october-2025"), runs.get("today")
        for name, r in runs.items():
            gap = f"{100 * (r['val_bpb'] - control['val_bpb']) / control['val_bpb']:+.2f}%" if control else "-"
            costs = f"{r['val_bpb'] - today['val_bpb']:+.4f}" if today and name.startswith("today - ") else ""
            print(f"| {stack} | {name} | {r['params']:,} | {r['train_flops_per_token']:.3g} | {r['val_bpb']:.4f} | "
                  f"{gap} | {costs} | {r['minutes']:.1f} |")
        summary[stack] = {
            "today_vs_october": None if not (control and today) else
            (today["val_bpb"] - control["val_bpb"]) / control["val_bpb"],
            "contribution": {name.removeprefix("today - "): r["val_bpb"] - today["val_bpb"]
                             for name, r in runs.items() if today and name.startswith("today - ")}}
    print(f"plot {plot}")
    print(json.dumps({"benchmark": "recipe", "steps": args.steps, "depth": args.depth, "seed": args.seed,
                      "summary": summary,
                      "runs": {s: {n: {k: v for k, v in r.items() if k != "curve"} for n, r in runs.items()}
                               for s, runs in results.items()}}))


if __name__ == "__main__":
    main()
