"""Selective-scan speed on the CPU: the compiled kernel against PyTorch scans, side by side in one run.

What it measures, at each sequence length L in --lengths, for the Mamba-1 selective scan
(h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t + D x_t) on float32 inputs of batch --batch,
--d-inner channels and --d-state states, the time of

  fwd      one scan under torch.no_grad();
  fwd+bwd  one scan with every input requiring grad, then backward from fixed random cotangents of y and h_L;

for four implementations of the same function:

  ours        `adamba.model.scan_cpu.cpu_selective_scan`: the C++ kernel (OpenMP over batch x channel blocks,
              sequential in time, state in registers, exact backward from checkpoints every 64 steps);
  ours-torch  `adamba.model.scan.sequential_scan`: adamba's pure-PyTorch fallback (and the tests' reference);
  loop        control (a), `loop_scan` below: decays exp(dt A) and inputs dt B x computed once as
              (B, L, d_inner, N) tensors, then a Python loop over t (unbind / stack), y by one einsum;
  parallel    control (b), `parallel_scan` below: the same decays and inputs, then a work-efficient
              (Blelloch-style) log-depth scan over the associative operator
              (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): pairs are combined level by level (L/2, L/4, ...
              elements, log2 L levels), then the even positions are filled in on the way back.

and, in the same run and table, Mamba-2's scan (Dao & Gu 2024, SSD) on inputs of the same sizes:

  ssd         `adamba.model.ssd.ssd_chunked`: the chunked state-space-duality scan in pure PyTorch (chunks of
              64 steps, matmuls inside chunks, a recurrence between them) over the --d-inner channels split into
              heads of 64, each with one scalar decay A (uniform in [-16, -1], Mamba-2's init) and one dt per step;
              B and C as above (one group). A different function from the Mamba-1 scan (one decay per head, not
              per channel and state), so it is checked against its own float64 recurrence (`ssd_sequential`).
              Compared with ours-torch, the Mamba-1 pure-PyTorch path; run once per --d-state (16 and 64).

Fairness: one process, the same inputs and threads (--threads, torch.set_num_threads) for all; each
(L, mode) first runs every implementation once untimed (warmup), then --repeats rounds that alternate the
implementations (ours, ours-torch, loop, parallel, ssd, ours, ...); medians are reported. An implementation whose
run takes longer than --max-seconds is timed once (its warmup run); one whose run at this L is estimated (its
median at the previous L, scaled by the length ratio) to take longer than --max-seconds is skipped, and the
table says so.

Peak memory: at --memory-length, each (implementation, mode) runs once in a fresh subprocess, which reports
the growth of its peak RSS over its RSS once the inputs exist (every tensor allocated by the scan and its
backward counts, the inputs do not). Peak RSS is VmHWM of /proc/self/status, reset to the current RSS just
before the run (/proc/self/clear_refs); not `getrusage(...).ru_maxrss`, which on Linux a child inherits from
its parent's peak across fork + exec (it read 0 MB growth for everything here).

Before timing, a check: at the first length, y and h_L of all four Mamba-1 scans (float32) must agree with the
loop in float64, and SSD's with its sequential recurrence in float64, to 1e-4 (max abs difference / max abs
value), else the script exits non-zero.

The project's acceptance target: at L = 1024, fwd+bwd, ours >= 10x faster than the loop and >= 2x faster than
the parallel scan; and the SSD scan >= 5x faster than ours-torch at d_state 16 and 64 (issue 9); the script says
whether each holds. The decode table adds a Mamba-2 block, whose per-token cost should not grow with the context.

Run from the repository root, with adamba installed (`pip install -e .`) or with `PYTHONPATH=.`:
    python benchmarks/scan.py --threads 2
The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_utils import cpu_name, parse_args, randomize

from adamba.model import scan_cpu
from adamba.model.scan import sequential_scan
from adamba.model.ssd import ssd_chunked, ssd_sequential

TARGET_L, TARGET_VS_LOOP, TARGET_VS_PARALLEL = 1024, 10.0, 2.0
TARGET_SSD_VS_TORCH = 5.0  # SSD fwd+bwd against ours-torch at TARGET_L
SSD_HEADDIM, SSD_CHUNK = 64, 64  # ModelConfig's mamba2_headdim and mamba2_chunk_size defaults
METHODS = ("ours", "ours-torch", "loop", "parallel", "ssd")
MODES = ("fwd", "fwd+bwd")


# ---------------------------------------------------------------------------------------------------------
# The controls: plain PyTorch, no adamba imports.
def decays_and_inputs(x, dt, A, B):
    """exp(dt A) and dt B x, each (batch, L, d_inner, N)."""
    return torch.exp(dt[..., None] * A), (dt * x)[..., None] * B[:, :, None, :]


def loop_scan(x, dt, A, B, C, D, h0=None):
    """Control (a): h_t = a_t h_{t-1} + b_t one step at a time, on precomputed a and b."""
    decay, inputs = decays_and_inputs(x, dt, A, B)
    h = h0 if h0 is not None else x.new_zeros(x.size(0), x.size(2), A.size(1))
    hs = []
    for a_t, b_t in zip(decay.unbind(1), inputs.unbind(1), strict=True):
        h = a_t * h + b_t
        hs.append(h)
    H = torch.stack(hs, dim=1)
    return torch.einsum("bldn,bln->bld", H, C) + x * D, h


def blelloch(a, b):
    """Inclusive scan of h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along dim 1 by recursive pairing: the pair
    (2k, 2k+1) combines to (a_2k a_2k+1, a_2k+1 b_2k + b_2k+1), the half-length sequence of pairs is scanned
    (giving h at the odd positions), then h_2k = a_2k h_2k-1 + b_2k. O(L) work, log2(L) levels."""
    L = a.size(1)
    if L == 1:
        return b
    if L % 2:  # pad with the identity element (1, 0)
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        b = torch.cat([b, torch.zeros_like(b[:, :1])], dim=1)
    a0, a1, b0, b1 = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    odd = blelloch(a0 * a1, a1 * b0 + b1)
    even = torch.cat([b0[:, :1], a0[:, 1:] * odd[:, :-1] + b0[:, 1:]], dim=1)
    return torch.stack([even, odd], dim=2).flatten(1, 2)[:, :L]


def parallel_scan(x, dt, A, B, C, D, h0=None):
    """Control (b): the log-depth scan above on precomputed a and b (h0 folded into b_0)."""
    decay, inputs = decays_and_inputs(x, dt, A, B)
    if h0 is not None:
        inputs = torch.cat([inputs[:, :1] + decay[:, :1] * h0[:, None], inputs[:, 1:]], dim=1)
    H = blelloch(decay, inputs)
    return torch.einsum("bldn,bln->bld", H, C) + x * D, H[:, -1]
# ---------------------------------------------------------------------------------------------------------


def flat_ssd(scan):
    """An SSD scan on the flat layout of this script: x (batch, L, d_inner) in heads of SSD_HEADDIM channels,
    dt (batch, L, heads), A and D (heads,), B and C (batch, L, N) shared by all heads; y (batch, L, d_inner)
    and h_L (batch, d_inner, N) come back flat, so the cotangents are those of the Mamba-1 scans."""
    def run(x, dt, A, B, C, D, h0=None):
        batch, L, d_inner = x.shape
        y, h = scan(x.view(batch, L, dt.size(-1), -1), dt, A, B[:, :, None], C[:, :, None], D, h0)
        return y.reshape(batch, L, d_inner), h.reshape(batch, d_inner, -1)
    return run


SCANS = {"ours": scan_cpu.cpu_selective_scan, "ours-torch": sequential_scan, "loop": loop_scan,
         "parallel": parallel_scan, "ssd": flat_ssd(lambda *a: ssd_chunked(*a, chunk_size=SSD_CHUNK))}


def make_inputs(batch, L, d_inner, d_state, seed, dtype=torch.float32):
    """Mamba-like values: dt in [1e-3, 1e-1] (log-uniform), A = -(1..N) per channel (S4D-real), D = 1.
    Returns ({method: its inputs}, cotangents of y and h_L): the Mamba-1 scans share one set; SSD gets the
    same x, B, C and one dt per (step, head), A ~ -U[1, 16] and D = 1 per head (Mamba-2's init)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, d_inner, generator=gen, dtype=dtype)
    dt = torch.exp(torch.rand(batch, L, d_inner, generator=gen, dtype=dtype) * math.log(100.0)) * 1e-3
    A = -torch.arange(1, d_state + 1, dtype=dtype).repeat(d_inner, 1)
    B = torch.randn(batch, L, d_state, generator=gen, dtype=dtype)
    C = torch.randn(batch, L, d_state, generator=gen, dtype=dtype)
    D = torch.ones(d_inner, dtype=dtype)
    gy = torch.randn(batch, L, d_inner, generator=gen, dtype=dtype)
    gh = torch.randn(batch, d_inner, d_state, generator=gen, dtype=dtype)
    heads = d_inner // SSD_HEADDIM
    dt_heads = torch.exp(torch.rand(batch, L, heads, generator=gen, dtype=dtype) * math.log(100.0)) * 1e-3
    A_heads = -(torch.rand(heads, generator=gen, dtype=dtype) * 15 + 1)
    inputs = {m: (x, dt, A, B, C, D) for m in METHODS}
    inputs["ssd"] = (x, dt_heads, A_heads, B, C, torch.ones(heads, dtype=dtype))
    return inputs, (gy, gh)


def run_once(method: str, mode: str, inputs, cotangents) -> float:
    """Seconds for one fwd (no_grad) or fwd+bwd of `method` on its inputs (`make_inputs`)."""
    fn, inputs = SCANS[method], inputs[method]
    if mode == "fwd":
        t0 = time.perf_counter()
        with torch.no_grad():
            fn(*inputs)
        return time.perf_counter() - t0
    leaves = [t.detach().requires_grad_() for t in inputs]
    t0 = time.perf_counter()
    y, h = fn(*leaves)
    torch.autograd.backward([y, h], list(cotangents))
    return time.perf_counter() - t0


def peak_rss_kib(reset: bool = False) -> int:
    """This process's peak RSS in KiB: VmHWM of /proc/self/status (Linux), after resetting it to the current RSS
    if `reset` (/proc/self/clear_refs). ru_maxrss only where /proc is missing: on Linux it survives execve, so
    a child started by a big parent would report the parent's peak."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def memory_probe(args) -> None:
    """Subprocess mode: one run of (method, mode) at length L; prints {"peak_mb": ...}."""
    method, mode, L = args.memory_probe[0], args.memory_probe[1], int(args.memory_probe[2])
    inputs, cotangents = make_inputs(args.batch, L, args.d_inner, args.d_state, args.seed)
    if method == "ours":
        assert scan_cpu.available(), scan_cpu.unavailable_reason()
    before = peak_rss_kib(reset=True)
    seconds = run_once(method, mode, inputs, cotangents)
    after = peak_rss_kib()
    print(json.dumps({"peak_mb": round((after - before) / 1024, 1), "seconds": round(seconds, 3)}))


def measure_memory(args, method: str, mode: str, L: int) -> float | None:
    cmd = [sys.executable, __file__, "--memory-probe", method, mode, str(L), "--threads", str(args.threads),
           "--batch", str(args.batch), "--d-inner", str(args.d_inner), "--d-state", str(args.d_state),
           "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory probe {method} {mode} L={L} failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def check_same_function(args, L: int) -> dict[str, float]:
    """Max relative difference of y and h_L (float32) from the loop in float64 (SSD: from its recurrence)."""
    inputs, _ = make_inputs(args.batch, L, args.d_inner, args.d_state, args.seed)
    with torch.no_grad():
        reference = {"mamba1": loop_scan(*(t.double() for t in inputs["loop"])),
                     "ssd": flat_ssd(ssd_sequential)(*(t.double() for t in inputs["ssd"]))}
        errors = {}
        for method in METHODS:
            y_ref, h_ref = reference["ssd" if method == "ssd" else "mamba1"]
            y, h = SCANS[method](*inputs[method])
            errors[method] = max(((y.double() - y_ref).abs().max() / y_ref.abs().max()).item(),
                                 ((h.double() - h_ref).abs().max() / h_ref.abs().max()).item())
    return errors


def fmt_ms(v: float | None, note: str = "") -> str:
    return note if v is None else f"{1e3 * v:,.1f}"


@torch.no_grad()
def decode_latency(args) -> list[dict]:
    """Per-token latency of one Mamba, one Mamba-2 and one attention block (d_model = d_inner / 2), batch 1,
    decoding through the inference cache after `context` tokens. Mamba's states have a fixed size; attention
    reads a cache that grows with the context. Each block is the only layer of an AdambaLM, so its cache, rotary
    angles and block context are made by the model's own code; only the block's call is timed."""
    from adamba import AdambaLM, ModelConfig
    from adamba.model.cache import InferenceCache
    from adamba.model.forward_pass import ForwardPass

    d_model = args.d_inner // 2
    contexts = [int(v) for v in args.decode_contexts.split(",")]
    capacity = max(contexts) + args.decode_steps + 1
    models = {}
    for name, kind in (("mamba", "M"), ("mamba2", "M2"), ("attention", "T")):
        config = ModelConfig(n_layer=1, n_embd=d_model, head_dim=64, block_pattern=kind, vocab_size=256,
                             sequence_len=capacity, mamba_d_state=args.d_state, mamba2_d_state=args.d_state,
                             mamba2_headdim=SSD_HEADDIM, mamba2_chunk_size=SSD_CHUNK)
        models[name] = AdambaLM.build(config).eval()
        randomize(models[name], args.seed)  # random weights: the output projections would start at zero
    token = torch.zeros(1, 1, dtype=torch.long)
    rows = []
    for context in contexts:
        row = {"context": context}
        for name, model in models.items():
            cache = InferenceCache(model, 1, capacity)
            state = cache.states[0]
            if name == "attention":  # a cache holding `context` tokens
                state.k[:, :, :context].normal_()
                state.v[:, :, :context].normal_()
            else:
                state.ssm.normal_()
            cache.lengths.fill_(context)
            x = torch.randn(1, 1, d_model)
            times = []
            for _ in range(args.decode_steps):
                _, cos, sin = model.embed(token, cache)  # the next position's rotary angles
                ctx = ForwardPass(model, cos, sin, cache).context(0)
                t0 = time.perf_counter()
                model.blocks[0](x, ctx)
                times.append(time.perf_counter() - t0)
                cache.lengths.fill_(context)  # stay at this context
            row[f"{name}_us"] = statistics.median(times) * 1e6
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,1024,4096", help="comma-separated sequence lengths")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-inner", type=int, default=512)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per (L, mode); medians reported")
    ap.add_argument("--max-seconds", type=float, default=30.0,
                    help="time slower runs once; skip a run estimated to take longer than this")
    ap.add_argument("--memory-length", type=int, default=4096, help="L of the peak-memory probes (0: none)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-contexts", default="128,512,2048,8192", help="contexts of the decode-latency table")
    ap.add_argument("--decode-steps", type=int, default=200, help="timed single-token steps per context")
    ap.add_argument("--memory-probe", nargs=3, metavar=("METHOD", "MODE", "L"), help=argparse.SUPPRESS)
    # d_inner 128: decode blocks of d_model 64, one attention head and two SSD heads. No peak-memory probes:
    # each is a fresh process (~4 s of imports), ten of them.
    args = parse_args(ap, smoke=dict(lengths=f"64,{TARGET_L}", batch=1, d_inner=128, d_state=4, repeats=1,
                                     memory_length=0, decode_contexts="16,64", decode_steps=2))
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return
    if not scan_cpu.available():
        raise SystemExit(f"the compiled kernel is unavailable: {scan_cpu.unavailable_reason()}")
    lengths = [int(v) for v in args.lengths.split(",")]
    print(f"device cpu ({cpu_name()}, {torch.get_num_threads()} threads), torch {torch.__version__}, float32; "
          f"batch {args.batch}, d_inner {args.d_inner}, d_state {args.d_state}; lengths {lengths}; "
          f"{args.repeats} repeats (interleaved), runs over {args.max_seconds:g} s timed once")

    errors = check_same_function(args, lengths[0])
    print(f"same function: max relative |diff| of y, h_L vs the float64 loop at L={lengths[0]}: "
          + ", ".join(f"{m} {e:.1e}" for m, e in errors.items()))
    if max(errors.values()) > 1e-4:
        raise SystemExit("the implementations do NOT compute the same function; comparison is void")

    tiny_inputs, tiny_cotangents = make_inputs(2, 8, SSD_HEADDIM, 4, args.seed)  # one SSD head
    for method in METHODS:  # first-call costs in the process (autograd engine, thread pool) out of the way
        run_once(method, "fwd+bwd", tiny_inputs, tiny_cotangents)

    rows, previous = [], {}
    for L in lengths:
        inputs, cotangents = make_inputs(args.batch, L, args.d_inner, args.d_state, args.seed)
        for mode in MODES:
            runs: dict[str, list[float]] = {m: [] for m in METHODS}
            skipped: dict[str, float] = {}
            for method in METHODS:  # warmup; skip what is estimated too slow, time once what is slow
                if (method, mode) in previous:
                    seconds_then, length_then = previous[method, mode]
                    estimate = seconds_then * L / length_then
                    if estimate > args.max_seconds:
                        skipped[method] = estimate
                        continue
                seconds = run_once(method, mode, inputs, cotangents)
                if seconds > args.max_seconds:
                    runs[method].append(seconds)
            active = [m for m in METHODS if m not in skipped and not runs[m]]
            for _ in range(args.repeats):
                for method in active:
                    runs[method].append(run_once(method, mode, inputs, cotangents))
            med = {m: statistics.median(r) if r else None for m, r in runs.items()}
            for m, v in med.items():
                if v is not None:
                    previous[m, mode] = (v, L)
            rows.append({"L": L, "mode": mode, **{f"{m}_s": (round(v, 5) if v is not None else None)
                                                  for m, v in med.items()},
                         "runs": {m: len(r) for m, r in runs.items()},
                         "skipped_estimate_s": {m: round(v, 1) for m, v in skipped.items()}})
            cells = " ".join(f"{m} {fmt_ms(med[m], 'skipped')}" for m in METHODS)
            print(f"L={L:5d} {mode:7s} ms: {cells}", flush=True)

    memory = {}
    if args.memory_length:
        for method in METHODS:
            for mode in MODES:
                row = next((r for r in rows if r["L"] == args.memory_length and r["mode"] == mode), None)
                if row is not None and method in row["skipped_estimate_s"]:
                    memory[f"{method} {mode}"] = None  # too slow to run at all
                    continue
                memory[f"{method} {mode}"] = measure_memory(args, method, mode, args.memory_length)
                print(f"peak RSS growth at L={args.memory_length}, {method} {mode}: {memory[f'{method} {mode}']} MB",
                      flush=True)

    print("\n| L | mode | ours ms | ours-torch ms | loop ms | parallel ms | ssd ms | loop / ours | parallel / ours "
          "| ours-torch / ours | ours-torch / ssd |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def cell(m, r=r):
            if r[f"{m}_s"] is None:
                return f"skipped (~{r['skipped_estimate_s'][m]:.0f} s est.)"
            return fmt_ms(r[f"{m}_s"]) + (" (1 run)" if r["runs"][m] == 1 else "")

        def ratio(m, base="ours", r=r):
            return f"{r[f'{m}_s'] / r[f'{base}_s']:.1f}x" if r[f"{m}_s"] is not None and r[f"{base}_s"] else "n/a"

        print(f"| {r['L']} | {r['mode']} | {cell('ours')} | {cell('ours-torch')} | {cell('loop')} | "
              f"{cell('parallel')} | {cell('ssd')} | {ratio('loop')} | {ratio('parallel')} | {ratio('ours-torch')} | "
              f"{ratio('ours-torch', 'ssd')} |")
    if memory:
        print(f"\n| peak RSS growth at L={args.memory_length} (MB) | fwd | fwd+bwd |")
        print("|---|---:|---:|")
        for m in METHODS:
            vals = [memory[f"{m} {mode}"] for mode in MODES]
            print(f"| {m} | " + " | ".join(f"{v:,.0f}" if v is not None else "not run" for v in vals) + " |")

    target = next((r for r in rows if r["L"] == TARGET_L and r["mode"] == "fwd+bwd"), None)
    holds = vs_loop = vs_parallel = None
    if target is not None and target["loop_s"] and target["parallel_s"]:
        vs_loop, vs_parallel = target["loop_s"] / target["ours_s"], target["parallel_s"] / target["ours_s"]
        holds = vs_loop >= TARGET_VS_LOOP and vs_parallel >= TARGET_VS_PARALLEL
        print(f"\nTarget at L={TARGET_L} fwd+bwd (>= {TARGET_VS_LOOP:g}x vs loop, >= {TARGET_VS_PARALLEL:g}x vs "
              f"parallel): {'holds' if holds else 'does NOT hold'} ({vs_loop:.1f}x, {vs_parallel:.1f}x)")
    else:
        print(f"\nTarget at L={TARGET_L} fwd+bwd: not measured")
    ssd_vs_torch = ssd_holds = None
    if target is not None and target["ssd_s"] and target["ours-torch_s"]:
        ssd_vs_torch = target["ours-torch_s"] / target["ssd_s"]
        ssd_holds = ssd_vs_torch >= TARGET_SSD_VS_TORCH
        print(f"SSD target at L={TARGET_L} fwd+bwd, d_state {args.d_state} (>= {TARGET_SSD_VS_TORCH:g}x vs "
              f"ours-torch): {'holds' if ssd_holds else 'does NOT hold'} ({ssd_vs_torch:.1f}x)")
    else:
        print(f"SSD target at L={TARGET_L} fwd+bwd: not measured")
    decode = decode_latency(args)
    print(f"\nDecode, one block at batch 1 (d_model {args.d_inner // 2}), median us per token over "
          f"{args.decode_steps} steps:\n| context | Mamba block | Mamba-2 block | attention block |\n"
          "|---:|---:|---:|---:|")
    for r in decode:
        print(f"| {r['context']} | {r['mamba_us']:.0f} | {r['mamba2_us']:.0f} | {r['attention_us']:.0f} |")
    mamba_growth = decode[-1]["mamba_us"] / decode[0]["mamba_us"]
    mamba2_growth = decode[-1]["mamba2_us"] / decode[0]["mamba2_us"]
    attention_growth = decode[-1]["attention_us"] / decode[0]["attention_us"]
    print(f"from context {decode[0]['context']} to {decode[-1]['context']}: Mamba x{mamba_growth:.2f} "
          f"({'within' if mamba_growth <= 1.2 else 'NOT within'} 1.2x), Mamba-2 x{mamba2_growth:.2f} "
          f"({'within' if mamba2_growth <= 1.2 else 'NOT within'} 1.2x), attention x{attention_growth:.2f}")
    result = {
        "benchmark": "scan", "device": "cpu", "device_name": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "dtype": "float32", "batch": args.batch, "d_inner": args.d_inner,
        "d_state": args.d_state, "lengths": lengths, "repeats": args.repeats, "max_seconds": args.max_seconds,
        "check_max_rel_err": {m: float(f"{e:.3g}") for m, e in errors.items()},
        "target_L": TARGET_L, "target_vs_loop": TARGET_VS_LOOP, "target_vs_parallel": TARGET_VS_PARALLEL,
        "speedup_vs_loop": round(vs_loop, 2) if vs_loop else None,
        "speedup_vs_parallel": round(vs_parallel, 2) if vs_parallel else None, "target_holds": holds,
        "ssd_headdim": SSD_HEADDIM, "ssd_chunk": SSD_CHUNK, "target_ssd_vs_torch": TARGET_SSD_VS_TORCH,
        "ssd_speedup_vs_torch": round(ssd_vs_torch, 2) if ssd_vs_torch else None, "ssd_target_holds": ssd_holds,
        "memory_length": args.memory_length, "peak_rss_growth_mb": memory, "rows": rows,
        "decode": decode, "decode_mamba_growth": round(mamba_growth, 3),
        "decode_mamba2_growth": round(mamba2_growth, 3),
        "decode_attention_growth": round(attention_growth, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
