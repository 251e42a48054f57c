"""The Chat tab: streaming chat with a finished run (PyTorch adapter) or an ONNX export, with a
system prompt, temperature / top-p / max tokens, the router's choice shown above every answer,
and the base model's answer (same model, HydraLoRA heads off) side by side on request.

API name: chat (outputs: history, base history, routing text, result dict, cleared input).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from hydra_edge.errors import UserError
from hydra_edge.inference.protocol import Sampling
from hydra_edge.ui.chatting import stream_reply
from hydra_edge.ui.handlers import AppContext, refreshed, user_errors

STREAM_INTERVAL_S = 0.05  # at most ~20 screen updates a second while tokens stream


def _text(content) -> str:
    """A chat message's text, whether gradio hands it over as a string or as content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("value") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return "" if content is None else str(content)


def model_messages(history: list | None, system_prompt: str) -> list[dict]:
    """The conversation as the model sees it: the system prompt, then user and assistant turns
    (the routing notes the tab adds to the display are left out)."""
    messages = [{"role": "system", "content": system_prompt.strip()}] if (system_prompt or "").strip() else []
    for message in history or []:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant") or (message.get("metadata") or {}).get("title"):
            continue
        messages.append({"role": role, "content": _text(message.get("content"))})
    return messages


def routing_note(route: dict, loaded) -> dict:
    """The display-only message above an answer: which cluster the router chose (and the gates)."""
    if route.get("gates"):
        body = "gate mix over the prompt: " + "  ".join(f"h{i} {g:.2f}" for i, g in enumerate(route["gates"]))
    else:
        body = loaded.description
    return {"role": "assistant", "content": body, "metadata": {"title": f"router → cluster {route['cluster']}"}}


def routing_text(route: dict | None, loaded) -> str:
    if route is None:
        return ""
    text = f"**Router → cluster {route['cluster']}**"
    if route.get("gates"):
        text += " · gates " + " · ".join(f"h{i} {g:.2f}" for i, g in enumerate(route["gates"]))
    return text + f" · {loaded.description}"


@dataclass
class _Options:
    """The settings column: what every turn is asked with."""

    system_prompt: gr.Textbox
    temperature: gr.Slider
    top_p: gr.Slider
    max_tokens: gr.Slider
    compare_base: gr.Checkbox


@dataclass
class _Conversation:
    """The conversation column: both chats, the routing line, and the message box with its buttons."""

    chatbot: gr.Chatbot
    base_chatbot: gr.Chatbot
    routing: gr.Markdown
    message: gr.Textbox
    send: gr.Button
    clear: gr.Button


def build(ctx: AppContext, demo: gr.Blocks) -> tuple[gr.Dropdown, gr.Markdown]:
    """The tab, laid out (model picker; settings beside the conversation) and wired. Returns the
    picker and its description line, which app.py refreshes whenever the tab is opened."""
    source, reload_list = _model_picker(ctx)
    source_info = gr.Markdown(elem_id="chat-source-info")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=240):
            options = _options()
        with gr.Column(scale=8):
            view = _conversation()
    result = gr.JSON(visible=False)
    shown = [view.chatbot, view.base_chatbot, view.routing, result]
    gr.on(
        [view.message.submit, view.send.click],
        chat_turn(ctx),
        [view.message, view.chatbot, view.base_chatbot, source, options.system_prompt, options.temperature,
         options.top_p, options.max_tokens, options.compare_base],
        [*shown, view.message],
        api_name="chat",
        show_progress="minimal",
    )  # fmt: skip
    view.clear.click(lambda: ([], [], "", None), None, shown, api_visibility="private")
    options.compare_base.change(
        lambda on: gr.update(visible=on), [options.compare_base], [view.base_chatbot], api_visibility="private"
    )
    _wire_model_picker(ctx, source, source_info, reload_list, shown)
    return source, source_info


def _model_picker(ctx: AppContext) -> tuple[gr.Dropdown, gr.Button]:
    sources = ctx.chat_models.sources()
    with gr.Row(equal_height=False):
        source = gr.Dropdown(
            sources,
            value=sources[0] if sources else None,
            allow_custom_value=True,
            scale=5,
            label="Model",
            info="a finished run (PyTorch adapter) or an ONNX export in the workspace",
            elem_id="chat-source",
        )
        reload_list = gr.Button("Refresh list", scale=1, min_width=100, size="md")
    return source, reload_list


def _options() -> _Options:
    return _Options(
        system_prompt=gr.Textbox("", label="System prompt", lines=3, placeholder="optional"),
        temperature=gr.Slider(0.0, 2.0, value=Sampling.temperature, step=0.05, label="Temperature", info="0 = greedy"),
        top_p=gr.Slider(0.05, 1.0, value=Sampling.top_p, step=0.05, label="Top-p"),
        max_tokens=gr.Slider(1, 1024, value=128, step=1, label="Max new tokens"),
        compare_base=gr.Checkbox(
            False,
            label="Compare with the base model",
            info="the same model with the HydraLoRA heads off (PyTorch adapters)",
        ),
    )


def _conversation() -> _Conversation:
    with gr.Row(equal_height=True):
        chatbot = gr.Chatbot(
            label="Fine-tuned",
            height=440,
            elem_id="chatbot",
            buttons=["copy_all"],
            feedback_options=None,
            placeholder="Pick a model above and send a message.",
        )
        base_chatbot = gr.Chatbot(
            label="Base model (adapter off)", height=440, visible=False, elem_id="base-chatbot", feedback_options=None
        )
    routing = gr.Markdown(elem_id="chat-routing")
    with gr.Row(equal_height=True):
        message = gr.Textbox(
            show_label=False,
            placeholder="Type a message and press Enter",
            scale=8,
            elem_id="chat-input",
            autofocus=False,
        )
        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="chat-send")
        clear = gr.Button("Clear", scale=1, min_width=80)
    return _Conversation(chatbot, base_chatbot, routing, message, send, clear)


def _wire_model_picker(ctx: AppContext, source, source_info, reload_list, shown: list) -> None:
    """Picking a model loads it (its description shows) and starts a new conversation; the
    button refreshes the list of runs and exports."""

    @user_errors
    def describe(source: str) -> str:
        if not source:
            return ""
        loaded = ctx.chat_models.get(source)
        return f"Loaded **{loaded.source}**: {loaded.description}."

    source.change(
        describe, [source], [source_info], api_visibility="private", show_progress="minimal", trigger_mode="always_last"
    ).success(lambda: ([], [], "", None), None, shown, api_visibility="private")
    reload_list.click(lambda current: refresh(ctx, current), [source], [source, source_info], api_visibility="private")


def chat_turn(ctx: AppContext):
    """The `chat` API function (gradio names its parameters from this signature)."""

    @user_errors
    def chat(
        message: str,
        history: list,
        base_history: list,
        source: str,
        system_prompt: str = "",
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: float = 128,
        compare_base: bool = False,
    ):
        """One chat turn: streams the answer, shows the routed cluster; optionally the base's answer too."""
        text = (message or "").strip()
        if not text:
            raise UserError("type a message first")
        loaded = ctx.chat_models.get(source)
        if compare_base and loaded.backend != "pytorch":
            raise UserError("comparing with the base model needs a finished run (PyTorch adapter), not an ONNX export")
        turn = _Turn(loaded, text, system_prompt, (int(max_tokens), temperature, top_p), history, base_history)
        turn.history.append({"role": "user", "content": text})
        if compare_base:
            turn.base_history.append({"role": "user", "content": text})
        for _ in turn.answer():
            yield turn.view()
        yield turn.view()
        if compare_base:
            for _ in turn.base_answer():
                yield turn.view()
        yield turn.view(turn.outcome)

    return chat


class _Turn:
    """One message and its answers as they stream: the two displayed histories, the routing line,
    and the outcome the API returns at the end. answer() and base_answer() yield whenever the
    screen is due an update (at most every STREAM_INTERVAL_S, counted across both)."""

    def __init__(self, loaded, text: str, system_prompt: str, sampling: tuple, history, base_history) -> None:
        self.loaded, self.text, self.system_prompt, self.sampling = loaded, text, system_prompt, sampling
        self.history, self.base_history = list(history or []), list(base_history or [])
        # what the model sees: the conversation so far, without this turn's message on display yet
        self.messages = model_messages(self.history, system_prompt) + [{"role": "user", "content": text}]
        self.note, self.shown = "", 0.0
        self.outcome = {
            "source": loaded.source,
            "backend": loaded.backend,
            "cluster": None,
            "gates": None,
            "answer": "",
            "base_answer": None,
        }

    def view(self, result=None) -> tuple:
        """The outputs: histories, routing line, result (skipped until the end), cleared input."""
        return self.history, self.base_history, self.note, gr.skip() if result is None else result, ""

    def _due(self) -> bool:
        if time.monotonic() - self.shown < STREAM_INTERVAL_S:
            return False
        self.shown = time.monotonic()
        return True

    def answer(self) -> Iterator[None]:
        """The fine-tuned model's answer, after the routing note naming its cluster."""
        for kind, value in stream_reply(self.loaded, self.messages, *self.sampling):
            if kind == "route":
                self.outcome["cluster"], self.outcome["gates"] = value["cluster"], value["gates"]
                self.history += [routing_note(value, self.loaded), {"role": "assistant", "content": ""}]
                self.note = routing_text(value, self.loaded)
            else:
                self.outcome["answer"] += value
                self.history[-1] = {"role": "assistant", "content": self.outcome["answer"]}
            if self._due():
                yield
        self.outcome["answer"] = self.outcome["answer"].strip()
        self.history[-1] = {"role": "assistant", "content": self.outcome["answer"] or "(empty answer)"}

    def base_answer(self) -> Iterator[None]:
        """The same model's answer with the HydraLoRA heads off, to the base chat's own history."""
        messages = model_messages(self.base_history[:-1], self.system_prompt) + [{"role": "user", "content": self.text}]
        self.base_history.append({"role": "assistant", "content": ""})
        answer = ""
        for kind, value in stream_reply(self.loaded, messages, *self.sampling, base_only=True):
            if kind == "text":
                answer += value
                self.base_history[-1] = {"role": "assistant", "content": answer}
                if self._due():
                    yield
        self.outcome["base_answer"] = answer.strip()
        self.base_history[-1] = {"role": "assistant", "content": self.outcome["base_answer"] or "(empty answer)"}


def refresh(ctx: AppContext, current: str | None):
    """The list of runs and exports as it is now, and the chosen one loaded (so the first message
    does not wait for it)."""
    update = refreshed(ctx.chat_models.sources(), current)
    chosen = update.get("value")
    if not chosen:
        return update, "No finished run or export in the workspace yet: train one on the Train tab."
    try:
        loaded = ctx.chat_models.get(chosen)
    except Exception as exc:  # shown, not raised: opening a tab should never pop an error
        return update, f"Cannot load {chosen}: {exc}"
    return update, f"Loaded **{loaded.source}**: {loaded.description}."
