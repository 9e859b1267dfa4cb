"""Inference speed of the cached engine against full recompute, side by side in one run.

What it measures, at each (context, batch) in --contexts x --batches, on a prompt of `context` random tokens
per row:

  engine     `adamba.infer.engine.Engine(model).steps(prompts, n, SamplingParams(temperature=0))`: the prompt
             is prefilled in one pass into a fresh `InferenceCache`, then each new token is one forward of a
             single token per row through the cache;
  recompute  the control, `recompute_steps` below: a plain greedy loop that re-runs `model(ids)` over the whole
             growing sequence for every new token (argmax of the last position, append, repeat).

Reported per (context, batch):

  prefill tok/s   batch x context / time of one `model(prompt, cache=fresh InferenceCache)` (cache allocated
                  outside the timed region); "no cache" is the same for `model(prompt)`, the recompute
                  loop's first forward;
  TTFT ms         time to first token: from calling the engine (cache allocation, prefill, greedy sampling,
                  the token back on the host) to its first token; for the recompute loop, its first
                  forward + argmax;
  decode ms/step  per-token latency after the first token: (time of token n - time of token 1) / (n - 1),
                  where every step gives each of the `batch` rows one token (tok/s = batch x 1000 / ms);
                  the engine decodes --decode-tokens tokens, the recompute loop --recompute-tokens (fewer at
                  long contexts, where each step is a full forward; per-step times stay comparable);
  speedup         recompute ms/step / engine ms/step.

The project's acceptance target is a cached decode at context 512 at least 5x faster per token than full
recompute; the script says whether it holds (at every measured batch).

Fairness: one model, weights, device, dtype and prompts for both; both emit each step's tokens to the host
(`.tolist()`, which also synchronises CUDA). Per (context, batch): --warmup untimed rounds of each, then
--repeats timed rounds alternating prefill, engine, recompute; medians over repeats are reported.
`torch.cuda.synchronize()` brackets every timed region on CUDA.

Before timing, a correctness check: in float32, the engine's greedy tokens must equal the recompute loop's
for a short prompt (2 rows x 16 tokens, 24 new tokens), else the script exits non-zero. Weights are re-drawn
at random (normal, std 1/sqrt(fan_in); the zero-initialised output projections and lm_head included), so
every op matters and the greedy tokens are not degenerate.

Run from the repository root, with adamba installed (`pip install -e .`) or with `PYTHONPATH=.`.
CPU (float32; the run recorded in BENCHMARKS.md):
    python benchmarks/infer.py --threads 2
GPU (model weights and cache in bf16 by default on CUDA; rotary tables stay float64 as in the model):
    python benchmarks/infer.py --device cuda --depth 12 --head-dim 128 --vocab-size 65536 \\
        --contexts 128,512,2048 --batches 1,8,32 --decode-tokens 128 --recompute-tokens 32 --repeats 5
The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator

import torch
from bench_utils import cpu_name, parse_args, randomize, sync

from adamba import AdambaLM, ModelConfig
from adamba.common import pick_device
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.model.cache import InferenceCache

GREEDY = SamplingParams(temperature=0)
TARGET_CONTEXT, TARGET_SPEEDUP = 512, 5.0
CHECK_ROWS, CHECK_PROMPT, CHECK_TOKENS = 2, 16, 24  # the correctness check: rows x prompt tokens, new tokens


# ---------------------------------------------------------------------------------------------------------
# The control: greedy decoding by full recompute of the growing sequence, no cache.
@torch.no_grad()
def recompute_steps(model: AdambaLM, ids: torch.Tensor, n: int) -> Iterator[list[int]]:
    """Yield n steps of greedy tokens (one per row), each from a forward over the whole sequence so far."""
    for i in range(n):
        token = model(ids)[:, -1].argmax(dim=-1)
        yield token.tolist()
        if i + 1 < n:
            ids = torch.cat([ids, token[:, None]], dim=1)
# ---------------------------------------------------------------------------------------------------------


def engine_steps(model: AdambaLM, prompts: list[list[int]], n: int) -> Iterator[list[int]]:
    for produced in Engine(model).steps(prompts, n, GREEDY):
        yield [token for _, token in produced]


@torch.no_grad()
def cast_weights(model: AdambaLM, dtype: torch.dtype) -> None:
    """Parameters (hence the cache) to `dtype`; buffers (the float64 rotary tables) stay as they are."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def timed(gen: Iterator[list[int]], device: torch.device) -> tuple[list[list[int]], list[float]]:
    """Run a token generator; return its steps and the seconds from the call to each step's tokens."""
    sync(device)
    t0 = time.perf_counter()
    steps, stamps = [], []
    for tokens in gen:
        stamps.append(time.perf_counter() - t0)  # tokens are host lists: CUDA already synchronised
        steps.append(tokens)
    return steps, stamps


def per_step(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


@torch.no_grad()
def prefill_time(model: AdambaLM, ids: torch.Tensor, cache: bool, device: torch.device) -> float:
    state = InferenceCache(model, ids.size(0), ids.size(1)) if cache else None
    sync(device)
    t0 = time.perf_counter()
    model(ids, cache=state)
    sync(device)
    return time.perf_counter() - t0


def check_greedy(cfg: ModelConfig, device: torch.device, seed: int) -> int:
    """float32: the engine's greedy tokens must equal the recompute loop's; returns how many were compared."""
    model = AdambaLM.build(cfg, device).eval()
    randomize(model, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    ids = torch.randint(cfg.vocab_size, (CHECK_ROWS, CHECK_PROMPT), generator=gen).to(device)
    engine = list(engine_steps(model, ids.tolist(), CHECK_TOKENS))
    control = list(recompute_steps(model, ids, CHECK_TOKENS))
    if engine != control:
        if len(engine) != len(control):
            raise SystemExit(f"engine gave {len(engine)} steps, full recompute {len(control)}; comparison is void")
        first = next(i for i, (a, b) in enumerate(zip(engine, control, strict=True)) if a != b)
        raise SystemExit(f"engine greedy tokens differ from full recompute at step {first}: "
                         f"{engine[first]} vs {control[first]}; the comparison is void")
    return sum(len(step) for step in engine)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--contexts", default="128,512,2048", help="comma-separated prompt lengths")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens the engine generates per timed run")
    ap.add_argument("--recompute-tokens", type=int, default=None,
                    help="tokens the recompute loop generates per timed run (default: "
                         "min(decode tokens, max(2, 4096 // context)): 32, 8, 2 at 128, 512, 2048)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per (context, batch); medians reported")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per (context, batch)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="weights and cache (default: bfloat16 on CUDA when supported, else float32)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap, smoke=dict(depth=1, vocab_size=256, contexts=f"16,{TARGET_CONTEXT}", batches="1,2",
                                     decode_tokens=4, repeats=1))

    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.decode_tokens < 2 or (args.recompute_tokens is not None and args.recompute_tokens < 2):
        raise SystemExit("--decode-tokens and --recompute-tokens must be >= 2 (decode time is measured after "
                         "the first token)")
    device = pick_device(args.device)
    if args.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 check compares exact greedy tokens
    n_recompute = {c: args.recompute_tokens or min(args.decode_tokens, max(2, 4096 // c)) for c in contexts}
    # room for the longest timed generation and for the check's, which does not depend on the flags
    sequence_len = max(max(contexts) + max(args.decode_tokens, *n_recompute.values()), CHECK_PROMPT + CHECK_TOKENS)
    cfg = ModelConfig(depth=args.depth, head_dim=args.head_dim, vocab_size=args.vocab_size, sequence_len=sequence_len)

    checked = check_greedy(cfg, device, args.seed + 1234)
    print(f"engine greedy tokens == full-recompute greedy tokens ({checked} tokens, {CHECK_ROWS} rows x "
          f"{CHECK_PROMPT}-token prompts, float32, random weights)")

    model = AdambaLM.build(cfg, device).eval()
    randomize(model, args.seed)
    cast_weights(model, dtype)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"model: {cfg.describe()} ({model.num_params():,} parameters)")
    print(f"device {device} ({device_name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"dtype {dtype}; engine {args.decode_tokens} tokens, recompute "
          f"{', '.join(f'{n_recompute[c]} @ {c}' for c in contexts)} tokens; {args.repeats} repeats, "
          f"{args.warmup} warmup")

    rows = []
    for context in contexts:
        for batch in batches:
            gen = torch.Generator(device="cpu").manual_seed(args.seed + context * 1000 + batch)
            ids = torch.randint(cfg.vocab_size, (batch, context), generator=gen).to(device)
            prompts = ids.tolist()
            n_rec = n_recompute[context]
            for _ in range(args.warmup):
                timed(engine_steps(model, prompts, min(4, args.decode_tokens)), device)
                timed(recompute_steps(model, ids, 2), device)
            runs: dict[str, list[float]] = {k: [] for k in ("prefill", "prefill_nc", "ttft", "ttft_rc",
                                                            "engine", "recompute")}
            for _ in range(args.repeats):
                runs["prefill"].append(prefill_time(model, ids, True, device))
                _, stamps = timed(engine_steps(model, prompts, args.decode_tokens), device)
                runs["ttft"].append(stamps[0])
                runs["engine"].append(per_step(stamps))
                _, stamps = timed(recompute_steps(model, ids, n_rec), device)
                runs["ttft_rc"].append(stamps[0])
                runs["prefill_nc"].append(stamps[0])  # the loop's first forward (+ argmax) over the prompt
                runs["recompute"].append(per_step(stamps))
            med = {k: statistics.median(v) for k, v in runs.items()}
            row = {
                "context": context, "batch": batch,
                "prefill_tok_s": round(batch * context / med["prefill"], 1),
                "prefill_nocache_tok_s": round(batch * context / med["prefill_nc"], 1),
                "ttft_ms": round(1e3 * med["ttft"], 2), "ttft_recompute_ms": round(1e3 * med["ttft_rc"], 2),
                "decode_ms_engine": round(1e3 * med["engine"], 3),
                "decode_ms_recompute": round(1e3 * med["recompute"], 3),
                "decode_tok_s_engine": round(batch / med["engine"], 1),
                "decode_tok_s_recompute": round(batch / med["recompute"], 1),
                "speedup": round(med["recompute"] / med["engine"], 2),
                "decode_tokens": args.decode_tokens, "recompute_tokens": n_rec,
                "engine_runs_ms": [round(1e3 * v, 3) for v in runs["engine"]],
                "recompute_runs_ms": [round(1e3 * v, 3) for v in runs["recompute"]],
            }
            rows.append(row)
            print(f"  context {context:5d} batch {batch:3d}: engine {row['decode_ms_engine']:.2f} ms/step, "
                  f"recompute {row['decode_ms_recompute']:.2f} ms/step, speedup {row['speedup']:.1f}x",
                  flush=True)

    print("\n| context | batch | prefill tok/s | no cache tok/s | TTFT ms | TTFT ms recompute "
          "| decode ms/step engine | decode ms/step recompute | engine tok/s | speedup |")
    print("|--------:|------:|--------------:|---------------:|--------:|------------------:"
          "|----------------------:|-------------------------:|-------------:|--------:|")
    for r in rows:
        print(f"| {r['context']:7d} | {r['batch']:5d} | {r['prefill_tok_s']:13,.0f} "
              f"| {r['prefill_nocache_tok_s']:14,.0f} | {r['ttft_ms']:7.1f} | {r['ttft_recompute_ms']:17.1f} "
              f"| {r['decode_ms_engine']:21.2f} | {r['decode_ms_recompute']:24.2f} "
              f"| {r['decode_tok_s_engine']:12,.0f} | {r['speedup']:6.1f}x |")
    at_target = [r["speedup"] for r in rows if r["context"] == TARGET_CONTEXT]
    holds = bool(at_target) and min(at_target) >= TARGET_SPEEDUP
    if at_target:
        print(f"\ntarget (cached decode >= {TARGET_SPEEDUP:g}x faster per token than full recompute at context "
              f"{TARGET_CONTEXT}): {'HOLDS' if holds else 'DOES NOT HOLD'} "
              f"(speedup {', '.join(f'{s:.1f}x' for s in at_target)} at batch {', '.join(map(str, batches))})")
    else:
        print(f"\ntarget at context {TARGET_CONTEXT}: not measured (add {TARGET_CONTEXT} to --contexts)")
    result = {
        "benchmark": "infer", "device": str(device), "device_name": device_name,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
        "depth": args.depth, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size,
        "sequence_len": cfg.sequence_len, "params": model.num_params(), "repeats": args.repeats,
        "warmup": args.warmup, "check_tokens": checked, "target_context": TARGET_CONTEXT,
        "target_speedup": TARGET_SPEEDUP, "target_holds": holds if at_target else None, "rows": rows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
