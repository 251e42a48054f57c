"""Loading the base model and its tokenizer: a preset (`tiny`, `gemma3-270m`), a local folder,
a GGUF file or a Hub id."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hydra_edge.data.chat_templates import apply_chat_template
from hydra_edge.errors import UserError
from hydra_edge.models.tiny import TINY_NAME, tiny_model_dir

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class BaseModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object  # transformers PreTrainedTokenizerBase
    reference: str  # what the user named: "tiny", a Hub id or a path
    resolved: str  # the folder or Hub id actually loaded
    quant: str


def resolve_model_reference(reference: str) -> str:
    """`tiny` -> the cached preset folder; `gemma3-270m` or a GGUF file (or a folder holding
    one) -> its converted folder (hydra_edge/models/gguf.py); an existing folder -> itself;
    a Hub id -> itself."""
    from hydra_edge.models.gguf import (
        GEMMA_NAME,
        converted_folder,
        gemma_preset_folder,
        gguf_file_of,
    )

    if reference == TINY_NAME:
        _quiet_loading()
        return str(tiny_model_dir())
    if reference == GEMMA_NAME:
        _quiet_loading()
        return str(gemma_preset_folder())
    gguf_path = gguf_file_of(reference)
    if gguf_path is not None:
        _quiet_loading()
        return str(converted_folder(gguf_path, reference))
    path = Path(reference).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"--model {reference}: folder has no config.json; point it at a Hugging Face "
                "model folder (save_pretrained output) or a .gguf file"
            )
        return str(path.resolve())
    looks_like_path = reference.startswith((".", "/", "~")) or reference.count("/") > 1
    if looks_like_path or not HUB_ID.match(reference):
        raise UserError(
            f"--model {reference}: no such folder; use tiny, gemma3-270m, a Hugging Face model id "
            "(e.g. Qwen/Qwen2.5-0.5B-Instruct), the path of a downloaded model or a .gguf file"
        )
    return reference


def load_tokenizer(reference: str, resolved: str | None = None, chat_template: str | None = None):
    """The base's tokenizer, with a pad token and a chat template: `chat_template` (its text) if
    given, else its own, else the fallback (hydra_edge/data/chat_templates.py)."""
    from transformers import AutoTokenizer

    resolved = resolved or resolve_model_reference(reference)
    _quiet_loading()
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, or a tokenizers parse error of a damaged file
        raise _load_error(reference, "its tokenizer could not be loaded", exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    apply_chat_template(tokenizer, chat_template, reference)
    return tokenizer


def _load_error(reference: str, what: str, exc: Exception) -> UserError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if reference == TINY_NAME:
        return UserError(
            f"--model tiny: the cached preset in {tiny_model_dir()} {what} ({first_line}); it is damaged: "
            "delete that folder and it is built again"
        )
    return UserError(
        f"--model {reference}: {what} ({first_line}); check the id or path, "
        "and for a Hub id that it was downloaded (no internet here?)"
    )


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def has_fast_bf16(device: str) -> bool:
    """Whether bf16 matmuls run at full speed here: CUDA with bf16 support, or a CPU with native
    bf16 instructions (AVX512-BF16 or AMX). AVX2-only CPUs emulate bf16 through float32
    conversions: measured 1.0 GFLOPS bf16 against 136 float32 on such a CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = _cpu_flags()
    if flags is None:  # no /proc (macOS, Windows): trust torch's dispatch level
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_class() -> str:
    """The CPU's class as far as hydra-edge's numbers depend on it, for every number it prints:
    "AVX512-BF16/AMX" (native bf16; bitsandbytes takes its packed 4-bit paths), "AVX512", "AVX2",
    or torch's dispatch level where /proc/cpuinfo is missing."""
    flags = _cpu_flags()
    if flags is None:
        import torch

        return f"{torch.backends.cpu.get_cpu_capability()} (torch's dispatch level)"
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "AVX512-BF16/AMX"
    return "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "pre-AVX2"


def _cpu_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}


def resolve_mixed_precision(setting: str, device: str | None = None) -> str:
    """--mixed-precision auto -> bf16 where it is fast, else no (float32); others as given."""
    if setting != "auto":
        return setting
    return "bf16" if has_fast_bf16(device or pick_device()) else "no"


def load_base(
    reference: str,
    quant: str = "nf4",
    gradient_checkpointing: bool = False,
    device: str | None = None,
    dtype: str = "bf16",
    chat_template: str | None = None,
) -> BaseModel:
    """Loads the base, quantized with bitsandbytes unless quant == "none".

    dtype is the dtype of the non-quantized weights and of the 4-bit layers' compute ("bf16" or
    "fp32").
    """
    import torch
    from transformers import AutoModelForCausalLM

    from hydra_edge.models.quant import bnb_config

    resolved = resolve_model_reference(reference)
    _quiet_loading()
    device = device or pick_device()
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tokenizer = load_tokenizer(reference, resolved, chat_template)
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notice about a refused pickle's protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model = AutoModelForCausalLM.from_pretrained(
                resolved,
                quantization_config=bnb_config(quant, torch_dtype),
                dtype=torch_dtype,
                device_map={"": device},
            )
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside a model folder's files is the files'
        # OSError/ValueError for missing or malformed files, UnpicklingError for a .bin that is not
        # a plain state dict, KeyError/RuntimeError/TypeError for a config that does not fit its weights.
        import pickle

        if isinstance(exc, pickle.UnpicklingError):  # torch.load(weights_only=True) refused it: good
            raise UserError(
                f"--model {reference}: its .bin weights are a pickle that is not a plain tensor state dict, "
                "which hydra-edge never unpickles; re-save the model as safetensors (save_pretrained)"
            ) from exc
        raise _load_error(reference, "could not be loaded", exc) from exc
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}  # frozen inputs: the reentrant variant would get no grads
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    from hydra_edge.models.lm_head import contiguous_head_inputs

    contiguous_head_inputs(model)  # generation's prefill and the gate pass slice the head's input
    return BaseModel(model, tokenizer, reference, resolved, quant)


def _quiet_loading() -> None:
    """Hides per-tensor loading bars and the notice about bitsandbytes' optional fused CPU
    kernel (fetched from a model hub, which hydra-edge never does; the plain path is used)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
