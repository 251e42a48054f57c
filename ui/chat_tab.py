"""The Chat tab: streaming chat with a finished run (PyTorch adapter) or an ONNX export, with a
system prompt, temperature / top-p / max tokens, the router's choice shown above every answer,
and the base model's answer (same model, HydraLoRA heads off) side by side on request.

API name: chat (outputs: history, base history, routing text, result dict, cleared input).
"""

from __future__ import annotations

import time

import gradio as gr

from hydra_edge.errors import UserError
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


def build(ctx: AppContext, demo: gr.Blocks) -> tuple[gr.Dropdown, gr.Markdown]:
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
    source_info = gr.Markdown(elem_id="chat-source-info")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=240):
            system_prompt = gr.Textbox("", label="System prompt", lines=3, placeholder="optional")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature", info="0 = greedy")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            max_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
            compare_base = gr.Checkbox(
                False,
                label="Compare with the base model",
                info="the same model with the HydraLoRA heads off (PyTorch adapters)",
            )
        with gr.Column(scale=8):
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
                    label="Base model (adapter off)",
                    height=440,
                    visible=False,
                    elem_id="base-chatbot",
                    feedback_options=None,
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
    result = gr.JSON(visible=False)

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
        max_tokens = int(max_tokens)
        history, base_history = list(history or []), list(base_history or [])
        messages = model_messages(history, system_prompt) + [{"role": "user", "content": text}]
        history.append({"role": "user", "content": text})
        if compare_base:
            base_history.append({"role": "user", "content": text})
        outcome = {
            "source": loaded.source,
            "backend": loaded.backend,
            "cluster": None,
            "gates": None,
            "answer": "",
            "base_answer": None,
        }
        note, shown = "", 0.0
        for kind, value in stream_reply(loaded, messages, max_tokens, temperature, top_p):
            if kind == "route":
                outcome["cluster"], outcome["gates"] = value["cluster"], value["gates"]
                history += [routing_note(value, loaded), {"role": "assistant", "content": ""}]
                note = routing_text(value, loaded)
            else:
                outcome["answer"] += value
                history[-1] = {"role": "assistant", "content": outcome["answer"]}
            if time.monotonic() - shown >= STREAM_INTERVAL_S:
                shown = time.monotonic()
                yield history, base_history, note, gr.skip(), ""
        outcome["answer"] = outcome["answer"].strip()
        history[-1] = {"role": "assistant", "content": outcome["answer"] or "(empty answer)"}
        yield history, base_history, note, gr.skip(), ""
        if compare_base:
            base_messages = model_messages(base_history[:-1], system_prompt) + [{"role": "user", "content": text}]
            base_history.append({"role": "assistant", "content": ""})
            answer = ""
            for kind, value in stream_reply(loaded, base_messages, max_tokens, temperature, top_p, base_only=True):
                if kind == "text":
                    answer += value
                    base_history[-1] = {"role": "assistant", "content": answer}
                    if time.monotonic() - shown >= STREAM_INTERVAL_S:
                        shown = time.monotonic()
                        yield history, base_history, note, gr.skip(), ""
            outcome["base_answer"] = answer.strip()
            base_history[-1] = {"role": "assistant", "content": outcome["base_answer"] or "(empty answer)"}
        yield history, base_history, note, outcome, ""

    gr.on(
        [message.submit, send.click],
        chat,
        [message, chatbot, base_chatbot, source, system_prompt, temperature, top_p, max_tokens, compare_base],
        [chatbot, base_chatbot, routing, result, message],
        api_name="chat",
        show_progress="minimal",
    )
    clear.click(lambda: ([], [], "", None), None, [chatbot, base_chatbot, routing, result], api_visibility="private")
    compare_base.change(lambda on: gr.update(visible=on), [compare_base], [base_chatbot], api_visibility="private")

    @user_errors
    def describe(source: str) -> str:
        if not source:
            return ""
        loaded = ctx.chat_models.get(source)
        return f"Loaded **{loaded.source}**: {loaded.description}."

    source.change(
        describe, [source], [source_info], api_visibility="private", show_progress="minimal", trigger_mode="always_last"
    ).success(lambda: ([], [], "", None), None, [chatbot, base_chatbot, routing, result], api_visibility="private")
    reload_list.click(lambda current: refresh(ctx, current), [source], [source, source_info], api_visibility="private")
    return source, source_info


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
