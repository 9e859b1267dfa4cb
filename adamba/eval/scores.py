"""A task's score at one compute mode, and the centred mean over tasks that ChatCORE (eval/chat_eval.py) and CORE
(eval/core.py) both report: (accuracy - chance) / (1 - chance), averaged (DCLM's CORE; nanochat's ChatCORE)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class TaskScore:
    task: str
    mode: str
    correct: int
    total: int
    baseline: float  # chance accuracy
    flops: float  # forward FLOPs spent on the task's items
    cropped: int = 0  # prompts or requests longer than the context, whose start was cut off
    kind: str = ""  # CORE's task kind (multiple_choice, schema, language_modeling); chat tasks leave it empty

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def centred(self) -> float:
        """0 at chance, 1 when every item is right."""
        return (self.accuracy - self.baseline) / (1 - self.baseline)


def centred_mean(scores: Sequence[TaskScore]) -> float:
    return sum(s.centred for s in scores) / len(scores)
