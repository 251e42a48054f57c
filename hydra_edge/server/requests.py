"""The request bodies of /v1/chat/completions and /v1/completions, checked as OpenAI checks them.

Types are strict (a string is not a number), so a wrong type is a 400 naming the field, never a
silent conversion. Fields that would change the answer but that this server cannot honour (n > 1,
logprobs, tools, penalties, ...) are refused by name; fields that do not change it (user,
metadata, ...) are accepted and ignored, as vLLM does, so client libraries that send them work.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hydra_edge.server.errors import ApiError

_STRICT = ConfigDict(strict=True, extra="allow")
# ONNX Runtime GenAI's random_seed is a 32-bit int (-1: random), so the range every engine honours.
SEED_MAX = 2**31 - 1
# Part names pydantic adds to an error's location inside a union ("str", "list[TextPart]").
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_turn(self) -> dict:
        """The {"role", "content"} turn chat templates render: parts joined, and OpenAI's
        `developer` role as `system`, which templates know."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What both endpoints share: the model and how to sample."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens (load benchmarks)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("seed")
    @classmethod
    def _seed(cls, value):
        if value is not None and not 0 <= value <= SEED_MAX:
            raise ValueError(f"out of range; use 0 to {SEED_MAX}")
        return value

    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def turns(self) -> list[dict]:
        """The conversation as {"role", "content"} turns (what is routed and rendered)."""
        raise NotImplementedError


# Fields that would change the answer, and the values that leave it unchanged (types included:
# `"n": true` is not 1).
_UNSUPPORTED = {
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)

    def turns(self) -> list[dict]:
        return [m.as_turn() for m in self.messages]


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request (a list of exactly one string, or a string)")
            value = value[0]
        if not value:
            raise ValueError("the prompt is empty")
        return value

    def turns(self) -> list[dict]:
        """The prompt as the one turn the request router reads."""
        return [{"role": "user", "content": self.prompt}]


def parse(model_class: type[GenerationRequest], body: object) -> GenerationRequest:
    """The checked request, or a 400 naming the first wrong field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for field, harmless in _UNSUPPORTED.items():
        value = body.get(field)
        if not any(value == h and type(value) is type(h) for h in harmless):
            raise ApiError(400, f"`{field}` is not supported by this server; leave it out", param=field)
    try:
        return model_class.model_validate(body)
    except ValidationError as exc:
        first = max(exc.errors(), key=lambda e: len(e["loc"]))  # in a union: the branch that got furthest
        where = ".".join(str(p) for p in first["loc"] if not (str(p) in _UNION_TAGS or "[" in str(p)))
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "required field missing"
        raise ApiError(400, f"`{where}`: {message}", param=where or None) from None


async def read_body(request: Request, limit_bytes: int, timeout: float) -> bytes:
    """The raw body, refused (413) as soon as it passes the limit, without reading the rest, and
    (408) when it has not all arrived within `timeout` seconds, so a trickling client cannot hold
    its connection open."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is larger than this server accepts ({limit_bytes} bytes)")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_big

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--client-timeout)") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def decode_json(raw: bytes) -> object:
    """The body as JSON: strict JSON (no NaN), nesting the parser can follow, and text that is
    UTF-8 throughout (no lone surrogate such as "\\ud800", which no tokenizer or reply can encode)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON (the body nests too deep)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON (the body nests too deep)") from None
    except UnicodeEncodeError:
        where = _not_text(body) or "body"
        raise ApiError(400, f"`{where}` is not valid UTF-8 text (it holds a lone surrogate)", param=where) from None
    return body


def _not_text(body: object) -> str:
    """The path (messages.0.content) of a string or key in body that UTF-8 cannot encode; a loop,
    not recursion, since the body may nest as deep as the parser allowed."""
    stack = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not _is_text(value):
            return path
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            here = f"{path}.{key}" if path else str(key)
            if not _is_text(here):  # the key itself: named with its surrogate escaped
                return here.encode("utf-8", "backslashreplace").decode()
            stack.append((here, item))
    return ""


def _is_text(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_body(model_class: type[GenerationRequest], raw: bytes) -> GenerationRequest:
    """decode_json then parse: the CPU-bound half of reading a request, run off the event loop."""
    return parse(model_class, decode_json(raw))
