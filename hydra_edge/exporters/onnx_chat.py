"""Serving an export: route the request, pick that cluster's model (or adapter), stream tokens.

`OnnxChat` is the `onnx` engine (hydra_edge.inference.protocol.Engine) behind `hydra-edge chat --onnx`,
`eval --onnx`, `serve --onnx` and the web UI's chat, found through the `hydra_edge.engines`
entry point, so the core never imports this module.

Several requests generate at once, each with its own onnxruntime-genai generator; the models
and the adapters are loaded once and shared (ONNX Runtime sessions run concurrently).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

from hydra_edge.errors import UserError, first_line
from hydra_edge.exporters.formats.onnx import verify_onnx_export
from hydra_edge.exporters.routed_export import RoutedExport
from hydra_edge.exporters.runtime import open_decoder, run_decoder
from hydra_edge.inference.protocol import Sampling, ServeAs


@contextlib.contextmanager
def damaged_export(path: Path):
    """A library error while loading or running an export's files means they are damaged: the
    manifest check proves only that they are the files that were signed. One line naming what
    failed, instead of onnxruntime's, onnxruntime-genai's or tokenizers' traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # RuntimeError, OSError, ValueError, ...: each library has its own
        raise UserError(
            f"{path}: cannot be used ({type(exc).__name__}: {first_line(exc, 240)}); "
            "the export is damaged, export it again"
        ) from exc


class OnnxChat(RoutedExport):
    """Loads each cluster's ONNX model on first use (onnxruntime-genai)."""

    backend = "onnx"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = verify_onnx_export(self.folder)
        super().__init__(self.folder)
        self._models: dict[str, tuple] = {}
        self._sessions: dict[str, object] = {}
        self._adapter_feeds: dict[int, dict] = {}
        self._genai_configs: dict[str, dict] = {}
        self._loading = threading.Lock()  # two first requests must not load a model twice

    def _key(self, cluster: int) -> str:
        """The models/ folder serving a cluster: one shared base (adapters), one model that
        routes per token by itself (dynamic), or the cluster's own model (merged)."""
        return {"adapters": "base", "dynamic": "dynamic"}.get(self.manifest["mode"], f"cluster_{cluster}")

    def _model(self, cluster: int):
        """(model, genai tokenizer, HF tokenizer, adapters or None) serving this cluster."""
        key = self._key(cluster)
        with self._loading:
            if key not in self._models:
                self._models[key] = self._load(key)
        return self._models[key]

    def _load(self, key: str) -> tuple:
        import onnxruntime_genai as og
        from transformers import AutoTokenizer

        model_dir = self.folder / "models" / key
        with damaged_export(model_dir):
            model = og.Model(str(model_dir))
            tokenizers = og.Tokenizer(model), AutoTokenizer.from_pretrained(model_dir)
        adapters = None
        if key == "base":
            adapters = og.Adapters(model)
            for c in self.manifest["clusters"]:
                path = self.folder / "adapters" / f"cluster_{c}.onnx_adapter"
                with damaged_export(path):
                    adapters.load(str(path), f"cluster_{c}")
        return model, *tokenizers, adapters

    def _genai_config(self, cluster: int) -> dict:
        """The model's genai_config.json "model" section, read once per model folder (kept on the
        engine: a cache outside it would keep every engine ever opened alive, and the web UI
        opens and drops them)."""
        key = self._key(cluster)
        if key not in self._genai_configs:
            self._genai_configs[key] = self._read_genai_config(self.folder / "models" / key / "genai_config.json")
        return self._genai_configs[key]

    @staticmethod
    def _read_genai_config(path: Path) -> dict:
        with damaged_export(path):
            config = json.loads(path.read_text())["model"]
            # the settings read below, checked once: the right types or a damaged file
            window = config["decoder"].get("sliding_window") or {}
            int(window.get("window_size", 0)), int(config["context_length"])
            eos = config.get("eos_token_id")
            [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        return config

    def max_length(self, cluster: int, wanted: int) -> int:
        """The generator's max_length for `wanted` tokens in all: at least the sliding window,
        since sliding-window attention (Gemma 3) needs a KV buffer that large; the caller stops
        at the tokens it wants."""
        window = (self._genai_config(cluster)["decoder"].get("sliding_window") or {}).get("window_size", 0)
        return max(wanted, window)

    def stop_tokens(self, cluster: int) -> set[int]:
        """Every end token the model knows (Gemma's chat turns end with <end_of_turn>, not EOS)."""
        eos = self._genai_config(cluster).get("eos_token_id")
        stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return stops | {self.tokenizer(cluster).eos_token_id}

    def describe(self) -> str:
        m = self.manifest
        return f"ONNX export ({m['mode']}, {m['precision']}), {len(m['clusters'])} clusters"

    def tokenizer(self, cluster: int):
        """The Hugging Face tokenizer (and chat template) of the model serving this cluster."""
        return self._model(cluster)[2]

    def logits(self, cluster: int, input_ids: list[int]):
        """Teacher-forced logits of one sequence with this cluster's weights. (T, vocab) numpy"""
        key = self._key(cluster)
        with damaged_export(self.folder / "models" / key):
            if key not in self._sessions:
                self._sessions[key] = open_decoder(self.folder / "models" / key, self.manifest.get("device", "cpu"))
            feeds = self._adapter_params(cluster) if key == "base" else None
            return run_decoder(*self._sessions[key], input_ids, feeds)

    def _adapter_params(self, cluster: int) -> dict:
        if cluster not in self._adapter_feeds:
            import numpy as np
            import onnxruntime as ort

            path = self.folder / "adapters" / f"cluster_{cluster}.onnx_adapter"
            with damaged_export(path):
                adapter = ort.AdapterFormat.read_adapter(str(path))
                # copy: the arrays would otherwise point into the adapter object's memory
                self._adapter_feeds[cluster] = {
                    k: np.array(v.numpy(), copy=True) for k, v in adapter.get_parameters().items()
                }
        return self._adapter_feeds[cluster]

    def stream(self, prompt_ids: list[int], cluster: int, serve_as: ServeAs, sampling: Sampling) -> Iterator[str]:
        model, tokenizer, _, adapters = self._model(cluster)
        with damaged_export(self.folder / "models" / self._key(cluster)):
            yield from self._generate(model, tokenizer, adapters, prompt_ids, cluster, serve_as, sampling)

    def _generate(self, model, tokenizer, adapters, prompt_ids, cluster, serve_as, sampling) -> Iterator[str]:
        import onnxruntime_genai as og

        wanted = len(prompt_ids) + sampling.max_new_tokens
        options = {"max_length": self.max_length(cluster, wanted), "do_sample": False}
        if sampling.temperature > 0:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        if sampling.seed is not None:
            options["random_seed"] = sampling.seed
        if sampling.ignore_eos:
            options["min_length"] = wanted  # end tokens masked until the last one
        params = og.GeneratorParams(model)
        params.set_search_options(**options)
        generator = og.Generator(model, params)
        if adapters is not None and serve_as != "base":
            generator.set_active_adapter(adapters, f"cluster_{cluster}")
        generator.append_tokens(prompt_ids)
        decoder, ends = tokenizer.create_stream(), self.stop_tokens(cluster)
        try:
            for _ in range(sampling.max_new_tokens):
                if generator.is_done():
                    break
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in ends and not sampling.ignore_eos:
                    break
                yield decoder.decode(token)
        finally:
            del generator  # frees its KV cache now, not at the next garbage collection

    def forceable_clusters(self) -> list[int]:
        return [] if self.manifest["mode"] == "dynamic" else list(self.manifest["clusters"])

    def serves_base(self) -> bool:
        return self.manifest["mode"] == "adapters"  # the shared base with no adapter active

    def context_length(self, cluster: int) -> int:
        return int(self._genai_config(cluster)["context_length"])
