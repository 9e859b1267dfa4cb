"""Looped depth recurrence (issue 7 acceptance): does training with sampled loop counts make r a test-time dial?

Part 1, the embedded corpus: two identical tiny looped models (attention blocks, prelude + recur + coda) trained by
the same trainer on the same tokens (seed, data order, batch, schedule, steps): one draws r per micro-step from
the Poisson-lognormal of mean r-bar (train/loops.py), the control trains at fixed r = r-bar. Val bpb of both at
r in {1, 2, r-bar, 2 r-bar, 4 r-bar}. Checked: bpb(1) > bpb(2) > bpb(r-bar) for the sampled model, bpb at 2 and 4
r-bar within 0.5% of bpb(r-bar), and the fixed-r model degrading more at r = 1.

Part 2, a synthetic iterative task: running parity of a bit string (the target at bit i is the XOR of bits 1..i).
A looped model trained with sampled r on strings of --parity-length bits is scored per bit at r in {1, 2, r-bar,
2 r-bar, 4 r-bar} on strings of 1x, 2x and 4x that length; the bits beyond the training length are reported
separately. Reported whatever it shows.

Prints both tables, writes a PNG under $ADAMBA_HOME/reports/, ends with one JSON line.

    python benchmarks/loops_quality.py                                    # defaults below: ~1 hour on 2 CPU cores
    python benchmarks/loops_quality.py --device cuda --steps 2000 --parity-steps 4000
    python benchmarks/loops_quality.py --smoke                            # a few seconds, numbers meaningless
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from bench_utils import parse_args  # noqa: E402

from adamba import AdambaLM, ModelConfig, TrainConfig  # noqa: E402
from adamba.checkpoint import load_checkpoint  # noqa: E402
from adamba.common import adamba_home, pick_device  # noqa: E402
from adamba.data.corpus import open_corpus  # noqa: E402
from adamba.data.dataset import TokenizedCorpus  # noqa: E402
from adamba.eval.bpb import evaluate_bpb  # noqa: E402
from adamba.model.compute import Compute
from adamba.train.loops import sample_loops  # noqa: E402
from adamba.train.optim import build_optimizers, set_schedule  # noqa: E402
from adamba.train.trainer import train  # noqa: E402

BOS = 2  # parity task tokens: bits 0 and 1, then <bos>


def loop_counts(r_bar: int) -> list[int]:
    return sorted({1, 2, r_bar, 2 * r_bar, 4 * r_bar})


def corpus_part(args, device) -> dict:
    loop = dict(prelude=args.prelude, recur=args.recur, coda=args.coda, mean_recurrence=args.mean_recurrence,
                backprop_depth=args.backprop_depth)
    model_config = ModelConfig(size=args.size, head_dim=args.head_dim, sequence_len=args.sequence_len,
                               vocab_size=4096, block_pattern=args.pattern, loop=loop)
    results = {}
    for name, fixed in (("sampled", 0), ("fixed", args.mean_recurrence)):
        config = TrainConfig(run_name=f"loops_quality-{name}", data="embedded", tokenizer_vocab_size=4096,
                             device_batch_size=args.batch_size,
                             total_batch_size=args.batch_size * args.sequence_len * args.grad_accum,
                             num_iterations=args.steps, eval_every=0, device=args.device, fixed_loops=fixed)
        started = time.perf_counter()
        result = train(model_config, config)
        ckpt = load_checkpoint(result.checkpoint, device)
        data = TokenizedCorpus(open_corpus("embedded"), ckpt.tokenizer, config.val_fraction)
        bpb = {r: evaluate_bpb(ckpt.model, data, batch_size=args.batch_size, seq_len=args.sequence_len,
                               max_tokens=args.eval_tokens, device=device, compute=Compute(loops=r))
               for r in loop_counts(args.mean_recurrence)}
        results[name] = {"bpb": bpb, "mean_loops": result.mean_loops if fixed == 0 else float(fixed),
                         "minutes": (time.perf_counter() - started) / 60,
                         "train_flops_per_token": ckpt.model.count_flops(
                             compute=Compute(loops=args.mean_recurrence)).train}
    return {"model": model_config.describe(), **results}


def parity_batch(generator: torch.Generator, batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    bits = torch.randint(0, 2, (batch, length), generator=generator)
    idx = torch.cat([torch.full((batch, 1), BOS), bits], dim=1)
    targets = torch.cat([torch.full((batch, 1), -1), bits.cumsum(1) % 2], dim=1)  # XOR of the bits so far
    return idx.to(device), targets.to(device)


def parity_part(args, device) -> dict:
    lengths = [args.parity_length * m for m in (1, 2, 4)]
    loop = dict(prelude=args.prelude, recur=args.parity_recur, coda=args.coda, mean_recurrence=args.mean_recurrence,
                backprop_depth=args.backprop_depth)
    config = ModelConfig(vocab_size=4, n_embd=args.parity_width, head_dim=16, sequence_len=max(lengths) + 1,
                         block_pattern="T", loop=loop)
    torch.manual_seed(args.seed)
    model = AdambaLM.build(config, device).train()
    train_config = TrainConfig(num_iterations=args.parity_steps, device_batch_size=args.parity_batch,
                               total_batch_size=args.parity_batch * (args.parity_length + 1), warmup_ratio=0.05)
    optimizers = build_optimizers(model, train_config)
    generator = torch.Generator().manual_seed(args.seed)
    started, losses = time.perf_counter(), []
    for step in range(args.parity_steps):
        set_schedule(optimizers, step, train_config)
        idx, targets = parity_batch(generator, args.parity_batch, args.parity_length, device)
        loss = model(idx, targets, compute=Compute(loops=sample_loops(config, args.seed, step, 0)))
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    test = torch.Generator().manual_seed(args.seed + 1)
    accuracy: dict[int, dict[int, dict[str, float]]] = {}
    with torch.no_grad():
        for length in lengths:
            idx, targets = parity_batch(test, args.parity_eval, length, device)
            accuracy[length] = {}
            for r in loop_counts(args.mean_recurrence):
                correct = model(idx, compute=Compute(loops=r))[:, 1:, :2].argmax(-1) == targets[:, 1:]
                accuracy[length][r] = {"all": correct.float().mean().item(),
                                       "beyond_training": correct[:, args.parity_length:].float().mean().item()
                                       if length > args.parity_length else float("nan")}
    return {"model": config.describe(), "train_length": args.parity_length, "accuracy": accuracy,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "minutes": (time.perf_counter() - started) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per corpus model")
    parser.add_argument("--size", type=int, default=4, help="width dial: n_embd = size x 64")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--pattern", default="T", help="block kinds (tiled over prelude + recur + coda)")
    parser.add_argument("--prelude", type=int, default=1)
    parser.add_argument("--recur", type=int, default=1)
    parser.add_argument("--coda", type=int, default=1)
    parser.add_argument("--mean-recurrence", type=int, default=4)
    parser.add_argument("--backprop-depth", type=int, default=4)
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=1 << 16)
    parser.add_argument("--parity-steps", type=int, default=2000)
    parser.add_argument("--parity-length", type=int, default=16)
    parser.add_argument("--parity-width", type=int, default=64)
    parser.add_argument("--parity-recur", type=int, default=2, help="recurrent layers of the parity model")
    parser.add_argument("--parity-batch", type=int, default=64)
    parser.add_argument("--parity-eval", type=int, default=512, help="test strings per length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-corpus", action="store_true")
    parser.add_argument("--skip-parity", action="store_true")
    args = parse_args(parser, smoke=dict(steps=2, size=1, sequence_len=32, batch_size=2, grad_accum=1, eval_tokens=256,
                                         parity_steps=2, parity_length=4, parity_width=32, parity_batch=4,
                                         parity_eval=8))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    counts = loop_counts(args.mean_recurrence)
    r_bar = args.mean_recurrence
    report: dict = {"benchmark": "loops_quality", "mean_recurrence": r_bar}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))

    if not args.skip_corpus:
        corpus = corpus_part(args, device)
        report["corpus"] = corpus
        print(f"\nembedded corpus, {corpus['model']}, {args.steps} steps each, same tokens")
        print("| training | mean r trained | " + " | ".join(f"bpb r={r}" for r in counts) + " |")
        print("|---|---:|" + "---:|" * len(counts))
        for name in ("sampled", "fixed"):
            row = corpus[name]
            print(f"| {name} | {row['mean_loops']:.2f} | " + " | ".join(f"{row['bpb'][r]:.4f}" for r in counts) + " |")
            axes[0].plot(counts, [row["bpb"][r] for r in counts], marker="o", label=f"{name} r (train)")
        s, f = corpus["sampled"]["bpb"], corpus["fixed"]["bpb"]
        checks = {
            "bpb(1) > bpb(2) > bpb(r_bar)": s[1] > s[2] > s[r_bar],
            "bpb(2 r_bar) within 0.5% of bpb(r_bar)": abs(s[2 * r_bar] / s[r_bar] - 1) <= 0.005,
            "bpb(4 r_bar) within 0.5% of bpb(r_bar)": abs(s[4 * r_bar] / s[r_bar] - 1) <= 0.005,
            "fixed-r model degrades more at r=1": f[1] - f[r_bar] > s[1] - s[r_bar],
        }
        report["checks"] = checks
        for check, ok in checks.items():
            print(f"  {'PASS' if ok else 'FAIL'}  {check}")
        axes[0].set(xscale="log", xlabel="loops at evaluation", ylabel="held-out val bpb", title="embedded corpus")
        axes[0].grid(alpha=0.3)
        axes[0].legend()

    if not args.skip_parity:
        parity = parity_part(args, device)
        report["parity"] = parity
        lengths = list(parity["accuracy"])
        print(f"\nrunning parity, {parity['model']}, trained on {args.parity_length} bits with sampled r "
              f"({args.parity_steps} steps, final loss {parity['final_loss']:.3f}); per-bit accuracy "
              "(bits beyond the training length in brackets)")
        print("| r | " + " | ".join(f"{n} bits" for n in lengths) + " |")
        print("|---:|" + "---:|" * len(lengths))
        for r in counts:
            cells = []
            for n in lengths:
                a = parity["accuracy"][n][r]
                cells.append(f"{a['all']:.3f}" + (f" ({a['beyond_training']:.3f})" if n > args.parity_length else ""))
            print(f"| {r} | " + " | ".join(cells) + " |")
        for n in lengths:
            axes[1].plot(counts, [parity["accuracy"][n][r]["all"] for r in counts], marker="o", label=f"{n} bits")
        axes[1].set(xscale="log", xlabel="loops at evaluation", ylabel="per-bit accuracy", title="running parity")
        axes[1].grid(alpha=0.3)
        axes[1].legend()

    fig.tight_layout()
    plot = adamba_home() / "reports" / "loops_quality.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    print(f"\nplot {plot}")
    print(json.dumps(report, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))


if __name__ == "__main__":
    main()
