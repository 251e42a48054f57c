"""Ollama Modelfiles for a GGUF export: the base, one cluster's LoRA adapter, the chat template and
the stop tokens.

Why the template is written out: Ollama formats chats with a Go text/template, not the Jinja one
in the GGUF's metadata. Left to itself it picks the closest of its built-in templates (or the bare
prompt), which can differ from the format the adapter was trained on. So go_template derives a Go
template from the training template by rendering it, not by parsing it: sentinel contents give
the text before and after each role's content, the header and the generation prompt. The result
is checked against Jinja on several conversations, and None (no TEMPLATE: Ollama's own choice)
is returned rather than a template that would prompt the model differently than training did.

What the derived template covers, and what it leaves out:
- Contents go in as they are. A template that `| trim`s contents (gemma, llama3) matches only for
  contents without surrounding whitespace, the usual case.
- A system message that opens the next user turn (Gemma: "<start_of_turn>user\\n" + system +
  "\\n\\n" + user) is kept exact by tracking the previous message's role ($prev).
- Conversations are checked with one system message, first. Tool calls are not covered. Ollama
  joins consecutive messages of the same role with a blank line before templating.
- The leading BOS is left out: llama.cpp and Ollama add it when the GGUF says add_bos_token.
- A template that uses eos_token needs eos_token given. One that numbers turns (loop.index) or
  adds a default system prompt when there is none (qwen2.5) cannot be written with these
  constructs and gives None.

Modelfile quoting follows Ollama's parser (parser/parser.go): a value runs to the end of its line,
or across lines inside "..." or \"\"\"...\"\"\", and nothing is escaped. A quote or backslash inside
a quoted value is read as written, so stop tokens are written between quotes as they are, and
modelfile() checks that each value reads back unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROLES = ("user", "assistant", "system")
QUOTE = '"'
TRIPLE = QUOTE * 3
INSTRUCTIONS = ("from", "adapter", "template", "parameter", "system", "license", "message", "draft")
INSTRUCTIONS += ("renderer", "parser", "requires")
NO_TEMPLATE = (
    "# No TEMPLATE: the chat template has no exact Ollama equivalent; Ollama takes the built-in template closest "
    "to the GGUF's own, or the bare prompt (see `ollama show --template`)."
)
_EOS_PROBE = "Eos7Probe"  # eos_token while it is unknown: seen in a rendering, the template needs it
# The conversations a derived template is checked on (contents without surrounding whitespace).
CHECKS = (
    (("user", "Hello there"),),
    (("system", "You are terse."), ("user", 'Say "hi"\nin two lines')),
    (("user", "2+2?"), ("assistant", "4, as {{ braces }} show"), ("user", "And 3+3?")),
    (("system", "Answer in French."), ("user", "Hi"), ("assistant", "Bonjour"), ("user", "Merci <3")),
)


class _NotExpressible(Exception):
    """The template does not follow the patterns a Go template is derived from."""


@dataclass
class _Wrappers:
    header: str  # once, before the first message
    pre: dict[str, str]  # role -> text before its content
    post: dict[str, str]  # role -> text after its content
    fold: str | None  # text before a user's content right after a system message (Gemma), else None
    generation: str  # the generation prompt, after the last message

    def literals(self) -> list[str]:
        return [self.header, *self.pre.values(), *self.post.values(), self.fold or "", self.generation]


def go_template(chat_template: str, bos_token: str | None = None, *, eos_token: str | None = None) -> str | None:
    """Ollama's Go text/template equivalent of a Jinja chat template (HF-style: variables `messages`,
    `add_generation_prompt`, `bos_token`, `eos_token`), or None when the template cannot be written
    with the patterns above (or renders differently on any checked conversation)."""
    try:
        render = _renderer(chat_template, bos_token, eos_token)
        wrappers = _derive(render)
        if any(render(list(conversation), True) != _apply(wrappers, conversation) for conversation in CHECKS):
            return None
    except Exception:  # the probes are conversations the template may reject
        return None
    if any("{{" in text or text.endswith("{") or TRIPLE in text for text in wrappers.literals()):
        return None  # would need escaping in Go, or cannot be quoted in a Modelfile
    return _go_text(wrappers)


def _renderer(chat_template: str, bos_token: str | None, eos_token: str | None):
    """render(messages as (role, content) pairs, add_generation_prompt) -> text, less the leading BOS."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(chat_template)
    variables = {"bos_token": bos_token or "", "eos_token": _EOS_PROBE if eos_token is None else eos_token}

    def render(messages: list[tuple[str, str]], generation: bool) -> str:
        conversation = [{"role": role, "content": content} for role, content in messages]
        text = template.render(messages=conversation, add_generation_prompt=generation, **variables)
        if eos_token is None and _EOS_PROBE in text:
            raise _NotExpressible("the template uses eos_token, which was not given")
        return text[len(bos_token) :] if bos_token and text.startswith(bos_token) else text

    return render


def _sentinel(index: int) -> str:
    return f"Hx{index}Sntl"  # mixed case: a template that changes case loses it


def _parts(render, roles: list[str]) -> list[str]:
    """The text around each content when messages with these roles are rendered: n + 1 parts."""
    text = render([(role, _sentinel(i)) for i, role in enumerate(roles)], False)
    parts = []
    for i in range(len(roles)):
        before, found, text = text.partition(_sentinel(i))
        if not found:
            raise _NotExpressible(f"message {i} ({roles[i]}) is not rendered as it is")
        parts.append(before)
    return [*parts, text]


def _without_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise _NotExpressible(f"{text!r} does not start with {prefix!r}")
    return text[len(prefix) :]


def _without_suffix(text: str, suffix: str) -> str:
    if not text.endswith(suffix):
        raise _NotExpressible(f"{text!r} does not end with {suffix!r}")
    return text[: len(text) - len(suffix)]


def _derive(render) -> _Wrappers:
    """Per-role wrappers from four renderings; the checks in go_template confirm them."""
    user = _parts(render, ["user"])  # header + pre[user], post[user]
    user_assistant = _parts(render, ["user", "assistant"])  # ..., post[user] + pre[assistant], post[assistant]
    user_again = _parts(render, ["user", "assistant", "user"])  # ..., post[assistant] + pre[user], ...
    system_user = _parts(render, ["system", "user"])  # header + pre[system], post[system] + pre[user], ...
    post = {"user": user[1], "assistant": user_assistant[2]}
    pre = {
        "user": _without_prefix(user_again[2], post["assistant"]),
        "assistant": _without_prefix(user_assistant[1], post["user"]),
    }
    header = _without_suffix(user[0], pre["user"])
    pre["system"] = _without_prefix(system_user[0], header)
    fold = None
    if system_user[1].endswith(pre["user"]):
        post["system"] = _without_suffix(system_user[1], pre["user"])
    else:  # the system message opens the user turn after it
        post["system"], fold = "", system_user[1]
    probe = [("user", _sentinel(0))]
    generation = _without_prefix(render(probe, True), render(probe, False))
    return _Wrappers(header, pre, post, fold, generation)


def _apply(wrappers: _Wrappers, conversation) -> str:
    """What the Go template renders for a conversation (generation prompt included)."""
    out, previous = [wrappers.header], ""
    for role, content in conversation:
        folded = role == "user" and previous == "system" and wrappers.fold is not None
        out += [wrappers.fold if folded else wrappers.pre[role], content, wrappers.post[role]]
        previous = role
    return "".join(out) + wrappers.generation


def _go_text(wrappers: _Wrappers) -> str:
    branches = []
    for i, role in enumerate(ROLES):
        pre = wrappers.pre[role]
        if role == "user" and wrappers.fold is not None:
            pre = f'{{{{ if eq $prev "system" }}}}{wrappers.fold}{{{{ else }}}}{pre}{{{{ end }}}}'
        keyword = "if" if i == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{wrappers.post[role]}')
    body = "".join(branches) + "{{ end }}"
    opening = "{{ " if wrappers.header else "{{- "  # {{- would trim a header's trailing whitespace
    if wrappers.fold is None:
        start = f"{wrappers.header}{opening}range .Messages }}}}"
    else:
        start = f'{wrappers.header}{opening}$prev := "" }}}}{{{{- range .Messages }}}}'
        body += "{{ $prev = .Role }}"
    return f"{start}{body}{{{{ end }}}}{wrappers.generation}"


def modelfile(base: str, adapter: str, template: str | None, stops: list[str], comment: str = "") -> str:
    """Modelfile text: '# ' comment lines, FROM, ADAPTER, TEMPLATE (or a comment saying why there is
    none), one `PARAMETER stop` per stop token. Sampling is left to the user. ValueError for a value
    Ollama's quoting cannot hold."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += ["FROM " + _quote(base, ("", QUOTE, TRIPLE)), "ADAPTER " + _quote(adapter, ("", QUOTE, TRIPLE))]
    lines.append(NO_TEMPLATE if template is None else "TEMPLATE " + _quote(template, (TRIPLE, QUOTE)))
    lines += ["PARAMETER stop " + _quote(stop, (QUOTE, TRIPLE)) for stop in stops]
    return "\n".join(lines) + "\n"


def _quote(value: str, marks: tuple[str, ...]) -> str:
    """The value between the first of these quote marks that Ollama reads back as the value."""
    for mark in marks:
        quoted = f"{mark}{value}{mark}"
        try:
            if parse_modelfile(f"FROM x\nTEMPLATE {quoted}\n")["template"] == value:
                return quoted
        except ValueError:
            pass
    raise ValueError(f"{value!r} cannot be written in a Modelfile: Ollama's quoting has no escapes")


def parse_modelfile(text: str) -> dict:
    """{"from", "adapter", "template", "parameters": [(name, value), ...]} from a Modelfile, read as
    Ollama's parser reads it; the other instructions are checked and skipped. ValueError, one line,
    for a malformed file."""
    parsed: dict = {"from": None, "adapter": None, "template": None, "parameters": []}
    pieces = re.split(r"([\r\n])", text.removeprefix("\ufeff"))  # lines and the newlines between
    instruction, buffer, start = None, "", 0
    for index in range(0, len(pieces), 2):
        line, number = pieces[index], index // 2 + 1
        if instruction is None:
            if not line.strip(" \t") or line.lstrip(" \t").startswith("#"):
                continue
            instruction, start = _instruction(line, number), number
            line = instruction[2]
        buffer += "".join(c for c in line if c.isprintable() or c in " \t")  # Ollama drops the rest
        value = _unquote(buffer.strip())
        if value is None:  # inside quotes: the value goes on, newline included
            buffer += pieces[index + 1] if index + 1 < len(pieces) else ""
            continue
        name, key, _ = instruction
        if name == "parameter":
            parsed["parameters"].append((key, value))
        elif name in parsed:
            parsed[name] = value
        instruction, buffer = None, ""
    if instruction is not None:
        raise ValueError(f"Modelfile line {start}: {instruction[0].upper()}'s quoted value is never closed")
    if parsed["from"] is None:
        raise ValueError("Modelfile: no FROM line (FROM <model name or GGUF path>)")
    return parsed


def _instruction(line: str, number: int) -> tuple[str, str | None, str]:
    """(instruction, parameter name or message role, the rest of the line) of a line that opens one."""
    match = re.match(r"[ \t]*([A-Za-z]*)([ \t]?)", line)
    name = match.group(1).lower()
    if name not in INSTRUCTIONS or not match.group(2):
        raise ValueError(
            f"Modelfile line {number}: {line.strip()[:40]!r} is not an instruction and its value "
            f"({', '.join(i.upper() for i in INSTRUCTIONS)})"
        )
    rest = line[match.end() :]
    if name not in ("parameter", "message"):
        return name, None, rest
    match = re.match(r"([A-Za-z0-9_]+)[ \t]" if name == "parameter" else r"([A-Za-z]+)[ \t]", rest)
    if not match or (name == "message" and match.group(1) not in ROLES):
        what = "a name and a value" if name == "parameter" else "a role (user, assistant, system) and a value"
        raise ValueError(f"Modelfile line {number}: {name.upper()} needs {what}")
    return name, match.group(1), rest[match.end() :]


def _unquote(value: str) -> str | None:
    """Ollama's unquote: the value inside \"\"\"...\"\"\" or "...", or as it is; None while a quote is open."""
    if value.startswith(TRIPLE):
        return value[3:-3] if len(value) >= 6 and value.endswith(TRIPLE) else None
    if value.startswith('"'):
        return value[1:-1] if len(value) >= 2 and value.endswith('"') else None
    return value
