"""The task protocol: a task is a sequence of conversations that can judge an answer to each.

A conversation is nanochat's dict (chat/render.py); its last message is the reference assistant answer, which
fine-tuning learns and evaluation withholds. `kind` says how evaluation asks: "categorical" items carry
`letters` (the choices' letters) and `answer` (the right one), and are scored on the letters' logits;
"generative" items are answered by sampling, and `evaluate` judges the decoded reply (tool calls and their
outputs included, as special-token strings). `baseline` is chance accuracy, the zero of nanochat's centred
ChatCORE. Items are a pure function of the task's arguments: the same index gives the same conversation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

LETTERS = "ABCDEFGHIJ"
KINDS = ("categorical", "generative")
SPECIAL_TOKEN = re.compile(r"<\|[a-z_]+\|>")  # how a decoded reply shows <|python_start|>, <|output_end|>, ...


class Task:
    """Subclasses set `name` and `kind` and give `__len__` and `__getitem__`; categorical tasks inherit
    `evaluate` (the chosen letter against `answer`), generative ones write their own checker."""

    name: str = "task"
    kind: str = "generative"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def evaluate(self, conversation: dict, answer: str) -> bool:
        """Whether `answer` (the chosen letter, or the generated text) is right for this item."""
        if self.kind == "categorical":
            return answer == conversation["answer"]
        raise NotImplementedError(f"{self.name} is for training only: it has no evaluation")

    @property
    def baseline(self) -> float:
        if self.kind != "categorical" or not len(self):
            return 0.0
        return float(np.mean([1 / len(item["letters"]) for item in self]))


def _index(i: int, n: int) -> int:
    """`i` as a position in 0..n-1 (negative counts from the end); IndexError beyond, which ends iteration."""
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of range for {n} items")
    return i % n


class Items(Task):
    """A task over a list of conversations built up front."""

    def __init__(self, name: str, kind: str, items: Sequence[dict]):
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {KINDS}")
        self.name, self.kind, self.items = name, kind, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class NumericAnswers(Items):
    """Generative items whose reply is right when its last stated number is the item's "truth" (e.g. GSM8K's
    train split, for reinforcement learning)."""

    def __init__(self, name: str, items: Sequence[dict]):
        super().__init__(name, "generative", items)

    def evaluate(self, conversation: dict, answer: str) -> bool:
        return same_number(final_number(answer), conversation["truth"])


class Subset(Task):
    """Items start..stop-1 of `task` (stop None: to the end), judged by it: e.g. a validation split."""

    def __init__(self, task: Task, start: int = 0, stop: int | None = None):
        stop = len(task) if stop is None else min(stop, len(task))
        if not 0 <= start <= stop:
            raise ValueError(f"start: {start} must lie in 0..{stop} (the subset's end, at most {len(task)} items)")
        self.task, self.start, self.stop = task, start, stop
        self.name, self.kind = task.name, task.kind

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict:
        return self.task[self.start + _index(i, len(self))]

    def evaluate(self, conversation: dict, answer: str) -> bool:
        return self.task.evaluate(conversation, answer)


class _Combined(Task):
    """Items of several tasks through an index of (task, item) pairs; each item is judged by its own task."""

    def __init__(self, tasks: Sequence[Task], index: list[tuple[int, int]], name: str):
        if not tasks:
            raise ValueError(f"tasks: {name} needs at least one task")
        self.tasks, self.index, self.name = list(tasks), index, name
        kinds = {task.kind for task in self.tasks}
        self.kind = kinds.pop() if len(kinds) == 1 else "generative"  # a mix is only ever trained on

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        t, j = self.index[_index(i, len(self))]
        return self.tasks[t][j]

    def task_of(self, i: int) -> Task:
        return self.tasks[self.index[_index(i, len(self))][0]]


class TaskSequence(_Combined):
    """The tasks one after the other, in order."""

    def __init__(self, tasks: Sequence[Task], name: str = "sequence"):
        super().__init__(tasks, [(t, i) for t, task in enumerate(tasks) for i in range(len(task))], name)


class TaskMixture(_Combined):
    """Every item of every task, in one shuffled order that is a fixed function of the seed (nanochat's
    TaskMixture: a task appears as often as it has items, so repeat a task in `tasks` to weight it up)."""

    def __init__(self, tasks: Sequence[Task], seed: int = 0, name: str = "mixture"):
        index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        order = np.random.default_rng(seed).permutation(len(index))
        super().__init__(tasks, [index[k] for k in order], name)


def multiple_choice(question: str, choices: Sequence[str], answer: int, **extra) -> dict:
    """A categorical conversation whose reference reply is the right letter. The letter follows its choice
    ("- Paris=A"), as in nanochat's render_mc: a small model then reads the choice before the letter it must
    predict, and the letter is one token after "=" in the tokenizers we train."""
    if not 2 <= len(choices) <= len(LETTERS) or not 0 <= answer < len(choices):
        raise ValueError(f"choices: {len(choices)} choices with answer {answer}; need 2..{len(LETTERS)} choices "
                         "and an answer index among them")
    letters = list(LETTERS[:len(choices)])
    listed = "\n".join(f"- {choice}={letter}" for choice, letter in zip(choices, letters, strict=True))
    text = f"Multiple choice question: {question}\n{listed}\n\nAnswer with the letter of the right choice only."
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": letters[answer]}],
            "letters": letters, "answer": letters[answer], **extra}


def spoken(text: str) -> str:
    """What the reply says in its own words: the text after its last tool output, special-token strings removed
    (so a number inside a tool call or its result does not count as the answer)."""
    return SPECIAL_TOKEN.sub(" ", text.rsplit("<|output_end|>", 1)[-1])


def final_number(text: str) -> str | None:
    """The last number the reply states (see `spoken`), thousands separators dropped: "1,234." -> "1234"."""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", spoken(text))
    return numbers[-1].replace(",", "") if numbers else None


def canonical_number(text: str) -> str:
    """'18.00', '18.' and '18' read the same (exactly, as decimals: no float rounding of long numbers)."""
    try:
        value = Decimal(text.replace(",", "").rstrip("."))
    except InvalidOperation:
        return text
    if not value.is_finite():
        return text
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def same_number(said: str | None, truth: str) -> bool:
    return said is not None and canonical_number(said) == canonical_number(truth)
