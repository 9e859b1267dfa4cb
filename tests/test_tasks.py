"""The tasks (adamba/tasks/): reference answers recomputed here, splits that never overlap, determinism, checkers
that say right and wrong, CustomJSON's errors, what the bundled wheels hold, HumanEval's checker, the mixtures,
and the Hub sources through a local HTTP server."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adamba.tasks import humaneval as he
from adamba.tasks.base import Items, TaskMixture, TaskSequence, final_number, multiple_choice
from adamba.tasks.bundled import ARC, GSM8K, MMLU, gsm8k_conversation
from adamba.tasks.customjson import CustomJSON, identity
from adamba.tasks.mixtures import eval_task, sft_mixture
from adamba.tasks.synthetic import Arithmetic, Counting, Spelling, corpus_words, split_of

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def question(item: dict) -> str:
    return item["messages"][0]["content"]


def reply_parts(item: dict) -> list[dict]:
    return item["messages"][-1]["content"]


# ---------------------------------------------------------------------------------------------------------------
# synthetic tasks


def test_arithmetic_reference_answers_and_tool_call():
    for item in Arithmetic("train", 300, seed=3):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question(item)).groups()
        truth = OPS[op](int(a), int(b))
        python, output, text = reply_parts(item)
        assert python == {"type": "python", "text": f"{a} {op} {b}"}
        assert output == {"type": "python_output", "text": str(truth)}
        assert text["text"] == f"The answer is {truth}."
        assert item["truth"] == str(truth)


def test_counting_and_spelling_reference_answers():
    for item in Counting("train", 200, seed=1):
        word, letter = item["word"], item["letter"]
        assert question(item) == f"How many times does the letter {letter} appear in {word}?"
        assert item["truth"] == str(word.count(letter))
        assert reply_parts(item)[0]["text"] == f"'{word}'.count('{letter}')"
    for item in Spelling("train", 200, seed=1):
        assert item["messages"][-1]["content"] == "-".join(item["word"])


@pytest.mark.parametrize("cls", [Arithmetic, Counting, Spelling])
def test_splits_are_disjoint_deterministic_and_test_items_distinct(cls):
    train, test = cls("train", 3000, seed=0), cls("test", 150, seed=5)
    assert not {question(t) for t in train} & {question(t) for t in test}
    assert len({question(t) for t in test}) == len(test) == 150
    assert [question(t) for t in cls("test", 150, seed=5)] == [question(t) for t in test]
    assert [question(t) for t in cls("test", 150, seed=6)] != [question(t) for t in test]


def test_words_held_out_for_counting_are_never_spelt_in_training():
    """Counting and spelling split by the word: a test word appears in neither training set."""
    test_words = {t["word"] for t in Counting("test", 150, seed=0)} | {t["word"] for t in Spelling("test", 150)}
    train_words = {t["word"] for t in Counting("train", 3000, seed=0)} | {t["word"] for t in Spelling("train", 3000)}
    assert not test_words & train_words


def test_generative_checkers_say_right_and_wrong():
    task = Arithmetic("test", 1, seed=0)
    item = task[0]
    truth = int(item["truth"])
    assert task.evaluate(item, f"The answer is {truth}.")
    assert task.evaluate(item, f"<|python_start|>x<|python_end|><|output_start|>{truth + 1}<|output_end|>It is {truth}")
    assert not task.evaluate(item, f"The answer is {truth + 1}.")
    # the number inside the tool's output is not the answer: what the reply says after it is
    assert not task.evaluate(item, f"<|output_start|>{truth}<|output_end|>The answer is {truth + 1}.")
    assert not task.evaluate(item, "I do not know.")
    assert final_number("It costs 1,234.") == "1234"

    spelling = Spelling("test", 1, seed=0)
    word = spelling[0]["word"]
    assert spelling.evaluate(spelling[0], "Sure: " + " - ".join(word.upper()) + ".")
    assert not spelling.evaluate(spelling[0], "-".join(word + "s"))
    assert not spelling.evaluate(spelling[0], "-".join(word[:-1]))


def test_too_many_held_out_items_is_a_clear_error():
    held_out_words = sum(split_of(word) == "test" for word in corpus_words())
    with pytest.raises(ValueError, match="n: spelling's test split has fewer than"):
        Spelling("test", held_out_words + 1)
    with pytest.raises(ValueError, match="split"):
        Spelling("validation", 3)


# ---------------------------------------------------------------------------------------------------------------
# the protocol: categorical items, mixtures, sequences


def test_multiple_choice_baseline_and_evaluate():
    items = Items("mc", "categorical", [multiple_choice("2+2?", ["3", "4"], 1),
                                        multiple_choice("Sky?", ["red", "green", "blue", "pink"], 2)])
    assert items[0]["answer"] == "B" and items[0]["messages"][1]["content"] == "B"
    assert "- 4=B" in items[0]["messages"][0]["content"]
    assert items.evaluate(items[1], "C") and not items.evaluate(items[1], "A")
    assert items.baseline == pytest.approx((1 / 2 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="choices"):
        multiple_choice("?", ["only"], 0)


def test_mixture_holds_every_item_once_in_a_seeded_order():
    a = Items("a", "generative", [{"messages": [], "id": f"a{i}"} for i in range(30)])
    b = Items("b", "generative", [{"messages": [], "id": f"b{i}"} for i in range(10)])
    mix = TaskMixture([a, b], seed=4)
    ids = [item["id"] for item in mix]
    assert sorted(ids) == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(10)])
    assert ids == [item["id"] for item in TaskMixture([a, b], seed=4)]
    assert ids != [item["id"] for item in TaskMixture([a, b], seed=5)]
    assert all(mix.task_of(i) is (a if ids[i][0] == "a" else b) for i in range(len(mix)))
    assert [item["id"] for item in TaskSequence([b, a])] == [f"b{i}" for i in range(10)] + [f"a{i}" for i in
                                                                                            range(30)]


def test_offline_mixture_validation_is_held_out():
    train, val, tasks = sft_mixture("offline", seed=0, val_n=64)
    train_questions = {question(item) for item in train}
    assert len(val) == 64 and not {question(item) for item in val} & train_questions
    for task in tasks:
        assert not {question(item) for item in task} & train_questions, task.name
    assert any(item["messages"][-1]["content"] and "adamba" in json.dumps(item) for item in identity())


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="--tasks: 'nope' is not a task"):
        eval_task("nope")
    with pytest.raises(ValueError, match="mixture: 'nope'"):
        sft_mixture("nope", 0, 8)


# ---------------------------------------------------------------------------------------------------------------
# CustomJSON


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('[{"role": "assistant", "content": "hi"}]', "line 2: message 0 has role 'assistant' where 'user'"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "line 2: message 1 has role 'user'"),
    ('[{"role": "user", "content": "a"}]', "line 2: the last message must be the assistant's"),
    ('[{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]', "line 2: message 0 needs"),
    ("{}", "line 2: must be a non-empty JSON list"),
])
def test_customjson_names_the_bad_line(tmp_path, line, message):
    good = json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                       {"role": "assistant", "content": "hello"}])
    path = tmp_path / "convs.jsonl"
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(f"convs.jsonl {message}")):
        CustomJSON(path)
    path.write_text(f"{good}\n\n{good}\n")
    assert len(CustomJSON(path)) == 2 and CustomJSON(path)[0]["messages"][0]["role"] == "system"
    with pytest.raises(ValueError, match="does not exist"):
        CustomJSON(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# the bundled evaluation sets


def test_bundled_sets_hold_what_the_docs_say():
    easy, challenge, mmlu, gsm8k = ARC("easy"), ARC("challenge"), MMLU(), GSM8K()
    assert (len(easy), len(challenge), len(mmlu), len(gsm8k)) == (570, 299, 14042, 1319)
    for task in (easy, challenge, mmlu):
        assert task.kind == "categorical" and 0.2 < task.baseline <= 0.34
        for item in (task[0], task[len(task) // 2], task[-1]):
            assert item["answer"] in item["letters"] and item["messages"][1]["content"] == item["answer"]
    assert len({r["question"] for r in mmlu.rows}) > 13000  # distinct questions, not one repeated
    with pytest.raises(ValueError, match="subset"):
        ARC("medium")


def test_gsm8k_tool_calls_reproduce_the_annotations():
    """The solution's <<expr=result>> become calculator calls; the expression recomputed here gives the result
    for nearly all of them (a few annotations in GSM8K round or are wrong), and the truth is the #### number."""
    gsm8k = GSM8K()
    agree = total = 0
    for row in gsm8k.rows[:200]:
        item = gsm8k.conversation(row)
        assert item["truth"] == row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        parts = item["messages"][1]["content"]
        for call, output in zip(parts, parts[1:], strict=False):
            if call["type"] == "python":
                assert output["type"] == "python_output"
                total += 1
                try:
                    value = eval(call["text"], {"__builtins__": {}})  # trusted data: GSM8K's own annotations
                    agree += abs(float(value) - float(output["text"])) < 1e-6 * max(1.0, abs(float(value)))
                except (SyntaxError, ZeroDivisionError, ValueError, NameError, TypeError):
                    pass
    assert total > 300 and agree / total > 0.95
    item = gsm8k_conversation("Q", "He has <<2*3=6>>6 apples.\n#### 6")
    assert item["messages"][1]["content"] == [{"type": "text", "text": "He has "},
                                              {"type": "python", "text": "2*3"},
                                              {"type": "python_output", "text": "6"},
                                              {"type": "text", "text": "6 apples.\n#### 6"}]
    assert gsm8k.evaluate(item, "So 6.") and gsm8k.evaluate(item, "6.00") and not gsm8k.evaluate(item, "7")


def test_humaneval_checker_passes_canonical_and_fails_broken(monkeypatch):
    task = he.HumanEval()
    assert len(task) == 164
    for i in (0, 2, 53):
        item = task[i]
        assert task.evaluate(item, item["messages"][1]["content"]), i  # the canonical solution, as a code block
        assert task.evaluate(item, he.problems()[i]["canonical_solution"]), i  # the body alone
        assert not task.evaluate(item, "    return None\n"), i
    monkeypatch.setattr(he, "TIMEOUT_S", 1.0)
    assert not task.evaluate(task[0], "    while True:\n        pass\n")


# ---------------------------------------------------------------------------------------------------------------
# Hub sources through a local server


def _parquet(tmp_path, name: str, columns: dict) -> bytes:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path.read_bytes()


def test_smoltalk_and_gsm8k_through_the_hf_downloader(tmp_path, monkeypatch):
    from adamba.tasks.hf_sources import gsm8k_hf, smoltalk

    chat = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]
            for i in range(5)]
    files = {
        "/datasets/HuggingFaceTB/smol-smoltalk/resolve/main/data/train-00000-of-00001.parquet":
            _parquet(tmp_path, "s.parquet", {"messages": chat}),
        "/datasets/openai/gsm8k/resolve/main/main/test-00000-of-00001.parquet":
            _parquet(tmp_path, "g.parquet", {"question": ["Q?"], "answer": ["<<1+2=3>>3\n#### 3"]}),
    }
    listings = {}
    for path, body in files.items():
        repo, rel = re.fullmatch(r"/datasets/(.+?/.+?)/resolve/main/(.+)", path).groups()
        listings.setdefault(f"/api/datasets/{repo}/tree/main", []).append(
            {"type": "file", "path": rel, "size": len(body)})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            """Quiet."""

        def do_GET(self):
            path = urlsplit(self.path).path
            body = json.dumps(listings[path]).encode() if path in listings else files.get(path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("ADAMBA_HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        talk = smoltalk("train")
        assert [item["messages"] for item in talk] == chat
        gsm8k_test = gsm8k_hf("test")
        (problem,) = gsm8k_test
        assert problem["truth"] == "3" and problem["messages"][1]["content"][0] == {"type": "python", "text": "1+2"}
        # judged by its final number, so the Hub's splits give RL its reward (train/rl.py)
        assert gsm8k_test.evaluate(problem, "It is 3.") and not gsm8k_test.evaluate(problem, "It is 4.")
        with pytest.raises(ValueError, match="no parquet file for split 'test'"):
            smoltalk("test")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
