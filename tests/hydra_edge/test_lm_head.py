"""The selective LM head: the same losses and gradients as the model's full head."""

import pytest
import torch

from hydra_edge.data.records import IGNORE_INDEX
from hydra_edge.models import lm_head
from hydra_edge.models.lm_head import (
    contiguous_head_inputs,
    deferred_head,
    label_losses,
    mean_label_loss,
    supports_deferred_head,
)


def _model(kind: str):
    from transformers import (
        CohereConfig,
        CohereForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    shape = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    elif kind == "gemma3-softcap":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**shape, head_dim=8, final_logit_softcapping=5.0, sliding_window=8))
    elif kind == "cohere-scaled":  # logits * 4 after the head: linear, so deferral still holds
        model = CohereForCausalLM(CohereConfig(**shape, logit_scale=4.0))
    else:
        model = _AbsLogits(LlamaConfig(**shape, tie_word_embeddings=False))
    return model.float()


class _AbsLogits(__import__("transformers").LlamaForCausalLM):
    """A head followed by a non-linear transform that deferral cannot reproduce."""

    def forward(self, *args, labels=None, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits.abs()
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


def _batch(pad_rows: bool = True):
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt
    mask = torch.ones_like(ids)
    if pad_rows:
        labels[2, 9:] = IGNORE_INDEX
        mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["llama", "gemma3-softcap", "cohere-scaled"])
def test_selective_head_gives_the_full_heads_loss_and_gradients(kind, monkeypatch):
    model = _model(kind)
    model.train()
    monkeypatch.setattr(lm_head, "CHUNK_ELEMENTS", 300 * 4)  # 4 positions per chunk: several chunks
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]

    full = model(**batch).loss
    full_grads = torch.autograd.grad(full, params, allow_unused=True)
    assert supports_deferred_head(model, batch["input_ids"])
    selective = mean_label_loss(model, batch)
    selective_grads = torch.autograd.grad(selective, params, allow_unused=True)

    assert abs(float(full.detach()) - float(selective.detach())) < 1e-5
    for expected, got in zip(full_grads, selective_grads):
        if expected is None:
            assert got is None or float(got.abs().max()) < 1e-6
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # The config's soft-capping is restored after the deferred forward.
    assert getattr(model.config, "final_logit_softcapping", None) == (5.0 if kind == "gemma3-softcap" else None)


def test_per_row_label_losses_match_the_full_logits():
    model = _model("llama").eval()
    batch = _batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with deferred_head(model):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert hidden.shape[-1] == 32  # hidden states, not logits
        losses, rows = label_losses(model, hidden, batch["labels"])
    targets = batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    for row in range(3):
        assert abs(float(losses[rows == row].sum()) - float(expected[row].sum())) < 1e-4
    assert rows.tolist() == sorted(rows.tolist()) and int((rows == 2).sum()) == 4


def test_a_head_with_another_transform_keeps_the_full_head():
    model = _model("abs").train()
    batch = _batch(pad_rows=False)
    assert not supports_deferred_head(model, batch["input_ids"])
    assert abs(float(mean_label_loss(model, batch)) - float(model(**batch).loss)) < 1e-6


def test_batch_without_label_tokens_still_backpropagates():
    model = _model("llama").train()
    batch = _batch()
    batch["labels"][:] = IGNORE_INDEX
    loss = mean_label_loss(model, batch)
    loss.backward()
    assert float(loss) == 0.0


def test_head_input_is_made_contiguous():
    model = _model("llama").eval()
    seen = []
    head = model.get_output_embeddings()
    contiguous_head_inputs(model)
    contiguous_head_inputs(model)  # idempotent: one hook
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 300, (2, 6)), logits_to_keep=1)
    assert seen == [True]
    assert len(head._forward_pre_hooks) == 2


def test_the_probe_ignores_a_pooled_step_in_progress():
    """The first training step may be a pooled one: its groups describe the batch, not the probe
    (the loop runs the probe inside the adapter's training_switches_paused)."""
    from hydra_edge.adapter.inject import hydra_layers, inject_hydra_lora
    from hydra_edge.adapter.switches import training_switches_paused

    model = _model("llama").train()
    inject_hydra_lora(model, ["model.layers.0.mlp.down_proj"], 4, 8.0, 2, 0.0)
    batch = _batch()
    layer = next(iter(hydra_layers(model).values()))
    groups = torch.arange(3).unsqueeze(1).expand(3, 12).contiguous()
    layer.pool_groups = (groups, groups >= 0)
    mean_label_loss(model, batch, training_switches_paused).backward()
    assert layer.pool_groups[0] is groups  # restored after the probe


def test_a_bf16_head_takes_float32_states_outside_autocast():
    """What a mixed-precision forward hands back while the model trains (a held-out pass)."""
    model = _model("llama").to(torch.bfloat16)
    hidden = torch.randn(5, 32)  # float32
    logits = lm_head.head_logits(model, hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, model.get_output_embeddings()(hidden.bfloat16()).float())
