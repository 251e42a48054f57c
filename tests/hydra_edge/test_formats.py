"""Bring your own data: every format in every file type trains; bad rows are named; nothing crosses."""

import json

import pytest
from cli_helpers import run_cli

from hydra_edge.data.formats import RowProblem, normalize
from hydra_edge.data.records import IGNORE_INDEX, Record, load_records, pack_samples, tokenize_record
from hydra_edge.training.config import build_config
from hydra_edge.training.finetune import run_finetune

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("Opposite of hot?", "cold"),
    ("Write seven in digits.", "7"),
    ("Is this review positive? Great movie!", "positive"),
]


def rows_in(fmt: str, n: int = 12) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)]
        q = f"{q} ({i})"
        rows.append(
            {
                "alpaca": {"instruction": q, "input": "" if i % 2 else "context", "output": a},
                "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
                "messages": {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ]
                },
                "prompt_completion": {"prompt": q, "completion": a},
                "text": {"text": f"{q} {a}"},
            }[fmt]
        )
    return rows


def write(rows: list[dict], path, kind: str):
    """Writes rows as a .jsonl/.json/.csv/.parquet file or a datasets save_to_disk folder."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        import csv

        keys = list(rows[0])
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    elif kind == "datasets":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


FORMATS = ["alpaca", "sharegpt", "messages", "prompt_completion", "text"]
KINDS = ["jsonl", "json", "csv", "parquet", "datasets"]


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_in_every_file_type_trains(tmp_path, tiny_dir, fmt, kind):
    path = write(rows_in(fmt), tmp_path / (f"data.{kind}" if kind != "datasets" else "data_folder"), kind)
    loaded = load_records([str(path)])
    assert loaded.formats == {str(path): fmt} and len(loaded.records) == 12
    config = build_config(
        {},
        {
            "data": [str(path)],
            "out": str(tmp_path / "out"),
            "max_steps": 2,
            "heads": "2",
            "seq_len": 64,
            "batch_size": 4,
            "quant": "none",
        },
    )
    result = run_finetune(config)
    assert result["train"]["steps"] == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_several_files_of_different_formats_mix(tmp_path):
    a = write(rows_in("alpaca", 5), tmp_path / "a.csv", "csv")
    b = write(rows_in("sharegpt", 7), tmp_path / "b.parquet", "parquet")
    loaded = load_records([str(a), str(b)])
    assert loaded.formats == {str(a): "alpaca", str(b): "sharegpt"} and len(loaded.records) == 12
    assert loaded.records[5].source == f"{b}:row 1"


@pytest.mark.parametrize(
    "fmt, row, expected",
    [
        (
            "alpaca",
            {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact."},
            [
                {"role": "system", "content": "Be exact."},
                {"role": "user", "content": "Add\n\n2 and 3"},
                {"role": "assistant", "content": "5"},
            ],
        ),
        (
            "alpaca",
            {"instruction": "Say hi", "input": "", "output": "hi"},
            [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        ),
        (
            "sharegpt",
            {
                "system": "S",
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "gpt", "value": "b"},
                    {"from": "human", "value": "c"},
                    {"from": "gpt", "value": "d"},
                ],
            },
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ],
        ),
        (
            "prompt_completion",
            {"prompt": "p", "completion": "c"},
            [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
        ),
    ],
)
def test_formats_become_the_same_conversation(fmt, row, expected):
    assert normalize(row, fmt) == (expected, None)


def test_sharegpt_multi_turn_loss_mask(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages, _ = normalize(
        {
            "conversations": [
                {"from": "human", "value": "a"},
                {"from": "gpt", "value": "b"},
                {"from": "human", "value": "c"},
                {"from": "gpt", "value": "d"},
            ]
        },
        "sharegpt",
    )
    sample = tokenize_record(tokenizer, Record("t", messages=messages), 512)
    assert tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX]) == "b<|end|>d<|end|>"
    assert sample.input_ids[-2] == tokenizer.eos_token_id  # "...d<|end|>\n": ends with EOS (+ newline)


MALFORMED = {
    # name: (file name, content or bytes, location it must name)
    "malformed_json": ("bad.jsonl", '{"text": "ok"}\n{"text": "no end\n', ":2:"),
    "invalid_utf8": ("bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2:"),
    "empty_jsonl": ("empty.jsonl", "", ":1:"),
    "blank_jsonl": ("blank.jsonl", "\n\n", ":1:"),
    "alpaca_missing_output": ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n', ":2:"),
    "alpaca_empty_output": (
        "a.jsonl",
        '{"instruction": "x", "output": "y"}\n{"instruction": "x", "output": ""}\n',
        ":2:",
    ),
    "alpaca_wrong_type": ("a.jsonl", '{"instruction": "x", "output": "y"}\n{"instruction": 3, "output": "y"}\n', ":2:"),
    "messages_unknown_role": (
        "m.jsonl",
        '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
        ":1:",
    ),
    "messages_no_assistant": ("m.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', ":1:"),
    "messages_missing_content": (
        "m.jsonl",
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}\n',
        ":1:",
    ),
    "messages_not_a_list": ("m.jsonl", '{"messages": "hello"}\n', ":1:"),
    "sharegpt_unknown_from": (
        "s.jsonl",
        '{"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}\n',
        ":1:",
    ),
    "sharegpt_empty": ("s.jsonl", '{"conversations": []}\n', ":1:"),
    "completion_missing": (
        "p.jsonl",
        '{"prompt": "x", "completion": "y"}\n{"prompt": "x", "completion": null}\n',
        ":2:",
    ),
    "row_not_object": ("r.jsonl", '{"text": "a"}\n[1, 2]\n', ":2:"),
    "unknown_format": ("u.jsonl", '{"question": "x", "answer": "y"}\n', ":1:"),
    "json_array_malformed": ("j.json", '[{"text": "a"},\n {"text": }]', ":2:"),
    "json_not_array": ("j.json", '{"text": "a"}', ":1:"),
    "csv_header_only": ("c.csv", "instruction,output\n", ":1:"),
    "csv_extra_cells": ("c.csv", "instruction,output\nx,y\nx,y,z\n", ":row 2:"),
    "csv_empty_cell": ("c.csv", "instruction,output\nx,y\nx,\n", ":row 2:"),
}


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_stops_before_training_naming_file_and_line(tmp_path, name):
    file_name, content, where = MALFORMED[name]
    path = tmp_path / file_name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run_cli("finetune", "--data", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("hydra-edge: error:")
    assert any(line.startswith(f"{path}{where}") for line in lines), result.stderr
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_parquet_wrong_type_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["fine", None, "also fine"]}), str(path))
    with pytest.raises(Exception) as err:
        load_records([str(path)])
    assert f"{path}:row 2: missing field" in err.value.lines[0]


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_skip_invalid_trains_on_the_valid_rows_and_counts_reasons(tmp_path):
    rows = [json.dumps(r) for r in rows_in("messages", 50)]
    rows[3] = '{"messages": [{"role": "user", "content": "only a question"}]}'
    rows[20] = '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}'
    rows[41] = '{"messages": [broken'
    path = tmp_path / "fifty.jsonl"
    path.write_text("\n".join(rows) + "\n")
    strict = run_cli("finetune", "--data", str(path), "--out", str(tmp_path / "strict"), cwd=tmp_path)
    assert strict.returncode == 2
    assert [line.split(": ")[0] for line in strict.stderr.splitlines()[:3]] == [f"{path}:4", f"{path}:21", f"{path}:42"]
    result = run_cli(
        "finetune",
        "--data",
        str(path),
        "--skip-invalid",
        "--out",
        str(tmp_path / "o"),
        "--max-steps",
        "2",
        "--heads",
        "2",
        "--quant",
        "none",
        "--seq-len",
        "64",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data: 47 training rows" in result.stderr
    assert "skipped 3 invalid rows" in result.stderr
    for reason in ("no assistant turn: 1", "unknown role: 1", "malformed JSON: 1"):
        assert reason in result.stderr
    assert len(json.loads((tmp_path / "o" / "clusters.json").read_text())["labels"]) == 47


def test_data_validate_lists_every_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": ""}\n{"text": 4}\n')
    result = run_cli("data", "validate", "--data", str(path))
    assert result.returncode == 2
    assert f"{path}:2: empty field" in result.stdout and f"{path}:3: wrong type" in result.stdout
    assert "1 valid rows, 2 invalid" in result.stdout


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_data_preview_marks_trained_tokens(tmp_path, tiny_dir):
    path = write(rows_in("alpaca", 2), tmp_path / "a.jsonl", "jsonl")
    result = run_cli("data", "preview", "--data", str(path), "--n", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[[Paris<|end|>]]" in result.stdout and "<|user|>" in result.stdout
    as_json = run_cli("data", "preview", "--data", str(path), "--n", "2", "--json")
    shown = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(shown) == 2 and all(len(s["input_ids"]) == len(s["labels"]) for s in shown)


def test_packing_never_lets_attention_cross_samples(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hydra_edge.data.records import collate

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    records = [Record(f"t:{i}", messages=normalize(r, "alpaca")[0]) for i, r in enumerate(rows_in("alpaca", 5))]
    samples = [tokenize_record(tokenizer, r, 512) for r in records]
    packed = pack_samples(samples, seq_len=64)
    assert len(packed) < len(samples) and all(len(p.input_ids) <= 64 for p in packed)
    batch = collate(packed, tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0] for s in samples]
    row, offset = 0, 0
    for s, logits in zip(samples, alone):
        if offset + len(s.input_ids) > len(packed[row].input_ids):
            row, offset = row + 1, 0
        torch.testing.assert_close(packed_logits[row, offset : offset + len(s.input_ids)], logits, atol=1e-4, rtol=1e-4)
        offset += len(s.input_ids)
    # the first token of every later sample is never a target (it would be predicted across the boundary)
    starts = [i for i, p in enumerate(packed[0].position_ids) if p == 0 and i > 0]
    assert starts and all(packed[0].labels[i] == IGNORE_INDEX for i in starts)


@pytest.mark.slow  # runs hydra-edge (training or the CLI) end to end
def test_packing_and_overlong_from_the_cli(tmp_path):
    rows = rows_in("messages", 20)
    rows[0]["messages"][2]["content"] = "word " * 200  # a long answer: truncated, not emptied
    path = write(rows, tmp_path / "m.jsonl", "jsonl")
    common = ["--data", str(path), "--max-steps", "2", "--heads", "2", "--quant", "none", "--seq-len", "96"]
    packed = run_cli("finetune", *common, "--packing", "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr[-2000:]
    assert "packed 20 samples into" in packed.stderr and "1 samples longer than --seq-len 96 truncated" in packed.stderr
    dropped = run_cli("finetune", *common, "--overlong", "drop", "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert dropped.returncode == 0, dropped.stderr[-2000:]
    assert "1 samples longer than --seq-len 96 dropped" in dropped.stderr


def test_row_problem_carries_a_reason():
    with pytest.raises(RowProblem) as err:
        normalize({"instruction": "x"}, "alpaca")
    assert err.value.reason == "missing field" and "'output'" in err.value.detail


def test_training_batches_carry_each_tokens_cluster_and_sample():
    from hydra_edge.data.records import Sample, collate

    samples = [
        Sample([5, 6, 7], [5, 6, 7], None, cluster=2),
        Sample([8, 9], [8, 9], None, cluster=0),
        Sample([3, 4, 5, 6], [3, 4, 5, 6], None, cluster=1),
    ]
    plain = collate(samples[:2], pad_id=0, with_clusters=True)
    assert plain["cluster_ids"].tolist() == [[2, 2, 2], [0, 0, -1]]
    assert plain["segment_ids"].tolist() == [[0, 0, 0], [0, 0, -1]]
    assert "cluster_ids" not in collate(samples[:2], pad_id=0)  # not a model input elsewhere
    packed = collate(pack_samples(samples, seq_len=6), pad_id=0, with_clusters=True)
    assert packed["cluster_ids"].tolist() == [[2, 2, 2, 0, 0], [1, 1, 1, 1, -1]]
    assert packed["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
