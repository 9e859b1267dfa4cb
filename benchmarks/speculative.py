"""Self-speculative decoding against plain decoding of the same model, side by side in one run.

Two trained models: the demo's (--demo: a checkpoint; by default the `demo` run of $ADAMBA_HOME, trained by `make
demo`) and a wider Matryoshka transformer (--wide: a checkpoint, or trained here for --wide-steps on the embedded
corpus with the sandwich rule, run `speculative-wide`), whose Ghost slice is far cheaper than its full width. For
each model, batch (1 and 8), and draft (the Ghost width, an exit halfway up the stack), at k in --ks, greedy
decoding of --tokens tokens after --prompt-tokens tokens of held-out text; repeats alternate plain and every
speculative setting, and the speed-up is the median over repeats of time(plain) / time(speculative) within the
repeat. Reported too: the acceptance rate (accepted draft tokens / drafted) and whether the output equals plain
greedy decoding row for row (it must: a mismatch is a float near-tie or a bug, and is counted).

    python benchmarks/speculative.py --threads 2      # the run recorded in BENCHMARKS.md
The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_utils import cpu_name, parse_args

from adamba import ModelConfig, TrainConfig
from adamba.checkpoint import CheckpointError, load_checkpoint, resolve_run
from adamba.common import pick_device
from adamba.data.corpus import open_corpus
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.infer.speculative import Draft
from adamba.train.trainer import train


def wide_model(args, device):
    """The wider Matryoshka transformer: the given checkpoint, the one trained before, or a new one."""
    path = resolve_run(args.wide or "speculative-wide")
    try:
        return load_checkpoint(path, device)
    except CheckpointError:
        if args.wide:
            raise
    config = ModelConfig(depth=args.wide_depth, n_embd=args.wide_width, head_dim=64, block_pattern="T",
                         sequence_len=args.wide_sequence_len, vocab_size=4096)
    result = train(config, TrainConfig(run_name="speculative-wide", data="embedded", tokenizer_vocab_size=4096,
                                       device_batch_size=args.wide_batch, num_iterations=args.wide_steps,
                                       total_batch_size=args.wide_batch * args.wide_sequence_len, eval_every=0,
                                       matryoshka=True, device=args.device))
    return load_checkpoint(result.checkpoint, device)


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the last documents of the embedded corpus (its held-out end)."""
    out = []
    for text in reversed(list(open_corpus("embedded").documents())):
        ids = tokenizer.encode(text, bos=True)
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise ValueError(f"--prompt-tokens: fewer than {n} documents have {length} tokens")


def measure(model, tokenizer, name: str, args) -> list[dict]:
    L = model.config.n_layer
    drafts = [(f"ghost k={k}", Draft(width="ghost", k=k)) for k in args.ks] + \
             [(f"exit:{L // 2} k={k}", Draft(exit_layer=L // 2, k=k)) for k in args.ks]
    rows = []
    for batch in args.batches:
        batch_prompts = prompts(tokenizer, batch, args.prompt_tokens)
        settings = [("plain", None), *drafts]
        times = {label: [] for label, _ in settings}
        outputs = {}
        for _ in range(args.repeats):
            for label, draft in settings:
                engine = Engine(model, tokenizer, speculative=draft)
                started = time.perf_counter()
                out = engine.generate(batch_prompts, args.tokens, SamplingParams(0))  # no stop token: every row
                times[label].append(time.perf_counter() - started)
                outputs[label] = out
        plain = outputs["plain"]
        tokens = sum(len(c.tokens) for c in plain)
        for label, _ in settings:
            out = outputs[label]
            drafted = sum(c.drafted for c in out)
            rows.append({
                "model": name, "batch": batch, "draft": label,
                "tokens_per_s": tokens / statistics.median(times[label]),
                "speedup": statistics.median(p / s for p, s in zip(times["plain"], times[label], strict=True)),
                "acceptance": sum(c.accepted for c in out) / drafted if drafted else None,
                "rows_equal": sum(a.tokens == b.tokens for a, b in zip(out, plain, strict=True)),
                "rows": batch})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="demo", help="the demo model's checkpoint or run name")
    ap.add_argument("--wide", default=None, help="the wider model's checkpoint (default: train one)")
    ap.add_argument("--wide-width", type=int, default=1024)
    ap.add_argument("--wide-depth", type=int, default=8)
    ap.add_argument("--wide-steps", type=int, default=60)
    ap.add_argument("--wide-batch", type=int, default=4)
    ap.add_argument("--wide-sequence-len", type=int, default=128)
    ap.add_argument("--ks", default="2,4,6")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = parse_args(ap, smoke=dict(demo="", wide_width=128, wide_depth=2, wide_steps=2, wide_batch=2,
                                     wide_sequence_len=64, ks="2", batches="1,2", prompt_tokens=8, tokens=6,
                                     repeats=1))
    args.ks = [int(k) for k in args.ks.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    wide = wide_model(args, device)
    models = {"wide": wide}
    if args.demo:  # the smoke run has no demo checkpoint
        models = {"demo": load_checkpoint(resolve_run(args.demo), device), **models}
    rows = []
    for name, ckpt in models.items():
        rows += measure(ckpt.model.eval(), ckpt.tokenizer, name, args)

    print(f"device: {device} ({cpu_name() if device.type == 'cpu' else torch.cuda.get_device_name(device)}), "
          f"{args.threads} threads; greedy, {args.prompt_tokens}-token prompts, {args.tokens} new tokens")
    for name, ckpt in models.items():
        print(f"{name}: {ckpt.model.config.describe()}, modes {ckpt.model.config.compute_modes}, {ckpt.path}")
    print("| model | batch | decoding | tokens/s | speed-up | acceptance | rows equal to plain |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        acceptance = "" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%"
        print(f"| {r['model']} | {r['batch']} | {r['draft']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{acceptance} | {r['rows_equal']}/{r['rows']} |")
    print(json.dumps({"benchmark": "speculative", "models": {n: c.model.config.describe() for n, c in models.items()},
                      "threads": args.threads, "tokens": args.tokens,
                      "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "rows": rows}))


if __name__ == "__main__":
    main()
