"""RL's costs: rollout tokens/s of the batched engine against sampling the same completions one at a time, and the
time of a whole GRPO step (rollouts + optimisation), side by side in one run.

What it measures, on the `--task` problems of one RL step (`--prompts` problems x `--samples` completions each,
temperature 1, the calculator executed, stop at <|assistant_end|>):

  batched     `Engine.generate` over all prompts x samples rows at once: how `adamba rl` samples (train/rl.py);
  sequential  the control: the same rows, one `Engine.generate` call each;
  RL step     `adamba.train.rl.rl` for --steps steps: its per-step wall time, split into rollouts and the
              optimisation (one on-policy pass), from the run's metrics.

The model is --checkpoint (a chat checkpoint, e.g. the demo's `demo-sft`, so completions have realistic lengths) or,
by default, the demo's architecture at random weights with a tokenizer trained on the embedded corpus (completions
then run to --max-new-tokens). Tokens/s counts the generated tokens (sampled and tool-forced), whatever their number.
Repeats alternate batched and sequential; medians are reported.

Run from the repository root with `PYTHONPATH=.`:
    python benchmarks/rl.py --threads 2 --checkpoint demo-sft --repeats 1   # the run recorded in BENCHMARKS.md
The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_utils import cpu_name, parse_args

from adamba import AdambaLM, ModelConfig
from adamba.chat.render import render_for_completion
from adamba.checkpoint import load_checkpoint, resolve_run, run_dir, save_checkpoint
from adamba.config import RL_TRAIN_DEFAULTS, RLConfig, TrainConfig
from adamba.data.corpus import embedded_corpus
from adamba.data.tokenizer import Tokenizer
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.tasks.mixtures import rl_task
from adamba.tools.calculator import calculate
from adamba.train.rl import rl


def base_checkpoint(args) -> str:
    if args.checkpoint:
        return args.checkpoint
    documents = list(embedded_corpus().documents())[:args.tokenizer_docs]
    tokenizer = Tokenizer.train(documents, args.vocab_size, "bench-rl")
    config = ModelConfig(depth=args.depth, head_dim=64, sequence_len=256, vocab_size=args.vocab_size,
                         block_pattern="TM")
    torch.manual_seed(0)
    save_checkpoint(run_dir("bench-rl-base"), AdambaLM.build(config), step=0, tokenizer=tokenizer)
    return "bench-rl-base"


def timed_generate(engine: Engine, rows: list[list[int]], args, stops: list[int], seed: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    done = engine.generate(rows, args.max_new_tokens, SamplingParams(temperature=1.0), seed=seed,
                           stop_tokens=stops, tool=calculate)
    return time.perf_counter() - t0, sum(len(c.tokens) for c in done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a chat checkpoint (default: random demo-size weights)")
    ap.add_argument("--task", default="counting")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=3, help="RL steps timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depth", type=int, default=4, help="without --checkpoint: the random model's depth")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--tokenizer-docs", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None)
    args = parse_args(ap, {"prompts": 2, "samples": 2, "max_new_tokens": 4, "steps": 1, "repeats": 1, "depth": 2,
                           "vocab_size": 512, "tokenizer_docs": 20})
    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_checkpoint(args)
    checkpoint = load_checkpoint(resolve_run(base))
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    train_task, _ = rl_task(args.task, 0)
    prompts = [render_for_completion(tokenizer, train_task[i]) for i in range(args.prompts)]
    rows = [p for p in prompts for _ in range(args.samples)]
    stops = [tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id]
    engine = Engine(model, tokenizer)
    timed_generate(engine, rows[:2], args, stops, seed=0)  # warm-up (the compiled CPU scan loads here)
    batched, sequential = [], []
    for r in range(args.repeats):
        seconds, tokens = timed_generate(engine, rows, args, stops, seed=r)
        batched.append(tokens / seconds)
        total_s = total_tokens = 0
        for i, row in enumerate(rows):
            seconds, tokens = timed_generate(engine, [row], args, stops, seed=r * 1000 + i)
            total_s, total_tokens = total_s + seconds, total_tokens + tokens
        sequential.append(total_tokens / total_s)

    rl_config = RLConfig(base=base, task=args.task, num_steps=args.steps, prompts_per_step=args.prompts,
                         samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens, eval_every=0,
                         eval_items=1, eval_samples=2)
    config = TrainConfig.from_dict({**RL_TRAIN_DEFAULTS, "run_name": "bench-rl", "device": "cpu"})
    records = [r for r in rl(rl_config, config, train_task, train_task, progress=False).metrics if "reward" in r]
    step_s = statistics.median(r["dt"] for r in records)
    rollout_s = statistics.median(r["rollout_s"] for r in records)

    b, s = statistics.median(batched), statistics.median(sequential)
    print(f"\nmodel {model.config.describe()}; {args.prompts} problems x {args.samples} samples of {args.task}, "
          f"<= {args.max_new_tokens} new tokens; cpu {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}\n")
    print("| what | value |\n|---|---:|")
    print(f"| rollout tok/s, batched engine (as RL samples) | {b:,.0f} |")
    print(f"| rollout tok/s, one row at a time (control) | {s:,.0f} |")
    print(f"| ratio batched / sequential | {b / s:.2f}x |")
    print(f"| RL step, median s (rollouts + optimisation) | {step_s:.2f} |")
    print(f"| of which rollouts, median s | {rollout_s:.2f} |")
    print(json.dumps({"benchmark": "rl", "task": args.task, "checkpoint": args.checkpoint, "prompts": args.prompts,
                      "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                      "threads": torch.get_num_threads(), "batched_tok_s": round(b, 1),
                      "sequential_tok_s": round(s, 1), "ratio": round(b / s, 3), "step_s": round(step_s, 3),
                      "rollout_s": round(rollout_s, 3), "batched_runs": batched, "sequential_runs": sequential}))


if __name__ == "__main__":
    main()
