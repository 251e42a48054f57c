"""The work of `--format gguf` (formats/gguf.py): the base as GGUF, each cluster's merged adapter
and each head as llama.cpp LoRA files, an Ollama Modelfile per cluster and a llama.cpp server
script, every cluster checked in llama.cpp against the PyTorch model pinned to that cluster.

    <out>/base.gguf                    the base (absent when the manifest references your own file)
    <out>/adapters/cluster_<c>.gguf    cluster c's merged adapter (A, B̄_c)
    <out>/adapters/head_<i>.gguf       head i (A, B_i), for runtimes that mix adapters per request
    <out>/tokenizer/                   the training tokenizer and chat template (chat/eval --gguf)
    <out>/ollama/cluster_<c>.Modelfile `ollama create NAME -f ...`
    <out>/serve-llama.sh, llama-server.json   llama-cpp-python's server with every cluster adapter
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.adapter.gates import cluster_gates
from hydra_edge.adapter.inject import hydra_layers
from hydra_edge.data.records import render_chat
from hydra_edge.errors import UserError
from hydra_edge.exporters.folder import base_entry, building, prepare, seal
from hydra_edge.exporters.gguf_files import TensorNames, architecture_of, write_base_gguf, write_lora_gguf
from hydra_edge.exporters.gguf_layout import (
    BASE_FILE,
    SERVER_CONTEXT,
    adapter_file,
    base_reference,
    write_serving_files,
)
from hydra_edge.exporters.gguf_runtime import LlamaRuntime, llama_cpp_module
from hydra_edge.exporters.merge import hydra_on_plain_base, merged_heads, pinned_logits, save_plain_base
from hydra_edge.exporters.validation import (
    compare_logits,
    describe_check,
    describe_criteria,
    validation_problem,
    validation_prompts,
)
from hydra_edge.models.gguf import source_gguf_file

# --gguf-base -> the validation rule its rounding is judged by (validation.py); your own file
# (source, copy) by the ggml type of its weights (rule_of_file)
RULES = {"f16": "fp16", "q8_0": "q8_0", "q4_k_m": "int4"}


def rule_of_file(path: Path) -> str:
    """The validation rule for a GGUF file's weights: F32/F16/BF16 as fp16, Q8_0 as Q8_0, any
    coarser quantization as int4 (general.file_type, llama.cpp's LLAMA_FTYPE)."""
    import gguf

    from hydra_edge.exporters.gguf_files import read_gguf

    field = read_gguf(path).fields.get("general.file_type")
    file_type = int(field.contents()) if field is not None else None
    floats = (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16)
    if file_type in floats:
        return "fp16"
    return "q8_0" if file_type == gguf.LlamaFileType.MOSTLY_Q8_0 else "int4"


def base_choice(requested: str, source: Path | None) -> str:
    """`auto`: the user's own file when the run started from one, else Q8_0 written from the
    dequantized weights; `source`/`copy` need a run that started from a GGUF file."""
    if requested == "auto":
        return "source" if source is not None else "q8_0"
    if requested in ("source", "copy") and source is None:
        raise UserError(f"--gguf-base {requested}: the run did not start from a GGUF file; choose f16, q8_0 or q4_k_m")
    return requested


def export(adapter_dir: Path, out_dir: Path, log, required_files, gguf_base: str) -> dict:
    llama_cpp_module()  # validation needs llama.cpp: refuse before any work
    config = prepare(adapter_dir, out_dir)
    source = source_gguf_file(config.base_model, config.base_fingerprint)
    choice = base_choice(gguf_base, source)
    arch = architecture_of(_base_config(config), source)  # an unknown model is refused before any work
    with building(out_dir) as work:
        log("export: writing the dequantized base")
        plain = save_plain_base(config, work / ".plain")
        hf_config = json.loads((plain / "config.json").read_text())
        names = TensorNames(arch, hf_config)
        reference, tokenizer = hydra_on_plain_base(plain, adapter_dir)
        base = _base_file(work, plain, choice, source, tokenizer.chat_template, log)
        shutil.rmtree(plain)
        tokenizer.save_pretrained(work / "tokenizer")
        gates_by_cluster = cluster_gates(adapter_dir)
        _write_adapters(work, names, reference, gates_by_cluster, config)
        files = {f"cluster_{c}": work / adapter_file(f"cluster_{c}") for c in gates_by_cluster}
        files.update({f"head_{i}": work / adapter_file(f"head_{i}") for i in range(config.heads)})
        validation = _validate(base, files, reference, tokenizer, gates_by_cluster, adapter_dir, choice, log)
        entries = {
            "format": "gguf",
            "base": {**base_entry(config), **base_reference(base, choice)},
            "clusters": sorted(int(c) for c in gates_by_cluster),
            "heads": config.heads,
            "rank": config.rank,
            "alpha": config.alpha,
            "architecture": names.arch.name,
            "context_length": int(hf_config.get("max_position_embeddings") or SERVER_CONTEXT),
            "validation": validation,
        }
        write_serving_files(work, entries, tokenizer)
        return seal(work, out_dir, adapter_dir, entries, required_files)


def _base_config(config: AdapterConfig) -> dict:
    """The base model's config.json (a preset or a GGUF file: its cached folder)."""
    from hydra_edge.files import read_json_object
    from hydra_edge.models.base import resolve_model_reference

    folder = Path(resolve_model_reference(config.base_model))
    return read_json_object(folder / "config.json", "the base model's config") if folder.is_dir() else {}


def _base_file(work: Path, plain: Path, choice: str, source: Path | None, template: str, log) -> Path:
    if choice == "source":
        log(f"export: the base is your own file {source} (sha256 in the manifest; not copied)")
        return source
    if choice == "copy":
        log(f"export: copying your base file {source.name}")
        shutil.copy2(source, work / BASE_FILE)
        return work / BASE_FILE
    log(f"export: writing the base as GGUF ({choice.upper()})")
    return write_base_gguf(plain, work / BASE_FILE, choice, source, template)


def _write_adapters(work: Path, names: TensorNames, reference, gates_by_cluster: dict, config: AdapterConfig) -> None:
    """Each cluster's merged adapter and each head on its own. llama.cpp scales B·A by
    alpha / r, taken from the file, so alpha is written as scaling · r."""
    alpha = config.scaling * config.rank
    (work / "adapters").mkdir()
    for cluster, layers in merged_heads(reference, gates_by_cluster).items():
        write_lora_gguf(work / adapter_file(f"cluster_{cluster}"), names, layers, alpha)
    layers = hydra_layers(reference)
    for head in range(config.heads):
        per_head = {
            name: (layer.hydra_A.detach().float().numpy(), layer.hydra_B[head].detach().float().numpy())
            for name, layer in layers.items()
        }  # A (r, in), B_i (out, r)
        write_lora_gguf(work / adapter_file(f"head_{head}"), names, per_head, alpha)


def head_mix(gates: dict) -> dict[str, float]:
    """A cluster's gate mix as one scale per head file: llama.cpp takes one scale per adapter,
    so each head's gates are averaged over the modules (exact when they agree)."""
    mean = np.mean([np.asarray(g, dtype=np.float64) for g in gates.values()], axis=0)  # (N,)
    return {f"head_{i}": float(g) for i, g in enumerate(mean)}


def _validate(base: Path, files: dict, reference, tokenizer, gates_by_cluster, adapter_dir, choice: str, log) -> dict:
    """Every cluster's adapter, in llama.cpp, against the PyTorch model pinned to that cluster;
    and llama.cpp's own tokenization of the validation rows against the training tokenizer's.
    base: the base GGUF; files: {adapter name: its GGUF file}; choice: the --gguf-base it came from."""
    conversations = validation_prompts(adapter_dir)
    texts = [render_chat(tokenizer, messages, add_generation_prompt=True) for messages in conversations]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    runtime = LlamaRuntime(base, files, n_ctx=max(len(p) for p in prompts) + 8)
    _check_tokenizer(runtime, tokenizer, texts, prompts)
    rule, checks = RULES.get(choice) or rule_of_file(base), {}
    for cluster, gates in gates_by_cluster.items():
        expected = pinned_logits(reference, gates, prompts)
        got = np.concatenate([runtime.logits({f"cluster_{cluster}": 1.0}, ids) for ids in prompts])
        check = compare_logits(got, expected)
        problem = validation_problem(check, rule)
        if problem:
            instead = (
                "export --format onnx or peft (llama.cpp computes this model differently from PyTorch)"
                if rule in ("fp16", "q8_0")
                else "choose --gguf-base q8_0 or f16"
            )
            raise UserError(
                f"export: llama.cpp's cluster {cluster} ({choice} base) fails validation: {problem}; {instead}"
            )
        mixed = np.concatenate([runtime.logits(head_mix(gates), ids) for ids in prompts])
        check["head_mix_top1_agreement"] = float((mixed.argmax(-1) == got.argmax(-1)).mean())
        log(f"export: cluster {cluster} validated in llama.cpp ({describe_check(check, rule)})")
        checks[str(cluster)] = {**check, "prompts": len(prompts)}
    return {"runtime": "llama.cpp (llama-cpp-python)", "criteria": describe_criteria(rule), "checks": checks}


def _check_tokenizer(runtime: LlamaRuntime, tokenizer, texts: list[str], prompts: list[list[int]]) -> None:
    """llama-server and Ollama tokenize the rendered chat themselves: a base file whose
    vocabulary splits it differently from training would serve other tokens than were trained."""
    for text, ids in zip(texts, prompts):
        bos = tokenizer.bos_token
        plain = text[len(bos) :] if bos and text.startswith(bos) and runtime.adds_bos() else text
        if runtime.tokenize(plain) != ids:
            raise UserError(
                "export: llama.cpp tokenizes the validation rows differently from the training tokenizer; "
                f"the base file's vocabulary does not match the model (first row: {text[:60]!r})"
            )
