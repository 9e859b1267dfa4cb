"""Chat evaluation: tasks scored on a chat model at each compute mode, with the FLOPs actually spent.

Two kinds of task (adamba/tasks): *categorical* (multiple choice) -- the prompt is the conversation up to the
assistant's turn, and the answer is the choice letter with the highest logit among the choices' letters (nanochat's
way: only the letters compete, so a small model that has not learnt the answer format is still scored on what it
prefers); *generative* -- the model answers greedily through the engine, with the calculator tool executed, and the
task checks the text. ChatCORE is nanochat's centred mean over tasks: (accuracy - chance) / (1 - chance).

FLOPs are counted from what ran: every prompt token and generated token, each at the mode's forward FLOPs per token
(model.count_flops, at the context the item reached). Items are striped across ranks under torchrun and summed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from ..chat.render import render_for_completion
from ..common import write_atomic
from ..infer.engine import Engine
from ..infer.sampling import SamplingParams
from ..model.compute import Compute
from .report_files import plt, report_dir, save_figure
from .scores import TaskScore, centred_mean

GREEDY = SamplingParams(temperature=0.0)


def chat_core(scores: Sequence[TaskScore]) -> float:
    """nanochat's ChatCORE: the mean centred accuracy."""
    return centred_mean(scores)


def evaluate_task(model, tokenizer, task, *, compute: Compute | None = None, mode: str = "full",
                  items: int | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                  tool: Callable[[str], str | None] | None = None, rank: int = 0, world_size: int = 1) -> TaskScore:
    """Score the first `items` items of `task` (None: all) at `compute`; `tool` is run for generative tasks'
    tool calls (None: calls are not executed)."""
    compute = compute or Compute()
    n = len(task) if items is None else min(items, len(task))
    mine = list(range(rank, n, world_size))
    score = _categorical if task.kind == "categorical" else _generative
    # a generative prompt leaves room for its answer
    room = 1 if task.kind == "categorical" else min(max_new_tokens, model.config.sequence_len // 2)
    correct, flops, cropped = 0, 0.0, 0
    for start in range(0, len(mine), batch_size):
        conversations = [task[i] for i in mine[start:start + batch_size]]
        prompts = [render_for_completion(tokenizer, c) for c in conversations]
        cropped += sum(len(p) > model.config.sequence_len - room for p in prompts)
        prompts = [_crop(p, model.config.sequence_len - room) for p in prompts]
        c, f = score(model, tokenizer, task, conversations, prompts, compute, max_new_tokens=max_new_tokens,
                     tool=tool)
        correct, flops = correct + c, flops + f
    totals = torch.tensor([correct, len(mine), flops, cropped], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(totals)
    return TaskScore(task.name, mode, int(totals[0]), int(totals[1]), task.baseline, float(totals[2]),
                     int(totals[3]))


def _crop(prompt: list[int], limit: int) -> list[int]:
    """A prompt that does not fit keeps <|bos|> and its last tokens: the end holds the choices or the question's
    last words and the primed assistant turn, which the answer depends on most."""
    return prompt if len(prompt) <= limit else [prompt[0], *prompt[len(prompt) - limit + 1:]]


def _spent(model, compute: Compute, tokens: int, context: int) -> float:
    return tokens * model.count_flops(max(1, context), compute).forward


@torch.no_grad()
def _categorical(model, tokenizer, task, conversations: list[dict], prompts: list[list[int]], compute: Compute,
                 **_) -> tuple[int, float]:
    """Right-padded prompts in one forward; each row's answer is its best letter at its last prompt token."""
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), max(map(len, prompts))), tokenizer.bos_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    was_training = model.training
    model.eval()
    logits = model(ids, compute=compute)
    model.train(was_training)
    correct = 0
    for b, (conversation, prompt) in enumerate(zip(conversations, prompts, strict=True)):
        letters = conversation["letters"]
        letter_ids = [_single_token(tokenizer, letter) for letter in letters]
        choice = letters[int(logits[b, len(prompt) - 1, letter_ids].argmax())]
        correct += bool(task.evaluate(conversation, choice))
    flops = sum(_spent(model, compute, len(p), len(p)) for p in prompts)
    return correct, flops


def _single_token(tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"letters: {letter!r} is {len(ids)} tokens in this tokenizer; a choice letter must be one")
    return ids[0]


def _generative(model, tokenizer, task, conversations: list[dict], prompts: list[list[int]], compute: Compute, *,
                max_new_tokens: int, tool) -> tuple[int, float]:
    context = model.config.sequence_len
    budget = [min(max_new_tokens, context - len(p)) for p in prompts]
    stops = [tokenizer.special_id("<|assistant_end|>"), tokenizer.bos_id]
    completions = Engine(model, tokenizer).generate(prompts, max(1, max(budget)), GREEDY, stop_tokens=stops,
                                                    compute=compute, tool=tool)
    correct, flops = 0, 0.0
    for conversation, prompt, done in zip(conversations, prompts, completions, strict=True):
        correct += bool(task.evaluate(conversation, tokenizer.decode(done.tokens)))
        flops += _spent(model, compute, len(prompt) + len(done.tokens), len(prompt) + len(done.tokens))
    return correct, flops


def markdown(scores: Sequence[TaskScore]) -> str:
    """One row per task, one column per mode; a mode that did not run a task shows "-" there, and its ChatCORE
    (a mean over every task) only when it ran them all."""
    modes = list(dict.fromkeys(s.mode for s in scores))
    tasks = list(dict.fromkeys(s.task for s in scores))
    table = {(s.task, s.mode): s for s in scores}

    def cell(score: TaskScore | None) -> str:
        if score is None:
            return "-"
        return (f"{100 * score.accuracy:.1f}% ({score.correct}/{score.total})"
                + (f", {score.cropped} cropped" if score.cropped else ""))

    def core(mode: str) -> str:
        ran = [table.get((t, mode)) for t in tasks]
        return f"{chat_core(ran):.3f}" if all(ran) else "-"

    lines = ["| task | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    lines += [f"| {task} | " + " | ".join(cell(table.get((task, m))) for m in modes) + " |" for task in tasks]
    lines.append("| **ChatCORE** | " + " | ".join(core(m) for m in modes) + " |")
    lines.append("| GFLOPs spent | " + " | ".join(f"{sum(s.flops for s in scores if s.mode == m) / 1e9:.3g}"
                                                  for m in modes) + " |")
    return "\n".join(lines)


def write_chat_report(name: str, scores: Sequence[TaskScore], source: str, note: str = "") -> tuple:
    """Markdown table and a PNG of accuracy against FLOPs spent, per task, one point per mode."""
    out = report_dir(name)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set(xlabel="forward FLOPs spent on the task (prompts + answers)", ylabel="accuracy",
           title=f"chat evaluation of {name}", xscale="log", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    for task in dict.fromkeys(s.task for s in scores):
        points = [s for s in scores if s.task == task]
        ax.plot([s.flops for s in points], [s.accuracy for s in points], marker="o", label=task)
        for s in points:
            ax.annotate(s.mode, (s.flops, s.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.legend(fontsize=8)
    png = save_figure(fig, out / "chat.png")
    md = write_atomic(out / "chat.md", f"# Chat evaluation: {name}\n\nCheckpoint: `{source}`. {note}\n\n"
                                       f"{markdown(scores)}\n\n![accuracy against FLOPs](chat.png)\n")
    return md, png
