"""One training loop, callable as a function (tests) or from `adamba train` (CLI, torchrun).

Per optimizer step: `grad_accum` micro-batches of device_batch_size x sequence_len tokens per rank, so
that total_batch_size tokens are seen across all ranks; the loss of each micro-batch is divided by
grad_accum, and DDP averages over ranks, so the update equals one step on the whole global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint, run_dir, save_checkpoint, set_rng_state
from ..common import DistInfo, init_distributed, pick_device, pick_dtype, print0, seed_everything
from ..config import MAMBA, ModelConfig, TrainConfig
from ..data.loader import DataLoader
from ..data.prepare import prepare_data
from ..eval.bpb import evaluate_bpb
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from ..model import AdambaLM, scan_cpu
from ..surgery.growth import GROWTH, resolve
from .loops import sample_loops
from .losses import AdaptiveStep, PredictorTraining, check_adaptive_training, mixture_train_flops
from .matryoshka import micro_step_widths
from .optim import build_optimizers, lr_multiplier, set_schedule
from .stages import apply_stage

# Dense bf16 peak FLOP/s by GPU name, for MFU (vendor datasheets, without sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
SAMPLE_PROMPTS = ["The ", "To be, or not", "KING"]
REPLAN_AT = (5, 20, 50, 100)  # steps into a time-budgeted run at which num_iterations is re-fitted
# Fields that do not change the optimisation trajectory, so a resumed run may set them freely.
RESUME_MAY_CHANGE = {"num_iterations", "time_budget_s", "eval_every", "eval_tokens", "sample_every", "save_every",
                     "wandb", "metrics_file", "device", "compile"}


@dataclass
class TrainResult:
    step: int
    checkpoint: Path
    metrics: list[dict] = field(default_factory=list)
    initial_val_bpb: float | None = None
    final_val_bpb: float | None = None
    mean_loops: float | None = None  # looped models: the mean loop count actually sampled over the run
    stage: str | None = None  # what a training stage froze or masked, and the optimizer memory saved (stages.py)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class MetricsLog:
    """Append-only JSONL on rank 0; on resume, entries after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool, wandb_run=None):
        self.path, self.enabled, self.wandb = path, enabled, wandb_run
        self.records: list[dict] = []
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in kept if r.get("step", 0) <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])


def _wandb_run(config: TrainConfig, model_config: ModelConfig, enabled: bool):
    if not (config.wandb and enabled):
        return None
    try:
        import wandb
    except ImportError:
        raise ValueError("wandb: asked for, but the wandb package is not installed (`pip install wandb`)") \
            from None
    return wandb.init(project="adamba", name=config.run_name,
                      config={"model": model_config.to_dict(), "train": config.to_dict()})


def fit_to_budget(config: TrainConfig, max_iterations: int, step: int, start_step: int,
                  seconds_per_step: float, remaining: float) -> TrainConfig:
    """Set num_iterations (at most max_iterations) so that the run, warmdown included, ends inside
    time_budget_s.

    Only done while both schedules agree on every step taken so far, so those steps are exactly what they
    would have been had num_iterations been this number from the start."""
    affordable = max(step + 1, min(max_iterations, step + int(remaining / seconds_per_step)))
    new = dataclasses.replace(config, num_iterations=affordable)
    if step == start_step or affordable == config.num_iterations:
        return config
    if any(lr_multiplier(s, config) != lr_multiplier(s, new) for s in range(step + 1)):
        return config
    print0(f"time budget: ~{seconds_per_step:.2f} s/step, so num_iterations {config.num_iterations} -> {affordable}")
    return new


def grad_accum_steps(config: TrainConfig, seq_len: int, world_size: int) -> int:
    per_micro = config.device_batch_size * seq_len * world_size
    if config.total_batch_size % per_micro:
        raise ValueError(f"total_batch_size: {config.total_batch_size} tokens is not a multiple of "
                         f"device_batch_size x sequence_len x world_size = {per_micro}")
    return config.total_batch_size // per_micro


def train(model_config: ModelConfig, config: TrainConfig, *, resume: bool = False,
          progress: bool = True) -> TrainResult:
    device = pick_device(config.device)
    info: DistInfo = init_distributed(device)
    dtype = pick_dtype(config.dtype, device)
    seed_everything(config.seed + info.rank)
    # A checkpoint to start from (e.g. a surgery's output): its weights and tokenizer, a fresh optimizer and schedule
    init = load_checkpoint(resolve(config.init_from), device) if config.init_from and not resume else None
    tokenizer_name = config.tokenizer or (str(init.path) if init is not None and init.tokenizer is not None else None)
    data = prepare_data(config.data, tokenizer_name, config.tokenizer_vocab_size, config.val_fraction, info.rank,
                        progress, config.text_field)
    tokenizer = data.tokenizer
    out_dir = run_dir(config.run_name)

    start_step, checkpoint = 0, None
    if resume:
        checkpoint = load_checkpoint(out_dir, device, with_optimizer=True)
        model, model_config, start_step = checkpoint.model, checkpoint.model.config, checkpoint.step
        print0(f"resuming {config.run_name} from {checkpoint.path} (step {start_step})")
        saved = checkpoint.meta.get("train_config") or {}
        changed = sorted(k for k, v in config.to_dict().items()
                         if k in saved and saved[k] != v and k not in RESUME_MAY_CHANGE)
        if changed:
            print0(f"warning: resuming with different {changed} than the checkpoint was trained with; "
                   "the run will not continue exactly as it would have")
    elif init is not None:
        model, model_config = init.model, init.model.config
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"init_from: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                             f"vocab_size={model_config.vocab_size}; train with the checkpoint's own tokenizer")
        print0(f"starting from {init.path}: its weights, with a fresh optimizer and schedule")
    else:
        if model_config.vocab_size != tokenizer.vocab_size:
            print0(f"vocab_size: {model_config.vocab_size} -> {tokenizer.vocab_size}, the tokenizer's size")
            model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
        model = AdambaLM.build(model_config, device)
    print0(f"model: {model_config.describe()}  ({model.num_params():,} parameters)")
    if MAMBA in model_config.block_pattern and device.type == "cpu":
        print0("Mamba on the CPU: loading the compiled selective scan (the first build takes about a minute)")
        if not scan_cpu.available():
            print0(f"  unavailable ({scan_cpu.unavailable_reason()}); using the much slower PyTorch scan")
    model_config.layer_widths(config.width)  # a bad fixed width fails here, not at the first step
    check_adaptive_training(model_config, config)
    if info.enabled and (config.exit_loss_weight or config.exit_kl_weight or config.gate_loss_weight
                         or config.predictor_weight):
        # gates and predictor take part in some passes of a step only; DDP's gradient averaging would need
        # find_unused_parameters and a test that ranks stay in step, which does not exist yet
        raise ValueError("exit_loss_weight: adaptive-compute training terms do not run under torchrun yet; train "
                         "them in one process")
    if config.fixed_loops and model_config.loop is None:
        raise ValueError(f"fixed_loops: {config.fixed_loops} given, but the model has no loop (config.loop is None)")
    flops = model.count_flops()
    accum = grad_accum_steps(config, model_config.sequence_len, info.world_size)
    print0(f"batch: {config.total_batch_size:,} tokens/step = {config.device_batch_size} rows x "
           f"{model_config.sequence_len} tokens x {info.world_size} rank(s) x {accum} micro-steps; "
           f"{flops.train:.3g} training FLOPs/token; compute dtype {dtype}")
    if config.predictor_weight:
        print0(f"energy penalty: the width predictor is trained on its CE + energy_weight={config.energy_weight} x "
               "E[FLOPs]/FLOPs(full) (train/losses.py), so expected FLOPs has a gradient; logged as "
               "predictor_flops_frac")
    elif config.matryoshka or config.energy_weight:
        chooser = f"sampled by the {config.matryoshka_rule} rule" if config.matryoshka else "fixed"
        ignored = " (so energy_weight is ignored)" if config.energy_weight else ""
        print0(f"energy penalty: widths are {chooser}, not chosen by a trained predictor, so expected FLOPs has "
               f"no gradient here; it is logged as energy_flops and not added to the loss{ignored}")

    source = checkpoint or init
    growth = source.meta.get("extra", {}).get(GROWTH) if source is not None else None
    stage = apply_stage(model, config.stage, growth)  # freezes or masks before the optimizers see the parameters
    stage_summary = stage.describe() if stage is not None else None
    if stage_summary:
        print0(stage_summary)
    optimizers = build_optimizers(model, config)
    loader = DataLoader(data, "train", config.device_batch_size, model_config.sequence_len, rank=info.rank,
                        world_size=info.world_size, seed=config.seed, device=device)
    if checkpoint is not None:
        for opt, state in zip(optimizers, checkpoint.optimizer_state["optimizers"], strict=True):
            opt.load_state_dict(state)
        loader.load_state_dict(checkpoint.meta["loader"])
        set_rng_state(checkpoint.optimizer_state["rng"])

    train_model: torch.nn.Module = model
    compile_model = config.compile if config.compile is not None else device.type == "cuda"
    if compile_model:
        train_model = torch.compile(model)
    if info.enabled:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda"
                                              else None)
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device.type, dtype=dtype))

    def evaluate() -> float:
        return evaluate_bpb(model, data, batch_size=config.device_batch_size, seq_len=model_config.sequence_len,
                            max_tokens=config.eval_tokens, device=device, rank=info.rank,
                            world_size=info.world_size, autocast=autocast)

    metrics = MetricsLog(Path(config.metrics_file) if config.metrics_file else out_dir / "metrics.jsonl",
                         start_step if resume else None, info.is_master,
                         _wandb_run(config, model_config, info.is_master))
    result = TrainResult(step=start_step, checkpoint=out_dir, stage=stage_summary)
    peak = peak_flops(device)
    tokens_per_step = config.total_batch_size
    bar = tqdm(total=config.num_iterations, initial=start_step, desc=f"train {config.run_name}", unit="step",
               disable=not (progress and info.is_master), dynamic_ncols=True)
    started = time.perf_counter()
    step, max_iterations = start_step, config.num_iterations
    all_loops: list[int] = []  # looped models: every loop count sampled in this run

    def save() -> Path:
        if info.is_master:
            result.checkpoint = save_checkpoint(
                out_dir, model, step=step, train_config=config.to_dict(), optimizers=optimizers,
                loader_state=loader.state_dict(), tokenizer=tokenizer, extra={GROWTH: growth} if growth else None)
        if info.enabled:
            dist.barrier()
        return result.checkpoint

    while True:
        out_of_time = bool(config.time_budget_s) and time.perf_counter() - started > config.time_budget_s
        if config.time_budget_s and info.enabled:  # stop together: a rank leaving alone would hang the others
            flag = torch.tensor(float(out_of_time), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        last = step >= config.num_iterations or out_of_time
        if config.eval_every and (step % config.eval_every == 0 or last):
            bpb = evaluate()
            if step == 0:
                result.initial_val_bpb = bpb
            result.final_val_bpb = bpb
            metrics.log({"step": step, "val_bpb": bpb})
            if info.is_master:
                bar.write(f"step {step:5d} | val bpb {bpb:.4f}")
        if config.sample_every and (step % config.sample_every == 0 or last) and info.is_master:
            engine = Engine(model, tokenizer)
            for prompt in SAMPLE_PROMPTS:
                text = engine.complete(prompt, 32, SamplingParams(temperature=0.0))
                bar.write(f"  sample: {prompt!r} -> {text!r}")
        if last:
            break

        t0 = time.perf_counter()
        if step == start_step:
            first_step_at = t0
        elif config.time_budget_s and step - start_step in REPLAN_AT:
            # every rank must choose the same num_iterations: plan with the slowest rank's clock
            clocks = torch.tensor([t0 - first_step_at, t0 - started], dtype=torch.float64, device=device)
            if info.enabled:
                dist.all_reduce(clocks, op=dist.ReduceOp.MAX)
            training_s, elapsed = clocks.tolist()
            config = fit_to_budget(config, max_iterations, step, start_step, training_s / (step - start_step),
                                   config.time_budget_s - elapsed)
            bar.total = config.num_iterations
        lr_mult = set_schedule(optimizers, step, config)
        loss_sum = torch.zeros((), device=device)
        step_flops = energy = 0.0  # training FLOPs actually spent; expected forward FLOPs/token of the widths
        step_loops: list[int] = []
        adaptive = AdaptiveStep(model_config, config, step)  # exit/gate/predictor terms (train/losses.py)
        for micro in range(accum):
            x, y = next(loader)
            adaptive.next_micro_batch()
            widths = micro_step_widths(model_config, config, step, micro)
            # None unless the model loops
            loops = config.fixed_loops or sample_loops(model_config, config.seed, step, micro)
            if loops is not None:
                step_loops.append(loops)
            for width in widths:  # a fixed choice's expected FLOPs (train/energy.py) is its FLOP count
                cost = model.count_flops(width=width, loops=loops)
                step_flops += cost.train * x.numel() * info.world_size
                energy += cost.forward / len(widths)
            for j, width in enumerate(widths):
                # DDP averages gradients on the step's last backward only
                sync = not info.enabled or (micro == accum - 1 and j == len(widths) - 1 and not config.predictor_weight)
                with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast():
                    choice = ({} if width is None else {"width": width}) | ({} if loops is None else {"loops": loops})
                    objective = adaptive.objective(model, x, width)
                    loss = train_model(x, y, **choice, **({} if objective is None else {"adaptive": objective}))
                    (loss / (accum * len(widths))).backward()
                adaptive.finished(objective, width)
                step_flops += adaptive.train_flops(objective) * x.numel() * info.world_size
                if j == 0:  # the logged loss is the first choice's CE: full width, or the sample
                    loss_sum += loss.detach() if objective is None else objective.ce
            if config.predictor_weight:  # the width predictor's pass: a mixture of widths + the energy penalty
                sync = not info.enabled or micro == accum - 1
                with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast():
                    objective = PredictorTraining(model_config, config)
                    (config.predictor_weight * train_model(x, y, adaptive=objective) / accum).backward()
                adaptive.finished(objective, None)
                step_flops += mixture_train_flops(model_config) * x.numel() * info.world_size
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        for opt in optimizers:
            opt.step()
        if stage is not None:
            stage.after_step()
        model.zero_grad(set_to_none=True)
        loss_value = (loss_sum / accum).item()
        if info.enabled:  # gloo has no AVG: sum, then divide
            loss_tensor = torch.tensor(loss_value, device=device)
            dist.all_reduce(loss_tensor)
            loss_value = loss_tensor.item() / info.world_size
        dt = time.perf_counter() - t0
        step += 1
        tok_per_s = tokens_per_step / dt
        record = {"step": step, "loss": loss_value, "lr_mult": lr_mult, "tokens": step * tokens_per_step,
                  "dt": dt, "tok_per_s": tok_per_s, "train_flops": step_flops}
        if config.matryoshka or config.width is not None:
            record["energy_flops"] = energy / accum
        record |= adaptive.record()
        if step_loops:  # the loop counts this step sampled (their mean over micro-steps)
            record["loops"] = sum(step_loops) / len(step_loops)
            all_loops.extend(step_loops)
        if peak:
            record["mfu"] = step_flops / dt / (peak * info.world_size)
        metrics.log(record)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_per_s:,.0f}",
                        **({"mfu": f"{100 * record['mfu']:.1f}%"} if "mfu" in record else {}))
        bar.update(1)
        if config.save_every and step % config.save_every == 0 and step < config.num_iterations:
            save()
    bar.close()
    if all_loops:
        result.mean_loops = sum(all_loops) / len(all_loops)
        print0(f"loops: mean r sampled {result.mean_loops:.2f} over {len(all_loops)} micro-steps (mean_recurrence "
               f"{model_config.loop.mean_recurrence}, clamped to [1, {model_config.loop.r_max}])")
    result.step = step
    save()
    result.metrics = metrics.records
    return result
