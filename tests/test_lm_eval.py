"""The lm-eval adapter (eval/lm_eval_adapter.py): `lm_eval.simple_evaluate` runs offline on a local YAML
multiple-choice task, and every log-likelihood it got equals one computed here from a full forward (float64)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_documents, tiny_config

from adamba.checkpoint import run_dir, save_checkpoint
from adamba.data.tokenizer import Tokenizer
from adamba.model import AdambaLM

TASK = """task: adamba_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""


def saved_model(run: str, sequence_len: int, seed: int):
    """A tiny model with a random, non-zero lm_head (so its log-likelihoods vary), saved as `run` with a tokenizer."""
    tokenizer = Tokenizer.train(make_documents(), 512, "lm-eval-test")
    torch.manual_seed(seed)
    model = AdambaLM.build(tiny_config(sequence_len=sequence_len))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    save_checkpoint(run_dir(run), model, step=1, tokenizer=tokenizer)
    return model, tokenizer


def test_simple_evaluate_offline_on_a_local_task_matches_a_full_forward(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from adamba.eval.lm_eval_adapter import AdambaEvalModel

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tokenizer = saved_model("toy", 128, seed=0)
    docs = [{"query": f"The {a} and the {b}:", "choices": ["king", "queen", "sword"], "gold": i % 3}
            for i, (a, b) in enumerate([("lord", "lady"), ("night", "day"), ("sea", "ship"), ("fire", "water")])]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(TASK.format(data=data))

    adapter = AdambaEvalModel("toy", device="cpu", batch_size=4)
    results = lm_eval.simple_evaluate(model=adapter, tasks=["adamba_toy"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    samples = results["samples"]["adamba_toy"]
    assert len(samples) == len(docs) and 0 <= results["results"]["adamba_toy"]["acc,none"] <= 1
    model = model.double()
    for sample in samples:
        for (context, continuation), (loglikelihood, _) in zip(
                [tuple(a) for a in sample["arguments"].values()] if isinstance(sample["arguments"], dict)
                else [tuple(a) for a in sample["arguments"]], [r[0] for r in sample["resps"]], strict=True):
            head = tokenizer.encode(context, bos=True)
            whole = tokenizer.encode(context + continuation, bos=True)
            assert whole[:len(head)] == head
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole]))[0], -1)
            expected = sum(logp[t - 1, whole[t]].item() for t in range(len(head), len(whole)))
            assert loglikelihood == pytest.approx(expected, abs=1e-4)


def test_rolling_loglikelihood_and_generation_against_the_model_itself(tmp_path):
    """loglikelihood_rolling: a string longer than the context, scored in windows, equals the sum of the same
    windows' full forwards; generate_until: the engine's greedy reply cut before the first stop string."""
    from types import SimpleNamespace

    from adamba.eval.lm_eval_adapter import AdambaEvalModel
    from adamba.infer.engine import Engine
    from adamba.infer.sampling import SamplingParams

    model, tokenizer = saved_model("small", 32, seed=1)
    adapter = AdambaEvalModel("small", device="cpu", batch_size=2)
    text = " ".join(make_documents(3, seed=5))[:400]
    [total] = adapter.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    tokens, expected = tokenizer.encode(text), 0.0
    for i in range(0, len(tokens), 31):  # windows of context - 1 tokens, each after <|bos|>
        window = [tokenizer.bos_id, *tokens[i:i + 31]]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window])).double()[0], -1)
        expected += sum(logp[t - 1, window[t]].item() for t in range(1, len(window)))
    assert len(tokens) > 31 and total == pytest.approx(expected, abs=1e-3)

    prompt = "The king and the queen"
    [done] = Engine(model, tokenizer).generate([tokenizer.encode(prompt, bos=True)], 12, SamplingParams(0),
                                               stop_tokens=[tokenizer.bos_id])
    reply = tokenizer.decode(done.tokens)
    stop = reply[len(reply) // 2:len(reply) // 2 + 2]
    [text] = adapter.generate_until([SimpleNamespace(args=(prompt, {"until": [stop], "max_gen_toks": 12}))],
                                    disable_tqdm=True)
    assert stop and text == reply[:reply.index(stop)]
