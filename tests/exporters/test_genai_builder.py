"""The builder wrapper adapts what transformers 5 and onnxruntime-genai's builder read differently;
onnxruntime failures during validation are one line."""

import pytest

from hydra_edge.errors import UserError


def test_gemma3_nested_rope_parameters_are_flattened_for_the_builder():
    from transformers import Gemma3TextConfig

    from hydra_edge.exporters.genai_builder import adapt_config

    config = Gemma3TextConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        intermediate_size=128,
        vocab_size=100,
    )
    assert "full_attention" in config.rope_parameters  # transformers 5 nests them per layer type
    full, local = config.rope_parameters["full_attention"], config.rope_parameters["sliding_attention"]
    adapt_config(config)
    assert config.rope_parameters["rope_type"] == full["rope_type"]
    assert config.rope_theta == full["rope_theta"] and config.rope_local_base_freq == local["rope_theta"]


def test_other_configs_are_left_alone():
    from transformers import LlamaConfig

    from hydra_edge.exporters.genai_builder import adapt_config

    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2)
    before = config.to_dict()
    assert adapt_config(config).to_dict() == before


def test_an_onnxruntime_failure_while_validating_is_one_line():
    from hydra_edge.exporters.runtime import run_decoder

    class Input:
        def __init__(self, name):
            self.name, self.type = name, "tensor(float)"

    class FailingSession:
        def get_inputs(self):
            return [Input("input_ids"), Input("past_key_values.0.key"), Input("past_key_values.1.key")]

        def run(self, names, feeds):
            assert feeds["past_key_values.0.key"].shape == (1, 1, 512, 8)  # the sliding window's buffer
            assert feeds["past_key_values.1.key"].shape == (1, 1, 0, 8)  # a global layer's grows
            raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : something\nmore")

    decoder = {"num_key_value_heads": 1, "head_size": 8, "sliding_window": {"window_size": 512, "layers": [0]}}
    with pytest.raises(UserError, match="onnxruntime could not run the built model .*INVALID_ARGUMENT : something\\)"):
        run_decoder(FailingSession(), decoder, [1, 2, 3])


@pytest.mark.slow  # four ONNX builds
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("sliding_window", [16, 4])  # longer and shorter than the 10 tokens run
def test_a_small_gemma3_builds_and_matches_pytorch(tmp_path, precision, sliding_window):
    """Width 40: the builder alone would scale embeddings by round(sqrt(40), 2) = 6.32, not 6.3246.
    Layers 0-1 slide, layer 2 is global (Gemma 3 mixes them); fp16 runs on the CPU here."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from hydra_edge.exporters.builders import build_onnx
    from hydra_edge.exporters.runtime import onnx_logits
    from hydra_edge.exporters.validation import compare_logits, validation_problem

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        hidden_size=40,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        vocab_size=128,
        sliding_window=sliding_window,
        max_position_embeddings=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        initializer_range=0.5,
    )
    model = Gemma3ForCausalLM(config).float().eval()
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    _write_word_tokenizer(hf_dir)
    build_onnx(hf_dir, tmp_path / "onnx", precision, "cpu", tmp_path / "cache")
    ids = [2, 5, 17, 99, 3, 64, 8, 21, 40, 7]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = onnx_logits(tmp_path / "onnx", ids)
    diff = float(abs(got - expected).max())
    if precision == "fp32":
        assert diff < 1e-4, diff
    else:  # float16 rounding (measured 0.005); attending past the window would be off by ~1-4
        assert diff < 0.05, diff
        assert validation_problem(compare_logits(got, expected), "fp16") is None


def _write_word_tokenizer(folder) -> None:
    """A 128-token word-level tokenizer: the builder needs one beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    ).save_pretrained(folder)
