"""Loading training data and rendering it into token ids with a loss mask.

Files and formats are read by `sources.py` and `formats.py`; this module validates every row
before any model is loaded, then renders conversations with the tokenizer's chat template.
The loss covers assistant tokens only (`text` rows: every token), and every sample ends with
the tokenizer's EOS so the tuned model learns to stop.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from hydra_edge.choices import OVERLONG_CHOICES, FormatChoice
from hydra_edge.data.formats import RowProblem, detect_format, normalize, tools_of
from hydra_edge.data.sources import read_rows
from hydra_edge.errors import TemplateOverBudget, UserError

IGNORE_INDEX = -100


def routing_text(messages: list[dict]) -> str:
    """The text a request is routed on: every non-assistant turn (system prompt and tool results
    included), the same text the clusters were fitted on in training. Every engine routes
    through this."""
    return "\n".join(m["content"] for m in messages if m["role"] != "assistant")


@dataclass
class Record:
    """One valid row of a data file, before tokenization."""

    source: str  # "FILE:LINE" or "FILE:row N", for messages about this row
    messages: list[dict] | None = None
    text: str | None = None
    tools: list[dict] | None = None  # function definitions the template shows (messages rows)

    @property
    def prompt_text(self) -> str:
        """What the cluster featurizer sees: routing_text of the conversation, or the text."""
        return routing_text(self.as_messages)

    @property
    def as_messages(self) -> list[dict]:
        """The row as a request: its conversation, or its text as one user turn."""
        return self.messages if self.text is None else [{"role": "user", "content": self.text}]

    @property
    def reference_answer(self) -> str | None:
        """The last assistant message, when the conversation ends with one in words (for
        exact-match; a tool call is not an answer to compare text with)."""
        if self.messages and self.messages[-1]["role"] == "assistant" and not self.messages[-1].get("tool_calls"):
            return self.messages[-1]["content"]
        return None


@dataclass
class Sample:
    """A tokenized record: ids and labels (IGNORE_INDEX where no loss), plus its cluster.

    position_ids is set only for packed samples (several records in one row; positions restart
    at each record, which is how the model keeps attention inside each of them)."""

    input_ids: list[int]
    labels: list[int]
    record: Record | None
    cluster: int = 0
    truncated: bool = field(default=False)
    overlong: bool = field(default=False)
    position_ids: list[int] | None = None
    # Packed rows only: the cluster of each token (a row holds records of several clusters).
    token_clusters: list[int] | None = None


@dataclass
class Problem:
    location: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason} ({self.detail})"


class DataProblems(UserError):
    """Invalid rows: one `FILE:LINE: reason` line each, then what to do."""

    def __init__(self, problems: list[Problem], total: int, limit: int) -> None:
        lines = [str(p) for p in problems[:limit]]
        if len(problems) > limit:
            lines.append(f"... and {len(problems) - limit} more")
        summary = (
            f"{len(problems)} invalid row{'s' if len(problems) != 1 else ''} in the data (of {total}); "
            "fix them, or pass --skip-invalid to train on the valid rows"
        )
        super().__init__(summary)
        self.problems, self.lines = problems, lines


@dataclass
class LoadedData:
    records: list[Record]
    formats: dict[str, str]  # file -> format used
    skipped: Counter  # reason -> rows skipped (with skip_invalid)
    problems: list[Problem]


def _file_format(rows, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    seen = Counter(detect_format(r.value) for r in rows[:100] if r.problem is None)
    seen.pop(None, None)
    return seen.most_common(1)[0][0] if seen else None


def load_records(
    paths: list[str], fmt: str = "auto", skip_invalid: bool = False, max_problems: int = 20, require_rows: bool = True
) -> LoadedData:
    """Reads and validates every row of every file; raises DataProblems unless skip_invalid.
    require_rows=False returns an empty result instead of refusing data with no valid row
    (`data validate` lists every problem either way)."""
    if fmt not in get_args(FormatChoice):  # callers other than finetune (data validate, the UI)
        raise UserError(f"--format {fmt}: use one of {', '.join(get_args(FormatChoice))}")
    records, problems, formats, total = [], [], {}, 0
    for path in paths:
        rows = list(read_rows(path))
        file_fmt = _file_format(rows, fmt)
        formats[str(path)] = file_fmt or "unknown"
        for row in rows:
            if row.problem is not None:
                if row.problem[0] != "empty file":
                    total += 1
                problems.append(Problem(row.location, *row.problem))
                continue
            total += 1
            if file_fmt is None:
                problems.append(
                    Problem(
                        row.location,
                        "unknown format",
                        "no messages, conversations, instruction/output, prompt/completion or text field",
                    )
                )
                continue
            try:
                messages, text = normalize(row.value, file_fmt)
                tools = tools_of(row.value) if file_fmt == "messages" else None
            except RowProblem as problem:
                problems.append(Problem(row.location, problem.reason, problem.detail))
                continue
            records.append(Record(row.location, messages=messages, text=text, tools=tools))
    if problems and not skip_invalid:
        raise DataProblems(problems, total, max_problems)
    if not records and require_rows:
        raise UserError(f"--data {', '.join(map(str, paths))}: no valid rows to train on")
    return LoadedData(records, formats, Counter(p.reason for p in problems), problems)


def read_records(path: str | Path, fmt: str = "auto") -> list[Record]:
    """All rows of one file, strictly validated."""
    return load_records([str(path)], fmt).records


# A template formats a conversation; it does not run for seconds or multiply it. Real templates
# render in milliseconds and add a few hundred characters per turn.
RENDER_SECONDS = 2.0
RENDER_GROWTH, RENDER_SLACK_CHARS = 8, 1 << 20


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> str:
    """The tokenizer's chat template applied to messages, or a UserError saying why it can't be.
    Rendered within a time and an output budget (TemplateOverBudget), since a template is code
    that came with the model or the adapter."""
    from hydra_edge.data.budget import OverBudget, time_budget

    try:
        with time_budget(RENDER_SECONDS):
            text = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
    except OverBudget:
        raise TemplateOverBudget(
            f"the chat template did not finish rendering a conversation within {RENDER_SECONDS:g} s "
            "(a loop that never ends?); fix the template or pick another with --chat-template"
        ) from None
    except Exception as exc:  # ValueError (no template) or jinja2 TemplateError (template refuses)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the tokenizer's chat template cannot render this conversation ({first})") from exc
    given = len(json.dumps([messages, tools], ensure_ascii=False, default=str))
    if len(text) > RENDER_GROWTH * given + RENDER_SLACK_CHARS:
        raise TemplateOverBudget(
            f"the chat template turned a conversation of {given:,} characters into {len(text):,}; "
            "fix the template or pick another with --chat-template"
        )
    return text


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered up to the assistant's turn."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes BOS itself


def text_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a plain prompt (no chat template), BOS first where the model has one."""
    return tokenizer(prompt)["input_ids"]


def _assistant_spans(tokenizer, messages: list[dict], tools=None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    Each span runs from where the generation prompt ends to the end of the turn (its closing
    EOS included, trailing whitespace excluded), found by rendering prefixes of the chat.
    Templates that rewrite earlier turns (some move the system prompt or drop earlier
    reasoning) do not render prefix by prefix; then only the final assistant turn is learned.
    """
    full = render_chat(tokenizer, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        upto = render_chat(tokenizer, messages[: i + 1], tools=tools)
        if not full.startswith(upto) or not upto.startswith(prefix):
            return full, _last_turn_span(tokenizer, messages, full, tools)
        spans.append((len(prefix), len(upto.rstrip())))
    return full, spans


def _last_turn_span(tokenizer, messages: list[dict], full: str, tools=None) -> list[tuple[int, int]]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prefix = render_chat(tokenizer, messages[:last], add_generation_prompt=True, tools=tools)
    upto = render_chat(tokenizer, messages[: last + 1], tools=tools)
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
        labels = [
            IGNORE_INDEX if t == tokenizer.bos_token_id and tokenizer.bos_token_id is not None else t for t in ids
        ]
    else:
        full, spans = _assistant_spans(tokenizer, record.messages, record.tools)
        _check_tools_rendered(full, record.messages)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = []
        for token_id, (start, end) in zip(ids, enc["offset_mapping"]):
            inside = any(s <= start < e for s, e in spans) and end > start
            labels.append(token_id if inside else IGNORE_INDEX)
    truncated = len(ids) > seq_len
    return Sample(ids[:seq_len], labels[:seq_len], record, truncated=truncated, overlong=truncated)


def _check_tools_rendered(full: str, messages: list[dict]) -> None:
    """A template that ignores tool calls would train on a conversation with its calls cut out;
    each call's name and each tool result must appear in the rendered text."""
    for m in messages:
        missing = [c["function"]["name"] for c in m.get("tool_calls") or () if c["function"]["name"] not in full]
        if m["role"] == "tool" and m["content"].strip() not in full:
            missing.append(f"the result {m['content'][:40]!r}")
        if missing:
            raise UserError(
                f"the chat template does not render tool calls (it dropped {missing[0]}); pick one that does: "
                "--chat-template chatml, llama3 or qwen2.5"
            )


@dataclass
class TokenizedData:
    samples: list[Sample]
    truncated: int  # samples cut to seq_len (--overlong truncate)
    dropped_overlong: int  # samples longer than seq_len left out (--overlong drop)
    dropped_no_target: int  # samples with no loss token left after truncation
    unrenderable: int = 0  # rows the chat template cannot render (left out with skip_invalid)


def tokenize_records(
    tokenizer,
    records: list[Record],
    seq_len: int,
    clusters: list[int] | None = None,
    overlong: str = "truncate",
    skip_invalid: bool = False,
) -> TokenizedData:
    """Tokenizes every record (with its cluster id); applies --overlong; drops rows with no target.
    Rows the chat template cannot render are reported by row (DataProblems), or left out with
    skip_invalid."""
    if overlong not in OVERLONG_CHOICES:
        raise UserError(f"--overlong {overlong}: use truncate or drop")
    samples, problems = [], []
    for record, cluster in zip(records, clusters or [0] * len(records)):
        try:
            sample = tokenize_record(tokenizer, record, seq_len)
        except TemplateOverBudget:
            raise  # the template's fault, not the row's: every row would wait out the budget
        except UserError as exc:
            problems.append(Problem(record.source, "template cannot render", str(exc)))
            continue
        sample.cluster = int(cluster)
        samples.append(sample)
    if problems and not skip_invalid:
        raise DataProblems(problems, len(records), 20)
    long_ones = sum(s.truncated for s in samples)
    if overlong == "drop":
        samples = [s for s in samples if not s.truncated]
    kept = [s for s in samples if any(label != IGNORE_INDEX for label in s.labels)]
    if not kept:
        raise UserError(
            f"no row has a trainable token within --seq-len {seq_len}; raise --seq-len"
            + (" or use --overlong truncate" if overlong == "drop" else "")
        )
    return TokenizedData(
        kept,
        truncated=long_ones if overlong == "truncate" else 0,
        dropped_overlong=long_ones if overlong == "drop" else 0,
        dropped_no_target=len(samples) - len(kept),
        unrenderable=len(problems),
    )


def pack_samples(samples: list[Sample], seq_len: int) -> list[Sample]:
    """Concatenates short samples into rows of at most seq_len tokens (first fit, in order).

    Positions restart at 0 for every sample in a row; the model turns that into a block-diagonal
    causal mask, so attention never crosses from one sample into another. The first label of
    every sample after the first is ignored: it would be predicted from the previous sample.
    """
    packed: list[Sample] = []
    current: Sample | None = None
    for s in samples:
        if current is None or len(current.input_ids) + len(s.input_ids) > seq_len:
            current = Sample([], [], None, cluster=s.cluster, position_ids=[], token_clusters=[])
            packed.append(current)
        labels = list(s.labels)
        if current.input_ids:
            labels[0] = IGNORE_INDEX
        current.input_ids += s.input_ids
        current.labels += labels
        current.position_ids += list(range(len(s.input_ids)))
        current.token_clusters += [s.cluster] * len(s.input_ids)
    return packed


def collate(samples: list[Sample], pad_id: int, with_clusters: bool = False) -> dict:
    """Right-pads a batch into the model's inputs: input_ids/labels (B, T), and either
    attention_mask (B, T) or, for packed samples, position_ids (B, T) with no attention_mask
    (padding then forms its own segment, and its labels are ignored).

    with_clusters adds, for training only (not model inputs), cluster_ids (B, T): each token's
    data cluster, and segment_ids (B, T): each token's sample within its row (0 unless packed);
    both -1 on padding."""
    import torch

    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    packed = any(s.position_ids is not None for s in samples)
    positions = torch.zeros((len(samples), width), dtype=torch.long)
    cluster_ids = torch.full((len(samples), width), -1, dtype=torch.long)
    segment_ids = torch.full((len(samples), width), -1, dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
        cluster_ids[row, :n] = torch.tensor(s.token_clusters) if s.token_clusters is not None else s.cluster
        starts = torch.tensor(s.position_ids) == 0 if s.position_ids is not None else torch.arange(n) == 0
        segment_ids[row, :n] = torch.cumsum(starts.long(), 0) - 1
        if packed:
            positions[row, :n] = torch.tensor(s.position_ids if s.position_ids is not None else list(range(n)))
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels}
    batch.update({"position_ids": positions} if packed else {"attention_mask": mask})
    if with_clusters:
        batch["cluster_ids"], batch["segment_ids"] = cluster_ids, segment_ids
    return batch
