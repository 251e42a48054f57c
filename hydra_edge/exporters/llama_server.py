"""`serve-llama.sh` of a GGUF export: llama-cpp-python's OpenAI-compatible server, started with
the export's llama-server.json, after registering the training chat template as a chat format.

llama-cpp-python renders chats with the template in the base file's metadata, and falls back to
Llama 2's format where there is none: a base that is your own file (`--gguf-base source|copy`,
Gemma's preset file has no template) would be served with the wrong format. The template the
adapter was trained with (export/tokenizer/) is registered here as the chat format `hydra-edge`,
which every model entry of the config names, so each cluster answers in the trained format
whatever its base holds.

    python -m hydra_edge.exporters.llama_server EXPORT_DIR [--config FILE]
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from hydra_edge.exporters.gguf_layout import CHAT_FORMAT, SERVER_CONFIG, stop_token_ids


def training_chat_formatter(tokenizer_dir: Path):
    """llama-cpp-python's chat formatter rendering with the training template (HF's Jinja
    settings), stopping at every end token the export knows."""
    from llama_cpp import llama_chat_format
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return llama_chat_format.Jinja2ChatFormatter(
        template=tokenizer.chat_template,
        eos_token=tokenizer.eos_token or "",
        bos_token=tokenizer.bos_token or "",
        add_generation_prompt=True,
        stop_token_ids=stop_token_ids(tokenizer),
    )


def main(argv: list[str] | None = None) -> None:
    from hydra_edge.exporters.gguf_runtime import llama_cpp_module

    parser = argparse.ArgumentParser(prog="python -m hydra_edge.exporters.llama_server", description=__doc__)
    parser.add_argument("export", type=Path, help="the GGUF export folder")
    parser.add_argument("--config", type=Path, help=f"the server config (default: EXPORT/{SERVER_CONFIG})")
    args = parser.parse_args(argv)
    llama_cpp_module()
    from llama_cpp import llama_chat_format

    formatter = training_chat_formatter(args.export / "tokenizer")
    llama_chat_format.register_chat_completion_handler(CHAT_FORMAT)(formatter.to_chat_handler())
    config = (args.config or args.export / SERVER_CONFIG).resolve()
    os.chdir(args.export)  # the config's paths are relative to the export
    sys.argv = ["llama_cpp.server", "--config_file", str(config)]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
