"""Per-cluster merge: dequantized base, PEFT-format adapters, folded weights, all equal the math."""

import json

import torch
from torch.testing import assert_close

from hydra_edge.adapter.gates import cluster_gates
from hydra_edge.adapter.switches import fixed_gates
from hydra_edge.exporters.merge import (
    fold_cluster_into_base,
    hydra_on_plain_base,
    merged_heads,
    write_peft_adapter,
)

PROMPTS = ["What is the capital of Peru?", "Give the antonym of the word fast.", "Spell nine with digits."]


def logits_of(model, tokenizer, prompts=PROMPTS):
    from hydra_edge.data.records import prompt_ids

    with torch.no_grad():
        return [
            model(input_ids=torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": p}])])).logits[0]
            for p in prompts
        ]


def test_plain_base_holds_the_dequantized_nf4_weights(plain_base, trained_adapter):
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    from hydra_edge.models.base import load_base

    dtype = json.loads((trained_adapter / "adapter_config.json").read_text())["dtype"]  # NF4 quantizes from it
    nf4 = load_base("tiny", quant="nf4", device="cpu", dtype=dtype).model
    plain = AutoModelForCausalLM.from_pretrained(plain_base)
    layer = nf4.model.layers[1].mlp.down_proj
    expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert torch.equal(plain.model.layers[1].mlp.down_proj.weight.data, expected)
    assert "quantization_config" not in json.loads((plain_base / "config.json").read_text())


def test_peft_adapter_equals_merged_computation(plain_base, trained_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    gates = cluster_gates(trained_adapter)
    assert len(gates) == config["heads"]
    ours, tokenizer = hydra_on_plain_base(plain_base, trained_adapter)
    for cluster, heads in merged_heads(ours, gates).items():
        folder = write_peft_adapter(
            tmp_path / f"peft-{cluster}", str(plain_base), config["rank"], config["alpha"], heads
        )
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(plain_base), folder).eval()
        with fixed_gates(ours, gates[cluster]):
            for a, b in zip(logits_of(peft_model, tokenizer), logits_of(ours, tokenizer)):
                assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_folded_weights_equal_merged_computation(plain_base, trained_adapter):
    from transformers import AutoModelForCausalLM

    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    gates = cluster_gates(trained_adapter)
    ours, tokenizer = hydra_on_plain_base(plain_base, trained_adapter)
    cluster, heads = next(iter(merged_heads(ours, gates).items()))
    folded = AutoModelForCausalLM.from_pretrained(plain_base).eval()
    fold_cluster_into_base(folded, heads, config["alpha"] / config["rank"])
    with fixed_gates(ours, gates[cluster]):
        for a, b in zip(logits_of(folded, tokenizer), logits_of(ours, tokenizer)):
            assert_close(a, b, atol=1e-4, rtol=1e-4)
        # and the merge is not a no-op: without the adapter the logits differ
        bare = AutoModelForCausalLM.from_pretrained(plain_base).eval()
        assert (logits_of(bare, tokenizer)[0] - logits_of(ours, tokenizer)[0]).abs().max() > 1e-2
