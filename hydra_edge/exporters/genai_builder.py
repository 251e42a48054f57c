"""Runs onnxruntime-genai's model builder (same arguments as `python -m
onnxruntime_genai.models.builder`), with the model config adapted where transformers 5 and the
builder read it differently. Run as a subprocess by builders.build_onnx.

Gemma 3: transformers 5 nests the rotary settings per layer type (rope_parameters =
{"full_attention": {...}, "sliding_attention": {...}}); the builder's Gemma 3 path (0.18) reads
the older flat form: rope_parameters["rope_type"], config.rope_theta for the global layers and
config.rope_local_base_freq for the sliding ones. The builder also rounds Gemma's embedding
scale sqrt(hidden_size) to two decimals (25.3 for 25.2982 at width 640), a 7e-5 relative error
on every logit that transformers (what was trained) does not make; it gets the exact value.
fp16 on the CPU: the builder (0.18) takes GroupQueryAttention only for (cpu, fp32) there and falls
back to MultiHeadAttention with one shared causal mask (/model/attn_mask_reformat): no sliding
window (Gemma 3's local layers attend to everything), a mask subgraph whose Expand only works
with an empty past, yet KV inputs and genai_config declared as window-sized caches, so
onnxruntime-genai fails at the first decode step. onnxruntime's CPU GroupQueryAttention has an
fp16 kernel (local_window_size, sliding_window_cache), so fp16 on the CPU gets the same attention
as fp32 on the CPU and fp16 on CUDA.
The export's logit validation checks that the result computes what PyTorch does.
"""

from __future__ import annotations

import runpy


def adapt_config(config):
    """The config as the builder expects it (changed in place; returned for chaining)."""
    rope = getattr(config, "rope_parameters", None)
    if getattr(config, "model_type", None) == "gemma3_text" and isinstance(rope, dict) and "full_attention" in rope:
        full, local = rope["full_attention"], rope.get("sliding_attention", rope["full_attention"])
        config.rope_parameters = dict(full)
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local["rope_theta"]
    return config


def _patch_gemma_embedding_scale() -> None:
    import math

    import onnxruntime_genai.models  # noqa: F401 - puts the builder's folder on sys.path
    from builders import gemma  # the module object builder.py itself imports (as `builders`)

    original = gemma.GemmaModel.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.embed_attrs["scale"] = math.sqrt(self.hidden_size)

    gemma.GemmaModel.__init__ = __init__


def _patch_fp16_cpu_attention() -> None:
    import onnx_ir as ir
    import onnxruntime_genai.models  # noqa: F401 - puts the builder's folder on sys.path
    from builders import base

    original = base.Model.is_gqa_supported

    def is_gqa_supported(self) -> bool:
        return original(self) or (self.ep, self.io_dtype) == ("cpu", ir.DataType.FLOAT16)

    base.Model.is_gqa_supported = is_gqa_supported


def _patch_auto_config() -> None:
    from transformers import AutoConfig

    original = AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        return adapt_config(original(*args, **kwargs))

    AutoConfig.from_pretrained = from_pretrained


if __name__ == "__main__":
    _patch_auto_config()
    _patch_gemma_embedding_scale()
    _patch_fp16_cpu_attention()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
