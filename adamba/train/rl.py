"""Reinforcement learning on verifiable rewards: GRPO from a chat checkpoint (`adamba rl`).

Each step: `prompts_per_step` training problems (a fixed function of the seed and the step, striped across ranks),
`samples_per_prompt` completions each sampled through the batched engine with the calculator executed, a reward per
completion from the task's checker (1 right, 0 wrong), group-relative advantages, and `ppo_epochs` passes of
`minibatches` optimizer steps on the clipped surrogate (train/grpo.py).
Sampled tokens carry the loss; prompt tokens and tool outputs (forced, not chosen by the policy) do not; a stop token
the policy chose does. Held-out pass@1 and pass@k every `eval_every` steps. Checkpoints carry the optimizers; since
every random draw is seeded by (seed, step, rank), `resume` continues exactly.

Compute-aware RL (`flops_price` lambda): the action is a width choice and then the tokens. Each completion's
per-layer Matryoshka widths are sampled from the width predictor's softmax over levels (model/predictor.py; added
to the model if it has none), the completion is generated and teacher-forced at those widths, and the choice's
log-probability is one more action in the clipped surrogate with the completion's advantage (REINFORCE over the
choice, Williams 1992; the KL penalty, if any, covers it too). The reward is correct - lambda * FLOPs spent / the
FLOPs of the prompt and the longest allowed answer at full width, both from the one FLOP counter, the predictor's
own pass included in what is spent: narrower widths and shorter answers both earn.
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
from ..checkpoint import (
    load_checkpoint,
    resolve_run,
    restore_rng_state,
    run_dir,
)
from ..common import autocast, init_distributed, pick_device, pick_dtype, print0, seed_everything
from ..config import RLConfig, TrainConfig
from ..eval.rl_report import write_rl_report
from ..infer.engine import Completion, Engine
from ..infer.sampling import SamplingParams
from ..model.compute import Compute
from ..model.exits import Adaptive
from ..model.predictor import choosable, prediction_flops
from ..surgery.add_predictor import with_width_predictor
from ..tools.calculator import calculate
from .fsdp import inference_copy
from .grpo import group_advantages, pass_at_k, policy_loss, token_logprobs
from .optim import build_optimizers, fine_tuning_config, set_schedule
from .trainer import (
    MetricsLog,
    TrainResult,
    check_fsdp,
    describe_model,
    prepare_model,
    restore_optimizers,
    resume_checkpoint,
    save_training,
    wrap_for_training,
)

EVAL_STREAM = 1 << 40  # the held-out evaluation's seeds: a stream no training step's (seed, step) can reach


@dataclass(frozen=True)
class WidthChoice:
    """The compute half of a compute-aware action: a Matryoshka level per layer, sampled from the width predictor
    (pinned layers -- Mamba, those the predictor reads -- always take the full level)."""

    levels: tuple[int, ...]  # index into config.matryoshka_levels, per layer
    widths: tuple[int, ...]  # the widths they are


@dataclass
class Rollout:
    """One sampled completion of one problem, as training sees it."""

    prompt: list[int]
    completion: Completion
    correct: bool
    flops: float  # forward FLOPs spent on it (prompt + completion, at the compute it ran; the predictor's pass)
    reward: float
    choice: WidthChoice | None = None  # the sampled widths (compute-aware RL), None: full width
    flops_frac: float = 1.0  # flops / the FLOPs of the same tokens at full width

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
    if rl_config.flops_price is not None and not model.config.predictor_layers:
        model = with_width_predictor(model, rl_config.predictor_layers)  # its first choice: uniform over levels
    describe_model(model, device)
    reference = None
    if rl_config.kl_coef:  # the frozen starting point of the KL penalty: the base, also when resuming
        reference = load_checkpoint(resolve_run(rl_config.base), device).model if resume else copy.deepcopy(model)
        if reference.config.predictor_layers != model.config.predictor_layers:  # the base had no predictor
            reference = with_width_predictor(reference, model.config.predictor_layers)
        reference.requires_grad_(False).eval()
    # under FSDP the reference stays whole on every rank: it is only ever run forward, without collectives
    _check_fsdp(rl_config, config, info)
    prepare_model(model, config, device, dtype)
    optimizers = build_optimizers(model, config)
    if resume:
        restore_optimizers(checkpoint, optimizers, model)
        restore_rng_state(checkpoint.optimizer_state["rng"], device, info)
    print0(f"rl: {rl_config.task}, {rl_config.num_steps} steps of {rl_config.prompts_per_step} problems x "
           f"{rl_config.samples_per_prompt} samples (temperature {rl_config.temperature:g}"
           f"{f', top-k {rl_config.top_k}' if rl_config.top_k else ''}), advantages r - mean"
           f"{' over std' if rl_config.scale_by_std else ''}, {rl_config.ppo_epochs} pass(es) x "
           f"{rl_config.minibatches} minibatch(es), clip [{1 - rl_config.clip_low:g}, {1 + rl_config.clip_high:g}], "
           f"KL {rl_config.kl_coef:g}; {_compute_text(rl_config)}; learning rates x "
           f"{rl_config.init_lr_frac:g} (matrix {config.matrix_lr:.3g}), linear decay to {config.final_lr_frac:g}")
    return RLRun(rl_config, config, info, device, dtype, model,
                 wrap_for_training(model, config, device, info, _untrained(model, rl_config)), reference,
                 checkpoint.tokenizer, optimizers, out_dir, start_step=checkpoint.step if resume else 0)


def _check_fsdp(rl_config: RLConfig, config: TrainConfig, info) -> None:
    check_fsdp(config, info)
    # the width predictor runs on hidden states outside the model's forward, which FSDP does not gather for
    if config.fsdp and rl_config.flops_price is not None:
        raise ValueError("flops_price: compute-aware RL does not run under --fsdp yet; train it without --fsdp "
                         "(DDP)")


def _untrained(model, rl_config: RLConfig) -> list:
    """What no RL step gives a gradient: exit and expansion gates, and the predictor without a FLOPs price."""
    heads = model.adaptive_heads
    if heads is None:
        return []
    unused = [*heads.exit_gates.parameters(), *heads.expansion_gates.parameters()]
    return unused if rl_config.flops_price is not None else [*unused, *(heads.predictor.parameters()
                                                                        if heads.predictor is not None else ())]


def _compute_text(rl_config: RLConfig) -> str:
    if rl_config.flops_price is None:
        return "full width"
    return f"widths sampled by the width predictor, FLOPs price {rl_config.flops_price:g}"


def step_problems(n_items: int, rl_config: RLConfig, seed: int, step: int, rank: int, world_size: int) -> list[int]:
    """This rank's problems at `step`: a draw without replacement that only depends on (seed, step)."""
    rng = np.random.default_rng([seed, step])
    chosen = rng.choice(n_items, size=min(rl_config.prompts_per_step, n_items), replace=False)
    return [int(i) for i in chosen[rank::world_size]]


def sample_rollouts(run: RLRun, task, items: list[int], samples: int, seed: int,
                    policy: torch.nn.Module | None = None) -> list[list[Rollout]]:
    """`samples` completions of each item through one batched engine call; groups in item order. Compute-aware:
    each completion first draws its widths (`choose_widths`), and the engine runs every row at its own. `policy`:
    the model that decodes (under FSDP the rank's inference copy; default run.model)."""
    model, tokenizer, config = run.model if policy is None else policy, run.tokenizer, run.config
    conversations = [task[i] for i in items]
    prompts = [render_for_completion(tokenizer, c) for c in conversations]
    budget = min(config.max_new_tokens, model.config.sequence_len - max(map(len, prompts)))
    if budget < 1:
        raise ValueError(f"task: a {task.name} prompt fills the model's context of {model.config.sequence_len} "
                         "tokens; no room to answer")
    params = SamplingParams(temperature=config.temperature, top_k=config.top_k or None)
    stops = [tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id]
    rows = [p for p in prompts for _ in range(samples)]
    choices = choose_widths(run, rows, seed) if config.flops_price is not None else [None] * len(rows)
    completions = Engine(model, tokenizer).generate(rows, budget, params, seed=seed, stop_tokens=stops,
                                                    compute=_rows_compute(choices), tool=calculate)
    groups = []
    for g, conversation in enumerate(conversations):
        group = []
        # priced against the longest answer allowed at full width: narrower widths and shorter answers both spend
        # less (a constant per prompt, so within a group only what the completion spent differs)
        longest = answer_flops(model, len(prompts[g]), budget, None)[0]
        for r in range(g * samples, (g + 1) * samples):
            done, choice = completions[r], choices[r]
            spent, full = answer_flops(model, len(prompts[g]), len(done.tokens), choice)
            correct = bool(task.evaluate(conversation, tokenizer.decode(done.tokens)))
            price = (config.flops_price or 0.0) * spent / longest
            group.append(Rollout(prompts[g], done, correct, spent, reward=float(correct) - price, choice=choice,
                                 flops_frac=spent / full))
        groups.append(group)
    return groups


def answer_flops(model, prompt_tokens: int, completion_tokens: int, choice: WidthChoice | None) -> tuple:
    """(forward FLOPs spent on one completion: prompt and completion at the choice's widths, and the predictor's
    pass over the prompt; the same tokens at full width without a predictor)."""
    length = max(1, prompt_tokens + completion_tokens)
    full = length * model.count_flops(length).forward
    if choice is None:
        return full, full
    spent = length * model.count_flops(length, Compute(width=list(choice.widths))).forward
    return spent + prediction_flops(model.config, prompt_tokens), full


def _rows_compute(choices: list[WidthChoice | None]) -> Compute:
    """Full width, or each row at its own sampled widths."""
    if choices[0] is None:
        return Compute()
    return Compute(adaptive=Adaptive(exit=False, row_widths=tuple(c.widths for c in choices)))


def _padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and each row's length."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
    return ids.to(device), torch.tensor([len(r) for r in rows], device=device)


def _width_logprobs(run: RLRun, model, prompts: list[list[int]]) -> torch.Tensor:
    """(B, n_layer, n_levels) log-probabilities of the levels under the width predictor, from each prompt (levels a
    layer may not take: -inf). The predictor reads detached hidden states, so only its own weights get gradient."""
    ids, valid = _padded(prompts, run.tokenizer.bos_id, run.device)
    with torch.no_grad(), autocast(run.device, run.dtype):
        hidden = model.hidden_after(ids, model.config.predictor_layers)
    return torch.log_softmax(model.adaptive_heads.predictor(hidden, valid), dim=-1)


@torch.no_grad()
def choose_widths(run: RLRun, prompts: list[list[int]], seed: int) -> list[WidthChoice]:
    """A level per layer for each prompt, drawn from the predictor's softmax (seeded: resumes draw the same)."""
    logp = _width_logprobs(run, run.model, prompts).float().cpu()
    generator = torch.Generator().manual_seed(seed)
    B, L, n = logp.shape
    levels = torch.multinomial(logp.exp().view(B * L, n), 1, generator=generator).view(B, L)
    values = run.model.config.matryoshka_levels
    return [WidthChoice(tuple(row), tuple(values[j] for j in row)) for row in levels.tolist()]


def _seed(*keys: int) -> int:
    return int(np.random.default_rng(list(keys)).integers(2**31))


def _batch(rollouts: list[Rollout], pad_id: int, device: torch.device):
    """(inputs, targets, action mask) for the teacher-forced pass over the rollouts, right-padded. The mask marks
    the tokens the policy sampled, and, compute-aware, one more column for each rollout's width choice."""
    sequences = [r.sequence() for r in rollouts]
    length = max(len(tokens) for tokens, _ in sequences) - 1
    x = torch.full((len(rollouts), length), pad_id, dtype=torch.long)
    y = torch.full((len(rollouts), length), -1, dtype=torch.long)
    mask = torch.zeros((len(rollouts), length + (rollouts[0].choice is not None)), dtype=torch.bool)
    for b, (tokens, sampled) in enumerate(sequences):
        n = len(tokens) - 1
        x[b, :n], y[b, :n] = torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])
        mask[b, :n] = torch.tensor(sampled[1:])
    mask[:, length:] = True  # the width choice, if there is one
    return x.to(device), y.to(device), mask.to(device)


def _logprobs(run: RLRun, model, x, y, rollouts: list[Rollout], forward=None) -> torch.Tensor:
    """log pi of each target token (B, T) at its rollout's widths, and compute-aware, the log-probability of the
    width choice as column T. `forward`: the module to run the tokens through (the DDP/compiled wrapper of
    `model` when training); the predictor is called on `model` itself."""
    choices = [r.choice for r in rollouts]
    with autocast(run.device, run.dtype):
        logits = (forward or model)(x, compute=_rows_compute(choices))
    logp = token_logprobs(logits, y, run.config.temperature)
    if choices[0] is None:
        return logp
    table = _width_logprobs(run, model, [r.prompt for r in rollouts])
    levels = torch.tensor([c.levels for c in choices], device=table.device)
    chosen = table.gather(-1, levels[..., None]).squeeze(-1).sum(dim=1)  # pinned layers: log 1 = 0
    return torch.cat([logp, chosen[:, None].to(logp.dtype)], dim=1)


def rl_step(run: RLRun, groups: list[list[Rollout]]) -> dict:
    """The optimisation on one step's rollouts: advantages, then ppo_epochs x minibatches optimizer steps."""
    config = run.config
    rewards = torch.tensor([[r.reward for r in group] for group in groups], dtype=torch.float32)
    advantages = group_advantages(rewards, config.scale_by_std).reshape(-1).to(run.device)
    rollouts = [r for group in groups for r in group]
    x, y, mask = _batch(rollouts, run.tokenizer.bos_id, run.device)
    local_tokens = max(mask.sum().item(), 1)
    # DDP averages gradients over ranks: normalise by every rank's actions, divided by the number of ranks
    tokens, reward_sum, correct_sum, count = _sum_over_ranks(run, mask.sum().item(), rewards.sum().item(),
                                                             sum(r.correct for r in rollouts), len(rollouts))
    normaliser = max(tokens, 1.0) / run.info.world_size
    with torch.no_grad():
        old = _logprobs(run, run.model, x, y, rollouts) if config.ppo_epochs * config.minibatches > 1 else None
        ref = _logprobs(run, run.reference, x, y, rollouts) if run.reference is not None else None
    stats = {"clipped_tokens": 0.0, "kl_sum": 0.0}
    order = torch.arange(len(rollouts))
    for _ in range(config.ppo_epochs):
        for part in order.chunk(config.minibatches):
            logp = _logprobs(run, run.model, x[part], y[part], [rollouts[i] for i in part], run.train_model)
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
            **({"flops_frac": float(np.mean([r.flops_frac for r in rollouts]))} if config.flops_price is not None
               else {}),
            "clipped_frac": stats["clipped_tokens"] / passes,
            **({"kl": stats["kl_sum"] / passes} if config.kl_coef else {})}


def _sum_over_ranks(run: RLRun, *values: float) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=run.device)
    if run.info.enabled:
        dist.all_reduce(totals)
    return totals.tolist()


def evaluate_pass_at_k(run: RLRun, task, step: int, policy: torch.nn.Module | None = None) -> dict:
    """pass@1 and pass@k (k = eval_samples) on the first eval_items held-out problems, sampled at the rollout
    temperature with a seed fixed per problem (the same draws at every evaluation); FLOPs per answer. Compute-aware,
    also the mean FLOPs fraction and, per problem, how many samples were right, their FLOPs fraction and how often
    each level was chosen (the report splits easy from hard problems with these)."""
    config = run.config
    n = min(config.eval_items, len(task))
    mine = list(range(run.info.rank, n, run.info.world_size))
    correct: list[list[bool]] = []
    problems: list[dict] = []
    flops = fractions = 0.0
    chunk = max(1, 64 // config.eval_samples)
    for start in range(0, len(mine), chunk):
        items = mine[start:start + chunk]
        seed = _seed(run.train_config.seed, EVAL_STREAM, items[0])  # not a training step's stream
        for item, group in zip(items, sample_rollouts(run, task, items, config.eval_samples, seed=seed,
                                                      policy=policy), strict=True):
            correct.append([r.correct for r in group])
            flops += sum(r.flops for r in group)
            fractions += sum(r.flops_frac for r in group)
            if config.flops_price is not None:
                problems.append(_problem_record(run, item, group))
    k = config.eval_samples
    solved = [pass_at_k(correct, j) * len(correct) if correct else 0.0 for j in (1, k)]  # a rank may have none
    totals = torch.tensor(_sum_over_ranks(run, *solved, flops, len(correct) * k, len(correct), fractions))
    record = {"step": step, "pass@1": (totals[0] / totals[4]).item(), f"pass@{k}": (totals[1] / totals[4]).item(),
              "eval_flops_per_answer": (totals[2] / totals[3]).item()}
    if config.flops_price is not None:
        record["eval_flops_frac"] = (totals[5] / totals[3]).item()
        record["problems"] = _gathered(run, problems)
    print0(f"step {step:4d} | held-out {task.name}: pass@1 {record['pass@1']:.1%}, pass@{k} {record[f'pass@{k}']:.1%}"
           f" ({int(totals[4])} problems x {k} samples)"
           + (f", FLOPs {record['eval_flops_frac']:.1%} of full width" if "eval_flops_frac" in record else ""))
    return record


def _problem_record(run: RLRun, item: int, group: list[Rollout]) -> dict:
    """One held-out problem's samples: right answers, mean FLOPs fraction, choices per level (choosable layers)."""
    layers = choosable(run.model.config)
    counts = np.bincount([r.choice.levels[i] for r in group for i in layers],
                         minlength=len(run.model.config.matryoshka_levels))
    return {"item": item, "solved": sum(r.correct for r in group), "samples": len(group),
            "flops_frac": float(np.mean([r.flops_frac for r in group])), "levels": counts.tolist()}


def _gathered(run: RLRun, records: list[dict]) -> list[dict]:
    """Every rank's records, in item order."""
    if run.info.enabled:
        parts: list = [None] * run.info.world_size
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["item"])


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
        # under FSDP each rank decodes with its own whole copy of the policy (fsdp.inference_copy)
        if last or step == 0 or (rl_config.eval_every and step % rl_config.eval_every == 0):
            metrics.log(evaluate_pass_at_k(run, eval_task, step, inference_copy(run.model)))
        if last:
            break
        t0 = time.perf_counter()
        policy = inference_copy(run.model)
        lr_mult = set_schedule(run.optimizers, step, config)
        items = step_problems(len(train_task), rl_config, config.seed, step, info.rank, info.world_size)
        groups = sample_rollouts(run, train_task, items, rl_config.samples_per_prompt,
                                 seed=_seed(config.seed, step, info.rank), policy=policy)
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
                                {**rl_config.to_dict(), "seed": config.seed}, rl_config.task,
                                run.model.config.matryoshka_levels)
        print0(f"report: {md}")
    return result


def _save(run: RLRun, step: int, result: TrainResult) -> None:
    path = save_training(run.out_dir, run.model, run.optimizers, step, run.train_config, run.info, run.device,
                         run.tokenizer, extra={"rl": run.config.to_dict()})
    if path is not None:
        result.checkpoint = path
