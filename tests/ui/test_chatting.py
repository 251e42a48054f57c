"""Chat pieces that need no server: the base-only switch and the history the model sees."""

from __future__ import annotations

import torch
from torch import nn

from hydra_edge.ui.chat_tab import model_messages
from hydra_edge.ui.chatting import heads_disabled


def test_heads_disabled_gives_the_base_layer_exactly_and_restores_the_gates():
    from hydra_edge.layers import HydraLoRALinear

    torch.manual_seed(0)
    model = nn.Sequential(HydraLoRALinear(nn.Linear(16, 8), rank=4, alpha=8, num_heads=3, head_init="random"))
    layer = model[0]
    with torch.no_grad():
        layer.hydra_B.normal_()  # heads that clearly change the output
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        adapted = model(x)
        with heads_disabled(model):
            base = model(x)
        again = model(x)
    torch.testing.assert_close(base, layer.base_layer(x), rtol=0, atol=0)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(again, adapted)
    assert layer.fixed_gates is None


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
