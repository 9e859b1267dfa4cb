"""Training throughput of AdambaLM against a minimal plain-PyTorch control, side by side in one run.

What it measures: tokens/s of full training steps (forward, cross-entropy, backward, optimizer step,
zero_grad) on one fixed batch of random tokens, for

  adamba   `AdambaLM.build(ModelConfig(...))`, optimizers from `adamba.train.optim.build_optimizers`;
  control  `ControlLM` below: an independent ~40-line transformer computing the same function with the
           same parameter shapes (embedding -> rms_norm -> blocks [x + attn(norm x); x + mlp(norm x)] ->
           rms_norm -> lm_head -> 15*tanh(logits/15) -> cross-entropy; half-split rotary then rms-norm on
           q and k, causal SDPA, relu^2 MLP), trained by a Muon + AdamW pair built here with the same groups
           and hyperparameters as adamba's, with adamba's Muon class (the optimizer is not what is compared);
           `--optimizer adamw`: plain torch AdamW on all parameters, both.

Fairness: same device, dtype (float32 on CPU, bf16 autocast on CUDA), batch, initial weights (the control is
loaded from adamba's state dict) and optimizer settings; `--warmup` steps per model (and any compilation)
are excluded; timed repetitions of `--steps` steps alternate adamba, control, adamba, control, ... and the
median tokens/s of each is reported with the ratio adamba/control (> 1: adamba is faster). MFU (CUDA only)
= training FLOPs/token from `model.count_flops()` x tokens/s / the GPU's dense bf16 peak.

`--float8 RECIPE` (GPUs of compute capability 8.9+; emulated slowly on a CPU): adamba's block projections in
float8 through its slice-aware path (model/float8.py), the control's same projections through torchao's own module
swap (`convert_to_float8_training`), so the ratio says what adamba's path costs against torchao's; the float8
speedup itself is this run's tokens/s against a run without the flag (gpu_suite.sh runs both). MFU stays relative
to the dense bf16 peak.

Before timing, a like-for-like check: adamba's weights (re-drawn at random, so that lm_head and the output
projections are not zero and every op matters) are copied into the control, and the float32 losses and
gradients of both must agree (|dloss| <= 1e-5), else the script stops.

Run from the repository root, with adamba installed (`pip install -e .`) or with `PYTHONPATH=.`.
CPU (float32, eager; the run recorded in BENCHMARKS.md):
    python benchmarks/train_throughput.py --depth 4 --sequence-len 256 --batch-size 8 --repeats 21
GPU (bf16 autocast, torch.compile on by default on CUDA; --no-compile for eager):
    python benchmarks/train_throughput.py --depth 12 --sequence-len 2048 --batch-size 16 \\
        --vocab-size 65536 --head-dim 128 --steps 20 --warmup 10 --repeats 7
The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from bench_utils import cpu_name, parse_args, randomize, sync

from adamba import AdambaLM, ModelConfig, TrainConfig
from adamba.common import pick_device
from adamba.config import FLOAT8_RECIPES
from adamba.model.float8 import enable_float8, float8_layers
from adamba.train.optim import Muon, build_optimizers
from adamba.train.trainer import PEAK_FLOPS, peak_flops


# ---------------------------------------------------------------------------------------------------------
# The control model: plain PyTorch, no adamba imports. Module/parameter names mirror adamba's state dict keys.
def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary(x, cos, sin):  # x (B, T, H, D); cos/sin (1, T, 1, D/2) float32
    d = x.size(-1) // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class ControlAttention(nn.Module):
    def __init__(self, d, n_head, n_kv_head):
        super().__init__()
        self.nh, self.nkv, self.hd = n_head, n_kv_head, d // n_head
        self.c_q = nn.Linear(d, n_head * self.hd, bias=False)
        self.c_k = nn.Linear(d, n_kv_head * self.hd, bias=False)
        self.c_v = nn.Linear(d, n_kv_head * self.hd, bias=False)
        self.c_proj = nn.Linear(n_head * self.hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = norm(rotary(self.c_q(x).view(B, T, self.nh, self.hd), cos, sin)).transpose(1, 2)
        k = norm(rotary(self.c_k(x).view(B, T, self.nkv, self.hd), cos, sin)).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class ControlMLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.c_fc = nn.Linear(d, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class ControlBlock(nn.Module):
    def __init__(self, d, n_head, n_kv_head, hidden):
        super().__init__()
        self.attn, self.mlp = ControlAttention(d, n_head, n_kv_head), ControlMLP(d, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class ControlLM(nn.Module):
    def __init__(self, vocab, d, n_layer, n_head, n_kv_head, hidden, seq_len, softcap, rope_base):
        super().__init__()
        self.softcap = softcap
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ControlBlock(d, n_head, n_kv_head, hidden) for _ in range(n_layer))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        hd = d // n_head
        inv_freq = 1.0 / (rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)[None, :, None, :]
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # angles in float64, kept
        self.register_buffer("sin", angles.sin().float(), persistent=False)  # in float32, shaped for use

    def forward(self, idx, targets):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(norm(x)).float()
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
# ---------------------------------------------------------------------------------------------------------


def build_control(cfg: ModelConfig, device: torch.device) -> ControlLM:
    with torch.device(device):
        return ControlLM(cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_kv_head,
                         cfg.mlp_ratio * cfg.n_embd, cfg.sequence_len, cfg.logit_softcap, cfg.rope_base)


def control_optimizers(model: ControlLM, tc: TrainConfig) -> list[torch.optim.Optimizer]:
    """Muon for block matrices, AdamW for embedding/lm_head: the same groups and settings as adamba's."""
    scale = (model.wte.weight.size(1) / 768) ** -0.5
    fused = model.wte.weight.device.type == "cuda"
    adamw = torch.optim.AdamW([{"params": [model.lm_head.weight], "lr": tc.unembedding_lr * scale},
                               {"params": [model.wte.weight], "lr": tc.embedding_lr * scale}],
                              betas=(0.8, 0.95), eps=1e-10, weight_decay=tc.weight_decay, fused=fused)
    muon = Muon([p for p in model.blocks.parameters()], lr=tc.matrix_lr, momentum=0.95,
                weight_decay=tc.weight_decay, adjust_lr_fn="original")
    return [adamw, muon]


def convert_control_to_float8(control: ControlLM, adamba: AdambaLM, recipe: str) -> None:
    """torchao's module swap on the control, for the projections adamba runs in float8 (same names, same set)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    marked = {id(layer) for layer in float8_layers(adamba) if getattr(layer, "float8", None) is not None}
    names = {f"blocks.{name}" for name, module in adamba.blocks.named_modules() if id(module) in marked}
    convert_to_float8_training(control, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=lambda module, fqn: fqn in names)
    swapped = sum("Float8" in type(module).__name__ for module in control.modules())
    if swapped != len(names):
        raise SystemExit(f"torchao swapped {swapped} of the control's projections, adamba marks {len(names)}")
    print(f"control: torchao's Float8Linear on the same {swapped} projections")


def plain_adamw(model: nn.Module) -> list[torch.optim.Optimizer]:
    fused = next(model.parameters()).device.type == "cuda"
    return [torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-10, fused=fused)]


def check_same_function(cfg: ModelConfig, device: torch.device, batch_size: int) -> tuple[float, float]:
    """Float32 loss and gradient differences between adamba and the control, on shared random weights."""
    adamba = AdambaLM.build(cfg, device)
    randomize(adamba, seed=1234)
    control = build_control(cfg, device)
    control.load_state_dict(adamba.state_dict(), strict=True)  # same names and shapes, or it raises
    gen = torch.Generator(device="cpu").manual_seed(5678)
    idx = torch.randint(cfg.vocab_size, (batch_size, cfg.sequence_len), generator=gen).to(device)
    targets = torch.randint(cfg.vocab_size, (batch_size, cfg.sequence_len), generator=gen).to(device)
    targets[:, :3] = -1  # exercise ignore_index
    losses = []
    for model in (adamba, control):
        loss = model(idx, targets)
        loss.backward()
        losses.append(loss.detach())
    dloss = (losses[0] - losses[1]).abs().item()
    control_params = dict(control.named_parameters())
    dgrad = max((p.grad - control_params[n].grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-30)
                for n, p in adamba.named_parameters())
    return dloss, dgrad


def run_steps(model, optimizers, x, y, steps: int, autocast) -> torch.Tensor:
    for _ in range(steps):
        with autocast():
            loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    return loss.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--sequence-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed repetition")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    ap.add_argument("--repeats", type=int, default=15, help="timed repetitions per model (interleaved)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile both models (default: on for CUDA, off elsewhere)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    ap.add_argument("--optimizer", choices=("muon", "adamw"), default="muon",
                    help="muon: adamba's Muon+AdamW and an equivalent pair for the control; "
                         "adamw: plain torch AdamW on all parameters for both")
    ap.add_argument("--no-check", action="store_true", help="skip the float32 same-function check")
    ap.add_argument("--float8", choices=FLOAT8_RECIPES, default=None,
                    help="float8 training matmuls through torchao for both models (see above)")
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap, smoke=dict(depth=1, sequence_len=32, batch_size=2, vocab_size=256, steps=1, warmup=1,
                                     repeats=1))

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device.type, dtype=dtype))
    cfg = ModelConfig(depth=args.depth, sequence_len=args.sequence_len, head_dim=args.head_dim,
                      vocab_size=args.vocab_size)

    check_dloss = check_dgrad = None
    if not args.no_check:
        check_dloss, check_dgrad = check_same_function(cfg, device, batch_size=2)
        print(f"control matches adamba: max |dloss| = {check_dloss:.2e}, "
              f"max relative |dgrad| = {check_dgrad:.2e} (float32, random weights)")
        if not (check_dloss <= 1e-5 and check_dgrad <= 1e-4):
            raise SystemExit("control does NOT compute the same function as adamba; comparison is void")

    torch.manual_seed(args.seed)
    adamba = AdambaLM.build(cfg, device)
    control = build_control(cfg, device)
    control.load_state_dict(adamba.state_dict(), strict=True)
    if args.float8:
        print(enable_float8(adamba, args.float8, device))
        convert_control_to_float8(control, adamba, args.float8)
    if args.optimizer == "muon":
        tc = TrainConfig()
        opts = {"adamba": build_optimizers(adamba, tc), "control": control_optimizers(control, tc)}
    else:
        opts = {"adamba": plain_adamw(adamba), "control": plain_adamw(control)}
    runners = {"adamba": torch.compile(adamba) if use_compile else adamba,
               "control": torch.compile(control) if use_compile else control}
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randint(cfg.vocab_size, (args.batch_size, cfg.sequence_len), generator=gen).to(device)
    y = torch.randint(cfg.vocab_size, (args.batch_size, cfg.sequence_len), generator=gen).to(device)
    tokens = args.steps * args.batch_size * cfg.sequence_len

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"model: {cfg.describe()} ({adamba.num_params():,} parameters)")
    print(f"device {device} ({device_name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"dtype {dtype}, compile {use_compile}, "
          f"optimizer {args.optimizer}, float8 {args.float8 or 'off'}; batch {args.batch_size}x{cfg.sequence_len}, "
          f"{args.steps} steps x "
          f"{args.repeats} repeats (ABAB...), {args.warmup} warmup steps")
    final_loss = {}
    for name in ("adamba", "control"):  # warmup (and compilation), untimed
        run_steps(runners[name], opts[name], x, y, args.warmup, autocast)
    sync(device)
    runs: dict[str, list[float]] = {"adamba": [], "control": []}
    for _ in range(args.repeats):
        for name in ("adamba", "control"):
            sync(device)
            t0 = time.perf_counter()
            loss = run_steps(runners[name], opts[name], x, y, args.steps, autocast)
            sync(device)
            runs[name].append(tokens / (time.perf_counter() - t0))
            final_loss[name] = loss.item()

    flops = adamba.count_flops(cfg.sequence_len).train
    peak = peak_flops(device)
    med = {name: statistics.median(r) for name, r in runs.items()}
    mfu = {name: (flops * med[name] / peak if peak else None) for name in runs}
    ratio = med["adamba"] / med["control"]
    # Each A run is paired with the B run right after it; the median of these ratios is robust to slow drift
    # in machine speed (e.g. other processes on a shared CPU).
    paired = statistics.median(a / b for a, b in zip(runs["adamba"], runs["control"], strict=True))
    print("\n| model   | tok/s (median) | min      | max      | MFU   | final loss |")
    print("|---------|---------------:|---------:|---------:|------:|-----------:|")
    for name in ("adamba", "control"):
        mfu_s = f"{mfu[name]:.1%}" if mfu[name] is not None else "n/a"
        print(f"| {name:7s} | {med[name]:14,.0f} | {min(runs[name]):8,.0f} | {max(runs[name]):8,.0f} "
              f"| {mfu_s:>5s} | {final_loss[name]:10.4f} |")
    verdict = "within" if ratio >= 0.95 else "NOT within"
    print(f"\nratio adamba/control = {ratio:.3f} ({verdict} 5%; median of paired A/B ratios {paired:.3f}); "
          f"{flops:.3g} training FLOPs/token"
          + ("" if peak else f"; MFU needs a CUDA GPU listed in PEAK_FLOPS "
                                 f"({', '.join(' '.join(words) for words, _ in PEAK_FLOPS)})"))
    result = {
        "benchmark": "train_throughput", "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype).split(".")[-1],
        "compile": use_compile, "optimizer": args.optimizer, "float8": args.float8, "depth": args.depth,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head, "sequence_len": cfg.sequence_len, "vocab_size": cfg.vocab_size,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "train_flops_per_token": flops, "check_max_dloss": check_dloss,
        "adamba_tok_s": round(med["adamba"], 1), "control_tok_s": round(med["control"], 1),
        "ratio": round(ratio, 4), "ratio_paired": round(paired, 4),
        "mfu": mfu["adamba"], "control_mfu": mfu["control"],
        "adamba_runs": [round(v, 1) for v in runs["adamba"]],
        "control_runs": [round(v, 1) for v in runs["control"]],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
