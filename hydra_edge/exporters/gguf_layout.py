"""Where a GGUF export keeps each file, and the files that tell runtimes how to use them: an
Ollama Modelfile per cluster, the llama-cpp-python server's config with one model name per
cluster (`cluster_<c>`, the names `hydra-edge serve --upstream` asks for), its start script and a
README. Read by the export (gguf_export.py), the engine (gguf_chat.py) and the format's
required-files check."""

from __future__ import annotations

import json
from pathlib import Path

from hydra_edge.errors import UserError
from hydra_edge.files import sha256_of
from hydra_edge.models.gguf import END_OF_TURN

BASE_FILE = "base.gguf"
SERVER_CONFIG = "llama-server.json"
SERVER_SCRIPT = "serve-llama.sh"
SERVER_PORT = 8080
# The chat format every server model entry names: the training template, which
# hydra_edge.exporters.llama_server registers under this name before the server starts.
CHAT_FORMAT = "hydra-edge"
# What one llama-cpp-python server model may hold (tokens); the server allocates it per model.
SERVER_CONTEXT = 4096


def adapter_file(name: str) -> str:
    return f"adapters/{name}.gguf"


def modelfile_path(cluster: int) -> str:
    return f"ollama/cluster_{cluster}.Modelfile"


def base_reference(base: Path, choice: str) -> dict:
    """The manifest's record of the base file: inside the export, or the user's own file by
    path and sha256 (`--gguf-base source`)."""
    if choice == "source":
        entry = {"gguf_file": str(base.resolve()), "gguf_sha256": sha256_of(base)}
    else:
        entry = {"gguf_file": BASE_FILE}
    if choice in ("source", "copy"):
        entry["weights"] = "your GGUF file, byte for byte"
    return {**entry, "gguf_base": choice}


def base_path(folder: Path, manifest: dict) -> Path:
    """The base file of an export; a referenced file must still be the one exported with."""
    entry = manifest["base"]
    if "gguf_sha256" not in entry:
        return folder / BASE_FILE
    path = Path(entry["gguf_file"])
    if not path.is_file():
        raise UserError(f"{folder}: its base is your file {path}, which is no longer there; put it back")
    if sha256_of(path) != entry["gguf_sha256"]:
        raise UserError(f"{path}: changed since {folder} was exported (sha256 differs); put the original back")
    return path


def required_files(manifest: dict) -> list[str]:
    needed = ["router/clusters.json", "router/clusters.safetensors", "tokenizer/tokenizer_config.json"]
    needed += [SERVER_CONFIG, SERVER_SCRIPT, "README.md"]
    if "gguf_sha256" not in manifest["base"]:
        needed.append(BASE_FILE)
    for c in manifest["clusters"]:
        needed += [adapter_file(f"cluster_{c}"), modelfile_path(c)]
    needed += [adapter_file(f"head_{i}") for i in range(manifest["heads"])]
    return needed


def _base_for(manifest: dict, relative_to: str) -> str:
    """The base file as a path from a file in the export (relative_to: that file's folder)."""
    entry = manifest["base"]
    if "gguf_sha256" in entry:
        return entry["gguf_file"]
    return str(Path(relative_to, BASE_FILE)) if relative_to else BASE_FILE


def stop_token_ids(tokenizer) -> list[int]:
    """The ids a chat turn ends with: EOS and <end_of_turn> where the vocabulary has it."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if END_OF_TURN in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    return list(dict.fromkeys(ids))


def stop_tokens(tokenizer) -> list[str]:
    """stop_token_ids as text, for Ollama's `PARAMETER stop`."""
    return [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]


def write_serving_files(work: Path, manifest: dict, tokenizer) -> None:
    from hydra_edge.exporters.ollama import go_template, modelfile

    template = go_template(tokenizer.chat_template, tokenizer.bos_token, eos_token=tokenizer.eos_token)
    (work / "ollama").mkdir()
    for c in manifest["clusters"]:
        try:
            text = modelfile(
                _base_for(manifest, ".."),
                str(Path("..", adapter_file(f"cluster_{c}"))),
                template,
                stop_tokens(tokenizer),
                comment=f"hydra-edge cluster {c}: ollama create my-model-c{c} -f {modelfile_path(c)}",
            )
        except ValueError as exc:  # a path or stop token Ollama's syntax cannot hold
            raise UserError(f"export --format gguf: the Ollama Modelfile cannot be written ({exc})") from exc
        (work / modelfile_path(c)).write_text(text)
    models = [
        {"model": _base_for(manifest, ""), "model_alias": f"cluster_{c}", "lora_path": adapter_file(f"cluster_{c}")}
        for c in manifest["clusters"]
    ] + [{"model": _base_for(manifest, ""), "model_alias": "base"}]
    for model in models:  # the training chat template, registered by hydra_edge.exporters.llama_server
        model.update(n_ctx=min(SERVER_CONTEXT, manifest["context_length"]), chat_format=CHAT_FORMAT)
    config = {"host": "127.0.0.1", "port": SERVER_PORT, "models": models}
    (work / SERVER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    script = work / SERVER_SCRIPT
    script.write_text(
        "#!/usr/bin/env bash\n"
        "# llama-cpp-python's OpenAI-compatible server with one model name per cluster (cluster_<c>:\n"
        "# the base with that cluster's adapter; `base`: no adapter). Put the routing proxy in front:\n"
        f"#   hydra-edge serve --upstream http://127.0.0.1:{SERVER_PORT}/v1 --gguf THIS_FOLDER\n"
        "# It renders chats with the training template (hydra_edge.exporters.llama_server registers it).\n"
        "# Needs: pip install 'hydra-edge[llama]'. Host and port: edit llama-server.json.\n"
        'cd "$(dirname "$0")"\n'
        'exec python -m hydra_edge.exporters.llama_server . "$@"\n'
    )
    script.chmod(0o755)
    (work / "README.md").write_text(_readme(manifest, template is not None))


def _readme(manifest: dict, has_template: bool) -> str:
    clusters = manifest["clusters"]
    base = _base_for(manifest, "")
    lines = [
        "# GGUF export (hydra-edge)",
        "",
        f"Base: `{base}` ({manifest['base']['gguf_base']}); adapters: one merged LoRA per data cluster "
        f"(`adapters/cluster_<c>.gguf`, {len(clusters)} clusters) and one per head (`adapters/head_<i>.gguf`). "
        "Every cluster was checked in llama.cpp against the trained model (manifest.json, `validation`).",
        "",
        "## Ollama",
        "",
        "```bash",
        *[f"ollama create my-model-c{c} -f {modelfile_path(c)}" for c in clusters],
        "```",
        "",
        "Each Modelfile sets the training chat template and stop tokens."
        if has_template
        else "The chat template could not be written as an Ollama template; Ollama uses the one in the GGUF file.",
        "",
        "## llama.cpp",
        "",
        f"`llama-cli -m {base} --lora adapters/cluster_0.gguf`, or `bash {SERVER_SCRIPT}` for an OpenAI-compatible "
        "server with a model name per cluster, behind `hydra-edge serve --upstream` to route each request.",
        "A runtime that takes several adapters with scales can mix the heads instead; the manifest's",
        "validation shows how closely one scale per head (gates averaged over modules) matches each cluster.",
        "",
        "## hydra-edge",
        "",
        "`hydra-edge chat --gguf .`, `hydra-edge eval --gguf . --data FILE` and `hydra-edge serve --gguf .` "
        "(an OpenAI-compatible API) route each request to its cluster.",
        "",
    ]
    return "\n".join(lines)
