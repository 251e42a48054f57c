"""Tool calling, content parts and chat templates: OpenAI-format rows train with the loss on the
assistant's calls and answers, a template that cannot render tools is reported by row, and
--chat-template picks a named template or a Jinja file."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error, run_in_process

from hydra_edge.data.chat_templates import FALLBACK, TEMPLATES, resolve_chat_template
from hydra_edge.data.formats import RowProblem, normalize
from hydra_edge.data.records import IGNORE_INDEX, DataProblems, load_records, tokenize_record, tokenize_records
from hydra_edge.errors import UserError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOL_ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny."},
        {"role": "user", "content": "And in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [{**CALL, "function": {"name": "get_weather",
                                                                                   "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "21 C"},
        {"role": "assistant", "content": "21 C in Rome."},
    ],
}  # fmt: skip
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_dir):
    """The tiny tokenizer with ChatML's markers as special tokens (as Qwen's tokenizer has them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIALS})
    tokenizer.chat_template = TEMPLATES["chatml"]
    return tokenizer


def tool_record(tmp_path, row=TOOL_ROW):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return load_records([str(path)]).records[0]


def test_openai_rows_normalize_calls_results_and_parts(tmp_path):
    record = tool_record(tmp_path)
    messages = record.messages
    assert messages[1] == {"role": "user", "content": "Weather in Paris?"}  # parts joined
    assert messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                        "id": "call_1"}],
    }  # fmt: skip
    assert messages[3] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}
    assert record.tools == TOOLS
    assert record.reference_answer == "21 C in Rome."
    assert "18 C, sunny" in record.prompt_text  # tool results are routed on, like user turns


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "missing field"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
          {"role": "assistant", "content": "a"}], "unsupported content"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}],
         "tool turn without a call"),
        ([{"role": "user", "content": "x"},
          {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
          {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a"}], "bad tool call"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {}}]},
          {"role": "assistant", "content": "a"}], "bad tool call"),
        ([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "a"}], "unknown role"),
    ],
)  # fmt: skip
def test_malformed_tool_rows_get_a_reason(messages, reason):
    with pytest.raises(RowProblem) as caught:
        normalize({"messages": messages}, "messages")
    assert caught.value.reason == reason


def test_tool_conversation_ids_and_loss_mask_token_by_token(tmp_path, chatml_tokenizer):
    """The loss covers each assistant turn, calls included, from after its header through
    <|im_end|>; the system prompt with the tool list, the user turns and the tool results are
    context only."""
    tokenizer = chatml_tokenizer
    record = tool_record(tmp_path)
    sample = tokenize_record(tokenizer, record, seq_len=2048)

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    tool_list = "\n".join(json.dumps(t) for t in TOOLS)
    system = (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tool_list}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n"
    )
    pieces = [  # (text, trained)
        (system, False),
        ("<|im_start|>user\nWeather in Paris?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>', True),
        ("\n<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("It is 18 C and sunny.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd in Rome?<|im_end|>\n<|im_start|>assistant\n", False),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>', True),
        ("\n<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("21 C in Rome.<|im_end|>", True),
        ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        ids = encode(text)
        expected_ids += ids
        expected_labels += ids if trained else [IGNORE_INDEX] * len(ids)
    assert sample.input_ids == expected_ids
    assert sample.labels == expected_labels
    learned = tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert learned.count("<tool_call>") == 2 and learned.endswith("21 C in Rome.<|im_end|>")
    assert "18 C, sunny" not in learned and "Weather in Paris?" not in learned


@pytest.mark.parametrize("name", ["llama3", "qwen2.5"])
def test_other_tool_templates_train_the_calls_too(tmp_path, chatml_tokenizer, name):
    chatml_tokenizer.chat_template = TEMPLATES[name]
    try:
        sample = tokenize_record(chatml_tokenizer, tool_record(tmp_path), seq_len=2048)
    finally:
        chatml_tokenizer.chat_template = TEMPLATES["chatml"]
    learned = chatml_tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert '"get_weather"' in learned and '"Rome"' in learned and "21 C in Rome." in learned
    assert "18 C, sunny" not in learned


@pytest.mark.parametrize("template", ["gemma", "fallback"])
def test_a_template_without_tools_is_reported_by_row_not_mangled(tmp_path, chatml_tokenizer, template):
    """gemma refuses tool calls; the fallback would drop them silently, which the check catches."""
    chatml_tokenizer.chat_template = TEMPLATES.get(template, FALLBACK)
    plain = load_records(
        [
            str(
                _write(
                    tmp_path,
                    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
                )
            )
        ]
    ).records
    try:
        with pytest.raises(DataProblems) as caught:
            tokenize_records(chatml_tokenizer, [tool_record(tmp_path), *plain], seq_len=2048)
        kept = tokenize_records(chatml_tokenizer, [tool_record(tmp_path), *plain], seq_len=2048, skip_invalid=True)
    finally:
        chatml_tokenizer.chat_template = TEMPLATES["chatml"]
    (problem,) = caught.value.problems
    assert problem.location.endswith("tools.jsonl:1") and problem.reason == "template cannot render"
    assert "tool calls" in problem.detail
    assert len(kept.samples) == 1 and kept.unrenderable == 1


def _write(tmp_path, row):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


def test_chat_template_names_files_and_bad_files(tmp_path):
    assert resolve_chat_template("chatml") == TEMPLATES["chatml"]
    good = tmp_path / "mine.jinja"
    good.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert resolve_chat_template(str(good)) == good.read_text()
    bad = tmp_path / "bad.jinja"
    bad.write_text("line one\n{% for m in messages %}{{ m['content'] }}\n")
    with pytest.raises(UserError, match=r"bad.jinja: line \d+"):
        resolve_chat_template(str(bad))
    with pytest.raises(UserError, match="chatml, llama3, gemma, qwen2.5"):
        resolve_chat_template("vicuna")


def test_data_preview_renders_with_the_chosen_template(tmp_path):
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(TOOL_ROW) + "\n")
    shown = run_in_process("data", "preview", "--data", str(data), "--chat-template", "chatml", "--n", "1")
    assert shown.returncode == 0, shown.stderr
    assert "[[<tool_call>" in shown.stdout and "<tool_response>\n18 C, sunny" in shown.stdout
    refused = run_in_process("data", "preview", "--data", str(data), "--chat-template", "gemma")
    assert_one_line_error(refused, "template cannot render")


@pytest.mark.slow
def test_tool_and_content_part_rows_train_end_to_end(tmp_path):
    """`finetune` on OpenAI-format rows (tool calls, tool turns, content parts) with --chat-template
    chatml: it trains, and the adapter keeps the template for eval and chat."""
    from hydra_edge.adapter.config import AdapterConfig

    data = tmp_path / "tools.jsonl"
    plain = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of Peru?"}]},
                          {"role": "assistant", "content": "Lima"}]}  # fmt: skip
    data.write_text("".join(json.dumps(row) + "\n" for row in [TOOL_ROW, plain] * 8))
    out = tmp_path / "run"
    run = run_in_process("finetune", "--data", str(data), "--chat-template", "chatml", "--heads", "1",
                         "--max-steps", "3", "--seq-len", "512", "--batch-size", "4", "--out", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert AdapterConfig.load(out).chat_template == TEMPLATES["chatml"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and all(row["loss"] > 0 for row in steps)
    chat = run_in_process("chat", "--adapter", str(out), "--prompt", "Capital of Peru?", "--max-new-tokens", "4")
    assert chat.returncode == 0, chat.stderr[-2000:]
