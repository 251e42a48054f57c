"""Decode speed and time to first token: ONNX and GGUF exports vs PyTorch eager, side by side.

Both sides run the same model: PyTorch is the float32 dequantized base with the HydraLoRA layers
(fixed to the cluster's mean gates, or with the per-token router for a dynamic export), generating with
`model.generate` (KV cache, greedy); ONNX is the export served by onnxruntime-genai. Each side
generates --new-tokens tokens for the same prompts; the table shows median time to first token
and decode tokens/s (tokens after the first / time after the first), then writes JSON. A GGUF
export (`--gguf`) runs in llama.cpp (llama-cpp-python) with the routed cluster's adapter.

    python benchmarks/onnx_speed.py --adapter hydra-out --export hydra-onnx
    python benchmarks/onnx_speed.py --adapter hydra-out --export onnx-fp32 onnx-int4 --json bench-out/onnx_speed.json
    python benchmarks/onnx_speed.py --adapter hydra-out --export onnx-int4 --gguf gguf-q8_0 gguf-q4_k_m

Several exports of the same adapter (fp32 and int4, say) are measured in one run against one
PyTorch baseline; they must share a mode (dynamic vs per-cluster gates decides the baseline).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of Japan?",
    "Give the antonym of the word early.",
    "Write the number eight in digits.",
    "Classify the sentiment of this review: The meal was superb.",
    "Tell me a short story about a lighthouse.",
]


def pytorch_side(
    adapter_dir: Path, cluster_of, new_tokens: int, dynamic: bool, device: str = "cpu"
) -> list[tuple[float, float]]:
    from transformers import GenerationConfig

    from hydra_edge.adapter.config import AdapterConfig
    from hydra_edge.adapter.gates import cluster_gates
    from hydra_edge.adapter.switches import fixed_gates
    from hydra_edge.data.records import prompt_ids
    from hydra_edge.exporters.merge import hydra_on_plain_base, save_plain_base

    # The float32 base every export is built from (the dequantized NF4 weights), written once here.
    with tempfile.TemporaryDirectory() as plain:
        save_plain_base(AdapterConfig.load(adapter_dir), Path(plain) / "base")
        model, tokenizer = hydra_on_plain_base(Path(plain) / "base", adapter_dir)
    model.to(device)  # a CUDA export is compared with PyTorch on the same GPU
    gates = cluster_gates(adapter_dir)
    results = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
        timings = []

        class FirstToken:  # a streamer that notes when the first new token arrives
            def __init__(self):
                self.calls = 0

            def put(self, value, timings=timings):
                self.calls += 1
                if self.calls == 2:  # the first call carries the prompt
                    timings.append(time.perf_counter())

            def end(self):
                pass

        config = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )
        start = time.perf_counter()
        # dynamic exports keep the per-token router; the others serve the cluster's mean gates
        with torch.no_grad(), fixed_gates(model, None if dynamic else gates[cluster_of(messages)]):
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=FirstToken()
            )
        end = time.perf_counter()
        produced = out.shape[1] - ids.shape[1]
        results.append((timings[0] - start, (produced - 1) / (end - timings[0])))
    return results


def onnx_side(chat, new_tokens: int) -> list[tuple[float, float]]:
    """chat: the export's OnnxChat (its models load on the first pass, outside the timings)."""
    import onnxruntime_genai as og

    from hydra_edge.data.records import render_chat

    results = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        cluster = chat.route(messages)
        model, tokenizer, hf_tokenizer, adapters = chat._model(cluster)
        ids = tokenizer.encode(render_chat(hf_tokenizer, messages, add_generation_prompt=True))
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=chat.max_length(cluster, len(ids) + new_tokens),
            min_length=len(ids) + new_tokens,
            do_sample=False,
        )
        start = time.perf_counter()
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, f"cluster_{cluster}")
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        produced = 1
        while produced < new_tokens and not generator.is_done():
            generator.generate_next_token()
            produced += 1
        end = time.perf_counter()
        results.append((first - start, (produced - 1) / (end - first)))
    return results


def gguf_side(chat, new_tokens: int) -> list[tuple[float, float]]:
    """chat: the export's GgufChat (llama.cpp loaded once)."""
    from hydra_edge.data.records import prompt_ids

    results = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        cluster = chat.route(messages)
        ids = prompt_ids(chat.tokenizer(cluster), messages)
        start = time.perf_counter()
        tokens = chat.runtime.generate({f"cluster_{cluster}": 1.0}, ids, 0.0, 1.0, None)
        next(tokens)  # end tokens are not special here: llama-cpp-python's generate never stops itself
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(tokens)
        end = time.perf_counter()
        tokens.close()
        results.append((first - start, (new_tokens - 1) / (end - first)))
    return results


def export_runs(args) -> tuple[dict, list]:
    """{label: runs} of every export, each after one warm-up pass, and the engines (for routing)."""
    from hydra_edge.exporters.gguf_chat import GgufChat
    from hydra_edge.exporters.onnx_chat import OnnxChat

    runs_by_label, engines = {}, []
    for folder in args.export:
        engine = OnnxChat(folder)
        onnx_side(engine, args.new_tokens)  # first pass: models load, sessions and caches warm up
        label = f"ONNX ({engine.manifest['mode']}, {engine.manifest['precision']})"
        runs_by_label[label] = onnx_side(engine, args.new_tokens)
        engines.append(engine)
    for folder in args.gguf:
        engine = GgufChat(folder)
        gguf_side(engine, args.new_tokens)
        runs_by_label[f"llama.cpp ({engine.manifest['base']['gguf_base']})"] = gguf_side(engine, args.new_tokens)
        engines.append(engine)
    return runs_by_label, engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--export", type=Path, nargs="*", default=[], help="ONNX exports of --adapter")
    parser.add_argument("--gguf", type=Path, nargs="*", default=[], help="GGUF exports of --adapter (llama.cpp)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (ONNX Runtime uses its default)")
    parser.add_argument("--json", type=Path, default=Path("bench-out/onnx_speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if not args.export and not args.gguf:
        sys.exit("onnx_speed: give --export and/or --gguf folders")
    runs_by_label, engines = export_runs(args)
    modes = {getattr(e, "manifest", {}).get("mode") == "dynamic" for e in engines}
    if len(modes) > 1:
        sys.exit("onnx_speed: mix of dynamic and per-cluster exports; measure them in separate runs")
    # The PyTorch model is the same for every export: the dequantized base.
    device = engines[0].manifest.get("device", "cpu")
    torch_runs = pytorch_side(args.adapter, engines[0].route, args.new_tokens, modes.pop(), device)
    rows = []
    for label, runs in {"PyTorch eager": torch_runs, **runs_by_label}.items():
        rows.append(
            {
                "runtime": label,
                "ttft_ms": 1000 * statistics.median(r[0] for r in runs),
                "decode_tokens_per_s": statistics.median(r[1] for r in runs),
            }
        )
    for row in rows:
        row["decode_speedup"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    print(f"{args.new_tokens} new tokens x {len(PROMPTS)} prompts, torch threads {torch.get_num_threads()}")
    print(f"{'runtime':<28} {'TTFT ms':>9} {'decode tok/s':>13} {'speed-up':>9}")
    for r in rows:
        print(f"{r['runtime']:<28} {r['ttft_ms']:>9.1f} {r['decode_tokens_per_s']:>13.1f} {r['decode_speedup']:>8.1f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"rows": rows, "new_tokens": args.new_tokens, "exports": [str(e) for e in args.export + args.gguf]},
            indent=2,
        )
        + "\n"
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
