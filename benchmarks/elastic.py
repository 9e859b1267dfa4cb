"""Decode speed of each compute mode against the speed-up its FLOPs predict, side by side in one run.

The demo's model (`adamba.demo.demo_configs`: an alternating attention/Mamba hybrid, depth 4, width 256, head
dim 64, vocab 4096) with random weights (speed does not depend on the values); flags override its shape.
For every mode and engine (eager, and compiled: `Engine(model, compile=True)`, one torch.compile graph per decode
step): the engine decodes --tokens tokens per row after a --context-token prompt, batch --batch; repetitions
alternate engines and modes (eager think, eager ghost, ..., compiled think, ...) and medians are reported. The
predicted speed-up of a mode is FLOPs(think) / FLOPs(mode) from the one FLOP counter at the decode context;
the measured one is the median over repeats of time(think) / time(mode) of the same engine within the repeat
(runs seconds apart are not compared: on a shared machine the speed drifts by more than the effect measured).
The target (issue 5): Ghost reaches >= 60% of its predicted speed-up, measured as (measured - 1) / (predicted - 1).

    python benchmarks/elastic.py
    python benchmarks/elastic.py --depth 20 --width 1280 --vocab-size 65536 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_utils import cpu_name, parse_args, randomize, sync

from adamba import AdambaLM, ModelConfig
from adamba.common import pick_device
from adamba.demo import demo_configs
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.model.compute import Compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=None, help="n_layer (default: the demo model's)")
    ap.add_argument("--width", type=int, default=None, help="n_embd (default: the demo model's)")
    ap.add_argument("--pattern", default=None, help="block_pattern (default: the demo model's)")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="eager,compiled", help="comma-separated: eager, compiled")
    ap.add_argument("--device", default="auto")
    # the smoke run decodes eagerly only: the compiled engine runs the same lines of this script, but compiling
    # takes ~45 s (Engine(compile=True) itself is tested by tests/test_compiled_decode.py)
    args = parse_args(ap, smoke=dict(depth=2, width=128, pattern="TM", vocab_size=256, context=16, tokens=4,
                                     repeats=1, engines="eager"))
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    demo = demo_configs("elastic", 0)[0].to_dict()
    shape = {"n_layer": args.depth, "n_embd": args.width, "block_pattern": args.pattern,
             "vocab_size": args.vocab_size}
    demo.update({k: v for k, v in shape.items() if v is not None})
    if args.depth is not None or args.width is not None:  # re-derive heads, levels and modes for the new shape
        demo.update(depth=None, n_head=None, n_kv_head=None, matryoshka_levels=None, compute_modes=None)
    config = ModelConfig.from_dict({**demo, "sequence_len": args.context + args.tokens})
    model = AdambaLM.build(config, device).eval()
    randomize(model, seed=0)
    kinds = args.engines.split(",")
    if any(k not in ("eager", "compiled") for k in kinds):
        raise SystemExit(f"--engines: give eager, compiled or both (comma-separated), not {args.engines!r}")
    engines = {kind: Engine(model, compile=kind == "compiled") for kind in kinds}
    prompts = [torch.randint(0, config.vocab_size, (args.context,)).tolist() for _ in range(args.batch)]
    greedy = SamplingParams(temperature=0)
    modes = list(config.compute_modes)

    def decode_seconds(kind: str, mode: str) -> float:
        """Seconds per decoded token (prefill excluded: the clock starts at the first token)."""
        stamps = []
        for _ in engines[kind].steps(prompts, args.tokens, greedy, compute=Compute(mode)):
            sync(device)
            stamps.append(time.perf_counter())
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    warmup = {}
    for kind in kinds:  # warm-up; the compiled engine compiles one graph per width here
        start = time.perf_counter()
        for mode in modes:
            decode_seconds(kind, mode)
        warmup[kind] = time.perf_counter() - start
    runs = {(k, m): [] for k in kinds for m in modes}
    for _ in range(args.repeats):
        for kind in kinds:
            for mode in modes:
                runs[kind, mode].append(decode_seconds(kind, mode))
    full_flops = model.count_flops(args.context).forward
    rows = []
    for kind in kinds:
        for mode in modes:
            s = statistics.median(runs[kind, mode])
            predicted = full_flops / model.count_flops(args.context, compute=Compute(mode)).forward
            measured = statistics.median(t / m for t, m in zip(runs[kind, "think"], runs[kind, mode], strict=True))
            realised = (measured - 1) / (predicted - 1) if predicted > 1 else None
            rows.append({"engine": kind, "mode": mode, "widths": config.layer_widths(mode), "ms_per_token": 1e3 * s,
                         "tok_s": args.batch / s, "predicted_speedup": predicted, "measured_speedup": measured,
                         "realised": realised})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{device.type} ({name}, {torch.get_num_threads()} threads), torch {torch.__version__}; "
          f"{config.describe()}; context {args.context}, batch {args.batch}, {args.tokens} tokens, "
          f"{args.repeats} interleaved repeats; warm-up (compilation included): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in warmup.items()))
    print("| engine | mode | widths | ms/token | tok/s | predicted speed-up | measured | realised |\n"
          "|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        realised = "-" if r["realised"] is None else f"{100 * r['realised']:.0f}%"
        print(f"| {r['engine']} | {r['mode']} | {' '.join(str(w or 'full') for w in r['widths'])} | "
              f"{r['ms_per_token']:.2f} | {r['tok_s']:.0f} | {r['predicted_speedup']:.2f}x | "
              f"{r['measured_speedup']:.2f}x | {realised} |")
    holds = {}
    for kind in kinds:
        ghost = next(r for r in rows if r["engine"] == kind and r["mode"] == "ghost")
        holds[kind] = ghost["realised"] is not None and ghost["realised"] >= 0.6
        print(f"{kind}: ghost reaches {100 * (ghost['realised'] or 0):.0f}% of its predicted speed-up: "
              f"target (>= 60%) {'holds' if holds[kind] else 'does NOT hold'}")
    print(json.dumps({"benchmark": "elastic", "device": device.type, "device_name": name,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "config": config.describe(),
                      "context": args.context, "batch": args.batch, "tokens": args.tokens,
                      "warmup_s": warmup, "target_holds": holds, "rows": rows}))


if __name__ == "__main__":
    main()
