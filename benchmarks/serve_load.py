"""`hydra-edge serve` under load: aggregate tokens/s and time to first token (p50, p95) at several
client concurrencies, beside the single-stream speed of the engine `hydra-edge chat --onnx` uses.

The server runs as a user would start it (a subprocess, --max-concurrency 16); clients are the
official `openai` package (AsyncOpenAI), streaming, with `ignore_eos` so every answer has exactly
--max-tokens tokens. Rounds interleave the single-stream engine and every concurrency, so a noisy
neighbour slows all of them alike; the table pools the rounds.

    python benchmarks/serve_load.py --export hydra-onnx
    python benchmarks/serve_load.py --export hydra-onnx --concurrency 1 4 16 --rounds 3 --json bench-out/serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import save_json  # noqa: E402

PROMPTS = [
    "What is the capital of Japan?",
    "Give the antonym of the word early.",
    "Write the number eight in digits.",
    "Classify the sentiment of this review: The meal was superb.",
    "Tell me a short story about a lighthouse.",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def single_stream(export: Path, max_tokens: int) -> list[dict]:
    """The engine behind `chat --onnx`, in this process, one prompt after another."""
    from hydra_edge.data.records import prompt_ids
    from hydra_edge.exporters.onnx_chat import OnnxChat
    from hydra_edge.inference.protocol import Sampling

    engine = single_stream.engine = getattr(single_stream, "engine", None) or OnnxChat(export)
    results = []
    for prompt in PROMPTS:
        turns = [{"role": "user", "content": prompt}]
        cluster = engine.route(turns)
        ids = prompt_ids(engine.tokenizer(cluster), turns)
        started, first, count = time.perf_counter(), None, 0
        for _ in engine.stream(ids, cluster, "routed", Sampling(max_tokens, ignore_eos=True)):
            first = first or time.perf_counter()
            count += 1
        results.append({"ttft": first - started, "tokens": count, "seconds": time.perf_counter() - started})
    return results


async def load(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[list[dict], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="benchmark", max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> dict:
        async with gate:
            started, first = time.perf_counter(), None
            stream = await client.chat.completions.create(
                model="auto",
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            tokens = 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter()
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return {"ttft": first - started, "tokens": tokens, "seconds": time.perf_counter() - started}

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - started
    await client.close()
    return list(results), wall


def start_server(export: Path, slots: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "hydra_edge", "serve", "--onnx", str(export), "--port", "0",
               "--max-concurrency", str(slots), "--max-queue", "256", "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    found = re.search(r"(http://\S+/v1)", server.stdout.readline())
    if not found:
        server.kill()
        sys.exit("serve_load: the server did not start")
    return server, found.group(1)


def summarize(name: str, concurrency: int, runs: list[tuple[list[dict], float]]) -> dict:
    requests = [r for results, _ in runs for r in results]
    tokens, wall = sum(r["tokens"] for r in requests), sum(w for _, w in runs)
    return {
        "mode": name,
        "concurrency": concurrency,
        "requests": len(requests),
        "aggregate_tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(r["ttft"] for r in requests),
        "ttft_p95_ms": 1000 * percentile([r["ttft"] for r in requests], 0.95),
        "per_stream_tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in requests),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True, help="an export folder (hydra-edge export --out)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench-out/serve_load.json"))
    args = parser.parse_args()

    server, url = start_server(args.export, max(args.concurrency))
    single: list[tuple[list[dict], float]] = []
    loaded: dict[int, list] = {c: [] for c in args.concurrency}
    try:
        asyncio.run(load(url, 1, 2, 4))  # warm-up: first requests load the model and adapters
        single_stream(args.export, 4)
        for _ in range(args.rounds):
            started = time.perf_counter()
            results = single_stream(args.export, args.max_tokens)
            single.append((results, time.perf_counter() - started))
            for concurrency in args.concurrency:
                loaded[concurrency].append(
                    asyncio.run(load(url, concurrency, max(8, 2 * concurrency), args.max_tokens))
                )
    finally:
        server.terminate()
        server.wait(timeout=30)

    rows = [summarize("chat --onnx engine (in process, one stream)", 1, single)]
    rows += [summarize("hydra-edge serve (HTTP, streaming)", c, loaded[c]) for c in args.concurrency]
    print(f"\n{args.max_tokens} tokens per answer, {args.rounds} rounds, export {args.export}\n")
    print("| mode | concurrency | requests | aggregate tokens/s | TTFT p50 ms | TTFT p95 ms | tokens/s per stream |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['aggregate_tokens_per_s']:.0f} | "
              f"{r['ttft_p50_ms']:.1f} | {r['ttft_p95_ms']:.1f} | {r['per_stream_tokens_per_s']:.0f} |")  # fmt: skip
    save_json(
        args.json, {"export": str(args.export), "max_tokens": args.max_tokens, "rounds": args.rounds, "rows": rows}
    )


if __name__ == "__main__":
    main()
