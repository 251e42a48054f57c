"""The `gguf` engine (hydra_edge.inference.protocol.Engine) behind `hydra-edge chat --gguf DIR`
and `eval --gguf DIR`: the export's base in llama.cpp with every cluster's adapter loaded once,
a request routed by the shipped router and answered with its cluster's adapter switched on.
Found through the `hydra_edge.engines` entry point, so the core never imports it.

Prompts are rendered and tokenized by the training tokenizer (export/tokenizer/); the export
checked that llama.cpp's own tokenizer agrees, so `ollama run` sees the same tokens.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

from hydra_edge.errors import UserError
from hydra_edge.exporters.gguf_layout import adapter_file, base_path, required_files, stop_token_ids
from hydra_edge.exporters.gguf_runtime import DEFAULT_CONTEXT, LlamaRuntime, damaged_gguf
from hydra_edge.exporters.manifest import verify_export
from hydra_edge.exporters.routed_export import RoutedExport
from hydra_edge.inference.protocol import Sampling, ServeAs


def verify_gguf_export(folder: Path) -> dict:
    manifest = verify_export(folder, lambda m: required_files(m) if m.get("format") == "gguf" else [])
    if manifest.get("format") != "gguf":
        kind = manifest.get("format", "onnx")
        use = "chat and eval take it with --onnx" if kind == "onnx" else "see the README in it"
        raise UserError(f"--gguf {folder}: holds a --format {kind} export; {use}")
    return manifest


class GgufChat(RoutedExport):
    backend = "llama.cpp"

    def __init__(self, folder: str | Path) -> None:
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.manifest = verify_gguf_export(self.folder)
        super().__init__(self.folder)
        with damaged_gguf(self.folder / "tokenizer"):
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder / "tokenizer")
        self._files = (
            base_path(self.folder, self.manifest),
            {f"cluster_{c}": self.folder / adapter_file(f"cluster_{c}") for c in self.manifest["clusters"]},
        )
        self._context = min(DEFAULT_CONTEXT, int(self.manifest.get("context_length", DEFAULT_CONTEXT)))
        self.runtime = LlamaRuntime(*self._files, n_ctx=self._context, logits_all=False)
        self._scorer: LlamaRuntime | None = None  # opened by the first teacher-forced scoring (eval)
        self._stops = set(stop_token_ids(self._tokenizer))

    def describe(self) -> str:
        base, clusters = self.manifest["base"]["gguf_base"], len(self.manifest["clusters"])
        return f"GGUF export ({base} base, llama.cpp), {clusters} clusters"

    def tokenizer(self, cluster: int):
        return self._tokenizer

    def _mix(self, cluster: int, serve_as: ServeAs = "routed") -> dict[str, float]:
        return {} if serve_as == "base" else {f"cluster_{cluster}": 1.0}

    def logits(self, cluster: int, input_ids: list[int]):
        """Teacher-forced logits of one sequence with this cluster's adapter. (T, vocab) numpy"""
        if self._scorer is None:  # the weights are shared through the file's memory map
            self._scorer = LlamaRuntime(*self._files, n_ctx=self._context, logits_all=True)
        return self._scorer.logits(self._mix(cluster), input_ids)

    def stream(self, prompt_ids: list[int], cluster: int, serve_as: ServeAs, sampling: Sampling) -> Iterator[str]:
        room = self.runtime.n_ctx - len(prompt_ids)
        if room < 1:
            raise UserError(f"the prompt has {len(prompt_ids)} tokens; this engine holds {self.runtime.n_ctx}")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens = self.runtime.generate(
            self._mix(cluster, serve_as), prompt_ids, sampling.temperature, sampling.top_p, sampling.seed
        )
        try:
            for count, token in enumerate(tokens):
                if count >= min(sampling.max_new_tokens, room):
                    break
                if token in self._stops and not sampling.ignore_eos:
                    break
                yield decoder.decode(self.runtime.piece(token))
        finally:
            tokens.close()  # releases the context for the next request

    def forceable_clusters(self) -> list[int]:
        return list(self.manifest["clusters"])

    def serves_base(self) -> bool:
        return True

    def context_length(self, cluster: int) -> int:
        return self.runtime.n_ctx
