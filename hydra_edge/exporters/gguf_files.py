"""GGUF files out, in llama.cpp's own layout: the base the adapter was trained against, and LoRA
adapters in llama.cpp's adapter format.

Written with the `gguf` package (llama.cpp's own Python writer, its tensor-name maps and Q8_0
quantizer); what it lacks is the Hugging Face -> GGUF conversion of each architecture, which lives
in llama.cpp's `convert_hf_to_gguf.py`, a script no package installs. The part of it the
architectures below need is written here, per architecture (`ARCHITECTURES`):

- llama: Q and K rows reordered from Hugging Face's rotate-half rope layout to ggml's adjacent
  pairs (`_permute`), a LoRA's B rows with them;
- gemma3: RMSNorm weights stored as 1 + w (Gemma multiplies by 1 + w, ggml by w).

Metadata: a run that started from a GGUF file copies that file's (hyperparameters, tokenizer:
exactly what llama.cpp read before), with the training chat template added; a run from a Hugging
Face folder writes llama.cpp's `gpt2` (byte-level BPE) vocabulary from tokenizer.json. Anything
else is refused by name; every file is then checked by llama.cpp itself (gguf_export.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hydra_edge.errors import UserError, first_line

# --gguf-base choices that write a file: the ggml type of 2-D weights (1-D ones stay F32)
WRITTEN_TYPES = ("f16", "q8_0", "q4_k_m")


@dataclass(frozen=True)
class Architecture:
    name: str  # general.architecture
    permute_qk: bool  # llama's rope row order
    norm_offset: float  # stored norm = HF norm + offset


ARCHITECTURES = {
    "llama": Architecture("llama", permute_qk=True, norm_offset=0.0),
    "gemma3": Architecture("gemma3", permute_qk=False, norm_offset=1.0),
}
# Hugging Face model_type -> GGUF architecture
MODEL_TYPES = {"llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def architecture_of(config: dict, source_gguf: Path | None) -> Architecture:
    """The writer's rules for this model, or one line naming what it knows."""
    name = MODEL_TYPES.get(config.get("model_type", ""))
    if name is None:
        known = ", ".join(sorted(MODEL_TYPES))
        raise UserError(
            f"export --format gguf: the GGUF writer knows the model types {known}, not "
            f"{config.get('model_type')!r}; export --format onnx or peft instead"
        )
    if source_gguf is None and name != "llama":
        raise UserError(
            f"export --format gguf: a {name} base from a Hugging Face folder needs its SentencePiece vocabulary "
            "converted, which this writer does not do; train from the model's GGUF file (--model FILE.gguf) "
            "or export --format onnx or peft"
        )
    return ARCHITECTURES[name]


def _permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row reorder, per head: (n_head * head_dim, ...) ->
    (n_head, 2, head_dim/2, ...) -> swap -> back; what transformers undoes when it reads a GGUF."""
    count = rows.shape[0]
    return rows.reshape(n_head, 2, count // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class TensorNames:
    """Hugging Face tensor names -> GGUF names and the row order each needs."""

    def __init__(self, arch: Architecture, config: dict) -> None:
        import gguf

        self.arch = arch
        self.config = config
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
        self.map = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])

    def gguf_name(self, hf_name: str) -> str:
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export --format gguf: no GGUF name for the tensor {hf_name} ({self.arch.name})")
        return name

    def rows_in_gguf_order(self, gguf_name: str, rows: np.ndarray) -> np.ndarray:
        """A weight's (or a LoRA B's) rows as llama.cpp expects them. (out, ...)"""
        if self.arch.permute_qk and ".attn_q." in gguf_name + ".":
            return _permute(rows, self.config["num_attention_heads"])
        if self.arch.permute_qk and ".attn_k." in gguf_name + ".":
            heads = self.config.get("num_key_value_heads") or self.config["num_attention_heads"]
            return _permute(rows, heads)
        return rows

    def base_tensor(self, hf_name: str, tensor: np.ndarray) -> tuple[str, np.ndarray]:
        name = self.gguf_name(hf_name)
        if tensor.ndim == 1 and name.endswith("norm.weight"):
            tensor = tensor + np.float32(self.arch.norm_offset)
        return name, self.rows_in_gguf_order(name, tensor)


def _typed(tensor: np.ndarray, base_type: str):
    """(data, raw ggml type or None) for one tensor: 1-D F32, 2-D F16 or Q8_0 (rows of 32)."""
    import gguf

    tensor = np.ascontiguousarray(tensor, dtype=np.float32)
    if tensor.ndim == 1 or base_type == "f32":
        return tensor, None
    if base_type == "q8_0" and tensor.shape[-1] % 32 == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(tensor, kind), kind
    return tensor.astype(np.float16), None


def write_base_gguf(plain_dir: Path, out_file: Path, base_type: str, source_gguf: Path | None, chat_template: str):
    """The dequantized base (a float32 Hugging Face folder) as one GGUF file of base_type
    (WRITTEN_TYPES, or f32 for an exact copy)."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((plain_dir / "config.json").read_text())
    arch = architecture_of(config, source_gguf)
    names = TensorNames(arch, config)
    tensors = {}
    for file in sorted(plain_dir.glob("*.safetensors")):
        for hf_name, tensor in load_file(str(file)).items():
            if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue  # llama.cpp reads the tied output from token_embd
            name, data = names.base_tensor(hf_name, tensor)
            tensors[name] = data
    writing_type = "f16" if base_type == "q4_k_m" else base_type  # llama.cpp quantizes from F16
    target = out_file.with_suffix(".f16.gguf") if base_type == "q4_k_m" else out_file
    writer = gguf.GGUFWriter(str(target), arch.name)
    if source_gguf is not None:
        _copy_metadata(writer, source_gguf, set(tensors))
        if chat_template:
            writer.add_chat_template(chat_template)  # the source's, if any, is replaced by training's
    else:
        _llama_metadata(writer, plain_dir, config)  # chat template from the folder's tokenizer config
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types.get(writing_type, gguf.LlamaFileType.MOSTLY_F16))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, tensor in tensors.items():
        data, kind = _typed(tensor, writing_type)
        writer.add_tensor(name, data, raw_dtype=kind)
    _write_out(writer)
    if base_type == "q4_k_m":
        quantize_q4_k_m(target, out_file)
        target.unlink()
    return out_file


# Written by this module for the file it writes, never copied from the source.
OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "tokenizer.chat_template")


def _copy_metadata(writer, source_gguf: Path, tensor_names: set[str]) -> None:
    """The source file's metadata (hyperparameters and tokenizer), after checking that the
    tensors written are the ones it holds: a layout this writer does not know is refused."""
    import gguf

    reader = read_gguf(source_gguf)
    source_names = {t.name for t in reader.tensors}
    if source_names != tensor_names:
        odd = sorted(source_names ^ tensor_names)[:3]
        raise UserError(
            f"export --format gguf: the tensors written differ from those of {source_gguf.name} ({', '.join(odd)}); "
            "this architecture's layout is one the writer does not know: export --format onnx or peft"
        )
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in OWN_KEYS:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)


def read_gguf(path: Path, what: str = ""):
    """gguf's reader on a file, or one line saying the file is damaged."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file raises ValueError, struct or numpy errors
        raise UserError(f"{path}: not a readable GGUF file ({first_line(exc)}){what}; replace or re-export it") from exc


# What a llama config.json must give for llama.cpp's hyperparameters.
LLAMA_KEYS = (
    "num_attention_heads",
    "hidden_size",
    "max_position_embeddings",
    "num_hidden_layers",
    "intermediate_size",
    "rms_norm_eps",
    "vocab_size",
)


def _llama_metadata(writer, model_dir: Path, config: dict) -> None:
    """llama.cpp's `llama` hyperparameters and `gpt2` vocabulary for a Hugging Face folder."""
    import gguf

    missing = [k for k in LLAMA_KEYS if k not in config]
    n_head = config.get("num_attention_heads") or 1
    if (
        missing
        or config.get("rope_scaling")
        or (config.get("head_dim") or 0) not in (0, config["hidden_size"] // n_head)
    ):
        raise UserError(
            f"export --format gguf: this llama config ({', '.join(missing) or 'rope scaling or its head size'}) is "
            "beyond what the GGUF writer converts; export --format onnx or peft"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_name(config.get("_name_or_path") or model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    _add_gpt2_vocab(writer, model_dir, config["vocab_size"])
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=config["vocab_size"]).add_to_gguf(writer, quiet=True)


def _add_gpt2_vocab(writer, model_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's `get_vocab_base` writes it: ids the tokenizer lacks become
    [PAD{i}] UNUSED, added special tokens CONTROL, other added tokens USER_DEFINED."""
    import gguf

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = tokenizer.get("pre_tokenizer") or {}
    if tokenizer["model"]["type"] != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise UserError(
            "export --format gguf: the base's tokenizer is not a GPT-2 style byte-level BPE, the one vocabulary "
            "this writer converts; train from the model's GGUF file or export --format onnx or peft"
        )
    id_to_token = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    id_to_token.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(id_to_token[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, which ByteLevel(use_regex=True) applies
    writer.add_token_list(tokens)
    writer.add_token_types(types)


def quantize_q4_k_m(f16_file: Path, out_file: Path) -> None:
    """llama.cpp's own quantizer (llama_model_quantize, through llama-cpp-python)."""
    from hydra_edge.exporters.gguf_runtime import llama_cpp_module

    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    if llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out_file).encode(), params) != 0:
        raise UserError(f"export --format gguf: llama.cpp could not quantize {f16_file.name} to Q4_K_M")


def write_lora_gguf(out_file: Path, names: TensorNames, layers: dict, alpha: float) -> Path:
    """One LoRA adapter in llama.cpp's format: `<base tensor>.lora_a` (r, in) and `.lora_b`
    (out, r) per adapted module {HF module name: (A, B)}; llama.cpp scales B·A by alpha / r."""
    import gguf

    writer = gguf.GGUFWriter(str(out_file), names.arch.name)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for module, (a, b) in layers.items():
        name = names.gguf_name(f"{module}.weight")
        b = names.rows_in_gguf_order(name, np.asarray(b, dtype=np.float32))  # (out, r)
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))  # (r, in)
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b, dtype=np.float32))  # (out, r)
    _write_out(writer)
    return out_file


def _write_out(writer) -> None:
    """gguf's writer puts header, metadata and tensors on disk in three passes, then closes."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
