"""Response bodies in OpenAI's formats: a whole answer, streamed chunks (server-sent events
ending `data: [DONE]`), and usage. Every body also names what served it: `hydra_cluster` (the
routed or pinned cluster; null for the base) and `system_fingerprint` ("hydra-edge:cluster_3")."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

Kind = Literal["chat", "completion"]


def sse(body: dict | str) -> str:
    """One server-sent event; the str "[DONE]" ends the stream."""
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Replies:
    """The bodies of one request's response, all with the same id, model and origin."""

    def __init__(self, kind: Kind, model: str, cluster: int | None, served_by: str) -> None:
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.origin = {"system_fingerprint": f"hydra-edge:{served_by}", "hydra_cluster": cluster}

    def _head(self, chunk: bool) -> dict:
        kind = {"chat": "chat.completion", "completion": "text_completion"}[self.kind]
        return {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.kind == "chat" else ""),
            "created": self.created,
            "model": self.model,
            **self.origin,
        }

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(False), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        """A streamed piece; for chat, the first carries the role and the last the finish reason."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last chunk when the client asked for stream_options.include_usage."""
        return {**self._head(True), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
