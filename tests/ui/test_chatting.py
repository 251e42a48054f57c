"""Chat pieces that need no server: the history the model sees."""

from __future__ import annotations

from hydra_edge.ui.chat_tab import model_messages


def test_model_messages_drop_routing_notes_and_read_content_parts():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Capital of Japan?"}], "metadata": None},
        {"role": "assistant", "content": "gate mix ...", "metadata": {"title": "router → cluster 5"}},
        {"role": "assistant", "content": [{"type": "text", "text": "Tokyo"}], "metadata": None},
    ]
    assert model_messages(history, " Be brief. ") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of Japan?"},
        {"role": "assistant", "content": "Tokyo"},
    ]
    assert model_messages([], "") == []
