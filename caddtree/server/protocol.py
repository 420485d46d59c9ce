"""OpenAI's request and response shapes for completions and chat completions, and its error shape.

Requests are validated here (types, ranges, the one choice per request we serve); responses carry
the usual `usage` plus a `caddtree` field with the decoding statistics that make the speed-up visible.
"""

from __future__ import annotations

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator

from caddtree.decode.sampling import SEEDS
from caddtree.decode.stats import GenerationResult


class ChatMessage(BaseModel):
    role: str
    content: str


class _Request(BaseModel):
    """Fields both endpoints share; unknown fields are ignored, as OpenAI's servers do."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEEDS.start, lt=SEEDS.stop)
    stop: str | list[str] | None = Field(default=None, validate_default=True)  # always a list after validation
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _number(cls, value):
        return float(value) if type(value) is int else value  # JSON's 1 is as good as 1.0

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("prompt must be one string (batches of prompts are not served)")
        return value if isinstance(value, str) else value[0]


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def stats(result: GenerationResult) -> dict:
    """The decoding statistics of a reply: how fast, how many tokens per target pass."""
    fields = ("method", "tau", "rounds", "mean_budget", "tokens_per_s", "ms_per_token", "drafted_share",
              "prefill_seconds", "decode_seconds")
    summary = result.summary()
    return {name: summary[name] for name in fields}


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.new_tokens,
            "total_tokens": result.prompt_tokens + result.new_tokens}


class Reply:
    """One reply's identity, and its JSON bodies (whole, or as stream chunks)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def whole(self, text: str, finish_reason: str, result: GenerationResult) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text, "logprobs": None})
        return {**self._head(self.object), "choices": [{**choice, "finish_reason": finish_reason}],
                "usage": usage(result), "caddtree": stats(result)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, result: GenerationResult | None = None,
              first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None}
        body = {**self._head(f"{self.object}.chunk" if self.chat else self.object),
                "choices": [{**choice, "finish_reason": finish_reason}]}
        if result is not None:
            body.update(usage=usage(result), caddtree=stats(result))
        return body

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


class StopScanner:
    """Finds stop strings in streamed text, holding back a tail that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.hold = max((len(stop) for stop in stops), default=1) - 1

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text now safe to send, and whether a stop string ended the reply."""
        self.pending += piece
        hits = [index for stop in self.stops if (index := self.pending.find(stop)) >= 0]
        if hits:
            safe, self.pending = self.pending[: min(hits)], ""
            return safe, True
        cut = max(len(self.pending) - self.hold, 0)
        safe, self.pending = self.pending[:cut], self.pending[cut:]
        return safe, False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest
