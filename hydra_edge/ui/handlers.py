"""What every tab shares: the app's context and the rule that user mistakes are messages.

A `UserError` (a bad path, a busy job slot, a malformed number) becomes a `gr.Error`: a red
notice in the browser and an `AppError` with the same text for API clients; never a traceback.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import gradio as gr

from hydra_edge.errors import UserError
from hydra_edge.ui.chatting import ChatModels
from hydra_edge.ui.jobs import JobManager
from hydra_edge.ui.workspace import Workspace


@dataclass
class AppContext:
    """The server-side state the tabs share (it outlives any browser session)."""

    ws: Workspace
    jobs: JobManager
    chat_models: ChatModels
    max_upload_bytes: int


def user_errors(fn):
    """Turns UserError into gr.Error; keeps fn's signature (gradio names API parameters from it)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as exc:
                raise gr.Error(str(exc), print_exception=False) from None

        return generator

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return wrapper


def refreshed(dropdown_choices: list[str], current: str | None, keep_custom: bool = True) -> dict:
    """A dropdown update with fresh choices that keeps the current value when it still makes sense."""
    value = (
        current
        if (current in dropdown_choices or (keep_custom and current))
        else (dropdown_choices[0] if dropdown_choices else None)
    )
    return gr.update(choices=dropdown_choices, value=value)


def command_box(value: str = "", elem_id: str | None = None) -> gr.Code:
    """The read-only shell command a tab runs, which a user can copy."""
    return gr.Code(
        value,
        language="shell",
        label="Equivalent command",
        interactive=False,
        lines=3,
        wrap_lines=True,
        show_line_numbers=False,
        elem_id=elem_id,
    )
