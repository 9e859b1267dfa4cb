"""The request bodies of the OpenAI-compatible API, as pydantic models: what a field may hold is checked here, so a
bad request is a 400 naming the field (api.py turns validation errors into OpenAI's error shape). Extensions the
OpenAI client sends through `extra_body`: `top_k`, `min_p`, `compute` (adamba's compute choice per request) and
vLLM's `ignore_eos`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 8
MAX_TOP_LOGPROBS = 20


class ComputeChoice(BaseModel):
    """{"mode": "ghost" | a width | "64,128,...", "loops": 8 | "kl:16", "adaptive": "calibrated" | 0.9,
    "speculative": "ghost" | "exit:2" (self-speculative decoding's draft), "draft_tokens": 4 (its k)}."""

    model_config = ConfigDict(extra="forbid", strict=True)
    mode: str | int | None = None
    loops: str | int | None = None
    adaptive: str | float | None = None
    speculative: str | None = None
    draft_tokens: int = Field(default=4, ge=1, le=16)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """Fields both endpoints share."""

    # strict: JSON types as OpenAI documents them ("yes" is not true, "2" is not 2); unknown fields are ignored, as
    # OpenAI clients send some this server does not use (user, ...)
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    min_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    compute: ComputeChoice | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model emits (benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP or any(not s or len(s) > 256 for s in stops):
            raise ValueError(f"at most {MAX_STOP} stop sequences, each 1 to 256 characters")
        return stops

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text: a string, or the text parts of a content list."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("messages: content parts must be {\"type\": \"text\", \"text\": ...}")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
