"""The chat evaluation harness on models whose answers are known: logits rigged towards the right or a wrong letter,
and scripted generations; ChatCORE and FLOPs by hand; the report files."""

import re

import pytest
import torch
from conftest import tiny_config

from adamba import AdambaLM
from adamba.chat.render import render_for_completion
from adamba.eval.chat_eval import TaskScore, chat_core, evaluate_task, markdown, write_chat_report
from adamba.infer import engine as engine_module
from adamba.model.compute import Compute

LETTERS = ["A", "B", "C", "D"]


class Quiz:
    """Multiple choice: 'which is N?' with the answer letter given per item."""

    name, kind, baseline = "quiz", "categorical", 0.25

    def __init__(self, answers: list[str]):
        self.answers = answers

    def __len__(self):
        return len(self.answers)

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"question {i}: which one?"},
                             {"role": "assistant", "content": self.answers[i]}],
                "letters": LETTERS, "answer": self.answers[i]}

    def evaluate(self, conversation, answer):
        return answer == conversation["answer"]


class Sums:
    """Generative: 'what is a+b?', right when the completion's last number is the sum."""

    name, kind, baseline = "sums", "generative", 0.0

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"what is {i}+{i + 1}?"},
                             {"role": "assistant", "content": str(2 * i + 1)}], "truth": str(2 * i + 1)}

    def evaluate(self, conversation, completion):
        numbers = re.findall(r"\d+", completion)
        return bool(numbers) and numbers[-1] == conversation["truth"]


class RiggedLetters(AdambaLM):
    """A real tiny model whose logits are pushed, for each prompt, towards one letter chosen by the test."""

    def __init__(self, config, tokenizer, pick):
        super().__init__(config)
        self.tokenizer, self.pick = tokenizer, pick  # pick(prompt ids) -> the letter to push

    def forward(self, idx, *args, **kwargs):
        logits = super().forward(idx, *args, **kwargs)
        for b, row in enumerate(idx.tolist()):
            while len(row) > 1 and row[-1] == self.tokenizer.bos_id:
                row.pop()  # the right padding
            logits[b, :, self.tokenizer.encode(self.pick(row))[0]] += 1e4
        return logits


@pytest.fixture
def letter_tokenizer(tokenizer):
    for letter in LETTERS:
        assert len(tokenizer.encode(letter)) == 1
    return tokenizer


def test_categorical_is_scored_by_the_letters_logits(letter_tokenizer):
    tokenizer = letter_tokenizer
    answers = ["A", "C", "B", "D", "C", "A", "B"]
    task = Quiz(answers)
    prompts = {tuple(render_for_completion(tokenizer, task[i])): answers[i] for i in range(len(task))}
    config = tiny_config(vocab_size=tokenizer.vocab_size, sequence_len=64)
    right = RiggedLetters(config, tokenizer, lambda row: prompts[tuple(row)])
    wrong = RiggedLetters(config, tokenizer, lambda row: LETTERS[(LETTERS.index(prompts[tuple(row)]) + 1) % 4])
    assert evaluate_task(right, tokenizer, task, batch_size=3).correct == len(task)
    scored = evaluate_task(wrong, tokenizer, task, batch_size=3)
    assert (scored.correct, scored.total, scored.accuracy) == (0, len(task), 0.0)
    # only the choices' letters compete: a letter outside them never wins, however large its logit
    outside = RiggedLetters(config, tokenizer, lambda row: "E")
    task_ab = Quiz(["B"] * 4)
    task_ab.__class__ = type("QuizAB", (Quiz,), {"__getitem__": lambda self, i: {**Quiz.__getitem__(self, i),
                                                                                  "letters": ["A", "B"]}})
    assert evaluate_task(outside, tokenizer, task_ab).total == 4
    # FLOPs: every prompt token at the mode's forward FLOPs per token, at the prompt's context (hand sum)
    half = Compute(width=config.n_embd // 2)
    spent = evaluate_task(right, tokenizer, task, compute=half, items=4).flops
    want = sum(len(p) * right.count_flops(len(p), half).forward for p in list(prompts)[:4])
    assert spent == pytest.approx(want)
    assert spent < evaluate_task(right, tokenizer, task, items=4).flops


def test_generative_is_scored_on_the_generated_text(tokenizer, monkeypatch):
    task = Sums()
    model = AdambaLM(tiny_config(vocab_size=tokenizer.vocab_size, sequence_len=64)).eval()
    stop = tokenizer.special_id("<|assistant_end|>")

    def scripted(texts):
        scripts = [tokenizer.encode(t) + [stop] for t in texts]
        cursor = [0] * len(scripts)

        def sample(logits, params, generator):
            out = [s[c] if c < len(s) else stop for s, c in zip(scripts, cursor, strict=True)]
            for b in range(len(cursor)):
                cursor[b] += 1
            return torch.tensor(out)
        return sample

    monkeypatch.setattr(engine_module, "sample", scripted(["It is 1.", "It is 3.", "It is 5."]))
    right = evaluate_task(model, tokenizer, task, batch_size=3)
    monkeypatch.setattr(engine_module, "sample", scripted(["It is 2.", "It is 9.", "It is 3 or 4."]))
    wrong = evaluate_task(model, tokenizer, task, batch_size=3)
    assert (right.correct, wrong.correct, right.total) == (3, 0, 3)
    # the tokens fed through the model are counted: the prompt, then each answer token ("It is N."; the
    # <|assistant_end|> sampled after the last one is never fed)
    prompts = [render_for_completion(tokenizer, task[i]) for i in range(3)]
    answer = [len(tokenizer.encode(f"It is {2 * i + 1}.")) for i in range(3)]
    want = sum((len(p) + a) * model.count_flops(len(p) + a).forward for p, a in zip(prompts, answer, strict=True))
    assert right.flops == pytest.approx(want)


def test_chat_core_is_the_centred_mean_and_the_report_is_written(tmp_path):
    scores = [TaskScore("quiz", "full", 10, 20, 0.25, 1e9), TaskScore("sums", "full", 3, 4, 0.0, 2e9),
              TaskScore("quiz", "ghost", 5, 20, 0.25, 4e8), TaskScore("sums", "ghost", 0, 4, 0.0, 5e8)]
    # by hand: full ((0.5 - 0.25) / 0.75 + 0.75) / 2; ghost (0 + 0) / 2
    assert chat_core(scores[:2]) == pytest.approx((1 / 3 + 0.75) / 2)
    assert chat_core(scores[2:]) == pytest.approx(0.0)
    table = markdown(scores)
    assert "| quiz | 50.0% (10/20) | 25.0% (5/20) |" in table and "| GFLOPs spent | 3 | 0.9 |" in table
    md, png = write_chat_report("evalrun", scores, "ckpt", "note")
    assert md.read_text().count("| sums |") == 1 and png.stat().st_size > 1000


def test_a_prompt_longer_than_the_context_keeps_bos_and_its_end(letter_tokenizer):
    """A question too long for the context is cut at its start (bos kept), counted, and still scored: the rigged
    model recognises only the prompt cut the way the test cuts it here."""
    tokenizer = letter_tokenizer
    long = Quiz(["C", "A"])
    long.__class__ = type("LongQuiz", (Quiz,), {"__getitem__": lambda self, i: {
        **Quiz.__getitem__(self, i), "messages": [{"role": "user", "content": "words " * 60 + f"item {i}"},
                                                  {"role": "assistant", "content": self.answers[i]}]}})
    context = 32
    full = [render_for_completion(tokenizer, long[i]) for i in range(2)]
    assert all(len(p) > context for p in full)
    keep = context - 1  # one position is left for the letter
    cut = {tuple([p[0], *p[-(keep - 1):]]): long.answers[i] for i, p in enumerate(full)}
    assert len(cut) == 2 and all(len(c) == keep for c in cut)
    model = RiggedLetters(tiny_config(vocab_size=tokenizer.vocab_size, sequence_len=context), tokenizer,
                          lambda row: cut.get(tuple(row), "B"))
    score = evaluate_task(model, tokenizer, long)
    assert (score.correct, score.total, score.cropped) == (2, 2, 2)
    assert "2 cropped" in markdown([score])
