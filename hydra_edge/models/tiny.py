"""The built-in `tiny` preset: a small Llama-architecture model that needs no download.

It is built once from a fixed seed (weights) and the bundled demo corpus (a byte-level BPE
tokenizer with a chat template), then cached under `hydra_edge_home()/models/<TINY_VERSION>`.
Its weights are random: the base model knows nothing, so everything the demo scores comes
from the adapter. Bump TINY_VERSION whenever the recipe changes so old caches are not reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hydra_edge.files import atomic_target

TINY_NAME = "tiny"
TINY_VERSION = "tiny-v1"
TINY_SEED = 20240430
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
MODEL_SHAPE = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    # ~1/sqrt(hidden): attention and MLP outputs keep the scale of their inputs, so what
    # one position writes reaches the others (0.02, the usual value, is tuned for width 768+).
    initializer_range=0.06,
)
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_TRAIN = DEMO_DIR / "train.jsonl"
DEMO_EVAL = DEMO_DIR / "eval.jsonl"


def hydra_edge_home() -> Path:
    """Where hydra-edge caches things: $HYDRA_EDGE_HOME, else ~/.cache/hydra-edge."""
    env = os.environ.get("HYDRA_EDGE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hydra-edge"


def tiny_model_dir() -> Path:
    """The cached preset folder, built on first use (a few seconds)."""
    target = hydra_edge_home() / "models" / TINY_VERSION
    if not (target / "config.json").is_file():
        _build(target)
    return target


def _corpus_lines() -> list[str]:
    """Text the tokenizer is trained on: every message of the demo training split."""
    lines = []
    with open(DEMO_TRAIN, encoding="utf-8") as f:
        for line in f:
            lines += [m["content"] for m in json.loads(line)["messages"]]
    return lines


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SHAPE["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build(target: Path) -> None:
    """Builds into a temporary folder and renames it into place (safe against races/crashes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _build_tokenizer()
    config = LlamaConfig(
        **MODEL_SHAPE,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    fork_devices = [] if not torch.cuda.is_available() else list(range(torch.cuda.device_count()))
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(target, done=lambda folder: (folder / "config.json").is_file()) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "hydra_edge_preset.json").write_text(
            json.dumps({"preset": TINY_NAME, "version": TINY_VERSION, "seed": TINY_SEED}) + "\n"
        )
