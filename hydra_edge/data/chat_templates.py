"""Chat templates by name (--chat-template chatml|llama3|gemma|qwen2.5) or from a Jinja file.

A template turns a conversation into the text the model trains on and is prompted with. The
tokenizer's own is used unless --chat-template names another; the one a run trained with is
stored in its adapter and used again by eval, chat, export and serve. A base that ships none
gets FALLBACK, with a notice.

The named templates follow the formats their model families were trained on, written here (not
downloaded), and render tool calls the way those families do: chatml and qwen2.5 as Hermes-style
<tool_call> JSON (Qwen2.5's format), llama3 as Llama 3.1's JSON calls with `ipython` results.
gemma has no tool format: a conversation with tool calls fails to render and is reported.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra_edge.errors import UserError

TEMPLATE_DIR = Path(__file__).parent / "templates"


def _template(name: str) -> str:
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")


FALLBACK = _template("fallback")
TEMPLATES = {
    "chatml": _template("chatml"),
    "llama3": _template("llama3"),
    "gemma": _template("gemma"),
    # ChatML with Qwen's default system prompt, as Qwen2.5's own template has it.
    "qwen2.5": "{%- set default_system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}"
    + _template("chatml"),
}


def resolve_chat_template(value: str) -> str:
    """The template text for --chat-template NAME or FILE.jinja, checked to compile."""
    if value in TEMPLATES:
        return TEMPLATES[value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(f"--chat-template {value}: neither a template name ({', '.join(TEMPLATES)}) nor a .jinja file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--chat-template {value}: cannot be read ({exc})") from exc
    check_template(text, f"--chat-template {value}")
    return text


def check_template(text: str, source: str) -> None:
    """A Jinja syntax error, one line naming the line."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise UserError(f"{source}: line {exc.lineno}: {exc.message}; fix the template") from exc


def apply_chat_template(tokenizer, template: str | None, model_name: str) -> None:
    """Sets the template a run renders conversations with: `template` if given, else the
    tokenizer's own, else FALLBACK (with a one-line notice)."""
    if template:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK
        print(
            f"chat template: {model_name} ships none; using hydra-edge's fallback ('### role:' headers, each turn "
            f"ended by EOS); --chat-template {'|'.join(TEMPLATES)}|FILE.jinja picks another",
            file=sys.stderr,
            flush=True,
        )
