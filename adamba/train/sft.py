"""Supervised fine-tuning: a base checkpoint trained on conversations, with the pretraining step (`train_step`).

nanochat's chat_sft recipe as defaults (config.SFT_TRAIN_DEFAULTS, printed at the start): the base's learning
rates times `init_lr_frac`, no warmup, a linear decay to 0 over one epoch of the mixture (or over the steps that
fit in time_budget_s, re-fitted as in pretraining). The loss counts only the assistant's tokens
(data/conversations.py); `--matryoshka` trains every width at every step as in pretraining, so every compute mode
stays usable after fine-tuning. Checkpoints carry the loader's position, optimizers and RNG, so `resume` continues
exactly; under torchrun each rank takes every world_size-th row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..chat.render import render_conversation
from ..checkpoint import load_checkpoint, resolve_run, run_dir
from ..common import init_distributed, pick_device, pick_dtype, print0, seed_everything
from ..config import SFTConfig, TrainConfig
from ..data.conversations import ConversationLoader
from ..model import AdambaLM
from .fsdp import inference_copy
from .optim import build_optimizers, fine_tuning_config, set_schedule
from .trainer import (
    MetricsLog,
    Run,
    TimeBudget,
    TrainResult,
    check_training,
    describe_batch,
    describe_model,
    due,
    grad_accum_steps,
    peak_flops,
    prepare_model,
    restore_training_state,
    resume_checkpoint,
    save_run,
    show_progress,
    step_record,
    train_step,
    untrained_heads,
    wrap_for_training,
)

# (model to decode with, run, step) -> metrics of a small chat evaluation; under FSDP the model is each rank's
# inference copy (fsdp.inference_copy), every rank decoding its own stripe of the items
ChatEval = Callable[[AdambaLM, Run, int], dict]


def sft_train_config(sft: SFTConfig, config: TrainConfig, steps: int) -> TrainConfig:
    """The TrainConfig the steps run with: learning rates scaled by init_lr_frac, num_iterations = steps."""
    return fine_tuning_config(config, sft.init_lr_frac, steps)


def setup_sft(sft: SFTConfig, config: TrainConfig, conversations: Sequence[dict], *, resume: bool = False,
              progress: bool = True) -> Run:
    """The base checkpoint (or the run's latest, to resume), the conversation loader, optimizers, compile / DDP."""
    device = pick_device(config.device)
    info = init_distributed(device)
    dtype = pick_dtype(config.dtype, device)
    seed_everything(config.seed + info.rank)
    out_dir = run_dir(config.run_name)
    checkpoint = resume_checkpoint(config, out_dir, device) if resume else load_checkpoint(resolve_run(sft.base),
                                                                                           device)
    if checkpoint.tokenizer is None:
        raise ValueError(f"base: {checkpoint.path} has no tokenizer.pkl; fine-tuning renders conversations with it")
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    describe_model(model, device)
    loader = ConversationLoader(conversations, _renderer(tokenizer),
                                config.device_batch_size, model.config.sequence_len, pad_id=tokenizer.bos_id,
                                rank=info.rank, world_size=info.world_size, seed=config.seed, device=device,
                                progress=progress and info.is_master, name=sft.mixture)
    accum = grad_accum_steps(config, model.config.sequence_len, info.world_size)
    per_epoch = loader.batches_in(0) // accum
    if per_epoch == 0 and not sft.num_iterations:
        raise ValueError(f"total_batch_size: one optimizer step takes {accum} batches, but an epoch of "
                         f"{sft.mixture} holds {loader.batches_in(0)}; lower total_batch_size")
    config = sft_train_config(sft, config, sft.num_iterations or sft.num_epochs * per_epoch)
    check_training(model.config, config, info)
    describe_batch(model, config, info, accum, dtype)
    print0(f"sft: {len(loader.pieces):,} conversations ({loader.supervised_tokens():,} supervised tokens), "
           f"{config.num_iterations} steps; learning rates x {sft.init_lr_frac} (matrix {config.matrix_lr:.3g}, "
           f"embedding {config.embedding_lr:.3g}, unembedding {config.unembedding_lr:.3g}), warmup "
           f"{config.warmup_ratio:g}, linear decay over the last {config.warmdown_ratio:.0%} to "
           f"{config.final_lr_frac:g}")
    prepare_model(model, config, device, dtype)
    optimizers = build_optimizers(model, config)
    if resume:
        restore_training_state(checkpoint, optimizers, loader, device, info, model)
    return Run(config, info, device, dtype, None, out_dir, model,
               wrap_for_training(model, config, device, info, untrained_heads(model)),
               optimizers, loader, accum, start_step=checkpoint.step if resume else 0, tokenizer=tokenizer)


@torch.no_grad()
def validation_loss(run: Run, loader: ConversationLoader, max_tokens: int) -> float:
    """Mean cross-entropy per supervised token of the held-out conversations (all ranks' rows together)."""
    model = run.model
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # (nats, tokens)
    batches = max(1, min(loader.batches_in(0), max_tokens // (loader.batch_size * loader.seq_len)))
    loader.load_state_dict({"epoch": 0, "batch": 0})
    for _ in range(batches):
        x, y = next(loader)
        with run.autocast():
            nats = model(x, y, loss_reduction="sum")
        total += torch.stack([nats.double(), (y != -1).sum().double()])
    model.train(was_training)
    if run.info.enabled:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def sft(sft_config: SFTConfig, config: TrainConfig, conversations: Sequence[dict],
        val_conversations: Sequence[dict] | None = None, *, chat_eval: ChatEval | None = None,
        resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune sft_config.base on `conversations`; `val_conversations` give the validation loss every eval_every
    steps, `chat_eval` a small chat evaluation every chat_eval_every steps and at the end."""
    run = setup_sft(sft_config, config, conversations, resume=resume, progress=progress)
    config, info = run.config, run.info
    val = None if not val_conversations else ConversationLoader(
        val_conversations, _renderer(run.tokenizer), config.device_batch_size, run.model_config.sequence_len,
        pad_id=run.tokenizer.bos_id, rank=info.rank, world_size=info.world_size, shuffle=False, device=run.device,
        name="validation")
    metrics = MetricsLog(run.out_dir / "metrics.jsonl", run.start_step if resume else None, info.is_master)
    result = TrainResult(step=run.start_step, checkpoint=run.out_dir)
    bar = tqdm(total=config.num_iterations, initial=run.start_step, desc=f"sft {config.run_name}", unit="step",
               disable=not (progress and info.is_master), dynamic_ncols=True)
    peak, step, budget = peak_flops(run.device), run.start_step, TimeBudget(run)
    while True:
        last = step >= run.config.num_iterations or budget.out_of_time()  # a collective under torchrun
        if val is not None and due(config.eval_every, step, last):
            loss = validation_loss(run, val, config.eval_tokens)
            metrics.log({"step": step, "val_loss": loss})
            if info.is_master:
                bar.write(f"step {step:5d} | val loss {loss:.4f}")
        if chat_eval is not None and (last or due(sft_config.chat_eval_every, step, False)):
            metrics.log({"step": step, **chat_eval(inference_copy(run.model), run, step)})
        if last:
            break
        t0 = time.perf_counter()
        if budget.replan(step, t0):  # time_budget_s: the decay re-fitted to the steps that fit
            bar.total = run.config.num_iterations
        lr_mult = set_schedule(run.optimizers, step, run.config)
        stats = train_step(run, step, run.loader)
        step += 1
        record = step_record(run, step, lr_mult, time.perf_counter() - t0, stats, peak)
        metrics.log(record)
        show_progress(bar, record)
        if config.save_every and step % config.save_every == 0 and step < run.config.num_iterations:
            save_run(run, step, result, {"sft": sft_config.to_dict()})
    bar.close()
    result.step = step
    save_run(run, step, result, {"sft": sft_config.to_dict()})
    result.metrics = metrics.records
    return result


def _renderer(tokenizer):
    """A conversation's whole (ids, mask); the loader cuts it to the context."""
    return lambda conversation: render_conversation(tokenizer, conversation, math.inf)
