"""Offline tasks a tiny model learns in minutes: arithmetic and letter counting through the calculator tool,
spelling without it (nanochat's SpellingBee and SimpleSpelling ideas, with words from the embedded corpus).

Each task is a pure function of (split, n, seed). Train and test never share a problem: a problem's split is fixed
by a hash of the problem itself (one in TEST_SHARE goes to test), and items are drawn by rejection within their
split, so a held-out score is on problems no fine-tuning step has seen. Counting and spelling split by the word,
so a test word is in neither task's training set. Test items are distinct problems (an evaluation counts each
once); training items are drawn with replacement, as many as asked for.

Replies are short on purpose (the demo model's context is 256 tokens): the tool call, its output, one sentence.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re

from ..data.corpus import embedded_corpus
from ..tools.calculator import calculate
from .base import Task, final_number, same_number, spoken

TEST_SHARE = 10  # one problem (or word) in ten is held out for evaluation
SPLITS = ("train", "test")
WORD_LENGTHS = (3, 10)  # the corpus words the tasks use, in letters


def split_of(key: str) -> str:
    """The split a problem belongs to, from its key alone (so no seed or size can move it)."""
    return "test" if int(hashlib.sha1(key.encode()).hexdigest(), 16) % TEST_SHARE == 0 else "train"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    return split


class _Drawn(Task):
    """Items drawn by rejection into their split, built once. `draw` returns (split key, conversation)."""

    kind = "generative"

    def __init__(self, split: str = "train", n: int = 1000, seed: int = 0):
        self.split, self.n, self.seed = _check_split(split), n, seed
        rng = random.Random(f"{self.name}-{split}-{seed}")
        self.items: list[dict] = []
        seen: set[str] = set()
        for _ in range(1000 + 100 * n):
            if len(self.items) == n:
                return
            key, item = self.draw(rng)
            question = item["messages"][0]["content"]
            if split_of(key) == split and (split == "train" or question not in seen):
                seen.add(question)
                self.items.append(item)
        raise ValueError(f"n: {self.name}'s {split} split has fewer than {n} distinct problems; ask for fewer")

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def evaluate(self, conversation: dict, answer: str) -> bool:
        """Right when the last number the reply says (after any tool output) is the truth."""
        return same_number(final_number(answer), conversation["truth"])


def tool_reply(expression: str, say: str) -> tuple[list[dict], str]:
    """The assistant parts of a reply that computes `expression` with the calculator, and the value."""
    value = calculate(expression)
    if value is None:
        raise ValueError(f"the calculator refuses {expression!r}")
    return [{"type": "python", "text": expression}, {"type": "python_output", "text": value},
            {"type": "text", "text": say.format(value)}], value


def _conversation(question: str, reply, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], **extra}


class Arithmetic(_Drawn):
    """"What is 347 + 582?" -> calculator call 347 + 582 -> "The answer is 929." (+ and - of 2-3 digit numbers,
    * of 1-2 digit ones). The split key is the problem, "347+582"."""

    name = "arithmetic"

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 99), rng.randint(2, 99)) if op == "*" else (rng.randint(10, 999), rng.randint(10, 999))
        # the call repeats the question's "347 + 582" token for token: the reply copies a span, it does not re-spell it
        parts, value = tool_reply(f"{a} {op} {b}", "The answer is {}.")
        return f"{a}{op}{b}", _conversation(f"What is {a} {op} {b}?", parts, truth=value)


@functools.lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """Lower-case alphabetic words of WORD_LENGTHS letters from the embedded corpus, sorted (deterministic)."""
    low, high = WORD_LENGTHS
    words = set()
    for document in embedded_corpus().documents():
        words.update(w for w in re.findall(r"[a-z]+", document.lower()) if low <= len(w) <= high)
    return tuple(sorted(words))


class Counting(_Drawn):
    """"How many times does the letter r appear in strawberry?" -> 'strawberry'.count('r') -> "The answer is 3.";
    the letter is from the word three times in four, else any letter (so answers of 0 occur too)."""

    name = "counting"

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        word = rng.choice(corpus_words())
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        parts, value = tool_reply(f"'{word}'.count('{letter}')", "The answer is {}.")
        question = f"How many times does the letter {letter} appear in {word}?"
        return word, _conversation(question, parts, truth=value, word=word, letter=letter)


class Spelling(_Drawn):
    """"Spell the word garden" -> "g-a-r-d-e-n": no tool. Right when the reply holds exactly that spelling as a
    whole (so "g-a-r-d-e-n-s" is wrong), whatever words surround it."""

    name = "spelling"

    def draw(self, rng: random.Random) -> tuple[str, dict]:
        word = rng.choice(corpus_words())
        spelt = "-".join(word)
        return word, _conversation(f"Spell the word {word}", spelt, truth=spelt, word=word)

    def evaluate(self, conversation: dict, answer: str) -> bool:
        said = re.sub(r"\s*-\s*", "-", spoken(answer).lower())
        return re.search(rf"(?<![a-z-]){re.escape(conversation['truth'])}(?![a-z-])", said) is not None
