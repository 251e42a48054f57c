"""Loading a trained adapter onto its base, and generating with it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.adapter.inject import (
    attach_adapter,
    base_fingerprint,
    read_adapter_weights,
)
from hydra_edge.clusters.fit import ClusterModel, load_clusters
from hydra_edge.data.records import prompt_ids
from hydra_edge.errors import UserError
from hydra_edge.inference.protocol import Sampling
from hydra_edge.models.base import load_base


@dataclass
class TrainedModel:
    model: object
    tokenizer: object
    config: AdapterConfig
    clusters: ClusterModel
    adapter_dir: Path


def load_trained(adapter_dir: str | Path, model_override: str | None = None, device: str | None = None) -> TrainedModel:
    """The base named in the adapter (or --model), quantized as in training, with the adapter.

    Refuses a base whose weights fingerprint differs from the one the adapter was trained on.
    """
    adapter_dir = Path(adapter_dir)
    config = AdapterConfig.load(adapter_dir)
    weights = read_adapter_weights(adapter_dir)
    clusters = load_clusters(adapter_dir, expected_k=config.heads)  # checked before the slow part: loading the base
    # The training dtype, also where bf16 is slow: NF4 quantizes from the loaded weights, so
    # another dtype would give (slightly) other base weights than the adapter was trained on.
    base = load_base(
        model_override or config.base_model,
        quant=config.quant,
        device=device,
        dtype=config.dtype,
        chat_template=config.chat_template,  # the template it trained with
    )
    fingerprint = base_fingerprint(base.resolved, base.model)
    if fingerprint != config.base_fingerprint:
        raise UserError(
            f"--adapter {adapter_dir}: trained on base {config.base_model!r} "
            f"(fingerprint {config.base_fingerprint[:12]}), but the loaded base "
            f"{base.reference!r} has fingerprint {fingerprint[:12]}; load the base it was trained on"
        )
    attach_adapter(base.model, config, weights, adapter_dir)
    base.model.eval()
    return TrainedModel(base.model, base.tokenizer, config, clusters, adapter_dir)


def generation_config(model, tokenizer, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0):
    """A clean GenerationConfig: greedy unless temperature > 0, no inherited penalties, and
    stopping on every end token the model knows (its generation config's and the tokenizer's)."""
    from transformers import GenerationConfig

    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops] if stops is not None else [])
    stops.add(tokenizer.eos_token_id)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(stops),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )


@torch.no_grad()
def generate_greedy(
    model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 32, progress=None
) -> list[str]:
    """Greedy answers for many conversations, batched with left padding; progress (a
    PhaseProgress) counts rows and generated tokens."""
    device = next(model.parameters()).device
    answers = []
    for i in range(0, len(conversations), batch_size):
        encoded = [prompt_ids(tokenizer, conv) for conv in conversations[i : i + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(encoded):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=generation_config(model, tokenizer, max_new_tokens),
        )
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        if progress is not None:
            progress.update(len(encoded), int((out[:, width:] != tokenizer.pad_token_id).sum()))
    return answers


@torch.no_grad()
def prompt_gate_mix(model, tokenizer, messages: list[dict]) -> list[float]:
    """The router's mean gate per head over the prompt's tokens, averaged across modules."""
    from hydra_edge.adapter.switches import capture_gates

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
    with capture_gates(model) as sinks:
        model(input_ids=ids, use_cache=False)
    per_module = [sink[-1].float().mean(dim=(0, 1)) for sink in sinks.values()]  # each (N,)
    return torch.stack(per_module).mean(dim=0).tolist()


def stream_tokens(model, tokenizer, prompt_ids: list[int], sampling: Sampling) -> Iterator[str]:
    """Engine.stream for a PyTorch model: HF generate on a worker thread, one text piece per
    token. Closing the iterator sets a stopping criterion, so generation ends after the current
    token. Pieces come from decoding all answer tokens so far (what TextIteratorStreamer does), so
    characters that span tokens come out whole."""
    from queue import SimpleQueue
    from threading import Event, Thread

    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    tokens: SimpleQueue = SimpleQueue()  # answer token ids, then None
    stop = Event()

    class TokenQueue(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() sends the prompt first
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                tokens.put(token)

        def end(self) -> None:
            tokens.put(None)

    class StopWhenClosed(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    config = generation_config(model, tokenizer, sampling.max_new_tokens, sampling.temperature, sampling.top_p)
    if sampling.ignore_eos:
        config.min_new_tokens = sampling.max_new_tokens  # end tokens masked until the last one
    ends = set(config.eos_token_id)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=config,
                    streamer=TokenQueue(),
                    stopping_criteria=StoppingCriteriaList([StopWhenClosed()]),
                )
        except BaseException as exc:  # surface it in the reader instead of hanging it
            failure.append(exc)
            tokens.put(None)

    worker = Thread(target=work, daemon=True)
    worker.start()
    answer: list[int] = []
    shown = ""
    try:
        while (token := tokens.get()) is not None:
            if token in ends:
                continue
            answer.append(token)
            text = tokenizer.decode(answer, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # a character still incomplete
                yield ""
                continue
            piece, shown = text[len(shown) :], text
            yield piece
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]
