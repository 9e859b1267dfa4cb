"""Reinforcement learning on verifiable rewards: GRPO from a chat checkpoint (`adamba rl`).

Each step: `prompts_per_step` training problems (a fixed function of the seed and the step, striped across ranks),
`samples_per_prompt` completions each sampled through the batched engine with the calculator executed, a reward per
completion from the task's checker (1 right, 0 wrong), group-relative advantages, and `ppo_epochs` passes of
`minibatches` optimizer steps on the clipped surrogate (train/grpo.py).
Sampled tokens carry the loss; prompt tokens and tool outputs (forced, not chosen by the policy) do not; a stop token
the policy chose does. Held-out pass@1 and pass@k every `eval_every` steps. Checkpoints carry the optimizers; since
every random draw is seeded by (seed, step, rank), `resume` continues exactly.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..chat.render import render_for_completion
from ..checkpoint import load_checkpoint, resolve_run, run_dir, save_checkpoint, set_rng_state
from ..common import autocast, init_distributed, pick_device, pick_dtype, print0, seed_everything
from ..config import RLConfig, TrainConfig
from ..eval.rl_report import write_rl_report
from ..infer.engine import Completion, Engine
from ..infer.sampling import SamplingParams
from ..model.compute import Compute
from ..tools.calculator import calculate
from .grpo import group_advantages, pass_at_k, policy_loss, token_logprobs
from .optim import build_optimizers, fine_tuning_config, set_schedule
from .trainer import MetricsLog, TrainResult, describe_model, resume_checkpoint, wrap_for_training

EVAL_STREAM = 1 << 40  # the held-out evaluation's seeds: a stream no training step's (seed, step) can reach


@dataclass
class Rollout:
    """One sampled completion of one problem, as training sees it."""

    prompt: list[int]
    completion: Completion
    correct: bool
    flops: float  # forward FLOPs spent on it (prompt + completion, at the compute it ran)
    reward: float

    def sequence(self) -> tuple[list[int], list[bool]]:
        """Prompt + completion (+ the stop token the policy chose), and per token whether the policy sampled it."""
        tokens = [*self.prompt, *self.completion.tokens]
        sampled = [False] * len(self.prompt) + [not forced for forced in self.completion.forced]
        if self.completion.stop_token is not None:
            tokens.append(self.completion.stop_token)
            sampled.append(True)
        return tokens, sampled


@dataclass
class RLRun:
    config: RLConfig
    train_config: TrainConfig
    info: object
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    train_model: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: object
    optimizers: list
    out_dir: object
    start_step: int = 0


def setup_rl(rl_config: RLConfig, config: TrainConfig, *, resume: bool = False) -> RLRun:
    device = pick_device(config.device)
    info = init_distributed(device)
    dtype = pick_dtype(config.dtype, device)
    seed_everything(config.seed + info.rank)
    if rl_config.prompts_per_step % info.world_size:
        raise ValueError(f"prompts_per_step: {rl_config.prompts_per_step} problems do not split over "
                         f"{info.world_size} ranks; use a multiple of {info.world_size}")
    out_dir = run_dir(config.run_name)
    config = fine_tuning_config(config, rl_config.init_lr_frac, rl_config.num_steps)
    if resume:
        checkpoint = resume_checkpoint(config, out_dir, device)
    else:
        checkpoint = load_checkpoint(resolve_run(rl_config.base), device)
    if checkpoint.tokenizer is None:
        raise ValueError(f"base: {checkpoint.path} has no tokenizer.pkl; RL renders problems with it")
    model = checkpoint.model
    describe_model(model, device)
    reference = None
    if rl_config.kl_coef:  # the frozen starting point of the KL penalty: the base, also when resuming
        reference = load_checkpoint(resolve_run(rl_config.base), device).model if resume else copy.deepcopy(model)
        reference.requires_grad_(False).eval()
    optimizers = build_optimizers(model, config)
    if resume:
        for opt, state in zip(optimizers, checkpoint.optimizer_state["optimizers"], strict=True):
            opt.load_state_dict(state)
        set_rng_state(checkpoint.optimizer_state["rng"])
    print0(f"rl: {rl_config.task}, {rl_config.num_steps} steps of {rl_config.prompts_per_step} problems x "
           f"{rl_config.samples_per_prompt} samples (temperature {rl_config.temperature:g}"
           f"{f', top-k {rl_config.top_k}' if rl_config.top_k else ''}), advantages r - mean"
           f"{' over std' if rl_config.scale_by_std else ''}, {rl_config.ppo_epochs} pass(es) x "
           f"{rl_config.minibatches} minibatch(es), clip [{1 - rl_config.clip_low:g}, {1 + rl_config.clip_high:g}], "
           f"KL {rl_config.kl_coef:g}; learning rates x "
           f"{rl_config.init_lr_frac:g} (matrix {config.matrix_lr:.3g}), linear decay to {config.final_lr_frac:g}")
    return RLRun(rl_config, config, info, device, dtype, model, wrap_for_training(model, config, device, info),
                 reference, checkpoint.tokenizer, optimizers, out_dir, start_step=checkpoint.step if resume else 0)


def step_problems(n_items: int, rl_config: RLConfig, seed: int, step: int, rank: int, world_size: int) -> list[int]:
    """This rank's problems at `step`: a draw without replacement that only depends on (seed, step)."""
    rng = np.random.default_rng([seed, step])
    chosen = rng.choice(n_items, size=min(rl_config.prompts_per_step, n_items), replace=False)
    return [int(i) for i in chosen[rank::world_size]]


def sample_rollouts(run: RLRun, task, items: list[int], samples: int, seed: int) -> list[list[Rollout]]:
    """`samples` completions of each item through one batched engine call; groups in item order."""
    model, tokenizer, config = run.model, run.tokenizer, run.config
    compute = Compute()  # full width: the policy is trained and judged there
    conversations = [task[i] for i in items]
    prompts = [render_for_completion(tokenizer, c) for c in conversations]
    budget = min(config.max_new_tokens, model.config.sequence_len - max(map(len, prompts)))
    if budget < 1:
        raise ValueError(f"task: a {task.name} prompt fills the model's context of {model.config.sequence_len} "
                         "tokens; no room to answer")
    params = SamplingParams(temperature=config.temperature, top_k=config.top_k or None)
    stops = [tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id]
    rows = [p for p in prompts for _ in range(samples)]
    completions = Engine(model, tokenizer).generate(rows, budget, params, seed=seed, stop_tokens=stops,
                                                    compute=compute, tool=calculate)
    groups = []
    for g, conversation in enumerate(conversations):
        group = []
        for done in completions[g * samples:(g + 1) * samples]:
            length = len(prompts[g]) + len(done.tokens)
            flops = length * model.count_flops(max(1, length), compute).forward
            correct = bool(task.evaluate(conversation, tokenizer.decode(done.tokens)))
            group.append(Rollout(prompts[g], done, correct, flops, reward=float(correct)))
        groups.append(group)
    return groups


def _seed(*keys: int) -> int:
    return int(np.random.default_rng(list(keys)).integers(2**31))


def _batch(rollouts: list[Rollout], pad_id: int, device: torch.device):
    """(inputs, targets, sampled mask) for the teacher-forced pass over the rollouts, right-padded."""
    sequences = [r.sequence() for r in rollouts]
    length = max(len(tokens) for tokens, _ in sequences) - 1
    x = torch.full((len(rollouts), length), pad_id, dtype=torch.long)
    y = torch.full((len(rollouts), length), -1, dtype=torch.long)
    mask = torch.zeros((len(rollouts), length), dtype=torch.bool)
    for b, (tokens, sampled) in enumerate(sequences):
        n = len(tokens) - 1
        x[b, :n], y[b, :n] = torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])
        mask[b, :n] = torch.tensor(sampled[1:])
    return x.to(device), y.to(device), mask.to(device)


def _logprobs(run: RLRun, model, x, y) -> torch.Tensor:
    with autocast(run.device, run.dtype):
        logits = model(x)
    return token_logprobs(logits, y, run.config.temperature)


def rl_step(run: RLRun, groups: list[list[Rollout]]) -> dict:
    """The optimisation on one step's rollouts: advantages, then ppo_epochs x minibatches optimizer steps."""
    config = run.config
    rewards = torch.tensor([[r.reward for r in group] for group in groups], dtype=torch.float32)
    advantages = group_advantages(rewards, config.scale_by_std).reshape(-1).to(run.device)
    rollouts = [r for group in groups for r in group]
    x, y, mask = _batch(rollouts, run.tokenizer.bos_id, run.device)
    local_tokens = max(mask.sum().item(), 1)
    # DDP averages gradients over ranks: normalise by every rank's tokens, divided by the number of ranks
    tokens, reward_sum, correct_sum, count = _sum_over_ranks(run, mask.sum().item(), rewards.sum().item(),
                                                             sum(r.correct for r in rollouts), len(rollouts))
    normaliser = max(tokens, 1.0) / run.info.world_size
    with torch.no_grad():
        old = _logprobs(run, run.model, x, y) if config.ppo_epochs * config.minibatches > 1 else None
        ref = _logprobs(run, run.reference, x, y) if run.reference is not None else None
    stats = {"clipped_tokens": 0.0, "kl_sum": 0.0}
    order = torch.arange(len(rollouts))
    for _ in range(config.ppo_epochs):
        for part in order.chunk(config.minibatches):
            logp = _logprobs(run, run.train_model, x[part], y[part])
            base = old[part] if old is not None else logp.detach()  # on-policy: ratio 1, REINFORCE's gradient
            loss, part_stats = policy_loss(logp, base, advantages[part], mask[part], normaliser,
                                           clip_low=config.clip_low, clip_high=config.clip_high,
                                           kl_coef=config.kl_coef, ref_logp=None if ref is None else ref[part])
            loss.backward()
            for key, value in part_stats.items():
                stats[key] += value
            if run.train_config.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.train_config.grad_clip)
            for opt in run.optimizers:
                opt.step()
            run.model.zero_grad(set_to_none=True)
    passes = config.ppo_epochs * local_tokens  # the clip and KL statistics are this rank's
    return {"reward": reward_sum / count, "correct": correct_sum / count,
            "completion_tokens": float(np.mean([len(r.completion.tokens) for r in rollouts])),
            "flops_per_answer": float(np.mean([r.flops for r in rollouts])),
            "clipped_frac": stats["clipped_tokens"] / passes,
            **({"kl": stats["kl_sum"] / passes} if config.kl_coef else {})}


def _sum_over_ranks(run: RLRun, *values: float) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=run.device)
    if run.info.enabled:
        dist.all_reduce(totals)
    return totals.tolist()


def evaluate_pass_at_k(run: RLRun, task, step: int) -> dict:
    """pass@1 and pass@k (k = eval_samples) on the first eval_items held-out problems, sampled at the rollout
    temperature with a seed fixed per problem (the same draws at every evaluation); FLOPs per answer."""
    config = run.config
    n = min(config.eval_items, len(task))
    mine = list(range(run.info.rank, n, run.info.world_size))
    correct: list[list[bool]] = []
    flops = 0.0
    chunk = max(1, 64 // config.eval_samples)
    for start in range(0, len(mine), chunk):
        items = mine[start:start + chunk]
        seed = _seed(run.train_config.seed, EVAL_STREAM, items[0])  # not a training step's stream
        for group in sample_rollouts(run, task, items, config.eval_samples, seed=seed):
            correct.append([r.correct for r in group])
            flops += sum(r.flops for r in group)
    k = config.eval_samples
    solved = [pass_at_k(correct, j) * len(correct) if correct else 0.0 for j in (1, k)]  # a rank may have none
    totals = torch.tensor(_sum_over_ranks(run, *solved, flops, len(correct) * k, len(correct)))
    record = {"step": step, "pass@1": (totals[0] / totals[4]).item(), f"pass@{k}": (totals[1] / totals[4]).item(),
              "eval_flops_per_answer": (totals[2] / totals[3]).item()}
    print0(f"step {step:4d} | held-out {task.name}: pass@1 {record['pass@1']:.1%}, pass@{k} {record[f'pass@{k}']:.1%}"
           f" ({int(totals[4])} problems x {k} samples)")
    return record


def rl(rl_config: RLConfig, config: TrainConfig, train_task, eval_task, *, resume: bool = False,
       progress: bool = True) -> TrainResult:
    """GRPO on `train_task`'s problems, evaluated on `eval_task`'s held-out ones."""
    run = setup_rl(rl_config, config, resume=resume)
    config, info = run.train_config, run.info
    metrics = MetricsLog(run.out_dir / "metrics.jsonl", run.start_step if resume else None, info.is_master)
    result = TrainResult(step=run.start_step, checkpoint=run.out_dir)
    bar = tqdm(total=rl_config.num_steps, initial=run.start_step, desc=f"rl {config.run_name}", unit="step",
               disable=not (progress and info.is_master), dynamic_ncols=True)
    step = run.start_step
    while True:
        last = step >= rl_config.num_steps
        if last or step == 0 or (rl_config.eval_every and step % rl_config.eval_every == 0):
            metrics.log(evaluate_pass_at_k(run, eval_task, step))
        if last:
            break
        t0 = time.perf_counter()
        lr_mult = set_schedule(run.optimizers, step, config)
        items = step_problems(len(train_task), rl_config, config.seed, step, info.rank, info.world_size)
        groups = sample_rollouts(run, train_task, items, rl_config.samples_per_prompt,
                                 seed=_seed(config.seed, step, info.rank))
        t_rollout = time.perf_counter() - t0
        record = rl_step(run, groups)
        step += 1
        dt = time.perf_counter() - t0
        generated = sum(len(r.completion.tokens) for g in groups for r in g)
        record = {"step": step, "lr_mult": lr_mult, "dt": dt, "rollout_s": t_rollout,
                  "rollout_tok_per_s": generated / t_rollout, **record}
        metrics.log(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", correct=f"{record['correct']:.0%}")
        bar.update(1)
        if config.save_every and step % config.save_every == 0 and step < rl_config.num_steps:
            _save(run, step, result)
    bar.close()
    result.step = step
    _save(run, step, result)
    result.metrics = metrics.records
    if info.is_master:
        md, _ = write_rl_report(config.run_name, metrics.records, rl_config.eval_samples,
                                {**rl_config.to_dict(), "seed": config.seed}, rl_config.task)
        print0(f"report: {md}")
    return result


def _save(run: RLRun, step: int, result: TrainResult) -> None:
    if run.info.is_master:
        result.checkpoint = save_checkpoint(run.out_dir, run.model, step=step,
                                            train_config=run.train_config.to_dict(), optimizers=run.optimizers,
                                            tokenizer=run.tokenizer, extra={"rl": run.config.to_dict()})
    if run.info.enabled:
        dist.barrier()
