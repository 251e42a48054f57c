"""How long validating a large data file takes (no model is loaded for this).

Writes a JSONL file of N rows in the chosen format (1 in 1000 deliberately broken), then times
`load_records(..., skip_invalid=True)`: reading, JSON decoding, format detection and every row
check. Prints a table and writes JSON.

    python benchmarks/validate_speed.py                      # 100,000 messages rows
    python benchmarks/validate_speed.py --rows 100000 --format alpaca --json bench-out/validate.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from report import save_json  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

from hydra_edge.data.records import load_records


def make_row(i: int, fmt: str) -> dict:
    question = f"Question number {i}: what is {i % 97} plus {i % 13}? Please answer briefly and explain."
    answer = f"The answer is {i % 97 + i % 13}."
    return {
        "messages": {
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        },
        "alpaca": {"instruction": question, "input": "", "output": answer},
        "sharegpt": {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
    }[fmt]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--format", choices=["messages", "alpaca", "sharegpt"], default="messages")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench-out/validate_speed.json"))
    args = parser.parse_args()

    path = Path(tempfile.mkdtemp(prefix="hydra-validate-")) / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(args.rows):
            f.write("{broken\n" if i % 1000 == 999 else json.dumps(make_row(i, args.format)) + "\n")
    size_mb = path.stat().st_size / 2**20
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        loaded = load_records([str(path)], "auto", skip_invalid=True)
        times.append(time.perf_counter() - start)
    best = min(times)
    result = {
        "rows": args.rows,
        "format": args.format,
        "file_mb": round(size_mb, 1),
        "valid": len(loaded.records),
        "invalid": len(loaded.problems),
        "best_s": round(best, 3),
        "rows_per_s": round(args.rows / best),
    }
    print(f"{'rows':>8} {'format':>9} {'MB':>6} {'valid':>7} {'invalid':>7} {'best s':>7} {'rows/s':>9}")
    print(
        f"{result['rows']:>8} {result['format']:>9} {result['file_mb']:>6} {result['valid']:>7} "
        f"{result['invalid']:>7} {result['best_s']:>7} {result['rows_per_s']:>9}"
    )
    save_json(args.json, result)
    path.unlink()


if __name__ == "__main__":
    main()
