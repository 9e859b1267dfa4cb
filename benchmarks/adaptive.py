"""Adaptive compute on the demo model (issue 6 acceptance): calibrated early exit, the width predictor, and whether
hard inputs get more compute.

The model is the demo's shape (`adamba.demo.demo_configs`: an alternating attention/Mamba hybrid, depth 4, width
256, head dim 64, Matryoshka-trained on the embedded Shakespeare corpus) with exits after blocks 1-3, a
ConfidenceGate each and a LayerDimPredictor after block 1, trained in the same run: LayerSkip-style exit losses,
gate BCE against the honest agreement label, and the predictor's loss + energy_weight * E[FLOPs] (train/losses.py).
(ExpansionGates need an attention layer at >= 0.75 n_layer; TMTM's layer 3 is Mamba, so this model has none.)

Then, on held-out sequences:
1. Calibration, 50 times: the sequences are split at random into calibration and test halves; Learn-then-Test
   picks the exit threshold on the calibration half (delta = 1%, epsilon = 0.1); the test half measures the
   disagreement with the full model and the FLOPs saved. Target: disagreement <= delta in >= 90% of splits; goal:
   >= 25% FLOPs saved.
2. Predictor against uniform width: each predictor point (budgets, prices) against the fixed-width (Matryoshka
   modes) curve interpolated at the same FLOPs/token, on the tokens after the predictor's prompt; the margin is
   reported whatever its sign.
3. Easy vs hard: rows of copying spans (a word list, then the same list again: the repeat is predictable) and of
   arithmetic ("a + b = c": the answers are not), same model and calibrated threshold; reports mean exit layer,
   FLOPs/token and the predictor's FLOPs for each, whatever they show.
Prints tables, writes a Markdown report and the adaptive PNG, ends with one JSON line.

    python benchmarks/adaptive.py --minutes 30             # the acceptance run (CPU, 2 cores)
    python benchmarks/adaptive.py --smoke                  # a few seconds, numbers meaningless
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import numpy as np
import torch
from bench_utils import parse_args

from adamba.checkpoint import load_checkpoint, run_dir
from adamba.common import adamba_home, pick_device
from adamba.config import ModelConfig
from adamba.data.corpus import open_corpus
from adamba.data.dataset import TokenizedCorpus
from adamba.demo import demo_configs
from adamba.eval.adaptive_report import adaptive_points, margin_at_equal_flops, markdown, plot
from adamba.eval.calibrate import calibrate, held_out_batches, sweep
from adamba.model.compute import Compute
from adamba.model.exits import Adaptive
from adamba.model.predictor import predict_widths
from adamba.train.trainer import train

WORDS = ("king queen lord lady castle sword crown night day love war peace speak hear see come thou thee good ill "
         "fair foul sweet heaven earth fire water death life prince duke father mother brother sister friend ghost "
         "storm sea ship forest garden tower gate honour glory shame grief joy fortune heart blood gold silver").split()


def build(args) -> tuple[ModelConfig, object]:
    model, config = demo_configs(args.run, args.minutes)
    shape = {"n_layer": args.depth, "n_embd": args.width, "sequence_len": args.sequence_len}
    # heads, levels and modes re-derived for the shape; exits after blocks 1..L-1, the predictor after block 1;
    # backout off: the numbers recorded in BENCHMARKS.md were measured before exits and backout were combined
    model = ModelConfig.from_dict({**model.to_dict(), **{k: v for k, v in shape.items() if v is not None},
                                   "depth": None, "n_head": None, "n_kv_head": None, "matryoshka_levels": None,
                                   "compute_modes": None, "block_pattern": "TM", "min_exit_layer": 1,
                                   "predictor_layers": 1, "backout": False})
    config = dataclasses.replace(
        config, num_iterations=args.steps or config.num_iterations, device_batch_size=args.batch_size,
        total_batch_size=args.batch_size * model.sequence_len * args.grad_accum,
        time_budget_s=0 if args.steps else args.minutes * 60,
        exit_loss_weight=1.0, gate_loss_weight=1.0, predictor_weight=1.0, energy_weight=args.energy_weight,
        predictor_context=min(64, model.sequence_len // 4), eval_every=0, device=args.device)
    return model, config


def synthetic_rows(tokenizer, kind: str, rows: int, seq_len: int, rng: random.Random):
    """(x, y, scored) rows of copying spans (scored: the repeated list) or arithmetic (scored: the answers)."""
    xs, ys, masks = [], [], []
    for _ in range(rows):
        ids, scored = [tokenizer.bos_id], [False]
        while len(ids) < seq_len + 1:
            if kind == "copy":
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
                parts = [(tokenizer.encode(words + " |"), False), (tokenizer.encode(" " + words + "\n"), True)]
            else:
                a, b = rng.randint(10, 999), rng.randint(10, 999)
                parts = [(tokenizer.encode(f"{a} + {b} ="), False), (tokenizer.encode(f" {a + b}\n"), True)]
            for tokens, score in parts:
                ids += tokens
                scored += [score] * len(tokens)
        ids, scored = ids[:seq_len + 1], scored[:seq_len + 1]
        xs.append(ids[:-1])
        ys.append(ids[1:])
        masks.append(scored[1:])  # y[t] = ids[t + 1] is scored when that token is
    return torch.tensor(xs), torch.tensor(ys), torch.tensor(masks)


@torch.no_grad()
def easy_vs_hard(model, tokenizer, threshold, start: int, device, rows: int = 16) -> dict:
    config = model.config
    rng = random.Random(0)
    result = {}
    for kind in ("copy", "arithmetic"):
        x, _, scored = (t.to(device) for t in synthetic_rows(tokenizer, kind, rows, config.sequence_len, rng))
        scored[:, :start] = False  # the predictor's prompt is not scored (as in the report)
        full = model(x).argmax(-1)
        policy = Adaptive(threshold=threshold) if threshold is not None else Adaptive(exit=False)
        out = model(x, compute=Compute(adaptive=policy), outputs=True)
        logits, record = out.logits, out.exits
        flops = record.token_flops(config, x.size(1))
        plans = predict_widths(model, x[:, :start])
        planned_policy = Adaptive(exit=False, row_widths=tuple(map(tuple, plans)))
        out = model(x, compute=Compute(adaptive=planned_policy), outputs=True)
        planned, plan_flops = out.logits, out.exits.token_flops(config, x.size(1))
        mask = scored.cpu()
        result[kind] = {
            "tokens": int(mask.sum()),
            "mean_exit": float(record.exit_layer.cpu()[mask].double().mean()),
            "exit_rate": float((record.exit_layer.cpu()[mask] < config.n_layer).double().mean()),
            "flops_frac": float(flops[mask].mean()) / model.count_flops(x.size(1)).forward,
            "disagreement": float((logits.argmax(-1) != full).cpu()[mask].double().mean()),
            "predictor_flops_frac": float(plan_flops[mask].mean()) / model.count_flops(x.size(1)).forward,
            "predictor_disagreement": float((planned.argmax(-1) != full).cpu()[mask].double().mean()),
        }
    return result


def point_json(point) -> dict:
    """A curve point for the JSON line: its bpb, not the per-batch sums behind its interval (`estimate`)."""
    return {**{k: v for k, v in vars(point).items() if k != "estimate"}, "bpb": point.bpb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="training time budget (ignored with --steps)")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of a time budget")
    ap.add_argument("--depth", type=int, default=None, help="n_layer (default: the demo's 4)")
    ap.add_argument("--width", type=int, default=None, help="n_embd (default: the demo's 256)")
    ap.add_argument("--sequence-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per micro-step (the demo's 8)")
    ap.add_argument("--grad-accum", type=int, default=2, help="micro-steps per step (the demo's 2)")
    ap.add_argument("--energy-weight", type=float, default=0.2, help="lambda of the predictor's energy penalty")
    ap.add_argument("--eval-tokens", type=int, default=1 << 15, help="held-out tokens (split 50 times)")
    ap.add_argument("--splits", type=int, default=50)
    ap.add_argument("--delta", type=float, default=0.01)
    ap.add_argument("--epsilon", type=float, default=0.1)
    ap.add_argument("--run", default="adaptive_bench")
    ap.add_argument("--reuse", action="store_true", help="evaluate the run's latest checkpoint, no training")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = parse_args(ap, smoke=dict(steps=2, depth=4, width=128, sequence_len=32, batch_size=2, grad_accum=1,
                                     eval_tokens=512, splits=2))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    started = time.perf_counter()
    model_config, config = build(args)
    if not args.reuse:
        train(model_config, config)
    ckpt = load_checkpoint(run_dir(args.run), device)
    model, tokenizer = ckpt.model.eval(), ckpt.tokenizer
    data = TokenizedCorpus(open_corpus(config.data), tokenizer, config.val_fraction)
    token_bytes = tokenizer.token_bytes.to(device)
    batches = held_out_batches(data, batch_size=8, seq_len=model.config.sequence_len, max_tokens=args.eval_tokens,
                               device=device)

    # 1. Learn-then-Test over random calibration/test splits of whole held-out sequences
    result = sweep(model, batches, token_bytes=token_bytes)
    n_seq = len(result.tokens)
    rng = np.random.default_rng(0)
    splits = []
    for _ in range(args.splits):
        order = rng.permutation(n_seq)
        cal, test = order[:n_seq // 2], order[n_seq // 2:]
        chosen = calibrate(result, args.delta, args.epsilon, subset=cal)
        rows = result.rows(test)
        g = None if chosen.threshold is None else result.thresholds.index(chosen.threshold)
        splits.append({"threshold": chosen.threshold,
                       "test_disagreement": 0.0 if g is None else float(rows["risk"][g]),
                       "test_flops_saved": 0.0 if g is None else 1 - float(rows["flops"][g]) / result.full_flops,
                       "test_exit_rate": 0.0 if g is None else float(rows["exit_rate"][g])})
    valid = np.mean([s["test_disagreement"] <= args.delta for s in splits])
    saved = np.array([s["test_flops_saved"] for s in splits])
    whole = calibrate(result, args.delta, args.epsilon)

    # 2. every curve (exit, depth, width, predictor) on the same held-out tokens; predictor against uniform width
    points, scored = adaptive_points(model, batches, token_bytes)
    margins = margin_at_equal_flops(points, "predictor")
    # 3. easy vs hard inputs, at the threshold calibrated on all held-out sequences
    start = min(64, model.config.sequence_len // 4)
    synthetic = easy_vs_hard(model, tokenizer, whole.threshold, start, device)

    out = adamba_home() / "reports" / args.run
    out.mkdir(parents=True, exist_ok=True)
    plot(points, out / "adaptive.png", f"adaptive compute: {args.run}")
    lines = [f"# Adaptive compute benchmark: {args.run}", "", f"Model: `{model.config.describe()}`; checkpoint "
             f"`{ckpt.path}`; {sum(result.tokens):,} held-out tokens in {n_seq} sequences.", "",
             f"## Calibration over {args.splits} random splits (delta {args.delta}, epsilon {args.epsilon})", "",
             f"- held-out disagreement <= delta in {100 * valid:.0f}% of splits (target >= 90%)",
             f"- FLOPs saved on the test half: mean {100 * saved.mean():.1f}%, min {100 * saved.min():.1f}%, "
             f"max {100 * saved.max():.1f}% (goal >= 25%)",
             f"- thresholds chosen: {sorted({s['threshold'] for s in splits}, key=lambda t: (t is None, t))}",
             f"- on all sequences: threshold {whole.threshold}, disagreement {100 * whole.risk:.2f}%, exit rate "
             f"{100 * whole.exit_rate:.1f}%, FLOPs saved {100 * whole.flops_saved:.1f}%", "",
             f"## Every curve ({scored:,} tokens per point)", "", markdown(points, model.config.matryoshka_levels), "",
             "## Predictor against uniform width at the same FLOPs/token (bpb; negative margin: predictor better)", "",
             "| predictor point | predictor bpb | uniform bpb at its FLOPs | margin |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {bpb:.4f} | {uniform:.4f} | {bpb - uniform:+.4f} |" for label, bpb, uniform in margins]
    lines += ["", "## Easy (copying) vs hard (arithmetic) inputs", "",
              "| input | scored tokens | mean exit layer | exit rate | FLOPs (exits) | disagreement | "
              "FLOPs (predictor) | disagreement (predictor) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {kind} | {r['tokens']} | {r['mean_exit']:.2f} | {100 * r['exit_rate']:.1f}% | "
              f"{100 * r['flops_frac']:.1f}% | {100 * r['disagreement']:.1f}% | {100 * r['predictor_flops_frac']:.1f}% "
              f"| {100 * r['predictor_disagreement']:.1f}% |" for kind, r in synthetic.items()]
    harder = synthetic["arithmetic"]["flops_frac"] > synthetic["copy"]["flops_frac"]
    lines += ["", f"Hard inputs get {'more' if harder else 'no more'} compute from the exits than easy ones.",
              "", "![quality against FLOPs](adaptive.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"report {out / 'report.md'} ({(time.perf_counter() - started) / 60:.1f} min)")
    print(json.dumps({"benchmark": "adaptive", "config": model.config.describe(), "checkpoint": str(ckpt.path),
                      "delta": args.delta, "epsilon": args.epsilon, "splits_valid": float(valid),
                      "flops_saved_mean": float(saved.mean()), "calibrated": dataclasses.asdict(whole),
                      "predictor_margins": margins, "easy_vs_hard": synthetic,
                      "points": [point_json(p) for p in points]}))


if __name__ == "__main__":
    main()
