"""Reading training data and rendering it into token ids with a loss mask.

Formats here: OpenAI-style `messages` (role/content) and plain `text`, in JSONL or a JSON
array. Conversations are rendered by the tokenizer's chat template; the loss covers assistant
tokens only (`text`: every token). Problems are reported as `FILE:LINE: reason`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hydra_edge.errors import UserError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


@dataclass
class Record:
    """One row of a data file, before tokenization."""

    source: str  # "FILE:LINE", for messages about this row
    messages: list[dict] | None = None
    text: str | None = None

    @property
    def prompt_text(self) -> str:
        """What the cluster featurizer sees: the user/system side of a conversation, or the text."""
        if self.text is not None:
            return self.text
        return "\n".join(m["content"] for m in self.messages if m["role"] != "assistant")

    @property
    def reference_answer(self) -> str | None:
        """The last assistant message, when the conversation ends with one (for exact-match)."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None


@dataclass
class Sample:
    """A tokenized record: ids and labels (IGNORE_INDEX where no loss), plus its cluster."""

    input_ids: list[int]
    labels: list[int]
    record: Record
    cluster: int = 0
    truncated: bool = field(default=False)


def _parse_record(obj, source: str) -> Record:
    if not isinstance(obj, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{source}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f"{source}: messages[{i}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise UserError(
                    f"{source}: messages[{i}] has unknown role {m['role']!r} "
                    f"(use one of {', '.join(ROLES)})"
                )
            if not isinstance(m["content"], str) or not m["content"].strip():
                raise UserError(f"{source}: messages[{i}].content must be a non-empty string")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{source}: conversation has no assistant turn to learn from")
        return Record(source, messages=[{"role": m["role"], "content": m["content"]} for m in messages])
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise UserError(f"{source}: 'text' must be a non-empty string")
        return Record(source, text=obj["text"])
    raise UserError(
        f"{source}: row has neither 'messages' nor 'text' (keys: {', '.join(sorted(obj)) or 'none'})"
    )


def read_records(path: str | Path) -> list[Record]:
    """All rows of a .jsonl or .json file, or a UserError naming the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 (byte {exc.start}); re-save it as UTF-8") from exc
    records = []
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
        if not isinstance(rows, list):
            raise UserError(f"{path}: a .json data file must hold an array of rows")
        records = [_parse_record(r, f"{path}:row {i + 1}") for i, r in enumerate(rows)]
    elif path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from exc
            records.append(_parse_record(obj, f"{path}:{lineno}"))
    else:
        raise UserError(f"--data {path}: unsupported file type {path.suffix!r}; use .jsonl or .json")
    if not records:
        raise UserError(f"{path}: no rows; the file is empty")
    return records


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template applied to messages, or a UserError saying why it can't be."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # ValueError (no template) or jinja2 TemplateError (template refuses)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the tokenizer's chat template cannot render this conversation ({first})") from exc


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Each span runs from where the generation prompt ends to the end of the turn (its closing
    EOS included, trailing whitespace excluded), found by rendering prefixes of the chat.
    Templates that rewrite earlier turns (some move the system prompt or drop earlier
    reasoning) do not render prefix by prefix; then only the final assistant turn is learned.
    """
    full = render_chat(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(prefix):
            return full, _last_turn_span(tokenizer, messages, full)
        spans.append((len(prefix), len(upto.rstrip())))
    return full, spans


def _last_turn_span(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prefix = render_chat(tokenizer, messages[:last], add_generation_prompt=True)
    upto = render_chat(tokenizer, messages[: last + 1])
    if not (full.startswith(upto) and upto.startswith(prefix)):
        raise UserError(
            "the tokenizer's chat template does not render a conversation as its prefix plus the "
            "assistant's answer, which assistant-only loss needs; use a model with a standard template"
        )
    return [(len(prefix), len(upto.rstrip()))]


def tokenize_record(tokenizer, record: Record, seq_len: int) -> Sample:
    """Token ids and labels for one record, truncated to seq_len."""
    if record.text is not None:
        ids = tokenizer(record.text, add_special_tokens=True)["input_ids"]  # BOS where the model wants one
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX if t == tokenizer.bos_token_id and tokenizer.bos_token_id is not None else t for t in ids]
    else:
        full, spans = _assistant_spans(tokenizer, record.messages)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = []
        for token_id, (start, end) in zip(ids, enc["offset_mapping"]):
            inside = any(s <= start < e for s, e in spans) and end > start
            labels.append(token_id if inside else IGNORE_INDEX)
    truncated = len(ids) > seq_len
    return Sample(ids[:seq_len], labels[:seq_len], record, truncated=truncated)


def tokenize_records(tokenizer, records: list[Record], seq_len: int, clusters: list[int] | None = None) -> list[Sample]:
    """Tokenizes every record (with its cluster id); drops those left with no loss tokens."""
    samples = [tokenize_record(tokenizer, r, seq_len) for r in records]
    for sample, cluster in zip(samples, clusters or [0] * len(samples)):
        sample.cluster = int(cluster)
    kept = [s for s in samples if any(label != IGNORE_INDEX for label in s.labels)]
    if not kept:
        raise UserError(
            f"no row has a trainable token within --seq-len {seq_len}; raise --seq-len"
        )
    return kept


def collate(samples: list[Sample], pad_id: int) -> dict:
    """Right-pads a batch. input_ids/labels/attention_mask: (B, T)."""
    import torch

    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
