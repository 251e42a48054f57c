"""The row formats users bring from LLaMA-Factory, axolotl and TRL, turned into one shape.

    alpaca             instruction, input?, output, system?
    sharegpt           conversations: [{from: human|gpt|system, value}], system?
    messages           messages: [{role: system|user|assistant, content}]
    prompt_completion  prompt, completion
    text               text

Every conversation becomes a list of {role, content} messages; `text` stays text. A row that
does not fit raises `RowProblem(reason, detail)`; the reasons are few and fixed so that
`--skip-invalid` can count them.
"""

from __future__ import annotations

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
}


class RowProblem(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason} ({detail})")
        self.reason, self.detail = reason, detail


def detect_format(row) -> str | None:
    """The format a row's keys announce, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def _string(row: dict, key: str, fmt: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise RowProblem("missing field", f"'{key}' is required in {fmt} rows")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowProblem("wrong type", f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowProblem("empty field", f"'{key}' is empty")
    return value


def _check_conversation(messages: list[dict], field: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowProblem("no assistant turn", f"'{field}' has no assistant message to learn from")
    return messages


def _messages(row: dict) -> list[dict]:
    turns = row.get("messages")
    if not isinstance(turns, list):
        raise RowProblem("wrong type", f"'messages' must be a list, got {type(turns).__name__}")
    if not turns:
        raise RowProblem("empty field", "'messages' is an empty list")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise RowProblem("wrong type", f"messages[{i}] must be an object, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m or m[key] is None:
                raise RowProblem("missing field", f"messages[{i}] needs '{key}'")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise RowProblem("wrong type", f"messages[{i}].role and .content must be strings")
        if m["role"] not in ROLES:
            raise RowProblem("unknown role", f"messages[{i}].role is {m['role']!r}; use system, user or assistant")
        if not m["content"].strip():
            raise RowProblem("empty field", f"messages[{i}].content is empty")
        out.append({"role": m["role"], "content": m["content"]})
    return _check_conversation(out, "messages")


def _sharegpt(row: dict) -> list[dict]:
    turns = row.get("conversations")
    if not isinstance(turns, list):
        raise RowProblem("wrong type", f"'conversations' must be a list, got {type(turns).__name__}")
    if not turns:
        raise RowProblem("empty field", "'conversations' is an empty list")
    out = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        out.append({"role": "system", "content": system})
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise RowProblem("wrong type", f"conversations[{i}] must be an object, got {type(m).__name__}")
        for key in ("from", "value"):
            if key not in m or m[key] is None:
                raise RowProblem("missing field", f"conversations[{i}] needs '{key}'")
        if not isinstance(m["from"], str) or not isinstance(m["value"], str):
            raise RowProblem("wrong type", f"conversations[{i}].from and .value must be strings")
        role = SHAREGPT_ROLES.get(m["from"].lower())
        if role is None:
            raise RowProblem("unknown role", f"conversations[{i}].from is {m['from']!r}; use human, gpt or system")
        if not m["value"].strip():
            raise RowProblem("empty field", f"conversations[{i}].value is empty")
        out.append({"role": role, "content": m["value"]})
    return _check_conversation(out, "conversations")


def _alpaca(row: dict) -> list[dict]:
    instruction = _string(row, "instruction", "alpaca")
    extra = _string(row, "input", "alpaca", required=False)
    output = _string(row, "output", "alpaca")
    system = _string(row, "system", "alpaca", required=False)
    user = instruction if not (extra and extra.strip()) else f"{instruction}\n\n{extra}"
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_completion(row: dict) -> list[dict]:
    prompt = _string(row, "prompt", "prompt_completion")
    completion = _string(row, "completion", "prompt_completion")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


CONVERTERS = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca, "prompt_completion": _prompt_completion}


def normalize(row, fmt: str) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for conversations, (None, text) for text rows; RowProblem if it does not fit."""
    if not isinstance(row, dict):
        raise RowProblem("wrong type", f"a row must be an object, got {type(row).__name__}")
    if fmt == "text":
        return None, _string(row, "text", "text")
    return CONVERTERS[fmt](row), None
