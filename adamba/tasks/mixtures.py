"""The named sets the CLI and the demo use: SFT mixtures (train, validation, chat-eval tasks) and evaluation tasks.

"offline" needs no network: the synthetic tasks (synthetic.py) and the identity set. Its validation
conversations and its evaluation items come from the test splits, which share no problem with the training ones.
"smoltalk" is nanochat's mixture from the Hub (hf_sources.py): SmolTalk, MMLU auxiliary_train, GSM8K train,
identity, spelling and counting.
"""

from __future__ import annotations

from collections.abc import Callable

from ..common import print0
from ..eval.chat_eval import evaluate_task
from ..tools.calculator import calculate
from .base import Items, Task, TaskMixture
from .bundled import ARC, GSM8K, MMLU
from .customjson import identity
from .humaneval import HumanEval
from .synthetic import Arithmetic, Counting, Spelling

# arithmetic, the hardest to learn (copying operands into the call), gets most of the steps
OFFLINE_SIZES = {"arithmetic": 12000, "counting": 2000, "spelling": 2000}
SMOLTALK_SYNTHETIC = {"counting": 20000, "spelling": 20000}
EVAL_ITEMS = 200  # items of each synthetic evaluation task
EVAL_SEED = 1234
SYNTHETIC = {"arithmetic": Arithmetic, "counting": Counting, "spelling": Spelling}
EVAL_TASKS: dict[str, Callable[[], Task]] = {
    **{name: (lambda cls=cls: cls("test", EVAL_ITEMS, EVAL_SEED)) for name, cls in SYNTHETIC.items()},
    "arc-easy": lambda: ARC("easy"), "arc-challenge": lambda: ARC("challenge"), "mmlu": MMLU, "gsm8k": GSM8K,
    "humaneval": HumanEval,
}
MIXTURES = ("offline", "smoltalk")
RL_TRAIN_ITEMS = 4000  # training problems of a synthetic RL task


def _gsm8k_rl(seed: int) -> tuple[Task, Task]:
    from .hf_sources import gsm8k_hf

    return gsm8k_hf("train"), GSM8K()


RL_TASKS: dict[str, Callable[[int], tuple[Task, Task]]] = {
    **{name: (lambda seed, name=name: (SYNTHETIC[name]("train", RL_TRAIN_ITEMS, seed), eval_task(name)))
       for name in ("arithmetic", "counting")},
    "gsm8k": _gsm8k_rl,
}


def rl_task(name: str, seed: int) -> tuple[Task, Task]:
    """(training problems, held-out problems) of an RL task: the held-out ones are the chat evaluation's."""
    if name not in RL_TASKS:
        raise ValueError(f"task: {name!r} is not an RL task; choose from {', '.join(RL_TASKS)}")
    return RL_TASKS[name](seed)


def eval_task(name: str) -> Task:
    if name not in EVAL_TASKS:
        raise ValueError(f"--tasks: {name!r} is not a task; choose from {', '.join(EVAL_TASKS)}")
    return EVAL_TASKS[name]()


def sft_mixture(name: str, seed: int, val_n: int) -> tuple[Task, Task, list[Task]]:
    """(training conversations, val_n held-out ones for the validation loss, tasks for the chat eval)."""
    if name == "offline":
        train = TaskMixture([cls("train", OFFLINE_SIZES[n], seed) for n, cls in SYNTHETIC.items()] + [identity()],
                            seed, name)
        held_out = TaskMixture([cls("test", val_n, seed + 1) for cls in SYNTHETIC.values()], seed)
        val = Items("validation", "generative", [held_out[i] for i in range(val_n)])
        return train, val, [eval_task(n) for n in SYNTHETIC]
    if name == "smoltalk":
        from .hf_sources import gsm8k_hf, mmlu_auxiliary_train, smoltalk

        synthetic = [SYNTHETIC[n]("train", size, seed) for n, size in SMOLTALK_SYNTHETIC.items()]
        train = TaskMixture([smoltalk("train"), mmlu_auxiliary_train(), gsm8k_hf("train"), identity(), identity(),
                             *synthetic], seed, name)
        test = smoltalk("test")
        return train, Items("validation", "generative", test.items[:val_n]), [eval_task("gsm8k"),
                                                                            eval_task("arc-easy")]
    raise ValueError(f"mixture: {name!r} is not a mixture; choose from {', '.join(MIXTURES)}")


def chat_eval_callback(tasks: list[Task], items: int):
    """A small chat evaluation for fine-tuning (train/sft.py's ChatEval): accuracy on the first `items` items of
    each task, tools executed; None when there is nothing to evaluate."""
    if not tasks or not items:
        return None

    def chat_eval(model, run, step: int) -> dict:
        scores = {f"chat/{task.name}": evaluate_task(model, run.tokenizer, task, items=items, tool=calculate,
                                                     rank=run.info.rank, world_size=run.info.world_size).accuracy
                  for task in tasks}
        print0(f"step {step:5d} | chat eval: " + ", ".join(f"{k[5:]} {v:.0%}" for k, v in scores.items()))
        return scores
    return chat_eval
