"""CORE (eval/core.py): rigged models whose right (or wrong) answers are known give 100% (0%) on each task kind;
few-shot prompts equal a rendering built here by hand; centring equals a hand computation."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from conftest import WORDS, make_documents

from adamba.data.tokenizer import Tokenizer
from adamba.eval.core import CoreTask, evaluate_core_task, fewshot_examples, render
from adamba.eval.scores import TaskScore, centred_mean


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(make_documents(), 512, "core-test")


class Oracle(torch.nn.Module):
    """Rigged: it has memorised some token sequences, and after any tokens it predicts, with near certainty, what
    followed the longest run of those same tokens in its memory (uniform when nothing matches)."""

    def __init__(self, tokenizer, texts: list[str], context: int = 256):
        super().__init__()
        self.memory = [tokenizer.encode(text, bos=True) for text in texts]
        self.vocab = tokenizer.vocab_size
        self.config = SimpleNamespace(sequence_len=context)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def next_token(self, prefix: list[int]) -> int | None:
        best, token = 0, None
        for sequence in self.memory:
            for j in range(len(sequence) - 1):
                run = 0
                while run <= j and run < len(prefix) and sequence[j - run] == prefix[-1 - run]:
                    run += 1
                if run > best:
                    best, token = run, sequence[j + 1]
        return token

    def forward(self, ids, compute=None):
        logits = torch.zeros(*ids.shape, self.vocab)
        for b, row in enumerate(ids.tolist()):
            for t in range(len(row)):
                token = self.next_token(row[:t + 1])
                if token is not None:
                    logits[b, t, token] = 30.0
        return logits

    def count_flops(self, context, compute=None):
        return SimpleNamespace(forward=1.0)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def mc_task(seed: int = 0, n: int = 6) -> CoreTask:
    rng = random.Random(seed)
    items = [{"query": f"Question {i}: {words(rng, 4)}. Answer:", "choices": [words(rng, 3) for _ in range(4)],
              "gold": rng.randrange(4)} for i in range(n)]
    return CoreTask("mc", "multiple_choice", items, num_fewshot=0, baseline=0.25)


def schema_task(seed: int = 1, n: int = 6) -> CoreTask:
    rng = random.Random(seed)
    items = [{"context_options": [f"The {words(rng, 2)} {option}" for option in ("prince", "storm", "raven")],
              "continuation": f"{words(rng, 3)}.", "gold": rng.randrange(3)} for _ in range(n)]
    return CoreTask("schema", "schema", items, baseline=1 / 3)


def lm_task(seed: int = 2, n: int = 6) -> CoreTask:
    rng = random.Random(seed)
    # each context ends in its own two words, so even a cropped prompt says which item it is
    items = [{"context": f"{words(rng, 6)} {WORDS[10 + i]} {WORDS[40 + i]}", "continuation": words(rng, 2)}
             for i in range(n)]
    return CoreTask("lm", "language_modeling", items)


def gold_prompts(task: CoreTask) -> list[str]:
    prompts = []
    for i, item in enumerate(task.items):
        rendered = render(task, i)
        prompts.append(rendered[-1] if task.kind == "language_modeling" else rendered[item["gold"]])
    return prompts


def wrong_prompts(task: CoreTask) -> list[str]:
    if task.kind == "language_modeling":
        return [p + " crown crown" for p in (render(task, i)[0] for i in range(len(task.items)))]
    return [render(task, i)[(item["gold"] + 1) % len(render(task, i))] for i, item in enumerate(task.items)]


@pytest.mark.parametrize("make", [mc_task, schema_task, lm_task])
def test_a_model_rigged_for_the_right_answer_scores_100_and_for_a_wrong_one_0(tokenizer, make):
    task = make()
    for prompts, expected in ((gold_prompts(task), 1.0), (wrong_prompts(task), 0.0)):
        model = Oracle(tokenizer, prompts)
        score = evaluate_core_task(model, tokenizer, task, batch_size=3)
        assert score.accuracy == expected, (task.kind, expected)
        assert score.total == len(task.items) and score.cropped == 0


def test_fewshot_prompts_equal_a_rendering_by_hand():
    task = CoreTask("mc", "multiple_choice", mc_task(n=8).items, num_fewshot=3, delimiter=" ")
    index = 5
    chosen = random.Random(1234 + index).sample([i for i in range(8) if i != index], 3)
    assert [task.items.index(e) for e in fewshot_examples(task, index)] == chosen
    item = task.items[index]
    shots = "".join(f"{task.items[i]['query']} {task.items[i]['choices'][task.items[i]['gold']]}\n\n" for i in chosen)
    assert render(task, index) == [f"{shots}{item['query']} {choice}" for choice in item["choices"]]

    lm = CoreTask("lm", "language_modeling", lm_task(n=5).items, num_fewshot=2, delimiter=" ")
    chosen = random.Random(1234 + 0).sample([1, 2, 3, 4], 2)
    shots = "".join(f"{lm.items[i]['context'].strip()} {lm.items[i]['continuation']}\n\n" for i in chosen)
    first = lm.items[0]
    assert render(lm, 0) == [f"{shots}{first['context'].strip()}", f"{shots}{first['context'].strip()} "
                                                                   f"{first['continuation']}"]
    assert index not in [task.items.index(e) for e in fewshot_examples(task, index)]


def test_centring_and_core_by_hand():
    scores = [TaskScore("a", "full", 60, 100, 0.25, 0.0), TaskScore("b", "full", 50, 100, 0.5, 0.0),
              TaskScore("c", "full", 10, 100, 0.0, 0.0)]
    # (0.6 - 0.25) / 0.75 = 0.4667, (0.5 - 0.5) / 0.5 = 0, 0.1 / 1 = 0.1
    assert [s.centred for s in scores] == pytest.approx([0.35 / 0.75, 0.0, 0.1])
    assert centred_mean(scores) == pytest.approx((0.35 / 0.75 + 0.1) / 3)


def test_a_long_prompt_keeps_its_scored_end(tokenizer):
    task = lm_task(n=3)
    model = Oracle(tokenizer, gold_prompts(task), context=8)
    score = evaluate_core_task(model, tokenizer, task)
    assert score.cropped == 3 and score.accuracy == 1.0
    with pytest.raises(ValueError, match="icl_task_type 'cloze'"):
        CoreTask("x", "cloze", [])


def write_bundle(folder, tasks: list[CoreTask]):
    """A DCLM-layout bundle: core.yaml, eval_data/<kind>/<label>.jsonl, eval_meta_data.csv (baselines in %)."""
    import json

    lines = ["icl_tasks:"]
    for task in tasks:
        uri = f"{task.kind}/{task.label}.jsonl"
        (folder / "eval_data" / task.kind).mkdir(parents=True, exist_ok=True)
        (folder / "eval_data" / uri).write_text("".join(json.dumps(item) + "\n" for item in task.items))
        lines += [f"- label: {task.label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{task.num_fewshot}]",
                  f"  icl_task_type: {task.kind}", "  continuation_delimiter: ' '"]
    (folder / "core.yaml").write_text("\n".join(lines) + "\n")
    rows = "".join(f"{t.label},x,x,{t.num_fewshot},{100 * t.baseline}\n" for t in tasks)
    (folder / "eval_meta_data.csv").write_text("Eval Task,Task Category,Task Type,#shots,Random baseline\n" + rows)


def test_a_bundle_served_over_http_downloads_verifies_and_scores(tmp_path, tokenizer, capsys):
    """The DCLM bundle's layout, zipped, served by a local HTTP server: `adamba eval core --bundle URL` downloads
    it, checks its SHA-256, unpacks it and scores every task; a wrong checksum is refused."""
    import hashlib
    import http.server
    import threading
    import zipfile
    from functools import partial

    from conftest import tiny_config

    from adamba.checkpoint import load_checkpoint, run_dir, save_checkpoint
    from adamba.cli import main
    from adamba.eval.core_tasks import fetch_bundle, load_bundle
    from adamba.model import AdambaLM

    tasks = [mc_task(), schema_task(), lm_task()]
    write_bundle(tmp_path / "bundle" / "eval_bundle", tasks)
    archive = tmp_path / "site" / "eval_bundle.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((tmp_path / "bundle").rglob("*")):
            z.write(path, path.relative_to(tmp_path / "bundle"))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
    try:
        assert main(["eval", "core", "tiny-missing", "--bundle", url, "--bundle-sha256", "0" * 64]) == 2
        assert "not the expected 0000" in capsys.readouterr().err
        loaded = load_bundle(fetch_bundle(url, digest))
        torch.manual_seed(0)
        assert [(t.label, t.kind, t.baseline, len(t.items)) for t in loaded] == \
            [(t.label, t.kind, pytest.approx(t.baseline), len(t.items)) for t in tasks]
        order = list(range(len(tasks[0].items)))
        random.Random(1337).shuffle(order)  # nanochat's order: its first --max-per-task items are these
        assert loaded[0].items == [tasks[0].items[i] for i in order]
        torch.manual_seed(0)
        save_checkpoint(run_dir("tiny"), AdambaLM.build(tiny_config(sequence_len=128)), step=1, tokenizer=tokenizer)
        assert main(["eval", "core", "tiny", "--bundle", url, "--bundle-sha256", digest, "--modes", "full",
                     "--device", "cpu"]) == 0
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert "CORE-bundle, 3 of 22 tasks" in out and "| mc | multiple_choice | 6 |" in out
    report = run_dir("tiny").parent.parent / "reports" / "tiny"
    assert (report / "core.png").exists() and len((report / "core.csv").read_text().splitlines()) == 4
    assert load_checkpoint(run_dir("tiny")).tokenizer is not None


def test_two_process_torchrun_scores_as_one_process(tokenizer, capsys):
    """`adamba eval core` under torchrun stripes the items over the ranks and sums the counts: the same table as
    one process (offline tasks from the wheel)."""
    import os
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV, tiny_config
    from test_train import ROOT, _free_port

    from adamba.checkpoint import run_dir, save_checkpoint
    from adamba.cli import main
    from adamba.model import AdambaLM

    torch.manual_seed(0)
    model = AdambaLM.build(tiny_config(sequence_len=64))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    save_checkpoint(run_dir("tiny"), model, step=1, tokenizer=tokenizer)
    flags = ["eval", "core", "tiny", "--tasks", "copa,winogrande", "--max-per-task", "9", "--device", "cpu"]
    assert main(flags) == 0
    alone = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "adamba.cli", *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table == alone and any(line.startswith("| copa | multiple_choice | 9 |") for line in table)
