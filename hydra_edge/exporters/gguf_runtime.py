"""llama.cpp on a GGUF export, through llama-cpp-python: one base model, every adapter loaded
once, a request's adapters (and their scales) switched on the context before it runs.

This is the runtime the export is checked with and `chat/eval --gguf` serve with, so what is
validated is what llama.cpp computes, not what our own reader would. A library error while
loading or running a file means the file is damaged: it is one line naming the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from hydra_edge.errors import UserError, first_line

INSTALL = "pip install 'hydra-edge[llama]' (builds llama.cpp from source once: 4-5 minutes on 2 cores)"
# Tokens one sequence may hold: a Gemma-sized vocabulary keeps (n_ctx, vocab) float32 logits.
DEFAULT_CONTEXT = 1024


def llama_cpp_module():
    """The llama_cpp package, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError(f"GGUF needs llama-cpp-python, which is not installed; {INSTALL}") from exc
    return llama_cpp


def usable_cpus() -> int:
    """The CPUs this process may run on: llama.cpp's threads (2 on 2 cores decode Gemma 3 270M
    ~1.5x faster than llama-cpp-python's default of half)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def damaged_gguf(path: Path):
    """llama.cpp's failures on a file as one line naming it."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - llama-cpp-python raises ValueError, RuntimeError, OSError
        raise UserError(
            f"{path}: llama.cpp cannot use it ({type(exc).__name__}: {first_line(exc)}); the file may be damaged "
            "(export it again), or memory ran out"
        ) from exc


class LlamaRuntime:
    """A base GGUF in llama.cpp with named LoRA adapters ready to switch per request. Calls are
    serialised: one llama.cpp context serves one sequence at a time, and a stream (`generate`)
    holds it until it is closed, so a thread must close its stream before its next call.

    logits_all keeps every position's logits ((n_ctx, vocab) float32: 1 GiB for Gemma 3 at 1024
    tokens), which teacher-forced scoring needs and generation does not."""

    def __init__(self, base: Path, adapters: dict[str, Path], n_ctx: int = DEFAULT_CONTEXT, logits_all=True) -> None:
        llama_cpp = llama_cpp_module()
        self.lock = threading.Lock()
        with damaged_gguf(base), _quiet_stderr():
            self.llm = llama_cpp.Llama(
                model_path=str(base),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                logits_all=logits_all,
                n_threads=usable_cpus(),  # llama-cpp-python's default, half the CPUs, assumes hyper-threading
                verbose=False,
            )
        # Freed before the interpreter tears its modules down (llama-cpp-python's own __del__ then fails).
        weakref.finalize(self, self.llm.close)
        self.n_ctx = n_ctx
        self.adapters = {}
        for name, path in adapters.items():
            with _quiet_stderr():
                pointer = llama_cpp.llama_adapter_lora_init(self.llm.model, str(path).encode())
            if not pointer:
                raise UserError(
                    f"{path}: llama.cpp cannot load this LoRA adapter; the file is damaged, export it again"
                )
            self.adapters[name] = pointer

    def use(self, mix: dict[str, float]) -> None:
        """Activates these adapters with these scales ({} = the base alone); the KV cache is
        dropped, since it was computed under other weights."""
        llama_cpp = llama_cpp_module()
        names = [name for name, scale in mix.items() if scale != 0.0]
        pointers = (llama_cpp.llama_adapter_lora_p_ctypes * max(len(names), 1))(*[self.adapters[n] for n in names])
        scales = (ctypes.c_float * max(len(names), 1))(*[float(mix[n]) for n in names])
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, pointers, len(names), scales) != 0:
            raise UserError(f"llama.cpp refused the adapters {', '.join(names)}")
        self.llm.reset()

    def logits(self, mix: dict[str, float], token_ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits with these adapters. (T, vocab)"""
        if not self.llm._logits_all:
            raise ValueError("this runtime keeps the last position's logits only (logits_all=False)")
        if len(token_ids) > self.n_ctx:
            raise UserError(f"a sequence of {len(token_ids)} tokens is longer than the context ({self.n_ctx})")
        with self.lock:
            self.use(mix)
            self.llm.eval(token_ids)
            return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of rendered text (special tokens parsed, BOS as the
        file says): what llama-server and Ollama feed the model."""
        with self.lock:
            return self.llm.tokenize(text.encode("utf-8"), add_bos=self.adds_bos(), special=True)

    def generate(self, mix: dict[str, float], prompt_ids: list[int], temperature: float, top_p: float, seed):
        """Token ids one by one (the caller stops it); holds the context until closed."""
        with self.lock:
            self.use(mix)
            if seed is not None:
                self.llm.set_seed(int(seed))
            yield from self.llm.generate(
                prompt_ids, temp=float(temperature), top_p=float(top_p), top_k=0, min_p=0.0, repeat_penalty=1.0
            )

    def adds_bos(self) -> bool:
        """Whether llama.cpp puts BOS before a prompt it tokenizes (the file's add_bos_token)."""
        return bool(self.llm._model.add_bos_token())

    def piece(self, token: int) -> bytes:
        return self.llm.detokenize([token], special=False)


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints its load log to the C stderr whatever `verbose` says for some messages;
    kept out of the user's terminal unless loading fails (then the one-line error says why)."""
    import sys

    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capture, a UI: nothing to silence
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
