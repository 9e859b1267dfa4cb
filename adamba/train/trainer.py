"""One training loop, callable as a function (tests) or from `adamba train` (CLI, torchrun).

Per optimizer step: `grad_accum` micro-batches of device_batch_size x sequence_len tokens per rank, so
that total_batch_size tokens are seen across all ranks; the loss of each micro-batch is divided by
grad_accum, and DDP averages over ranks, so the update equals one step on the whole global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checkpoint import (
    SHARDS,
    Checkpoint,
    all_ranks_rng_states,
    load_checkpoint,
    resolve_run,
    restore_rng_state,
    run_dir,
    save_checkpoint,
)
from ..common import (
    DistInfo,
    autocast,
    init_distributed,
    pick_device,
    pick_dtype,
    print0,
    seed_everything,
    write_atomic,
)
from ..config import MAMBA, ModelConfig, TrainConfig, require_loop
from ..data.dataset import TokenizedCorpus
from ..data.loader import DataLoader
from ..data.prepare import prepare_data
from ..data.tokenizer import Tokenizer
from ..eval.bpb import evaluate_bpb
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from ..model import AdambaLM, scan_cpu
from ..model.compute import Compute
from ..model.float8 import enable_float8
from ..surgery.growth import GROWTH
from .fsdp import checkpoint_blocks, inference_copy, load_shard_optimizer_states, save_shards, shard_model
from .horizon import apply_horizon, plan_horizon
from .loops import sample_loops
from .losses import AdaptiveStep, ExitTraining, PredictorTraining, check_adaptive_training, mixture_train_flops
from .matryoshka import micro_step_widths
from .optim import build_optimizers, describe_muon, lr_multiplier, set_schedule
from .stages import Stage, apply_stage

# Dense bf16 peak FLOP/s (vendor datasheets: the "with sparsity" figure halved), for MFU: the words a GPU's name
# must contain, the most specific first -- an H100 SXM reports "NVIDIA H100 80GB HBM3", the PCIe and NVL cards
# name themselves, and their peaks are 24% and 16% lower.
PEAK_FLOPS = [(("GH200",), 989e12), (("H200", "NVL"), 835e12), (("H200",), 989e12), (("H100", "NVL"), 835e12),
              (("H100", "PCIE"), 756e12), (("H100",), 989e12), (("A100",), 312e12), (("L40S",), 362e12),
              (("4090",), 165e12)]
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
    tokens_per_step: int = 0  # the batch trained with (an automatic batch resolved, train/horizon.py)


def peak_flops_of(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name; None for a GPU not in PEAK_FLOPS."""
    words = set(re.split(r"[\s_-]+", gpu_name.upper()))
    return next((flops for required, flops in PEAK_FLOPS if words.issuperset(required)), None)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops_of(name)
    if peak is None:
        print0(f"MFU not reported: no peak FLOP/s known for {name} (trainer.PEAK_FLOPS)")
    return peak


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
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a") as f:  # appended line by line: a crash loses at most the line being written
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


# --- setup -------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A training run after setup: what train_step needs, and what the loop around it evaluates, logs and saves."""

    config: TrainConfig  # replaced when a time budget re-fits num_iterations
    info: DistInfo
    device: torch.device
    dtype: torch.dtype  # the compute dtype of autocast
    data: TokenizedCorpus | None  # pretraining's corpus; None when fine-tuning (its loader holds conversations)
    out_dir: Path
    model: AdambaLM
    train_model: torch.nn.Module  # what the passes call: the model, compiled and/or wrapped in DDP
    optimizers: list[torch.optim.Optimizer]
    loader: Iterator[tuple[torch.Tensor, torch.Tensor]]  # with state_dict / load_state_dict, for exact resume
    accum: int  # micro-batches per optimizer step
    start_step: int = 0
    stage: Stage | None = None
    growth: dict | None = None  # the checkpoint's growth record (surgery), saved again with every checkpoint
    tokenizer: Tokenizer | None = None  # saved with every checkpoint

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Under DDP or FSDP, gradients are averaged over ranks at a backward with sync; the others accumulate
        locally."""
        if self.config.fsdp:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return self.train_model.no_sync() if self.info.enabled and not sync else contextlib.nullcontext()


def setup_run(model_config: ModelConfig, config: TrainConfig, *, resume: bool = False,
              progress: bool = True) -> Run:
    """Everything before the first step: device and processes, data, the model (fresh, from init_from, or resumed
    with its optimizer, loader and RNG state), checks, the training stage, and compile / DDP wrapping."""
    device = pick_device(config.device)
    info: DistInfo = init_distributed(device)
    horizon = plan_horizon(model_config, config, info.world_size)
    if horizon is not None:  # before the resume check, which compares the planned numbers with the saved ones
        config = apply_horizon(config, horizon)
        print0(horizon.describe())
    dtype = pick_dtype(config.dtype, device)
    seed_everything(config.seed + info.rank)
    # A checkpoint to start from (e.g. a surgery's output): its weights and tokenizer, a fresh optimizer and schedule
    init = load_checkpoint(resolve_run(config.init_from), device) if config.init_from and not resume else None
    tokenizer_name = config.tokenizer or (str(init.path) if init is not None and init.tokenizer is not None else None)
    data = prepare_data(config.data, tokenizer_name, config.tokenizer_vocab_size, config.val_fraction, info.rank,
                        progress, config.text_field)
    out_dir = run_dir(config.run_name)
    checkpoint = resume_checkpoint(config, out_dir, device) if resume else None
    model = _model_to_train(model_config, checkpoint, init, data.tokenizer, device)
    describe_model(model, device)
    check_training(model.config, config, info)
    accum = grad_accum_steps(config, model.config.sequence_len, info.world_size)
    describe_batch(model, config, info, accum, dtype)
    _describe_energy_penalty(config)

    source = checkpoint or init
    growth = source.meta.get("extra", {}).get(GROWTH) if source is not None else None
    stage = apply_stage(model, config.stage, growth)  # freezes or masks before the optimizers see the parameters
    if stage is not None:
        print0(stage.describe())
    prepare_model(model, config, device, dtype)
    if stage is not None:
        stage.hold(model)  # the old entries as this rank holds them (stages.py)
    optimizers = build_optimizers(model, config)
    print0(describe_muon(config))
    loader = DataLoader(data, "train", config.device_batch_size, model.config.sequence_len, rank=info.rank,
                        world_size=info.world_size, seed=config.seed, device=device)
    if checkpoint is not None:
        restore_training_state(checkpoint, optimizers, loader, device, info, model)
    return Run(config, info, device, dtype, data, out_dir, model,
               wrap_for_training(model, config, device, info, untrained_heads(model)),
               optimizers, loader, accum, start_step=checkpoint.step if checkpoint is not None else 0, stage=stage,
               growth=growth, tokenizer=data.tokenizer)


def prepare_model(model: AdambaLM, config: TrainConfig, device: torch.device, dtype: torch.dtype) -> None:
    """What a run does to its model before the optimizers see it (pretraining and fine-tuning alike): float8
    matmuls (marked layers, so before compile and wrapping), activation checkpointing, FSDP sharding (the
    optimizers then hold the shards; fsdp.py)."""
    if config.float8:
        print0(enable_float8(model, config.float8, device))
    if config.activation_checkpointing:
        checkpoint_blocks(model)
    if config.fsdp:
        shard_model(model, dtype)


def resume_checkpoint(config: TrainConfig, out_dir: Path, device: torch.device) -> Checkpoint:
    checkpoint = load_checkpoint(out_dir, device, with_optimizer=True)
    print0(f"resuming {config.run_name} from {checkpoint.path} (step {checkpoint.step})")
    saved = checkpoint.meta.get("train_config") or {}
    changed = sorted(k for k, v in config.to_dict().items()
                     if k in saved and saved[k] != v and k not in RESUME_MAY_CHANGE)
    if changed:
        print0(f"warning: resuming with different {changed} than the checkpoint was trained with; "
               "the run will not continue exactly as it would have")
    return checkpoint


def _model_to_train(model_config: ModelConfig, checkpoint: Checkpoint | None, init: Checkpoint | None,
                    tokenizer: Tokenizer, device: torch.device) -> AdambaLM:
    """The resumed checkpoint's model, else init_from's, else a fresh one with the tokenizer's vocab_size."""
    if checkpoint is not None:
        return checkpoint.model
    if init is not None:
        if tokenizer.vocab_size > init.model.config.vocab_size:
            raise ValueError(f"init_from: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                             f"vocab_size={init.model.config.vocab_size}; train with the checkpoint's own tokenizer")
        print0(f"starting from {init.path}: its weights, with a fresh optimizer and schedule")
        return init.model
    if model_config.vocab_size != tokenizer.vocab_size:
        print0(f"vocab_size: {model_config.vocab_size} -> {tokenizer.vocab_size}, the tokenizer's size")
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    return AdambaLM.build(model_config, device)


def describe_model(model: AdambaLM, device: torch.device) -> None:
    print0(f"model: {model.config.describe()}  ({model.num_params():,} parameters)")
    if MAMBA in model.config.block_pattern and device.type == "cpu":
        print0("Mamba on the CPU: loading the compiled selective scan (the first build takes about a minute)")
        if not scan_cpu.available():
            print0(f"  unavailable ({scan_cpu.unavailable_reason()}); using the much slower PyTorch scan")


def check_training(model_config: ModelConfig, config: TrainConfig, info: DistInfo) -> None:
    """What the model config and the train config each accept alone, but not together."""
    model_config.layer_widths(config.width)  # a bad fixed width fails here, not at the first step
    check_adaptive_training(model_config, config)
    if info.enabled and (config.exit_loss_weight or config.exit_kl_weight or config.gate_loss_weight
                         or config.predictor_weight):
        # gates and predictor take part in some passes of a step only; DDP looks for unused parameters when a
        # model has them (wrap_for_training), but no test yet shows these objectives' ranks staying in step
        raise ValueError("exit_loss_weight: adaptive-compute training terms do not run under torchrun yet; train "
                         "them in one process")
    if config.fixed_loops:
        require_loop(model_config, "fixed_loops")
    check_fsdp(config, info)


def check_fsdp(config: TrainConfig, info: DistInfo) -> None:
    if config.fsdp and not info.enabled:
        raise ValueError("fsdp: shards over the ranks of torchrun; start the run with torchrun --nproc_per_node=N "
                         "-m adamba.cli train|sft|rl ..., or drop --fsdp")


def describe_batch(model: AdambaLM, config: TrainConfig, info: DistInfo, accum: int, dtype: torch.dtype) -> None:
    print0(f"batch: {config.total_batch_size:,} tokens/step = {config.device_batch_size} rows x "
           f"{model.config.sequence_len} tokens x {info.world_size} rank(s) x {accum} micro-steps; "
           f"{model.count_flops().train:.3g} training FLOPs/token; compute dtype {dtype}")


def _describe_energy_penalty(config: TrainConfig) -> None:
    """Say whether expected FLOPs is trained (a width predictor chooses widths) or only logged."""
    if config.predictor_weight:
        print0(f"energy penalty: the width predictor is trained on its CE + energy_weight={config.energy_weight} x "
               "E[FLOPs]/FLOPs(full) (train/losses.py), so expected FLOPs has a gradient; logged as "
               "predictor_flops_frac")
    elif config.matryoshka or config.energy_weight:
        chooser = f"sampled by the {config.matryoshka_rule} rule" if config.matryoshka else "fixed"
        ignored = " (so energy_weight is ignored)" if config.energy_weight else ""
        print0(f"energy penalty: widths are {chooser}, not chosen by a trained predictor, so expected FLOPs has "
               f"no gradient here; it is logged as energy_flops and not added to the loss{ignored}")


def restore_training_state(checkpoint: Checkpoint, optimizers: list[torch.optim.Optimizer],
                            loader: DataLoader, device: torch.device, info: DistInfo, model: torch.nn.Module) -> None:
    """Optimizer moments, the loader's position and the RNG, so the resumed run continues exactly."""
    restore_optimizers(checkpoint, optimizers, model)
    loader.load_state_dict(checkpoint.meta["loader"])
    restore_rng_state(checkpoint.optimizer_state["rng"], device, info)


def restore_optimizers(checkpoint: Checkpoint, optimizers: list[torch.optim.Optimizer], model: torch.nn.Module) -> None:
    """The checkpoint's optimizer moments. An FSDP run's sharded states (fsdp.py) load into a sharded model on any
    number of ranks, or into a plain one."""
    states = checkpoint.optimizer_state["optimizers"]
    if states is None:
        load_shard_optimizer_states(model, optimizers, checkpoint.path / SHARDS)
    elif isinstance(model, FSDPModule):
        raise ValueError(f"fsdp: {checkpoint.path} was trained without --fsdp; resume it without --fsdp, or start "
                         "from its weights with a fresh optimizer (--init-from)")
    else:
        for opt, state in zip(optimizers, states, strict=True):
            opt.load_state_dict(state)


def wrap_for_training(model: AdambaLM, config: TrainConfig, device: torch.device, info: DistInfo,
                      untrained=()) -> torch.nn.Module:
    """The model wrapped in DDP under torchrun, then compiled (by default on CUDA only). In that order: compiling
    the DDP module lets TorchDynamo's DDPOptimizer cut the graph at DDP's gradient buckets, so all-reduces overlap
    the backward; a model compiled first and wrapped after is one graph whose gradients DDP reduces only at its end.

    `untrained`: parameters no pass of this run gives a gradient (e.g. exit gates and a width predictor under the
    plain loss). Under DDP they are frozen first: DDP would wait for their gradients ("Expected to have finished
    reduction ...") at the next step. Their optimizer skips them, as it would anyway without gradients."""
    if config.fsdp and not isinstance(model, FSDPModule):
        raise ValueError("fsdp: the model must be sharded (fsdp.shard_model) before it is wrapped for training")
    train_model: torch.nn.Module = model
    if info.enabled and not config.fsdp:  # (FSDP reduce-scatters gradients itself: fsdp.py)
        for p in untrained:
            p.requires_grad_(False)
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda"
                                              else None)
    if config.compile if config.compile is not None else device.type == "cuda":
        train_model = torch.compile(train_model)
    return train_model


def untrained_heads(model: AdambaLM) -> list[torch.nn.Parameter]:
    """Gates and the width predictor: trained only by the adaptive-compute terms, which run in one process only
    (check_training), so under torchrun no pass trains them."""
    return list(model.adaptive_heads.parameters()) if model.adaptive_heads is not None else []


# --- one optimizer step ------------------------------------------------------------------------------------------


@dataclass
class Pass:
    """One forward + backward on a micro-batch: its compute choice and the objective it trains (None: the plain
    CE; ExitTraining: with exit and gate terms; PredictorTraining: the width predictor's mixture of widths)."""

    tokens: int
    compute: Compute = field(default_factory=Compute)
    objective: ExitTraining | PredictorTraining | None = None


@dataclass
class StepStats:
    """What one optimizer step did, for its metrics record."""

    loss: float  # each micro-batch's first pass's CE (full width, or the sample), averaged over micro-batches, ranks
    train_flops: float  # training FLOPs the step spent, all ranks together
    energy_flops: float | None  # sampled or fixed widths: their expected forward FLOPs/token (train/energy.py)
    loops: list[int]  # looped models: each micro-batch's loop count
    adaptive: dict[str, float]  # each adaptive objective's logged terms (train/losses.py)


def _pass_loss(run: Run, x: torch.Tensor, y: torch.Tensor, p: Pass) -> torch.Tensor:
    """The loss of every training pass: the model's cross-entropy, or its objective's (train/losses.py), which
    computes its terms from the forward's outputs."""
    if p.objective is None:
        return run.train_model(x, y, compute=p.compute)
    return p.objective.loss(run.train_model, run.model, x, y, p.compute)


def train_step(run: Run, step: int, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> StepStats:
    """One optimizer step on run.accum micro-batches from `batches`: every pass of each (its Matryoshka widths,
    loop count and adaptive objectives), then clipping, the optimizers, the stage's masks and zeroed gradients.
    The learning rate is the caller's to set (set_schedule)."""
    config, model_config = run.config, run.model_config
    adaptive = AdaptiveStep(model_config, config, step)  # exit/gate/predictor terms (train/losses.py)
    passes: list[Pass] = []
    choices: list[list[Compute]] = []  # each micro-batch's compute choices: its widths at its loop count
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(run.accum):
        x, y = next(batches)
        # loops: None unless the model loops
        loops = config.fixed_loops or sample_loops(model_config, config.seed, step, micro)
        choices.append([Compute(width, loops) for width in micro_step_widths(model_config, config, step, micro)])
        loss, micro_passes = _train_micro_batch(run, adaptive, x, y, choices[-1], last=micro == run.accum - 1)
        loss_sum += loss
        passes += micro_passes
    _optimizer_step(run)
    sampled_or_fixed_widths = config.matryoshka or config.width is not None
    return StepStats(loss=_mean_over_ranks(run, (loss_sum / run.accum).item()),
                     train_flops=step_train_flops(run.model, adaptive, passes, run.info.world_size),
                     energy_flops=expected_forward_flops(run.model, choices) if sampled_or_fixed_widths else None,
                     loops=[computes[0].loops for computes in choices if computes[0].loops is not None],
                     adaptive=adaptive.record())


def _train_micro_batch(run: Run, adaptive: AdaptiveStep, x: torch.Tensor, y: torch.Tensor,
                       computes: list[Compute], last: bool) -> tuple[torch.Tensor, list[Pass]]:
    """The passes on one micro-batch: one per compute choice, then the width predictor's. Returns the loss to log (the
    first pass's CE) and the passes run. `last`: the step's last micro-batch, whose last backward syncs DDP."""
    config = run.config
    adaptive.next_micro_batch()
    passes = []
    for j, compute in enumerate(computes):
        with run.grad_sync(last and j == len(computes) - 1 and not config.predictor_weight), run.autocast():
            p = Pass(x.numel(), compute, adaptive.objective(run.model, x, compute.width))
            loss = _pass_loss(run, x, y, p)
            (loss / (run.accum * len(computes))).backward()
        adaptive.finished(p.objective, compute.width)
        passes.append(p)
        if j == 0:  # the logged loss is the first choice's CE: full width, or the sample
            logged = loss.detach() if p.objective is None else p.objective.ce
    if config.predictor_weight:  # the width predictor's pass: a mixture of widths + the energy penalty
        with run.grad_sync(last), run.autocast():
            p = Pass(x.numel(), objective=PredictorTraining(run.model_config, config))
            (config.predictor_weight * _pass_loss(run, x, y, p) / run.accum).backward()
        adaptive.finished(p.objective, None)
        passes.append(p)
    return logged, passes


def _optimizer_step(run: Run) -> None:
    """Mask the stage's gradients, clip, step every optimizer, put back what the stage masks, and zero the
    gradients."""
    if run.stage is not None:
        run.stage.before_step()
    if run.config.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    for opt in run.optimizers:
        opt.step()
    if run.stage is not None:
        run.stage.after_step()
    run.model.zero_grad(set_to_none=True)


def _mean_over_ranks(run: Run, value: float) -> float:
    if not run.info.enabled:
        return value
    total = torch.tensor(value, device=run.device)
    dist.all_reduce(total)  # gloo has no AVG: sum, then divide
    return total.item() / run.info.world_size


def pass_train_flops(model: AdambaLM, adaptive: AdaptiveStep, p: Pass) -> float:
    """Training FLOPs per token of one pass: forward + backward at its width and loop count plus what its
    objective adds, or, for the width predictor's pass, every width of its mixture."""
    if isinstance(p.objective, PredictorTraining):
        return mixture_train_flops(model.config)
    return model.count_flops(compute=p.compute).train + adaptive.train_flops(p.objective)


def step_train_flops(model: AdambaLM, adaptive: AdaptiveStep, passes: list[Pass], world_size: int) -> float:
    """The training FLOPs a step spent: its passes, run by every rank on its own tokens."""
    return sum(pass_train_flops(model, adaptive, p) * p.tokens * world_size for p in passes)


def expected_forward_flops(model: AdambaLM, choices: list[list[Compute]]) -> float:
    """Forward FLOPs/token of a step's compute choices: the mean over each micro-batch's choices (a fixed choice's
    expected FLOPs, train/energy.py, is its FLOP count), averaged over micro-batches."""
    energy = 0.0
    for computes in choices:
        for compute in computes:
            energy += model.count_flops(compute=compute).forward / len(computes)
    return energy / len(choices)


# --- the loop: evaluation, samples, time budget, logging, checkpoints ---------------------------------------------


class TimeBudget:
    """time_budget_s: the run stops once it has passed, and re-fits num_iterations to it at the REPLAN_AT steps."""

    def __init__(self, run: Run):
        self.run = run
        self.started = time.perf_counter()
        self.first_step_at = self.started  # until the first step starts
        self.max_iterations = run.config.num_iterations

    def out_of_time(self) -> bool:
        budget = self.run.config.time_budget_s
        out_of_time = bool(budget) and time.perf_counter() - self.started > budget
        if budget and self.run.info.enabled:  # stop together: a rank leaving alone would hang the others
            flag = torch.tensor(float(out_of_time), device=self.run.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        return out_of_time

    def replan(self, step: int, now: float) -> bool:
        """Called as each step starts; at a REPLAN_AT step, re-fits run.config.num_iterations and returns True."""
        run = self.run
        steps_done = step - run.start_step
        if steps_done == 0:
            self.first_step_at = now
        if not (run.config.time_budget_s and steps_done in REPLAN_AT):
            return False
        # every rank must choose the same num_iterations: plan with the slowest rank's clock
        clocks = torch.tensor([now - self.first_step_at, now - self.started], dtype=torch.float64, device=run.device)
        if run.info.enabled:
            dist.all_reduce(clocks, op=dist.ReduceOp.MAX)
        training_s, elapsed = clocks.tolist()
        run.config = fit_to_budget(run.config, self.max_iterations, step, run.start_step, training_s / steps_done,
                                   run.config.time_budget_s - elapsed)
        return True


def due(every: int, step: int, last: bool) -> bool:
    """Periodic work (eval_every, sample_every; 0: never) is done every `every` steps and at the end."""
    return bool(every) and (step % every == 0 or last)


def _evaluate(run: Run, step: int, result: TrainResult, metrics: MetricsLog, bar: tqdm) -> None:
    bpb = evaluate_bpb(run.model, run.data, batch_size=run.config.device_batch_size,
                       seq_len=run.model_config.sequence_len, max_tokens=run.config.eval_tokens, device=run.device,
                       rank=run.info.rank, world_size=run.info.world_size, autocast=run.autocast)
    if step == 0:
        result.initial_val_bpb = bpb
    result.final_val_bpb = bpb
    metrics.log({"step": step, "val_bpb": bpb})
    if run.info.is_master:
        bar.write(f"step {step:5d} | val bpb {bpb:.4f}")


def _write_samples(run: Run, bar: tqdm) -> None:
    """Greedy continuations of SAMPLE_PROMPTS, written by rank 0 (a sharded model's ranks all gather its copy
    first: fsdp.inference_copy)."""
    model = inference_copy(run.model)
    if not run.info.is_master:
        return
    engine = Engine(model, run.tokenizer)
    for prompt in SAMPLE_PROMPTS:
        text = engine.complete(prompt, 32, SamplingParams(temperature=0.0))
        bar.write(f"  sample: {prompt!r} -> {text!r}")


def step_record(run: Run, step: int, lr_mult: float, dt: float, stats: StepStats, peak: float | None) -> dict:
    """The metrics record of a step; `step` counts the steps done, this one included."""
    tokens_per_step = run.config.total_batch_size
    record = {"step": step, "loss": stats.loss, "lr_mult": lr_mult, "tokens": step * tokens_per_step,
              "dt": dt, "tok_per_s": tokens_per_step / dt, "train_flops": stats.train_flops}
    if stats.energy_flops is not None:
        record["energy_flops"] = stats.energy_flops
    record |= stats.adaptive
    if stats.loops:  # the loop counts this step sampled (their mean over micro-steps)
        record["loops"] = sum(stats.loops) / len(stats.loops)
    if peak:
        record["mfu"] = stats.train_flops / dt / (peak * run.info.world_size)
    return record


def show_progress(bar: tqdm, record: dict) -> None:
    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:,.0f}",
                    **({"mfu": f"{100 * record['mfu']:.1f}%"} if "mfu" in record else {}))
    bar.update(1)


def _growth(run: Run) -> dict | None:
    return {GROWTH: run.growth} if run.growth else None


def save_run(run: Run, step: int, result: TrainResult, extra: dict | None = None) -> None:
    """The run's checkpoint at `step` (save_training), its loader position included."""
    path = save_training(run.out_dir, run.model, run.optimizers, step, run.config, run.info, run.device,
                         run.tokenizer, run.loader.state_dict(), extra)
    if path is not None:
        result.checkpoint = path


def save_training(out_dir: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], step: int,
                  config: TrainConfig, info: DistInfo, device: torch.device, tokenizer: Tokenizer | None,
                  loader_state: dict | None = None, extra: dict | None = None) -> Path | None:
    """Rank 0 writes the checkpoint (model, optimizers, every rank's RNG, tokenizer, the loader's position and
    `extra` in its meta) and returns its path; the others wait for it (None). Under FSDP every rank first writes
    its shards."""
    rng_states = all_ranks_rng_states(device, info)
    shards = None
    if config.fsdp:  # every rank writes its shards first, into a folder rank 0 then moves into the checkpoint
        shards = out_dir / f".shards-{step:06d}"
        if info.is_master and shards.exists():
            shutil.rmtree(shards)  # a run killed while writing them
        dist.barrier()
        save_shards(model, optimizers, shards)
        dist.barrier()
    path = None
    if info.is_master:
        path = save_checkpoint(out_dir, model, step=step, train_config=config.to_dict(), optimizers=optimizers,
                               loader_state=loader_state, tokenizer=tokenizer, extra=extra, rng_states=rng_states,
                               shards=shards)
    if info.enabled:
        dist.barrier()
    return path


def train(model_config: ModelConfig, config: TrainConfig, *, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train for config.num_iterations steps (fewer if time_budget_s runs out), evaluating, sampling and saving
    as configured; `resume` continues the run's latest checkpoint exactly."""
    run = setup_run(model_config, config, resume=resume, progress=progress)
    info = run.info
    metrics = MetricsLog(Path(config.metrics_file) if config.metrics_file else run.out_dir / "metrics.jsonl",
                         run.start_step if resume else None, info.is_master,
                         _wandb_run(config, run.model_config, info.is_master))
    result = TrainResult(step=run.start_step, checkpoint=run.out_dir,
                         stage=run.stage.describe() if run.stage is not None else None,
                         tokens_per_step=run.config.total_batch_size)
    peak = peak_flops(run.device)
    bar = tqdm(total=run.config.num_iterations, initial=run.start_step, desc=f"train {config.run_name}", unit="step",
               disable=not (progress and info.is_master), dynamic_ncols=True)
    budget = TimeBudget(run)
    step = run.start_step
    all_loops: list[int] = []  # looped models: every loop count sampled in this run
    while True:
        out_of_time = budget.out_of_time()  # on every rank at every step: under torchrun it is a collective
        last = step >= run.config.num_iterations or out_of_time
        if due(run.config.eval_every, step, last):
            _evaluate(run, step, result, metrics, bar)
        if due(run.config.sample_every, step, last) and (info.is_master or run.config.fsdp):
            _write_samples(run, bar)
        if last:
            break
        t0 = time.perf_counter()
        if budget.replan(step, t0):
            bar.total = run.config.num_iterations
        lr_mult = set_schedule(run.optimizers, step, run.config)
        stats = train_step(run, step, run.loader)
        dt = time.perf_counter() - t0
        step += 1
        all_loops.extend(stats.loops)
        record = step_record(run, step, lr_mult, dt, stats, peak)
        metrics.log(record)
        show_progress(bar, record)
        if run.config.save_every and step % run.config.save_every == 0 and step < run.config.num_iterations:
            save_run(run, step, result, _growth(run))
    bar.close()
    if all_loops:
        result.mean_loops = sum(all_loops) / len(all_loops)
        loop = run.model_config.loop
        print0(f"loops: mean r sampled {result.mean_loops:.2f} over {len(all_loops)} micro-steps (mean_recurrence "
               f"{loop.mean_recurrence}, clamped to [1, {loop.r_max}])")
    result.step = step
    save_run(run, step, result, _growth(run))
    result.metrics = metrics.records
    return result
