"""CORE (Li et al. 2024, DCLM, section 3.4 and appendix G; nanochat's base-model metric): in-context tasks scored by
the model's own likelihoods, each accuracy centred by its random baseline, CORE = the mean of centred accuracies.

Three task kinds, each item in the DCLM eval bundle's JSONL form:
- multiple_choice {"query", "choices", "gold"}: one context, several continuations; the answer is the choice with
  the lowest mean loss over its own tokens.
- schema {"context_options", "continuation", "gold"}: several contexts, one continuation; the answer is the
  context under which the continuation has the lowest mean loss (Winograd-style).
- language_modeling {"context", "continuation"}: right when greedy decoding reproduces the continuation exactly
  (every continuation token is the argmax after the tokens before it).

A task's items are first shuffled with `random.Random(1337)` (so the first `max_items` are a fixed random subset);
each prompt starts with `num_fewshot` solved examples drawn for the item by `random.Random(1234 + index)` from the
task's other items (never the item itself), each followed by a blank line; context and continuation are joined by
the task's delimiter. A prompt longer than the model's context keeps its end (the scored part) and loses its start.
Requests -- one per choice or context -- are sorted by length and run in batches; each token's loss is read where
the continuation sits. FLOPs spent: every request token at the forward FLOPs per token of a sequence that long.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model.compute import Compute
from .scores import TaskScore

KINDS = ("multiple_choice", "schema", "language_modeling")
# the 22 tasks of the DCLM bundle's core.yaml, as nanochat runs them
CORE_LABELS = frozenset({
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa", "commonsense_qa",
    "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande", "bigbench_dyck_languages",
    "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators", "bigbench_repeat_copy_logic", "squad", "coqa",
    "boolq", "bigbench_language_identification"})
CORE_TASK_COUNT = len(CORE_LABELS)
FEWSHOT_SEED = 1234
ORDER_SEED = 1337  # nanochat shuffles each task's items with this seed, then takes the first --max-per-task


@dataclass(frozen=True)
class CoreTask:
    label: str
    kind: str
    items: Sequence[dict]
    num_fewshot: int = 0
    delimiter: str = " "
    baseline: float = 0.0  # accuracy of random guessing, as a fraction

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.label}: icl_task_type {self.kind!r} is not one of {', '.join(KINDS)}")
        if not 0 <= self.baseline < 1:
            raise ValueError(f"{self.label}: random baseline {self.baseline!r} must be in [0, 1)")


def in_nanochat_order(items: Sequence[dict]) -> list[dict]:
    """A task's items in the order nanochat scores them (and draws few-shot examples from): shuffled with a fixed
    seed, so the first N are a fixed random subset."""
    items = list(items)
    random.Random(ORDER_SEED).shuffle(items)
    return items


def fewshot_examples(task: CoreTask, index: int) -> list[dict]:
    """The solved examples shown before item `index`: a fixed draw from the other items."""
    if task.num_fewshot == 0:
        return []
    others = [i for i in range(len(task.items)) if i != index]
    rng = random.Random(FEWSHOT_SEED + index)
    return [task.items[i] for i in rng.sample(others, min(task.num_fewshot, len(others)))]


def solved(task: CoreTask, item: dict) -> str:
    """An item written out with its answer, as a few-shot example."""
    d = task.delimiter
    if task.kind == "multiple_choice":
        return f"{item['query']}{d}{item['choices'][item['gold']]}"
    if task.kind == "schema":
        return f"{item['context_options'][item['gold']]}{d}{item['continuation']}"
    return f"{item['context'].strip()}{d}{item['continuation']}"


def render(task: CoreTask, index: int) -> list[str]:
    """The prompts of item `index`, few-shot examples first: one per choice (multiple choice), one per context
    (schema); for language modelling the prompt without the continuation, then with it."""
    item, d = task.items[index], task.delimiter
    shots = "".join(solved(task, example) + "\n\n" for example in fewshot_examples(task, index))
    if task.kind == "multiple_choice":
        return [shots + item["query"] + d + choice for choice in item["choices"]]
    if task.kind == "schema":
        return [shots + option + d + item["continuation"] for option in item["context_options"]]
    context = shots + item["context"].strip() + d
    # without its trailing delimiter, so the continuation's first token carries the space as the tokenizer merges it
    return [context.rstrip(), context + item["continuation"]]


@dataclass
class _Request:
    item: int
    option: int
    tokens: list[int]
    start: int  # the scored span: tokens[start:], predicted from the tokens before


def _requests(task: CoreTask, tokenizer, indices: Sequence[int], context: int) -> tuple[list[_Request], int]:
    """Tokenized requests and how many had to be cropped. The scored span (nanochat's rule): multiple choice,
    what follows the tokens all choices share; schema, the tokens all contexts end with; language modelling, what
    the continuation adds to the prompt without it. A request longer than `context` keeps its end."""
    requests, cropped = [], 0
    for index in indices:
        prompts = [tokenizer.encode(p, bos=True) for p in render(task, index)]
        if task.kind == "language_modeling":
            without, whole = prompts
            start = len(without) if whole[:len(without)] == without else _common_length(prompts)
            spans = [(whole, start)]
        elif task.kind == "multiple_choice":
            start = _common_length(prompts)
            spans = [(tokens, start) for tokens in prompts]
        else:
            suffix = _common_length([t[::-1] for t in prompts])
            spans = [(tokens, len(tokens) - suffix) for tokens in prompts]
        for option, (tokens, start) in enumerate(spans):
            if start >= len(tokens) and task.kind == "language_modeling":
                raise ValueError(f"{task.label}: item {index} has an empty continuation")
            start = min(start, len(tokens) - 1)  # identical choices: score their last token (they tie)
            if len(tokens) > context:
                cut = len(tokens) - context
                tokens, start, cropped = tokens[cut:], max(1, start - cut), cropped + 1
            requests.append(_Request(index, option, tokens, max(1, start)))
    return requests, cropped


def _common_length(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence shares."""
    n = 0
    for column in zip(*sequences, strict=False):  # sequences differ in length: the shared part ends at the shortest
        if any(t != column[0] for t in column):
            break
        n += 1
    return n


@dataclass(frozen=True)
class Scored:
    """A continuation's log-likelihood under the model: the sum over its tokens, their number, and whether greedy
    decoding reproduces it (every token the argmax)."""

    logprob: float
    tokens: int
    greedy: bool


@torch.no_grad()
def score_continuations(model, sequences: Sequence[tuple[list[int], int]], compute: Compute | None = None,
                        batch_size: int = 16) -> list[Scored]:
    """For each (tokens, start): the log-likelihood of tokens[start:] given the tokens before them, in batches of
    similar length (right-padded; padding is never read). The one scorer of CORE and the lm-eval adapter."""
    compute = compute or Compute()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    results: list[Scored | None] = [None] * len(sequences)
    for first in range(0, len(order), batch_size):
        chosen = order[first:first + batch_size]
        length = max(len(sequences[i][0]) for i in chosen)
        ids = torch.zeros(len(chosen), length, dtype=torch.long)
        for b, i in enumerate(chosen):
            ids[b, :len(sequences[i][0])] = torch.tensor(sequences[i][0])
        ids = ids.to(device)
        logits = model(ids, compute=compute)
        for b, i in enumerate(chosen):
            tokens, start = sequences[i]
            targets = ids[b, start:len(tokens)]
            predicted = torch.log_softmax(logits[b, start - 1:len(tokens) - 1].float(), dim=-1)  # the scored rows
            results[i] = Scored(predicted.gather(-1, targets[:, None]).sum().item(), len(targets),
                                bool((predicted.argmax(-1) == targets).all()))
    return results


def evaluate_core_task(model, tokenizer, task: CoreTask, *, compute: Compute | None = None, mode: str = "full",
                       max_items: int | None = None, batch_size: int = 16, rank: int = 0,
                       world_size: int = 1) -> TaskScore:
    """Score the first `max_items` items of `task` (None: all) at `compute`, striped across ranks."""
    compute = compute or Compute()
    n = len(task.items) if max_items is None else min(max_items, len(task.items))
    mine = list(range(rank, n, world_size))
    requests, cropped = _requests(task, tokenizer, mine, model.config.sequence_len)
    scored = score_continuations(model, [(r.tokens, r.start) for r in requests], compute, batch_size)
    per_token = {n: model.count_flops(n, compute).forward for n in {len(r.tokens) for r in requests}}
    flops = sum(len(r.tokens) * per_token[len(r.tokens)] for r in requests)
    by_item: dict[int, list[int]] = {}
    for i, request in enumerate(requests):
        by_item.setdefault(request.item, []).append(i)
    correct = 0
    for index, ids in by_item.items():
        if task.kind == "language_modeling":
            correct += scored[ids[0]].greedy
        else:  # the lowest mean loss: the highest mean log-likelihood per token
            means = [scored[i].logprob / scored[i].tokens for i in ids]
            correct += means.index(max(means)) == task.items[index]["gold"]
    totals = torch.tensor([correct, len(mine), flops, cropped], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(totals)
    return TaskScore(task.label, mode, int(totals[0]), int(totals[1]), task.baseline, float(totals[2]),
                     int(totals[3]), kind=task.kind)
