"""4-bit specifics, kept apart from the layer code (as PEFT keeps `bnb.py` apart).

bitsandbytes is imported inside the functions, so `import hydra_edge` stays fast.
"""

from __future__ import annotations


def bnb_config(quant: str, compute_dtype=None):
    """The `BitsAndBytesConfig` for `--quant nf4|fp4` (double quant; compute in compute_dtype,
    bf16 unless given), or None."""
    if quant == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


def is_linear4bit(module) -> bool:
    """True for a bitsandbytes `Linear4bit` (checked by name so bitsandbytes is not imported)."""
    return any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__)


def dequantized_weight(layer):
    """The weight a layer really multiplies by: NF4/FP4 weights dequantized, others as is.

    (out, in). The export base and the merge math use this, not the original checkpoint.
    """
    if is_linear4bit(layer):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return layer.weight.data
