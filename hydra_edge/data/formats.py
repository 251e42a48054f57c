"""The row formats users bring from LLaMA-Factory, axolotl and TRL, turned into one shape.

    alpaca             instruction, input?, output, system?
    sharegpt           conversations: [{from: human|gpt|system, value}], system?
    messages           messages: [{role: system|user|assistant|tool, content}], tools?
                       (OpenAI's format: content a string or a list of text parts; an
                       assistant turn may carry tool_calls, answered by `tool` turns)
    prompt_completion  prompt, completion
    text               text

Every conversation becomes a list of {role, content} messages; `text` stays text. A row that
does not fit raises `RowProblem(reason, detail)`; the reasons are few and fixed so that
`--skip-invalid` can count them.
"""

from __future__ import annotations

import json

from hydra_edge.files import NumberTooLong, parse_json

ROLES = ("system", "user", "assistant")
MESSAGE_ROLES = (*ROLES, "tool")
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
    """OpenAI's chat format: text parts joined into one string, tool calls kept (their JSON
    arguments parsed, as chat templates expect a mapping), and `tool` turns after the call."""
    turns = row.get("messages")
    if not isinstance(turns, list) or not all(isinstance(m, dict) for m in turns):
        return _turns(row, "messages", "role", "content", {r: r for r in ROLES}, "system, user or assistant")
    if not turns:
        raise RowProblem("empty field", "'messages' is an empty list")
    out = []
    for i, m in enumerate(turns):
        role = m.get("role")
        if not isinstance(role, str):
            raise RowProblem("missing field" if role is None else "wrong type", f"messages[{i}] needs a string 'role'")
        if role not in MESSAGE_ROLES:
            raise RowProblem("unknown role", f"messages[{i}].role is {role!r}; use system, user, assistant or tool")
        calls = _tool_calls(m, i) if role == "assistant" else None
        content = _content(m, i, may_be_empty=bool(calls))
        message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = calls
        if role == "tool":
            if not out or not (out[-1]["role"] == "tool" or out[-1].get("tool_calls")):
                raise RowProblem("tool turn without a call", f"messages[{i}] answers no assistant tool_calls")
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    message[key] = m[key]
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise RowProblem("no assistant turn", "'messages' has no assistant message to learn from")
    if out[-1]["role"] != "assistant":
        raise RowProblem(
            "last turn not the assistant's",
            f"'messages' ends with a {out[-1]['role']} turn, which has no answer to learn from; end it with the "
            "assistant's reply",
        )
    return out


def _content(m: dict, i: int, may_be_empty: bool) -> str:
    """A message's text: a string, or OpenAI content parts [{type: text, text}] joined."""
    content = m.get("content")
    if content is None and not may_be_empty:
        raise RowProblem("missing field", f"messages[{i}] needs 'content'")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RowProblem(
                    "unsupported content", f"messages[{i}].content[{j}] is a {kind!r} part; only text parts train"
                )
            texts.append(part["text"])
        content = "".join(texts)
    if content is not None and not isinstance(content, str):
        raise RowProblem("wrong type", f"messages[{i}].content must be a string or a list of text parts")
    if not (content or "").strip() and not may_be_empty:
        raise RowProblem("empty field", f"messages[{i}].content is empty")
    return content or ""


def _tool_calls(m: dict, i: int) -> list[dict] | None:
    calls = m.get("tool_calls")
    if calls is None:
        return None
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise RowProblem("wrong type", f"{where} must be a non-empty list")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowProblem("bad tool call", f"{where}[{j}] needs function.name (OpenAI's format)")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = parse_json(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise RowProblem("bad tool call", f"{where}[{j}].function.arguments is not JSON ({exc.msg})") from None
            except NumberTooLong as exc:
                raise RowProblem("bad tool call", f"{where}[{j}].function.arguments holds {exc}") from None
            except RecursionError:
                raise RowProblem("bad tool call", f"{where}[{j}].function.arguments is nested too deeply") from None
        if not isinstance(arguments, dict):
            raise RowProblem("bad tool call", f"{where}[{j}].function.arguments must be a JSON object")
        entry = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def tools_of(row) -> list[dict] | None:
    """A messages row's `tools` (function definitions the chat template shows the model)."""
    tools = row.get("tools") if isinstance(row, dict) else None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowProblem("wrong type", "'tools' must be a list of function definitions (objects)")
    return tools or None


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
