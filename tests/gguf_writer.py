"""Write a small Hugging Face Llama folder to a GGUF file, the way llama.cpp's converter would.

Tests that exercise GGUF loading need a GGUF file, and downloading one makes them slow, flaky
and network-bound. This helper converts a local folder instead (in practice the `tiny` preset
from `hydra_edge.models.tiny`), following llama.cpp's `convert_hf_to_gguf.py` for the `llama`
architecture: its metadata keys, its tensor names, its Q/K row permutation, and its GPT-2 style
(byte-level BPE) tokenizer encoding. Only what such a folder needs is covered: a single
`model.safetensors`, a `tokenizer.json` with a ByteLevel BPE model, no rope scaling, no biases,
and f32 or f16 tensors (no quantization).

What transformers' GGUF loader reads back differs from the folder in ways the file cannot fix:
the tokenizer gains `[PAD{i}]` tokens up to the model's vocab size (llama.cpp's padding) plus an
`<|endoftext|>` special token (GPT2Tokenizer's default, id == vocab_size), and a file with no BOS
id loads with LlamaConfig's default `bos_token_id=1`.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

__all__ = ["write_llama_gguf"]


def write_llama_gguf(model_dir: Path, out_file: Path, dtype: str = "f32") -> Path:
    """Convert `model_dir` (config.json, model.safetensors, tokenizer.json) to `out_file`.

    `dtype` is "f32" or "f16" for the matrices; 1-D tensors (the norms) are always f32, as in
    llama.cpp. Returns `out_file`.
    """
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', not {dtype!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    config = json.loads((model_dir / "config.json").read_text())
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))

    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _add_tokenizer(writer, model_dir, config["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for hf_name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        if name.endswith("attn_q.weight"):
            tensor = _permute(tensor, n_head)
        elif name.endswith("attn_k.weight"):
            tensor = _permute(tensor, n_head_kv)
        tensor = tensor.astype(np.float16 if dtype == "f16" and tensor.ndim > 1 else np.float32)
        writer.add_tensor(name, tensor)  # numpy (torch) order; the writer reverses it for ggml

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row reorder: from HF's rotate-half rope layout to GGML's interleaved pairs.

    HF keeps each head's rows as [first half | second half] and rotates row i with row
    i + head_dim/2; ggml's rope rotates adjacent rows (2j, 2j+1). So per head:
    (n_head * head_dim, in) -> (n_head, 2, head_dim/2, in) -> swap -> (n_head, head_dim/2, 2, in)
    -> back to (n_head * head_dim, in). transformers undoes it on load (`LlamaTensorProcessor`).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """The `gpt2` (byte-level BPE) tokenizer, as llama.cpp's `get_vocab_base` writes it.

    Tokens keep their byte-level spelling; ids the tokenizer lacks up to the model's vocab size
    become `[PAD{i}]` UNUSED entries, added special tokens CONTROL, other added tokens
    USER_DEFINED. Merges, special token ids and the chat template come from gguf's SpecialVocab,
    which is what the converter itself uses.
    """
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if tokenizer["model"]["type"] != "BPE":
        raise ValueError("only byte-level BPE tokenizers are supported")
    id_to_token = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    id_to_token.update({i: t["content"] for i, t in added.items()})
    if max(id_to_token) >= vocab_size:
        raise ValueError(f"tokenizer has ids beyond the model's vocab_size {vocab_size}")

    tokens, token_types = [], []
    for i in range(vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            token_types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(id_to_token[i])
            token_types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(id_to_token[i])
            token_types.append(gguf.TokenType.NORMAL)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, which ByteLevel(use_regex=True) applies
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
