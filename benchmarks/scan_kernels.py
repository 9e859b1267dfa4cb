"""The fused CUDA scan kernels against adamba's PyTorch scans, side by side in one run, on a GPU.

For each sequence length L: Mamba-1's selective scan (mamba_ssm's `selective_scan_fn`, as `model/scan.py` calls it,
against `scan.sequential_scan`, the PyTorch path that runs without the kernel) and Mamba-2's SSD scan (mamba_ssm's
Triton `mamba_chunk_scan_combined`, as `model/ssd.py` calls it, against `ssd.ssd_chunked`), forward and
forward+backward, float32 inputs of batch --batch, --d-inner channels (Mamba-2: heads of 64) and --d-state states.
The PyTorch path is the control; before timing, each kernel's output is compared with it (max |difference| in the
table). Timed rounds alternate the two; medians. Where a kernel does not import or run (a CPU, or mamba-ssm not
installed), its rows say why (kernels.py's probe) and only the PyTorch path is timed: `--smoke` on a CPU checks
the script itself. The CPU benchmark of the compiled CPU kernel is benchmarks/scan.py.

    python benchmarks/scan_kernels.py --device cuda
    python benchmarks/scan_kernels.py --smoke       # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from bench_utils import parse_args, sync

from adamba.common import pick_device
from adamba.model import kernels
from adamba.model.scan import sequential_scan
from adamba.model.ssd import ssd_chunked

HEADDIM = 64


def mamba1_inputs(batch: int, L: int, d_inner: int, n: int, device, gen: torch.Generator) -> list[torch.Tensor]:
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    x, dt = randn(batch, L, d_inner), torch.nn.functional.softplus(randn(batch, L, d_inner) - 2)
    A = -torch.exp(randn(d_inner, n) * 0.5)
    return [x, dt, A, randn(batch, L, n), randn(batch, L, n), randn(d_inner)]


def mamba2_inputs(batch: int, L: int, d_inner: int, n: int, device, gen: torch.Generator) -> list[torch.Tensor]:
    heads = d_inner // HEADDIM

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    x, dt = randn(batch, L, heads, HEADDIM), torch.nn.functional.softplus(randn(batch, L, heads) - 2)
    A = -torch.rand(heads, generator=gen).to(device) * 15 - 1  # Mamba-2's init range [-16, -1]
    return [x, dt, A, randn(batch, L, 1, n), randn(batch, L, 1, n), randn(heads)]


def kernel_mamba1(fn):
    def run(x, dt, A, B, C, D):  # mamba_ssm's layout is (batch, channels, length), as model/scan.py calls it
        y, h = fn(x.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A,
                  B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D, return_last_state=True)
        return y.transpose(1, 2), h
    return run


def kernel_mamba2(fn):
    def run(x, dt, A, B, C, D):
        return fn(x, dt, A, B, C, 64, D=D, return_final_states=True)
    return run


def timed(fn, inputs: list[torch.Tensor], backward: bool, device) -> float:
    if backward:
        inputs = [t.detach().requires_grad_(True) for t in inputs]
    sync(device)
    start = time.perf_counter()
    if backward:
        y, h = fn(*inputs)
        (y.sum() + h.sum()).backward()
    else:
        with torch.no_grad():
            fn(*inputs)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--d-inner", type=int, default=1536)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = parse_args(ap, smoke=dict(lengths="32,64", batch=1, d_inner=128, d_state=4, repeats=1, device="cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    found = kernels.resolve()
    notes = dict(zip(("mamba1", "conv", "mamba2"), found.notes, strict=True))
    gpu_kernels = device.type == "cuda"
    cases = {"mamba1": (mamba1_inputs, sequential_scan,
                        kernel_mamba1(found.selective_scan) if found.selective_scan and gpu_kernels else None),
             "mamba2": (mamba2_inputs, ssd_chunked,
                        kernel_mamba2(found.chunk_scan) if found.chunk_scan and gpu_kernels else None)}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for L in [int(v) for v in args.lengths.split(",")]:
        for scan, (make, control, kernel) in cases.items():
            inputs = make(args.batch, L, args.d_inner, args.d_state, device, gen)
            with torch.no_grad():
                reference = control(*inputs)[0]
                diff = None if kernel is None else (kernel(*inputs)[0] - reference).abs().max().item()
            for backward in (False, True):
                times = {"pytorch": [], "kernel": []}
                for fn in (control, kernel):  # warmup (and the Triton kernel's autotuning)
                    if fn is not None:
                        timed(fn, inputs, backward, device)
                for _ in range(args.repeats):
                    for name, fn in (("pytorch", control), ("kernel", kernel)):
                        if fn is not None:
                            times[name].append(timed(fn, inputs, backward, device))
                ms = {k: 1e3 * statistics.median(v) if v else None for k, v in times.items()}
                rows.append({"scan": scan, "L": L, "mode": "fwd+bwd" if backward else "fwd",
                             "pytorch_ms": ms["pytorch"], "kernel_ms": ms["kernel"], "max_abs_diff": diff,
                             "speedup": None if ms["kernel"] is None else ms["pytorch"] / ms["kernel"]})
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({gpu}), torch {torch.__version__}, float32, batch {args.batch}, d_inner "
          f"{args.d_inner}, d_state {args.d_state}; {notes['mamba1']}; {notes['mamba2']}")
    print("| scan | L | mode | PyTorch (control) ms | kernel ms | speed-up | max abs diff |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        kernel = "absent" if r["kernel_ms"] is None else f"{r['kernel_ms']:.3f}"
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2e}"
        print(f"| {r['scan']} | {r['L']} | {r['mode']} | {r['pytorch_ms']:.3f} | {kernel} | {speedup} | {diff} |")
    print(json.dumps({"benchmark": "scan_kernels", "device": str(device), "device_name": gpu, "notes": notes,
                      "batch": args.batch, "d_inner": args.d_inner, "d_state": args.d_state, "rows": rows}))


if __name__ == "__main__":
    main()
