"""The OpenAI-compatible HTTP API over one Scheduler: /v1/models, /v1/chat/completions, /v1/completions, /health,
/metrics (Prometheus text) and the web UI at /.

Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad request (naming the
field), 401 without the API key, 404 for another model's name, 413 for a body over the limit, 429 when the queue
is full. Generation runs on the scheduler's thread; a handler only waits for its tokens, so the event loop stays
free, and a client that disconnects cancels its rows at once. With several devices, each holds a copy of the model
and its own scheduler, and each request goes to the one with the least work (rows generating plus waiting).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat.render import render_prompt
from ..infer.sampling import SamplingParams
from ..infer.speculative import Draft, offered_drafts
from ..model.compute import Compute
from ..tools.calculator import calculate
from .protocol import ChatRequest, CompletionRequest, Sampling
from .scheduler import QueueFull, Scheduler
from .scheduler import Request as Job
from .text import TextStream

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # bytes a request body may have


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def create_app(model, tokenizer, name: str, *, max_batch: int = 8, max_queue: int = 64, api_key: str | None = None,
               tools: bool = True, max_body: int = MAX_BODY, devices: list | None = None,
               compile: bool = False) -> FastAPI:
    """The app; its schedulers (one per device of `devices`, default the model's own) start and stop with it."""
    devices = devices or [next(model.parameters()).device]
    models = [model if torch.device(d) == next(model.parameters()).device and i == 0 else
              copy.deepcopy(model).to(d) for i, d in enumerate(devices)]
    schedulers = [Scheduler(m, tokenizer, max_batch=max_batch, max_queue=max_queue, compile=compile) for m in models]
    server = Server(model, tokenizer, name, schedulers, tool=calculate if tools else None)
    app = FastAPI(title="adamba", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.schedulers = schedulers
    for scheduler in schedulers:
        app.router.on_startup.append(scheduler.start)
        app.router.on_shutdown.append(scheduler.stop)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body):
            return error_response(413, f"the request body is over {max_body} bytes", code="body_too_large")
        protected = request.url.path.startswith("/v1") or request.url.path == "/metrics"
        if api_key and protected and request.headers.get("authorization") != f"Bearer {api_key}":
            return error_response(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                  kind="authentication_error", code="invalid_api_key")
        return await call_next(request)

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crashed)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.add_api_route("/", lambda: FileResponse(STATIC / "index.html"), methods=["GET"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_api_route("/v1/chat/completions", server.chat, methods=["POST"])
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    return app


async def _api_error(_, error: APIError):
    return error_response(error.status, error.message, error.param, error.code, error.kind)


async def _invalid(_, error: RequestValidationError):
    first = error.errors()[0] if error.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    if first.get("type") == "json_invalid":
        return error_response(400, "the body is not valid JSON", code="invalid_json")
    return error_response(400, f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}", param,
                          code="invalid_value")


async def _http_error(_, error: StarletteHTTPException):
    return error_response(error.status_code, str(error.detail), code="not_found" if error.status_code == 404 else None)


async def _crashed(_, error: Exception):  # never a traceback on the wire
    return error_response(500, f"internal error: {type(error).__name__}", kind="server_error")


class Server:
    """The endpoints' logic over one model and its schedulers (one per device)."""

    def __init__(self, model, tokenizer, name: str, schedulers: list[Scheduler], tool=None):
        self.model, self.tokenizer, self.name, self.schedulers, self.tool = model, tokenizer, name, schedulers, tool
        self.context = model.config.sequence_len
        self.stops = frozenset({tokenizer.bos_id})
        self.chat_stops = self.stops | {tokenizer.special_id("<|assistant_end|>")}

    async def health(self):
        return {"status": "ok", "model": self.name, "active": sum(s.active for s in self.schedulers),
                "waiting": sum(len(s.waiting) for s in self.schedulers)}

    async def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "adamba",
                                            "max_model_len": self.context,
                                            "compute_modes": dict(self.model.config.compute_modes),
                                            "speculative_drafts": offered_drafts(self.model.config)}]}

    async def metrics(self):
        registry = CollectorRegistry()
        registry.register(_Collector(self.schedulers))
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    async def chat(self, body: ChatRequest, http: Request):
        try:
            prompt = render_prompt(self.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as error:
            raise APIError(400, str(error), "messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        return await self._serve(body, http, prompt, limit, self.chat_stops, self.tool, chat=True)

    async def completions(self, body: CompletionRequest, http: Request):
        prompt = self.tokenizer.encode(body.prompt, bos=True)
        return await self._serve(body, http, prompt, body.max_tokens, self.stops, None, chat=False)

    def _compute_info(self, job: Job) -> dict:
        """Where a request's compute went, for the usage: each block's kind and width; with adaptive compute, per
        generated token its exit layer (n_layer: none) or its iterations; a looped model's fixed iterations."""
        config, compute = self.model.config, job.compute
        info = {"blocks": "".join(config.block_pattern)}
        if config.loop is None:
            info["layer_widths"] = config.width_values(compute.width)
        elif not job.decisions:
            info["loops"] = compute.loops if isinstance(compute.loops, int) else config.loop.mean_recurrence
        if job.speculative is not None:
            info["speculative"] = {"draft": job.speculative.describe(),
                                   "k": job.speculative.k, "drafted": job.drafted, "accepted": job.accepted}
        made = job.decisions[len(job.prompt) - 1:][:len(job.tokens)]  # the positions that produced each token
        if made and len(made[0]) == 1:
            info["token_loops"] = [d[0] for d in made]
        elif made:
            info["token_exit_layers"] = [d[0] for d in made]
        return info

    def _jobs(self, body: Sampling, prompt: list[int], limit: int | None, stop_tokens, tool, chat: bool) -> list:
        """One scheduler request per choice, each with its event queue; checked before anything is queued."""
        if body.model is not None and body.model != self.name:
            raise APIError(404, f"model {body.model!r} is not served here; this server has {self.name!r}", "model",
                           "model_not_found")
        if len(prompt) >= self.context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, but the model's context is {self.context} "
                                "tokens, which must also hold the reply; shorten the prompt",
                           "messages" if chat else "prompt", "context_length_exceeded")
        room = self.context - len(prompt)
        if limit is not None and limit > room:
            field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"{field}: {limit} new tokens do not fit: the prompt has {len(prompt)} of the "
                                f"model's {self.context}; ask for at most {room}", field, "context_length_exceeded")
        compute, top = _compute(self.model.config, body), _top_logprobs(body, chat)
        draft = _draft(self.model.config, body)
        params = SamplingParams(body.temperature, body.top_k, body.top_p if body.top_p < 1 else None, body.min_p)
        loop = asyncio.get_running_loop()
        jobs = []
        for i in range(body.n):
            queue: asyncio.Queue = asyncio.Queue()
            seed = None if body.seed is None else (body.seed + i) % 2**63
            jobs.append((Job(prompt, limit or room, params, seed, stop_tokens, body.stops(), compute, top,
                             tool, speculative=draft, on_event=_bridge(loop, queue)), queue))
        return jobs

    async def _serve(self, body: Sampling, http: Request, prompt: list[int], limit: int | None, stop_tokens, tool,
                     chat: bool):
        stop_tokens = frozenset() if body.ignore_eos else stop_tokens
        pairs = self._jobs(body, prompt, limit, stop_tokens, tool, chat)
        jobs = [job for job, _ in pairs]
        try:
            for job in jobs:  # to the device with the least work
                min(self.schedulers, key=lambda s: s.active + len(s.waiting)).submit(job)
        except QueueFull as error:
            for job in jobs:
                job.cancel()
            raise APIError(429, str(error), code="queue_full", kind="rate_limit_error") from None
        except ValueError as error:  # the scheduler's own checks (e.g. early exit on a compiled server)
            for job in jobs:
                job.cancel()
            message = str(error)
            raise APIError(400, message, message.split(":", 1)[0] if ":" in message else None) from None
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.name}
        reply = Reply(self.tokenizer, meta, pairs, body.stops(), chat, logprobs=jobs[0].top_logprobs is not None,
                      describe=self._compute_info)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(reply.events(http, usage), media_type="text/event-stream")
        return JSONResponse(await reply.whole(http))


class Reply:
    """The choices of one request as they are generated: one JSON body, or server-sent events."""

    def __init__(self, tokenizer, meta: dict, pairs: list, stops: tuple[str, ...], chat: bool, logprobs: bool,
                 describe):
        self.tokenizer, self.meta, self.chat, self.logprobs = tokenizer, meta, chat, logprobs
        self.describe = describe  # job -> where its compute went (Server._compute_info)
        self.jobs = [job for job, _ in pairs]
        self.queues = [queue for _, queue in pairs]
        self.streams = [TextStream(tokenizer, stops) for _ in pairs]
        self.kind = "chat.completion" if chat else "text_completion"

    def usage(self) -> dict:
        completion = sum(len(j.tokens) for j in self.jobs)
        prompt = len(self.jobs[0].prompt)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "flops": sum(j.flops for j in self.jobs), "compute": self.describe(self.jobs[0])}

    def _logprobs(self, tokens: list) -> dict | None:
        if not self.logprobs or not tokens:
            return None
        if self.chat:
            return {"content": [_chat_logprob(self.tokenizer, t) for t in tokens]}
        return _completion_logprobs(self.tokenizer, tokens)

    async def whole(self, http: Request) -> dict:
        choices = []
        try:
            for i, (queue, stream) in enumerate(zip(self.queues, self.streams, strict=True)):
                reason, tokens = await _drain(queue, stream, http)
                entry = {"index": i, "finish_reason": reason, "logprobs": self._logprobs(tokens)}
                if self.chat:
                    entry["message"] = {"role": "assistant", "content": stream.text()}
                else:
                    entry["text"] = stream.text()
                choices.append(entry)
        finally:
            for job in self.jobs:
                job.cancel()  # a no-op for finished rows; frees the others if the client went away
        return {**self.meta, "object": self.kind, "choices": choices, "usage": self.usage()}

    def _chunk(self, index: int, text: str, reason: str | None, tokens=(), first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            entry = {"index": index, "delta": delta}
        else:
            entry = {"index": index, "text": text}
        entry.update(finish_reason=reason, logprobs=self._logprobs(list(tokens)))
        return _event({**self.meta, "object": f"{self.kind}.chunk" if self.chat else self.kind, "choices": [entry]})

    async def events(self, http: Request, usage: bool) -> AsyncIterator[str]:
        """SSE: per choice, a first chunk with the role (chat), text deltas, a last chunk with the finish reason;
        then the usage (if asked) and [DONE]. Leaving early (the client went away) cancels the rows."""
        try:
            for i, (queue, stream) in enumerate(zip(self.queues, self.streams, strict=True)):
                if self.chat:
                    yield self._chunk(i, "", None, first=True)
                while True:
                    kind, payload = await queue.get()
                    if kind == "token":
                        text = stream.add(payload.id)
                        if text or self.logprobs:
                            yield self._chunk(i, text, None, [payload] if self.logprobs else ())
                    elif kind == "done":
                        yield self._chunk(i, stream.finish(), "stop" if stream.stopped else payload)
                        break
                    else:
                        yield _event({"error": {"message": payload, "type": "server_error", "param": None,
                                                "code": None}})
                        return
            if usage:
                yield _event({**self.meta, "object": f"{self.kind}.chunk" if self.chat else self.kind,
                              "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            for job in self.jobs:
                job.cancel()


async def _drain(queue: asyncio.Queue, stream: TextStream, http: Request) -> tuple[str, list]:
    """Wait for one row to finish (its tokens into `stream`); give up if the client disconnects."""
    tokens = []
    while True:
        try:
            kind, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                raise APIError(499, "the client disconnected") from None
            continue
        if kind == "token":
            stream.add(payload.id)
            tokens.append(payload)
        elif kind == "done":
            stream.finish()
            return ("stop" if stream.stopped else payload), tokens[:stream.kept_tokens()]
        else:
            raise APIError(500, payload, kind="server_error")


def _bridge(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """The scheduler thread's events into this request's queue, on the event loop's thread."""
    def on_event(kind: str, payload) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
    return on_event


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _compute(config, body: Sampling) -> Compute:
    choice = body.compute
    if choice is None:
        return Compute()
    try:
        adaptive = None if choice.adaptive is None else str(choice.adaptive)
        return Compute.parse(config, width=None if choice.mode is None else str(choice.mode), loops=choice.loops,
                             adaptive=adaptive, names={"width": "compute.mode", "loops": "compute.loops",
                                                       "adaptive": "compute.adaptive"})
    except ValueError as error:
        message = str(error)
        param = message.split(":", 1)[0] if message.startswith("compute.") else "compute"
        raise APIError(400, message if message.startswith("compute") else f"compute.{message}", param) from None


def _draft(config, body: Sampling) -> Draft | None:
    choice = body.compute
    if choice is None or choice.speculative is None:
        return None
    try:
        return Draft.parse(config, choice.speculative, k=choice.draft_tokens)
    except ValueError as error:
        raise APIError(400, f"compute.{error}", "compute.speculative") from None


def _top_logprobs(body: Sampling, chat: bool) -> int | None:
    if chat:
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def _chat_logprob(tokenizer, token) -> dict:
    def entry(i: int, logprob: float) -> dict:
        text = tokenizer.decode([i])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {**entry(token.id, token.logprob), "top_logprobs": [entry(i, lp) for i, lp in token.top or []]}


def _completion_logprobs(tokenizer, tokens: list) -> dict:
    texts = [tokenizer.decode([t.id]) for t in tokens]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in t.top or []} for t in tokens],
            "text_offset": offsets}


class _Collector:
    """The schedulers' counters and gauges, one series per scheduler (one per device), read when /metrics is
    scraped."""

    def __init__(self, schedulers: list[Scheduler]):
        self.schedulers = schedulers

    def collect(self):
        for key, help_text in (("requests", "requests admitted into the batch"),
                               ("prompt_tokens", "prompt tokens prefilled"),
                               ("completion_tokens", "tokens generated"),
                               ("flops", "forward FLOPs spent on finished requests"),
                               ("cancelled", "requests cancelled by their clients"),
                               ("steps", "decode steps run")):
            family = CounterMetricFamily(f"adamba_{key}", help_text, labels=["scheduler", "device"])
            for i, scheduler in enumerate(self.schedulers):
                family.add_metric([str(i), str(scheduler.device)], scheduler.stats[key])
            yield family
        for key, help_text, value in (("queue_waiting", "requests waiting for a slot", lambda s: len(s.waiting)),
                                      ("slots_active", "slots generating", lambda s: s.active),
                                      ("slots_total", "slots in the batch", lambda s: s.max_batch)):
            family = GaugeMetricFamily(f"adamba_{key}", help_text, labels=["scheduler", "device"])
            for i, scheduler in enumerate(self.schedulers):
                family.add_metric([str(i), str(scheduler.device)], value(scheduler))
            yield family
