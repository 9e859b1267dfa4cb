"""Serving throughput and latency through the real HTTP server: `adamba serve`'s continuous batching against a
one-request-at-a-time server (the control, nanochat's design: one generation at a time behind a lock), side by side
in one run, at 1, 4 and 16 concurrent clients.

Each client sends --requests streaming /v1/completions requests one after another, each a fixed prompt of
--prompt-tokens tokens and exactly --output-tokens new tokens (vLLM's ignore_eos), sampled at temperature 1 with its
own seed. Measured per request: time to the first token (TTFT) and the whole latency; per run: output tokens per
second over the run's wall time. Both servers run the same model, the same sampling code and the same SSE format
on 127.0.0.1; only the scheduling differs. The model is --checkpoint or, by default, the demo's architecture at random
weights (the tokens are meaningless; their cost is the same).

Run from the repository root with `PYTHONPATH=.`:
    python benchmarks/serve.py --threads 2          # the run recorded in BENCHMARKS.md
The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import httpx
import torch
import uvicorn
from bench_utils import cpu_name, parse_args, randomize
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from adamba import AdambaLM, ModelConfig
from adamba.checkpoint import load_checkpoint, resolve_run
from adamba.data.corpus import embedded_corpus
from adamba.data.tokenizer import Tokenizer
from adamba.infer.engine import Engine
from adamba.infer.sampling import SamplingParams
from adamba.serve.api import create_app


def one_at_a_time_app(model, tokenizer) -> FastAPI:
    """The control: each request generates alone, start to finish, while the others wait for the lock."""
    app = FastAPI()
    lock = threading.Lock()
    engine = Engine(model, tokenizer)

    @app.post("/v1/completions")
    async def completions(body: dict):
        prompt = tokenizer.encode(body["prompt"], bos=True)
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def generate() -> None:
            with lock, torch.inference_mode():
                for token in engine.stream(prompt, body["max_tokens"], SamplingParams(body["temperature"]),
                                           seed=body["seed"]):
                    loop.call_soon_threadsafe(queue.put_nowait, token)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=generate, daemon=True).start()

        async def events():
            while (token := await queue.get()) is not None:
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': tokenizer.decode([token])}]})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class Served:
    def __init__(self, app, port: int):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)


async def one_client(http: httpx.AsyncClient, url: str, prompt: str, args, client: int, records: list) -> None:
    for r in range(args.requests):
        body = {"model": "bench", "prompt": prompt, "max_tokens": args.output_tokens, "temperature": 1.0,
                "seed": client * 1000 + r, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first, tokens, usage = None, 0, None
        async with http.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):  # the batching server's count (a chunk may carry no text or several tokens)
                    usage = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and chunk["choices"][0].get("text"):
                    tokens += 1
                    first = first or time.perf_counter()
        records.append({"ttft": first - start, "latency": time.perf_counter() - start,
                        "tokens": usage if usage is not None else tokens})


def measure(app, port: int, prompt: str, clients: int, args) -> dict:
    records: list[dict] = []

    async def run() -> float:
        async with httpx.AsyncClient(timeout=600) as http:
            start = time.perf_counter()
            await asyncio.gather(*(one_client(http, f"http://127.0.0.1:{port}/v1/completions", prompt, args, c,
                                              records) for c in range(clients)))
            return time.perf_counter() - start

    with Served(app, port):
        wall = asyncio.run(run())
    latencies = sorted(r["latency"] for r in records)
    return {"clients": clients, "requests": len(records), "tokens": sum(r["tokens"] for r in records),
            "tok_s": sum(r["tokens"] for r in records) / wall,
            "ttft_p50": statistics.median(r["ttft"] for r in records), "latency_p50": statistics.median(latencies),
            "latency_p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def model_and_tokenizer(args):
    if args.checkpoint:
        checkpoint = load_checkpoint(resolve_run(args.checkpoint))
        return checkpoint.model, checkpoint.tokenizer
    documents = list(embedded_corpus().documents())[:args.tokenizer_docs]
    tokenizer = Tokenizer.train(documents, args.vocab_size, "bench-serve")
    config = ModelConfig(depth=args.depth, head_dim=64, sequence_len=512, vocab_size=args.vocab_size,
                         block_pattern="TM")
    model = AdambaLM.build(config)
    randomize(model, seed=0)
    return model.eval(), tokenizer


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a checkpoint with a tokenizer (default: random demo-size)")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--requests", type=int, default=4, help="requests per client, one after another")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="the batching server's slots")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--tokenizer-docs", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None)
    args = parse_args(ap, {"clients": "1,2", "requests": 1, "prompt_tokens": 8, "output_tokens": 4, "depth": 2,
                           "vocab_size": 512, "tokenizer_docs": 20, "max_batch": 2})
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = model_and_tokenizer(args)
    words = tokenizer.decode(list(range(256, 256 + 4 * args.prompt_tokens)))  # any text; cut to the length asked
    prompt_ids = tokenizer.encode(words)[:args.prompt_tokens - 1]
    prompt = tokenizer.decode(prompt_ids)
    prompt_tokens = len(tokenizer.encode(prompt, bos=True))
    servers = {"continuous batching": lambda: create_app(model, tokenizer, "bench", max_batch=args.max_batch,
                                                         max_queue=1024, tools=False),
               "one at a time (control)": lambda: one_at_a_time_app(model, tokenizer)}
    measure(servers["continuous batching"](), free_port(), prompt, 1, argparse.Namespace(**{**vars(args),
                                                                                           "requests": 1}))  # warm-up
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        for name, build in servers.items():
            rows.append({"server": name, **measure(build(), free_port(), prompt, clients, args)})

    print(f"\nmodel {model.config.describe()}; prompts of {prompt_tokens} tokens, {args.output_tokens} new tokens "
          f"each, {args.requests} requests per client, batching server with {args.max_batch} slots; cpu "
          f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| clients | server | output tok/s | TTFT p50 (s) | latency p50 (s) | latency p99 (s) | "
          "throughput vs control |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    control = {r["clients"]: r for r in rows if r["server"].startswith("one")}
    for r in rows:
        ratio = r["tok_s"] / control[r["clients"]]["tok_s"]
        print(f"| {r['clients']} | {r['server']} | {r['tok_s']:,.0f} | {r['ttft_p50']:.3f} | {r['latency_p50']:.2f} |"
              f" {r['latency_p99']:.2f} | {ratio:.2f}x |")
    print(json.dumps({"benchmark": "serve", "checkpoint": args.checkpoint, "prompt_tokens": prompt_tokens,
                      "output_tokens": args.output_tokens, "requests_per_client": args.requests,
                      "max_batch": args.max_batch, "threads": torch.get_num_threads(), "runs": rows}))


if __name__ == "__main__":
    main()
