"""Reading and rendering data: the loss mask covers assistant tokens only, problems name FILE:LINE."""

import json

import pytest

from hydra_edge.data.records import IGNORE_INDEX, Record, read_records, tokenize_record, tokenize_records
from hydra_edge.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_multi_turn_ids_and_loss_mask(tokenizer):
    sample = tokenize_record(tokenizer, Record("t:1", messages=CONVERSATION), seq_len=512)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert end == tokenizer.eos_token_id
    # Hand-built expectation: the template's pieces, token by token.
    expected_ids, expected_labels = [], []
    for m in CONVERSATION:
        header = encode(tokenizer, f"<|{m['role']}|>\n")
        body = encode(tokenizer, m["content"]) + [end]
        newline = encode(tokenizer, "\n")
        expected_ids += header + body + newline
        trained = m["role"] == "assistant"
        expected_labels += (
            [IGNORE_INDEX] * len(header)
            + (body if trained else [IGNORE_INDEX] * len(body))
            + [IGNORE_INDEX] * len(newline)
        )
    assert sample.input_ids == expected_ids
    assert sample.labels == expected_labels
    learned = tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert learned == "Hello there<|end|>Paris<|end|>"


def test_text_rows_learn_every_token_and_end_with_eos(tokenizer):
    sample = tokenize_record(tokenizer, Record("t:1", text="plain text here"), seq_len=512)
    assert sample.labels == sample.input_ids
    assert sample.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_and_rows_left_without_targets(tokenizer):
    long = Record("t:1", messages=[{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}])
    sample = tokenize_record(tokenizer, long, seq_len=16)
    assert sample.truncated and len(sample.input_ids) == 16
    with pytest.raises(UserError, match="--seq-len 16"):
        tokenize_records(tokenizer, [long], seq_len=16)
    short = Record("t:2", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    truncating = tokenize_records(tokenizer, [long, short], seq_len=16)
    assert (truncating.truncated, truncating.dropped_no_target, len(truncating.samples)) == (1, 1, 1)
    long_answer = Record(
        "t:3", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok " * 40}]
    )
    dropping = tokenize_records(tokenizer, [long_answer, short], seq_len=16, overlong="drop")
    assert (dropping.dropped_overlong, [s.record.source for s in dropping.samples]) == (1, ["t:2"])
    keeping = tokenize_records(tokenizer, [long_answer, short], seq_len=16, overlong="truncate")
    assert (keeping.truncated, len(keeping.samples)) == (1, 2)


def test_dropped_rows_keep_every_other_row_with_its_cluster(tokenizer):
    def conversation(text):
        return Record("t", messages=[{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}])

    records = [conversation("short"), conversation("word " * 100), conversation("also short")]
    samples = tokenize_records(tokenizer, records, seq_len=24, clusters=[5, 6, 7]).samples
    assert [(s.record.messages[0]["content"], s.cluster) for s in samples] == [("short", 5), ("also short", 7)]


def test_tokenizer_without_chat_template_gets_the_default(tmp_path, tiny_dir):
    import shutil

    from hydra_edge.data.chat_templates import FALLBACK
    from hydra_edge.models.base import load_base

    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir, plain)
    for name in ("chat_template.jinja",):
        (plain / name).unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    base = load_base(str(plain), quant="none", device="cpu")
    assert base.tokenizer.chat_template == FALLBACK
    sample = tokenize_record(base.tokenizer, Record("t", messages=CONVERSATION), seq_len=512)
    learned = base.tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert learned == "Hello there<|end|>Paris<|end|>"


def test_json_array_files(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]))
    records = read_records(path)
    assert [r.source for r in records] == [f"{path}:row 1", f"{path}:row 2"]
    assert records[0].reference_answer == "Paris"
    assert records[0].prompt_text == "Be brief.\nHi\nCapital of France?"


def test_hub_datasets_load_through_load_dataset_with_row_locations(tmp_path):
    """hf:NAME[:SPLIT] goes through datasets.load_dataset; a local dataset folder takes the same
    path offline, and every row is named hf:NAME:row N."""
    from cli_helpers import assert_one_line_error, run_in_process

    from hydra_edge.data.records import DataProblems, load_records

    folder = tmp_path / "my-dataset"
    folder.mkdir()
    good = {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima"}]}
    (folder / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    other = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
    (folder / "test.jsonl").write_text(json.dumps(other) + "\n")
    records = load_records([f"hf:{folder}"]).records
    assert [r.source for r in records] == [f"hf:{folder}:row 1", f"hf:{folder}:row 2"]
    assert records[0].messages == good["messages"]
    (test_record,) = load_records([f"hf:{folder}:test"]).records
    assert test_record.source == f"hf:{folder}:test:row 1" and test_record.messages[-1]["content"] == "hi"

    (folder / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataProblems) as caught:
        load_records([f"hf:{folder}"])
    assert str(caught.value.problems[0]).startswith(f"hf:{folder}:row 2: empty field")
    missing = run_in_process("data", "validate", "--data", "hf:no-such-org/no-such-dataset")
    assert_one_line_error(missing, "hf:no-such-org/no-such-dataset", "cannot be loaded")
    unknown_split = run_in_process("data", "validate", "--data", f"hf:{folder}:validation")
    assert_one_line_error(unknown_split, "cannot be loaded")
