"""Writes a randomly initialised model with a real model's shapes, plus the tiny tokenizer.

Lets speed and memory be measured at a real size with no download:

    python benchmarks/make_random_model.py --shape qwen2.5-0.5b --out /tmp/qwen-shape
    hydra-edge finetune --model /tmp/qwen-shape --max-steps 20 ...
"""

import argparse
from pathlib import Path

SHAPES = {
    # Qwen/Qwen2.5-0.5B's config.json (architecture numbers only).
    "qwen2.5-0.5b": dict(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from hydra_edge.models.tiny import tiny_model_dir

    shape = dict(SHAPES[args.shape])
    shape.pop("arch")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir())
    config = Qwen2Config(
        **shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    torch.manual_seed(args.seed)
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.shape}-shaped random model ({n / 1e6:.0f}M parameters) to {out}")


if __name__ == "__main__":
    main()
