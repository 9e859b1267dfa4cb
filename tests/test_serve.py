"""`adamba serve`: a real uvicorn on 127.0.0.1 (a free port) with a tiny attention + Mamba model in float64, talked
to with the official `openai` client. Replies are checked against the engine generating each request alone (an
independent path: no scheduler, no slots, no HTTP)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import make_documents, tiny_config
from test_train import _free_port

from adamba.chat.render import render_prompt
from adamba.data.tokenizer import Tokenizer
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.infer.speculative import Draft
from adamba.model import AdambaLM
from adamba.model.compute import Compute
from adamba.serve.api import create_app


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(make_documents(), 512, "serve-test")


@pytest.fixture(scope="module")
def model():
    """Random weights with a non-zero lm_head (so greedy replies vary with the prompt), float64 (so a row batched
    with others and the same row alone agree to the last bit that matters for argmax)."""
    torch.manual_seed(0)
    model = AdambaLM.build(tiny_config(block_pattern="TM", sequence_len=256)).double()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


class Running:
    """A uvicorn server on a free loopback port, in a thread, for the length of a `with` block."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.app = app

    def __enter__(self) -> Running:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             timeout=60, **kwargs)

    def metric(self, name: str) -> float:
        """The metric summed over its series (one per device)."""
        return sum(self.series(name).values())

    def series(self, name: str) -> dict[str, float]:
        found = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                 for line in httpx.get(self.url + "/metrics").text.splitlines()
                 if line.startswith(name + "{") or line.startswith(name + " ")}
        if not found:
            raise KeyError(name)
        return found


@pytest.fixture
def server(model, tokenizer):
    with Running(create_app(model, tokenizer, "tiny", max_batch=4, max_queue=64, tools=False)) as running:
        yield running


def alone(model, tokenizer, messages: list[dict], max_tokens: int, mode: str = "") -> list[int]:
    """The reference: the engine on this one prompt, greedy, stopping where the server's chat does."""
    prompt = render_prompt(tokenizer, messages)
    stops = [tokenizer.bos_id, tokenizer.special_id("<|assistant_end|>")]
    [done] = Engine(model, tokenizer).generate([prompt], max_tokens, SamplingParams(0), stop_tokens=stops,
                                               compute=Compute.parse(model.config, width=mode))
    return done.tokens


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_and_a_greedy_chat_reply_equal_the_engine_alone(server, model, tokenizer):
    client = server.client()
    [entry] = client.models.list().data
    assert entry.id == "tiny" and entry.model_extra["max_model_len"] == 256
    assert entry.model_extra["speculative_drafts"] == ["ghost", "exit:1"]  # TM: a narrow slice, the first block
    reply = client.chat.completions.create(model="tiny", messages=ask("the king and the queen"), max_tokens=20,
                                           temperature=0)
    expected = alone(model, tokenizer, ask("the king and the queen"), 20)
    assert reply.choices[0].message.content == tokenizer.decode(expected)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(render_prompt(tokenizer, ask("the king and the queen")))
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + len(expected)
    assert reply.choices[0].finish_reason == ("length" if len(expected) == 20 else "stop")

    chunks = list(client.chat.completions.create(model="tiny", messages=ask("the king and the queen"),
                                                 max_tokens=20, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)


def test_length_stop_strings_n_and_seeds(server, model, tokenizer):
    client = server.client()
    short = client.chat.completions.create(model="tiny", messages=ask("a sword"), max_tokens=5, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 5

    full = tokenizer.decode(alone(model, tokenizer, ask("a sword"), 40))
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    cut = client.chat.completions.create(model="tiny", messages=ask("a sword"), max_tokens=40, temperature=0,
                                         stop=[stop, "never-appears"])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=ask("a sword"), max_tokens=40, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]

    def sampled(seed):
        reply = client.chat.completions.create(model="tiny", messages=ask("a sword"), max_tokens=12, temperature=1,
                                               seed=seed, n=2)
        return [c.message.content for c in reply.choices]

    first = sampled(7)
    assert len(first) == 2 and first[0] != first[1]  # two choices, two draws
    assert sampled(7) == first and sampled(8) != first


def test_compute_modes_change_the_flops_in_usage(server, model, tokenizer):
    client = server.client()
    spent = {}
    for mode in ("ghost", "full"):
        reply = client.chat.completions.create(model="tiny", messages=ask("the night"), max_tokens=10, temperature=0,
                                               extra_body={"compute": {"mode": "" if mode == "full" else mode}})
        tokens = alone(model, tokenizer, ask("the night"), 10, "" if mode == "full" else mode)
        assert reply.choices[0].message.content == tokenizer.decode(tokens)
        # by hand: every prompt and reply token at the forward FLOPs per token of a sequence that long
        length = reply.usage.prompt_tokens + len(tokens)
        compute = Compute.parse(model.config, width="" if mode == "full" else mode)
        assert reply.usage.model_extra["flops"] == pytest.approx(length * model.count_flops(length, compute).forward)
        spent[mode] = reply.usage.model_extra["flops"] / length
    assert spent["ghost"] < 0.9 * spent["full"]


def test_completions_with_log_probabilities_from_a_full_forward(server, model, tokenizer):
    client = server.client()
    reply = client.completions.create(model="tiny", prompt="the king", max_tokens=6, temperature=0, logprobs=2)
    choice = reply.choices[0]
    prompt = tokenizer.encode("the king", bos=True)
    [done] = Engine(model, tokenizer).generate([prompt], 6, SamplingParams(0), stop_tokens=[tokenizer.bos_id])
    tokens = done.tokens
    assert choice.text == tokenizer.decode(tokens)
    assert choice.logprobs.tokens == [tokenizer.decode([t]) for t in tokens]
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == 6
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0], -1)
    for i, (value, top) in enumerate(zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs,
                                         strict=True)):
        row = logp[len(prompt) - 1 + i]
        assert value == pytest.approx(row.max().item(), abs=1e-9)  # greedy: the most likely token
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(2).values.tolist(), abs=1e-9)


def test_sixteen_concurrent_streams_each_get_their_text_alone(model, tokenizer):
    """16 clients at once through 4 slots, with different prompts, lengths and modes: rows join and leave the
    running batch at step boundaries and each stream is what the engine gives that request alone."""
    words = make_documents(16, seed=3)
    cases = [(ask(" ".join(words[i].split()[:3 + i % 5])), 4 + (5 * i) % 23, ("", "ghost", "normal")[i % 3])
             for i in range(16)]
    with Running(create_app(model, tokenizer, "tiny", max_batch=4, tools=False)) as running:
        client = running.client()

        def stream(case):
            messages, max_tokens, mode = case
            chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True, extra_body={"compute": {"mode": mode}})
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with ThreadPoolExecutor(16) as pool:
            texts = list(pool.map(stream, cases))
        assert running.metric("adamba_requests_total") == 16
    for (messages, max_tokens, mode), text in zip(cases, texts, strict=True):
        assert text == tokenizer.decode(alone(model, tokenizer, messages, max_tokens, mode))


def test_a_disconnect_frees_the_slot_and_a_full_queue_gives_429(tokenizer):
    """One slot, one place in the queue: a long stream holds the slot, a second request waits, a third is refused;
    the first client leaves mid-stream, and its slot goes to the waiting request at once."""
    torch.manual_seed(0)
    model = AdambaLM.build(tiny_config(sequence_len=4096)).eval()  # a reply long enough to leave in the middle of
    longest = 4000
    with Running(create_app(model, tokenizer, "tiny", max_batch=1, max_queue=1)) as running:
        body = {"model": "tiny", "prompt": "the king", "max_tokens": longest, "temperature": 0, "stream": True}
        with httpx.Client(base_url=running.url, timeout=30) as http, http.stream("POST", "/v1/completions",
                                                                                  json=body) as first:
            lines = first.iter_lines()  # kept: a dropped iterator would close the response (a disconnect)
            next(lines)  # generating: it holds the one slot
            answers = []
            waiting = threading.Thread(target=lambda: answers.append(httpx.post(
                running.url + "/v1/completions", timeout=60, json={**body, "stream": False, "max_tokens": 2})))
            waiting.start()
            deadline = time.monotonic() + 10
            while running.metric("adamba_queue_waiting") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as refused:
                running.client().completions.create(model="tiny", prompt="x", max_tokens=2)
            assert refused.value.status_code == 429 and refused.value.body["code"] == "queue_full"
        # the first client went away mid-stream: its slot is freed, the waiting request runs and finishes
        waiting.join(timeout=30)
        assert answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] == 2
        assert running.metric("adamba_cancelled_total") == 1
        assert running.metric("adamba_slots_active") == 0
        assert running.metric("adamba_completion_tokens_total") < longest


def error_of(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in response.text
    return error


def test_bad_requests_get_openai_shaped_errors_naming_the_field(server):
    url = server.url
    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)  # noqa: E731
    ok = {"model": "tiny", "messages": ask("hi"), "max_tokens": 2}
    r = post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
    r = post("/v1/chat/completions", json={**ok, "model": "other"})
    assert r.status_code == 404 and error_of(r)["param"] == "model"
    r = post("/v1/chat/completions", json={**ok, "temperature": -1})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = post("/v1/chat/completions", json={**ok, "messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and error_of(r)["param"] == "messages.0.role"
    r = post("/v1/chat/completions", json={**ok, "compute": {"mode": "enormous"}})
    assert r.status_code == 400 and error_of(r)["param"] == "compute.mode"
    r = post("/v1/completions", json={"model": "tiny", "prompt": "king " * 400})
    error = error_of(r)
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and "context is 256" in error["message"]
    r = post("/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"
    assert httpx.get(url + "/v1/nothing").status_code == 404
    assert post("/v1/chat/completions", json=ok).status_code == 200  # and it still answers


def test_an_api_key_is_required_when_set(model, tokenizer):
    with Running(create_app(model, tokenizer, "tiny", api_key="sesame")) as running:
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        assert running.client(api_key="sesame").models.list().data[0].id == "tiny"
        assert httpx.get(running.url + "/health").json()["status"] == "ok"  # health needs no key
        assert httpx.get(running.url + "/metrics").status_code == 401


def test_sse_wire_format(server):
    """The raw stream, as non-Python clients read it: data: lines, JSON chunks, then data: [DONE]."""
    body = {"model": "tiny", "messages": ask("hi"), "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def malformed_requests(seed: int = 0, count: int = 520):
    """(path, body bytes) pairs, each malformed in one of the ways clients get wrong, drawn with a seed."""
    import random

    rng = random.Random(seed)
    good = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    wrong_values = [-1, -(10**30), 10**30, 1.5, "x" * 70_000, [], {}, [1, 2], True, "NaN", float("-inf")]
    fields = {"model": [1, [], {}], "messages": [None, [], "hi", [1], [{"role": "user"}] * 10_000,
                                                 [{"role": "wizard", "content": "x"}], [{"content": "x"}],
                                                 [{"role": "user", "content": [{"type": "image"}]}]],
              "max_tokens": [0, -5, 10**12, "ten", 2.5], "temperature": [-1, 3, "hot", []],
              "top_p": [0, 1.5, "all"], "top_k": [0, -3, "k"], "n": [0, 100, -1, "two"], "stop": [[""], ["a"] * 9,
                                                                                                 5, ["x" * 300]],
              "seed": [2**70, "s", 1.5], "stream": ["yes", 2, []], "logprobs": ["y", 3], "top_logprobs": [-1, 50, 3],
              "stream_options": ["x", 5], "compute": ["ghost", 5, {"mode": "enormous"}, {"mode": []},
                                                     {"loops": 4}, {"adaptive": "calibrated"}, {"bogus": 1}]}
    for i in range(count):
        kind = i % 6
        if kind == 0:  # not JSON at all, or cut short
            text = json.dumps(good)
            body = rng.choice([text[:rng.randrange(1, len(text))].encode(), b"", b"\x00\x01", b"[", b"nul",
                               rng.randbytes(rng.randrange(1, 64))])
        elif kind == 1:  # invalid UTF-8 inside otherwise plausible JSON
            body = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + rng.randbytes(8) + b'\xff\xfe"}]}'
        elif kind == 2:  # a field of the wrong type or out of range
            name = rng.choice(sorted(fields))
            body = json.dumps({**good, name: rng.choice(fields[name])}).encode()
        elif kind == 3:  # a random field replaced by a random wrong value
            name = rng.choice(sorted(good))
            body = json.dumps({**good, name: rng.choice(wrong_values)}, allow_nan=True).encode()
        elif kind == 4:  # not an object, or missing what is required
            body = json.dumps(rng.choice([[], "text", 3, {}, {"model": "tiny"}, {"messages": "hi"}])).encode()
        else:  # the completions endpoint, likewise
            body = json.dumps(rng.choice([{"prompt": 5}, {"prompt": None}, {"prompt": "x", "max_tokens": -1},
                                          {"prompt": "x", "logprobs": 99}, {"prompt": "king " * 5000},
                                          {"prompt": ["a", "b"]}, {"prompt": "x", "echo": "no"}])).encode()
            yield "/v1/completions", body
            continue
        yield "/v1/chat/completions", body


def test_a_bounded_fuzz_of_malformed_requests_gets_only_json_4xx(server, model, tokenizer):
    cases = list(malformed_requests())
    assert len(cases) >= 500
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body in cases:
            response = http.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= response.status_code < 500, (body[:200], response.status_code, response.text[:300])
            error_of(response)
        # and it still answers, greedily (a sampled reply may stop at its first token), as the engine alone does
        ok = http.post("/v1/chat/completions",
                       json={"model": "tiny", "messages": ask("hi"), "max_tokens": 2, "temperature": 0})
        expected = alone(model, tokenizer, ask("hi"), 2)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == len(expected)
        assert ok.json()["choices"][0]["message"]["content"] == tokenizer.decode(expected)


def test_chat_completions_on_an_imported_nanochat_model(tmp_path, capsys):
    """A nanochat-format chat checkpoint (its weights, its tokenizer.pkl) imported and served: the reply is the
    engine's on exactly nanochat's rendering of the conversation (system message included)."""
    from test_chat_cli import CHAT_CONFIG
    from test_chat_render import nanochat_tokenizer, reference
    from test_nanochat import random_state, write_nanochat

    from adamba.checkpoint import load_checkpoint, run_dir
    from adamba.cli import main

    nc_tokenizer = nanochat_tokenizer(tmp_path)
    folder = write_nanochat(tmp_path / "chatsft_checkpoints" / "d2", random_state(CHAT_CONFIG, seed=7), step=9,
                            model_config=CHAT_CONFIG, tokenizer=nc_tokenizer)
    assert main(["import", "nanochat", str(folder), "--tag", "ncchat"]) == 0
    checkpoint = load_checkpoint(run_dir("ncchat"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    prompt = reference(nc_tokenizer.enc, {"messages": messages})[0] + [nc_tokenizer.special_id("<|assistant_start|>")]
    stops = [nc_tokenizer.bos_id, nc_tokenizer.special_id("<|assistant_end|>")]
    [done] = Engine(checkpoint.model, checkpoint.tokenizer).generate([prompt], 12, SamplingParams(0),
                                                                     stop_tokens=stops)
    with Running(create_app(checkpoint.model, checkpoint.tokenizer, "ncchat", tools=False)) as running:
        reply = running.client().chat.completions.create(model="ncchat", messages=messages, max_tokens=12,
                                                         temperature=0)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.choices[0].message.content == checkpoint.tokenizer.decode(done.tokens)


def test_early_exit_per_request_counts_each_tokens_own_flops(tokenizer):
    """compute.adaptive: exit gates decide per token; the reply equals the engine's alone, and usage's FLOPs equal
    the sum over tokens of their own exit layers' costs, taken from a full forward over the same tokens (gates
    decide from h_k alone, so a full forward decides as decoding did)."""
    torch.manual_seed(1)
    model = AdambaLM.build(tiny_config(n_layer=4, min_exit_layer=1, sequence_len=128)).double().eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    messages = ask("the king and the queen")
    compute = Compute.parse(model.config, adaptive="0.5")
    prompt = render_prompt(tokenizer, messages)
    stops = [tokenizer.bos_id, tokenizer.special_id("<|assistant_end|>")]
    [done] = Engine(model, tokenizer).generate([prompt], 16, SamplingParams(0), stop_tokens=stops, compute=compute)
    with Running(create_app(model, tokenizer, "tiny", tools=False)) as running:
        reply = running.client().chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                         temperature=0, extra_body={"compute": {"adaptive": 0.5}})
        plain = running.client().chat.completions.create(model="tiny", messages=messages, max_tokens=16,
                                                         temperature=0)
    assert reply.choices[0].message.content == tokenizer.decode(done.tokens)
    fed = prompt + done.tokens[:-1]  # the last token is produced, never run
    with torch.no_grad():
        out = model(torch.tensor([fed]), compute=compute, outputs=True)
    length = len(prompt) + len(done.tokens)
    assert reply.usage.model_extra["flops"] == pytest.approx(out.exits.token_flops(model.config, length).sum().item())
    exits = out.exits.exit_layer[0, len(prompt) - 1:].tolist()
    assert reply.usage.model_extra["compute"]["token_exit_layers"] == exits
    assert min(exits) < model.config.n_layer  # some tokens left early: fewer FLOPs than the plain reply's
    assert reply.usage.model_extra["flops"] < plain.usage.model_extra["flops"] or \
        len(done.tokens) > plain.usage.completion_tokens


def test_two_devices_each_get_requests_and_answer_as_alone(model, tokenizer):
    """One scheduler per device (two CPU "devices" here; cuda:0, cuda:1 on a GPU node): requests go to the one
    with less work, and every reply is still what the engine gives alone."""
    cases = [(ask(w), 6 + i) for i, w in enumerate(["the king", "a sword", "the night", "fair lady", "the sea",
                                                    "a storm", "the crown", "my lord"])]
    with Running(create_app(model, tokenizer, "tiny", max_batch=2, tools=False, devices=["cpu", "cpu"])) as running:
        client = running.client()

        def reply(case):
            messages, max_tokens = case
            return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                  temperature=0).choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(reply, cases))
        per_device = running.series("adamba_requests_total")
    assert len(per_device) == 2 and sum(per_device.values()) == 8 and min(per_device.values()) >= 2, per_device
    for (messages, max_tokens), text in zip(cases, texts, strict=True):
        assert text == tokenizer.decode(alone(model, tokenizer, messages, max_tokens))


def test_the_serve_command_starts_a_server_on_loopback(model, tokenizer):
    """`adamba serve RUN` as users start it: a separate process, found on 127.0.0.1, answering, then stopped."""
    import os
    import subprocess
    import sys

    from conftest import SUBPROCESS_ENV
    from test_train import ROOT

    from adamba.checkpoint import run_dir, save_checkpoint

    save_checkpoint(run_dir("served"), model, step=1, tokenizer=tokenizer)
    port = _free_port()
    env = {**os.environ, **SUBPROCESS_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "adamba.cli", "serve", "served", "--port", str(port),
                             "--max-batch", "2", "--no-tools"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "adamba serve did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].id == "served"
        reply = client.chat.completions.create(model="served", messages=ask("the king"), max_tokens=4, temperature=0)
        assert reply.choices[0].message.content == tokenizer.decode(alone(model, tokenizer, ask("the king"), 4))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("loops", [2, "kl"])
def test_a_looped_model_serves_fixed_and_adaptive_loops(tokenizer, loops):
    """A looped model's iterations per request: the reply equals the engine's alone; fixed loops are priced by
    hand, adaptive exit ("kl") per token within its bounds."""
    torch.manual_seed(2)
    model = AdambaLM.build(tiny_config(n_layer=3, sequence_len=128, loop=dict(prelude=1, recur=1, coda=1,
                                                                              mean_recurrence=3))).double().eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    messages = ask("the king")
    compute = Compute.parse(model.config, loops=loops)
    prompt = render_prompt(tokenizer, messages)
    stops = [tokenizer.bos_id, tokenizer.special_id("<|assistant_end|>")]
    [done] = Engine(model, tokenizer).generate([prompt], 8, SamplingParams(0), stop_tokens=stops, compute=compute)
    with Running(create_app(model, tokenizer, "tiny", tools=False)) as running:
        reply = running.client().chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                         temperature=0, extra_body={"compute": {"loops": loops}})
    assert reply.choices[0].message.content == tokenizer.decode(done.tokens)
    usage, length = reply.usage.model_extra, len(prompt) + len(done.tokens)
    if loops == 2:
        assert usage["compute"]["loops"] == 2
        assert usage["flops"] == pytest.approx(length * model.count_flops(length, compute).forward)
    else:
        counts = usage["compute"]["token_loops"]
        assert len(counts) == len(done.tokens) and all(1 <= c <= 3 for c in counts)
        # each token between one iteration and all three with their two probes (a full forward's "kl" decisions
        # may differ from decoding's, so the counts themselves have no independent reference here)
        fewest = length * model.count_flops(length, Compute(loops=1)).forward
        most = length * model.count_flops(length, Compute(loops=3), probes=2).forward
        assert fewest <= usage["flops"] <= most


@pytest.mark.slow  # compiling the step takes over a minute on 2 CPU cores (make test-slow)
def test_compiled_decode_steps_serve_the_same_replies(model, tokenizer):
    """--compile: each step one torch.compile graph over a static cache; concurrent rows at two modes (so steps
    mix widths) still get what the engine gives each alone; early exit is refused with the reason."""
    torch._dynamo.reset()
    cases = [(ask("the king"), 10, ""), (ask("a sword"), 14, "ghost"), (ask("the night"), 6, "")]
    with Running(create_app(model, tokenizer, "tiny", max_batch=2, tools=False, compile=True)) as running:
        client = running.client()

        def reply(case):
            messages, max_tokens, mode = case
            return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                  temperature=0, extra_body={"compute": {"mode": mode}})

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(reply, cases))
        refused = httpx.post(running.url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": ask("hi"), "compute": {"adaptive": 0.5}})
    for (messages, max_tokens, mode), got in zip(cases, replies, strict=True):
        assert got.choices[0].message.content == tokenizer.decode(alone(model, tokenizer, messages, max_tokens, mode))
    assert refused.status_code == 400 and "--compile" in error_of(refused)["message"]


def test_a_step_on_the_first_rows_of_a_cache_writes_what_a_whole_batch_step_would(model):
    """The scheduler runs light loads on `InferenceCache.first_rows(n)`: a forward there must leave rows [0, n)
    exactly as the same forward on the whole cache does -- attention K/V (with narrow writes, whose layer inputs
    the view allocates), Mamba conv and SSM state -- and the rows after n untouched."""
    from adamba.model.cache import InferenceCache

    torch.manual_seed(3)
    prompts = torch.randint(0, 512, (3, 5))
    whole, viewed = InferenceCache(model, 3, 32), InferenceCache(model, 3, 32)
    with torch.no_grad():
        for cache in (whole, viewed):
            model(prompts, cache=cache)
        untouched = [t.clone() for t in (viewed.states[0].k[2], viewed.states[1].ssm[2], viewed.lengths[2])]
        for width in ("ghost", "", "normal"):
            ids = torch.randint(0, 512, (3, 1))
            compute = Compute.parse(model.config, width=width)
            expected = model(ids, cache=whole, compute=compute)[:2]
            view = viewed.first_rows(2)
            got = model(ids[:2], cache=view, compute=compute)
            viewed.absorb(view)
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
        assert viewed.states[0].inputs is not None  # allocated by the view at the narrow write, kept
        for before, after in zip(untouched, (viewed.states[0].k[2], viewed.states[1].ssm[2], viewed.lengths[2]),
                                 strict=True):
            assert torch.equal(before, after)
        final = torch.randint(0, 512, (3, 1))
        torch.testing.assert_close(model(final, cache=viewed)[:2], model(final, cache=whole)[:2], atol=0, rtol=0)


def test_speculative_requests_answer_as_plain_greedy_decoding_and_count_their_compute(server, model, tokenizer):
    """Concurrent speculative requests (two drafts, rows of different lengths sharing rounds) give the engine's plain
    greedy replies; usage counts what speculation spent on top: rejected drafts at full cost and the draft's reads."""
    client = server.client()
    cases = [(ask(text), spec) for text in ("the king", "a sword and a crown for the prince", "night")
             for spec in ("ghost", "exit:1")]

    def request(case):
        messages, spec = case
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0,
                                              extra_body={"compute": {"speculative": spec, "draft_tokens": 3}})

    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(request, cases))
    for (messages, spec), reply in zip(cases, replies, strict=True):
        tokens = alone(model, tokenizer, messages, 24)
        assert reply.choices[0].message.content == tokenizer.decode(tokens)
        info = reply.usage.model_extra["compute"]["speculative"]
        assert info["draft"] == spec and info["k"] == 3 and 0 <= info["accepted"] <= info["drafted"] > 0
        # by hand: plain FLOPs + rejected drafts read at full width + the draft's reads (the prompt, every drafted
        # token, and d_k again after rounds that accepted all k: between 0 and drafted / k of those)
        prompt, length = reply.usage.prompt_tokens, reply.usage.prompt_tokens + len(tokens)
        full = model.count_flops(length).forward
        draft = model.count_flops(length, Draft.parse(model.config, spec).compute()).forward
        extra = reply.usage.model_extra["flops"] - length * full - (info["drafted"] - info["accepted"]) * full
        again = extra / draft - prompt - info["drafted"]
        assert again == pytest.approx(round(again)) and 0 <= round(again) <= info["drafted"] / 3

    reply = client.completions.create(model="tiny", prompt="the king", max_tokens=6, temperature=0, logprobs=2,
                                      extra_body={"compute": {"speculative": "exit:1"}})
    plain = client.completions.create(model="tiny", prompt="the king", max_tokens=6, temperature=0, logprobs=2)
    assert reply.choices[0].text == plain.choices[0].text
    assert reply.choices[0].logprobs.token_logprobs == pytest.approx(plain.choices[0].logprobs.token_logprobs,
                                                                     abs=1e-9)
    sampled = client.completions.create(model="tiny", prompt="the", max_tokens=8, temperature=1.0, seed=5,
                                        extra_body={"compute": {"speculative": "ghost"}, "ignore_eos": True})
    assert sampled.usage.completion_tokens == 8


def test_speculative_errors_name_the_field_and_tools_may_run(server, model, tokenizer):
    ok = {"model": "tiny", "messages": ask("hi"), "max_tokens": 2}
    r = httpx.post(server.url + "/v1/chat/completions", json={**ok, "compute": {"speculative": "exit:9"}}, timeout=30)
    assert r.status_code == 400 and error_of(r)["param"] == "compute.speculative"
    assert "depth: 9" in error_of(r)["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={**ok, "compute": {"draft_tokens": 0}}, timeout=30)
    assert r.status_code == 400 and error_of(r)["param"] == "compute.draft_tokens"
    with Running(create_app(model, tokenizer, "tiny", tools=True)) as running:  # tools on: the same reply
        replies = [running.client().chat.completions.create(model="tiny", messages=ask("the king"), max_tokens=16,
                                                            temperature=0, extra_body=extra)
                   for extra in ({}, {"compute": {"speculative": "ghost"}})]
        assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


def test_a_speculative_chat_runs_its_tool_calls_as_a_plain_one(tokenizer):
    """A model that calls the calculator again and again: tool calls end rounds early and their output is drafted as
    forced tokens; the reply equals the plain one, results included."""
    from test_speculative import chain_model

    special = tokenizer.special_id
    chain = [special("<|python_start|>"), *tokenizer.encode("7*8"), special("<|python_end|>"),
             special("<|output_end|>"), *tokenizer.encode(" so")]
    model = chain_model(tokenizer, chain)
    with Running(create_app(model, tokenizer, "tiny", tools=True)) as running:
        client = running.client()
        replies = [client.chat.completions.create(model="tiny", messages=ask("7*8?"), max_tokens=30, temperature=0,
                                                  extra_body=extra)
                   for extra in ({}, {"compute": {"speculative": "ghost", "draft_tokens": 4}})]
    plain, spec = (r.choices[0].message.content for r in replies)
    assert spec == plain and plain.count("56") >= 2
