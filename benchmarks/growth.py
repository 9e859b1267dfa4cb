"""Growth acceptance (issue 8): after widening and training, does the wide model beat the un-widened model trained
for the same extra tokens?

1. base: a model of width --width trained from scratch for --base-steps steps (embedded corpus).
2. grown: the base widened to --wide (`adamba surgery widen`, --init), then --new-dims-steps steps of stage
   new-dims (only the new dimensions train) and the rest of --extra-steps with stage all.
3. control: the same base, un-widened, trained --extra-steps more steps.
Both extra phases start from the base's weights with a fresh optimizer and schedule, use the same seed (one
different from the base's, so the data order is not the base's again), batch and number of steps: the same
tokens. All three are scored on the same held-out tokens. Equal tokens is not equal compute: the wide model
spends more FLOPs per token, so the table gives the training FLOPs of each extra phase too. The verdict is
printed either way. Ends with one JSON line; a Markdown report goes to $ADAMBA_HOME/reports/growth/.

    python benchmarks/growth.py                                     # the acceptance run: ~10 minutes, 2 cores
    python benchmarks/growth.py --base-steps 20 --extra-steps 20 --eval-tokens 8192 --run-prefix growth-smoke
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_utils import parse_args

from adamba import ModelConfig, TrainConfig
from adamba.checkpoint import load_checkpoint
from adamba.common import adamba_home, pick_device
from adamba.data.corpus import open_corpus
from adamba.data.dataset import TokenizedCorpus
from adamba.eval.bpb import evaluate_bpb
from adamba.surgery import widen
from adamba.surgery.growth import record, save_grown
from adamba.train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="the base model's n_embd")
    parser.add_argument("--wide", type=int, default=128, help="the widened n_embd")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--pattern", default="TM2", help="block pattern (tiled over the layers)")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--init", default="zero", help="widening init: zero, lora, copy-scale or svd")
    parser.add_argument("--base-steps", type=int, default=400)
    parser.add_argument("--extra-steps", type=int, default=400)
    parser.add_argument("--new-dims-steps", type=int, default=0,
                        help="of the grown model's extra steps, how many train only the new dimensions first")
    parser.add_argument("--matryoshka", action="store_true", help="train the extra phases with --matryoshka")
    parser.add_argument("--sequence-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--run-prefix", default="growth")
    args = parse_args(parser, smoke=dict(base_steps=2, extra_steps=2, sequence_len=32, batch_size=2, eval_tokens=256))
    if not 0 <= args.new_dims_steps < args.extra_steps:
        raise SystemExit("--new-dims-steps: must be below --extra-steps (the rest trains everything)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    config = ModelConfig(n_layer=args.n_layer, n_embd=args.width, n_head=args.width // args.head_dim,
                         block_pattern=args.pattern, sequence_len=args.sequence_len, vocab_size=4096,
                         mamba2_headdim=args.head_dim)
    shared = dict(data="embedded", tokenizer_vocab_size=4096, device_batch_size=args.batch_size,
                  total_batch_size=args.batch_size * args.sequence_len, eval_every=0, device=args.device)
    extra = dict(shared, seed=43, matryoshka=args.matryoshka)
    p = args.run_prefix

    started = time.perf_counter()
    base = train(config, TrainConfig(run_name=f"{p}-base", num_iterations=args.base_steps, **shared))
    source = load_checkpoint(base.checkpoint)
    grown = widen(source.model, args.wide, args.init)
    current = save_grown(f"{p}-wide-0", grown, source.tokenizer,
                         record("widen", source.model.config, [], None, width=[args.width, args.wide],
                                init=args.init), str(base.checkpoint))
    phases = []
    if args.new_dims_steps:
        phases.append(train(grown.config, TrainConfig(run_name=f"{p}-wide-1", init_from=str(current),
                                                      stage="new-dims", num_iterations=args.new_dims_steps,
                                                      **extra)))
        current = phases[-1].checkpoint
    phases.append(train(grown.config, TrainConfig(run_name=f"{p}-wide-2", init_from=str(current), stage="all",
                                                  num_iterations=args.extra_steps - args.new_dims_steps, **extra)))
    control = train(config, TrainConfig(run_name=f"{p}-control", init_from=str(base.checkpoint),
                                        num_iterations=args.extra_steps, **extra))

    data = TokenizedCorpus(open_corpus("embedded"), source.tokenizer, TrainConfig.val_fraction)
    rows = {}
    for name, checkpoint, runs in (("base", base.checkpoint, []), ("widened + trained", phases[-1].checkpoint, phases),
                                   ("un-widened + trained", control.checkpoint, [control])):
        model = load_checkpoint(checkpoint, device).model
        rows[name] = {
            "n_embd": model.config.n_embd, "params": model.num_params(),
            "flops_per_token": model.count_flops().forward,
            "extra_tokens": sum(r.step for r in runs) * shared["total_batch_size"],
            "extra_train_flops": sum(m.get("train_flops", 0.0) for r in runs for m in r.metrics),
            "val_bpb": evaluate_bpb(model, data, batch_size=args.batch_size, seq_len=args.sequence_len,
                                    max_tokens=args.eval_tokens, device=device)}
    wide, narrow = rows["widened + trained"]["val_bpb"], rows["un-widened + trained"]["val_bpb"]
    verdict = (f"{'holds' if wide < narrow else 'FAILS'}: the widened model ({wide:.4f} bpb) "
               f"{'beats' if wide < narrow else 'does not beat'} the un-widened one ({narrow:.4f} bpb) after the "
               f"same {rows['un-widened + trained']['extra_tokens']:,} extra tokens")

    lines = ["| model | n_embd | params | fwd FLOPs/token | extra tokens | extra training FLOPs | val bpb |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['n_embd']} | {r['params']:,} | {r['flops_per_token']:.3g} | {r['extra_tokens']:,} "
              f"| {r['extra_train_flops']:.3g} | {r['val_bpb']:.4f} |" for n, r in rows.items()]
    table = "\n".join(lines)
    minutes = (time.perf_counter() - started) / 60
    out = adamba_home() / "reports" / p
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(
        f"# Growth: widen {args.width} -> {args.wide} ({args.init}) vs the un-widened model\n\n"
        f"Base: {config.describe()}, {args.base_steps} steps; extra phase: {args.extra_steps} steps "
        f"({args.new_dims_steps} of them new-dims), {shared['total_batch_size']:,} tokens each; "
        f"{minutes:.1f} minutes in all.\n\n{table}\n\n- {verdict}\n")
    print(f"\n{table}\n\n- {verdict}\nreport {out / 'report.md'}")
    print(json.dumps({"benchmark": "growth", "config": config.describe(), "wide": args.wide, "init": args.init,
                      "base_steps": args.base_steps, "extra_steps": args.extra_steps,
                      "new_dims_steps": args.new_dims_steps, "rows": rows, "holds": wide < narrow,
                      "minutes": minutes}))


if __name__ == "__main__":
    main()
