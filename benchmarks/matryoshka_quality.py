"""One Matryoshka-trained model against models trained independently at each compute mode's width.

MatFormer (Devvrit et al. 2023) reports that each nested slice is as good as a model of its size trained
alone. Here: the demo's shape (an alternating attention/Mamba hybrid, width 256, head dim 64; `--pattern T` for
a transformer) on the embedded corpus. The Matryoshka models train every slice, by the sandwich rule (full,
smallest and one random middle width per micro-step) and by MatFormer's rule (one random width per
micro-step); each control trains only at one width (`TrainConfig.width`): the same weights and architecture,
its attention/MLP layers narrowed to that width, Mamba, embeddings and lm_head at full width, which is exactly
what a slice computes. All runs use the same tokenizer, seed, data order, batch, schedule and number of steps,
so they see the same tokens. Every model is then scored on the same held-out tokens at the Ghost, Normal and
Think widths.

Checks (issue 5): within each Matryoshka model bpb falls as width grows, and each slice is within 3% of its
independent model. Prints a table, writes a Markdown report and a PNG of bpb against FLOPs/token, ends with
one JSON line.

    python benchmarks/matryoshka_quality.py            # about 15 minutes on 2 idle CPU cores
    python benchmarks/matryoshka_quality.py --steps 2000 --width 768 --depth 12 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from bench_utils import parse_args  # noqa: E402

from adamba import ModelConfig, TrainConfig  # noqa: E402
from adamba.checkpoint import load_checkpoint  # noqa: E402
from adamba.common import adamba_home, pick_device  # noqa: E402
from adamba.data.corpus import open_corpus  # noqa: E402
from adamba.data.dataset import TokenizedCorpus  # noqa: E402
from adamba.eval.bpb import evaluate_bpb  # noqa: E402
from adamba.model.compute import Compute
from adamba.train.trainer import train  # noqa: E402

MODES = ("ghost", "normal", "think")
TOLERANCE = 0.03  # each slice within 3% of its independent model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--pattern", default="TM")
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--rules", default="sandwich,sample", help="Matryoshka rules to train")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parse_args(parser, smoke=dict(steps=2, depth=2, width=128, sequence_len=32, batch_size=2, eval_tokens=256))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model_config = ModelConfig(depth=args.depth, n_embd=args.width, head_dim=64, block_pattern=args.pattern,
                               sequence_len=args.sequence_len, vocab_size=4096)
    base = dict(data="embedded", tokenizer_vocab_size=4096, device_batch_size=args.batch_size,
                total_batch_size=args.batch_size * args.sequence_len, num_iterations=args.steps, eval_every=0,
                device=args.device)
    prefix = f"matryoshka_quality-{args.pattern.replace('*', 'x')}"  # runs and report, per block pattern
    runs = {f"matryoshka-{rule}": dict(matryoshka=True, matryoshka_rule=rule) for rule in args.rules.split(",")}
    runs |= {f"independent-{mode}": dict(width=mode) for mode in MODES}

    results, data = {}, None
    for name, overrides in runs.items():
        started = time.perf_counter()
        result = train(model_config, TrainConfig(run_name=f"{prefix}-{name}", **base, **overrides))
        ckpt = load_checkpoint(result.checkpoint, device)
        if data is None:
            data = TokenizedCorpus(open_corpus("embedded"), ckpt.tokenizer, TrainConfig.val_fraction)
        modes = MODES if name.startswith("matryoshka") else (overrides["width"],)
        results[name] = {
            "bpb": {mode: evaluate_bpb(ckpt.model, data, batch_size=args.batch_size, seq_len=args.sequence_len,
                                       max_tokens=args.eval_tokens, device=device, compute=Compute(mode))
                    for mode in modes},
            "train_flops": sum(m["train_flops"] for m in result.metrics if "train_flops" in m),
            "minutes": (time.perf_counter() - started) / 60,
        }
        flops = {mode: ckpt.model.count_flops(compute=Compute(mode)).forward for mode in MODES}

    matryoshka = [name for name in results if name.startswith("matryoshka")]
    rows, checks = [], {}
    for mode in MODES:
        independent = results[f"independent-{mode}"]["bpb"][mode]
        row = {"mode": mode, "width": model_config.compute_modes[mode], "flops": flops[mode],
               "independent": independent}
        for name in matryoshka:
            bpb = results[name]["bpb"][mode]
            row[name] = bpb
            row[f"{name} gap"] = (bpb - independent) / independent
            checks[f"{name} {mode} within {TOLERANCE:.0%}"] = row[f"{name} gap"] <= TOLERANCE
        rows.append(row)
    for name in matryoshka:
        curve = [results[name]["bpb"][mode] for mode in MODES]
        checks[f"{name} monotone"] = all(a > b for a, b in itertools.pairwise(curve))

    header = "| mode | width | FLOPs/token | independent | " + " | ".join(f"{n} (gap)" for n in matryoshka) + " |"
    lines = [header, "|---|---:|---:|---:|" + "---:|" * len(matryoshka)]
    for r in rows:
        cells = " | ".join(f"{r[n]:.4f} ({100 * r[n + ' gap']:+.2f}%)" for n in matryoshka)
        lines.append(f"| {r['mode']} | {r['width']} | {r['flops']:.3g} | {r['independent']:.4f} | {cells} |")
    spent = ["| run | training FLOPs | minutes |", "|---|---:|---:|"]
    spent += [f"| {n} | {r['train_flops']:.3g} | {r['minutes']:.1f} |" for n, r in results.items()]
    verdicts = [f"- {'holds' if ok else 'FAILS'}: {check}" for check, ok in checks.items()]
    table = "\n".join(lines)

    out = adamba_home() / "reports" / prefix
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([flops[m] for m in MODES], [r["independent"] for r in rows], "ks", label="independent models")
    for name in matryoshka:
        ax.plot([flops[m] for m in MODES], [results[name]["bpb"][m] for m in MODES], marker="o", label=name)
    for r in rows:
        ax.annotate(r["mode"], (r["flops"], r["independent"]), textcoords="offset points", xytext=(4, 4))
    ax.set(xlabel="forward FLOPs per token", ylabel="held-out val bpb",
           title=f"Matryoshka slices vs independent models ({args.steps} steps each)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bpb_vs_flops.png", dpi=110)
    plt.close(fig)
    (out / "report.md").write_text(
        f"# Matryoshka slices vs independently trained models\n\nModel: {model_config.describe()}; "
        f"{args.steps} steps of {base['total_batch_size']:,} tokens each.\n\n{table}\n\n"
        + "\n".join(spent) + "\n\n" + "\n".join(verdicts) + "\n\n![bpb against FLOPs](bpb_vs_flops.png)\n")

    print(f"\n{table}\n\n" + "\n".join(spent) + "\n\n" + "\n".join(verdicts))
    print(f"report {out / 'report.md'}")
    print(json.dumps({"benchmark": "matryoshka_quality", "steps": args.steps, "config": model_config.describe(),
                      "rows": rows, "checks": checks,
                      "runs": results}))


if __name__ == "__main__":
    main()
