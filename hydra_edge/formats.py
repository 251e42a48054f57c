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

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
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


def _turns(
    row: dict, field: str, role_key: str, text_key: str, roles: dict[str, str], hint: str, fold_case: bool = False
) -> list[dict]:
    """Checks a list of turns and maps it to {role, content} messages."""
    turns = row.get(field)
    if not isinstance(turns, list):
        raise RowProblem("wrong type", f"'{field}' must be a list, got {type(turns).__name__}")
    if not turns:
        raise RowProblem("empty field", f"'{field}' is an empty list")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise RowProblem("wrong type", f"{field}[{i}] must be an object, got {type(m).__name__}")
        for key in (role_key, text_key):
            if key not in m or m[key] is None:
                raise RowProblem("missing field", f"{field}[{i}] needs '{key}'")
        if not isinstance(m[role_key], str) or not isinstance(m[text_key], str):
            raise RowProblem("wrong type", f"{field}[{i}].{role_key} and .{text_key} must be strings")
        role = roles.get(m[role_key].lower() if fold_case else m[role_key])
        if role is None:
            raise RowProblem("unknown role", f"{field}[{i}].{role_key} is {m[role_key]!r}; use {hint}")
        if not m[text_key].strip():
            raise RowProblem("empty field", f"{field}[{i}].{text_key} is empty")
        out.append({"role": role, "content": m[text_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise RowProblem("no assistant turn", f"'{field}' has no assistant message to learn from")
    if out[-1]["role"] != "assistant":
        raise RowProblem(
            "last turn not the assistant's",
            f"'{field}' ends with a {out[-1]['role']} turn, which has no answer to learn from; end it with the "
            "assistant's reply",
        )
    return out


def _messages(row: dict) -> list[dict]:
    return _turns(row, "messages", "role", "content", {r: r for r in ROLES}, "system, user or assistant")


def _sharegpt(row: dict) -> list[dict]:
    messages = _turns(row, "conversations", "from", "value", SHAREGPT_ROLES, "human, gpt or system", fold_case=True)
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


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
