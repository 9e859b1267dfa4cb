"""Quality of an alternating attention/Mamba hybrid, and of pure Mamba-1 (`M`) and Mamba-2 (`M2`) stacks,
against a pure transformer (`T`) of (nearly) equal size.

Every model is trained by the same trainer on the embedded corpus with the same tokenizer, seed, data
order, batch, schedule and number of steps, so they see exactly the same tokens; val bpb is measured on the
same held-out scenes. The transformer is the control; the pure Mamba stacks get the number of layers whose
parameter count is closest to the transformer's (a Mamba layer without MLP has about half an attention
layer's parameters). Prints a table, writes a PNG of the validation curves next to the run reports, and ends
with one JSON line.

    python benchmarks/hybrid_quality.py   # defaults below, four models: ~1 hour on 2 CPU cores (estimated, not timed)
    python benchmarks/hybrid_quality.py --models transformer,mamba,mamba2   # the T / M / M2 comparison only
    python benchmarks/hybrid_quality.py --steps 2000 --device cuda
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

MODELS = ("transformer", "hybrid", "mamba", "mamba2")


def count_params(config: ModelConfig) -> int:
    with torch.device("meta"):
        return AdambaLM(config).num_params()


def matched_stack(kind: str, target: int, common: dict) -> ModelConfig:
    """A stack of `kind` layers whose parameter count is closest to `target` (parameters grow linearly in
    the number of layers: embeddings and lm_head once, then the same amount per layer)."""
    one, two = (count_params(ModelConfig(n_layer=n, block_pattern=kind, **common)) for n in (1, 2))
    n_layer = max(1, round((target - one) / (two - one)) + 1)
    return ModelConfig(n_layer=n_layer, block_pattern=kind, **common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--transformer-layers", type=int, default=6)
    parser.add_argument("--hybrid-pattern", default="TM*4",
                        help="the hybrid's block pattern; TM*4 = 8 layers, 4 attention + 4 Mamba")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"which of {', '.join(MODELS)} to train (the transformer is always trained)")
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per evaluation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parse_args(parser, smoke=dict(steps=2, width=64, transformer_layers=1, hybrid_pattern="TM",
                                         sequence_len=32, batch_size=2, grad_accum=1, eval_tokens=256))
    if args.threads:
        torch.set_num_threads(args.threads)

    common = dict(n_embd=args.width, head_dim=64, sequence_len=args.sequence_len, vocab_size=4096)
    chosen = {m.strip() for m in args.models.split(",") if m.strip()}
    unknown = sorted(chosen - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    transformer = ModelConfig(n_layer=args.transformer_layers, block_pattern="T", **common)
    target = count_params(transformer)
    models = {
        "transformer": transformer,
        "hybrid": ModelConfig(block_pattern=args.hybrid_pattern, **common),
        "mamba": matched_stack("M", target, common),
        "mamba2": matched_stack("M2", target, common),
    }
    models = {name: cfg for name, cfg in models.items() if name == "transformer" or name in chosen}
    params = {name: count_params(cfg) for name, cfg in models.items()}
    results = {}
    for name, model_config in models.items():
        config = TrainConfig(run_name=f"hybrid_quality-{name}", data="embedded", tokenizer_vocab_size=4096,
                             device_batch_size=args.batch_size,
                             total_batch_size=args.batch_size * args.sequence_len * args.grad_accum,
                             num_iterations=args.steps, eval_every=max(1, args.steps // 6),
                             eval_tokens=args.eval_tokens, device=args.device)
        started = time.perf_counter()
        result = train(model_config, config)
        results[name] = {
            "params": params[name], "blocks": "".join(model_config.block_pattern),
            "val_bpb": result.final_val_bpb, "initial_val_bpb": result.initial_val_bpb,
            "minutes": (time.perf_counter() - started) / 60,
            "curve": [(m["step"], m["val_bpb"]) for m in result.metrics if "val_bpb" in m],
            "train_flops_per_token": AdambaLM(model_config).count_flops().train,
        }

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(*zip(*r["curve"], strict=True), marker="o", label=f"{name} ({r['params'] / 1e6:.2f}M params)")
    ax.set(xlabel="step (same tokens for all)", ylabel="held-out val bpb", title="T, hybrid, M and M2 stacks")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plot = adamba_home() / "reports" / "hybrid_quality.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)

    t = results["transformer"]
    gaps = {name: (r["val_bpb"] - t["val_bpb"]) / t["val_bpb"] for name, r in results.items()}
    print("\n| model | blocks | params | train FLOPs/token | val bpb | vs transformer | minutes |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['blocks']} | {r['params']:,} | {r['train_flops_per_token']:.3g} | "
              f"{r['val_bpb']:.4f} | {100 * gaps[name]:+.2f}% | {r['minutes']:.1f} |")
    for name, r in results.items():
        if name != "transformer":
            print(f"{name} vs transformer: {100 * gaps[name]:+.2f}% val bpb (negative = {name} better); "
                  f"params {100 * (r['params'] - t['params']) / t['params']:+.1f}%")
    print(f"plot {plot}")
    print(json.dumps({"benchmark": "hybrid_quality", "steps": args.steps, "relative_bpb_gap": gaps.get("hybrid"),
                      "relative_bpb_gaps": gaps,
                      **{name: {k: v for k, v in r.items() if k != "curve"} for name, r in results.items()}}))


if __name__ == "__main__":
    main()
