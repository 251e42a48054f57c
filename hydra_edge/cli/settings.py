"""The settings of the core commands besides `finetune` (eval, chat, clusters, data validate, data
preview), as dataclasses their options are generated from (cli/options.py). A setting another
command already defines is copied from it (`same_as`): `--format`, `--seq-len`, `--heads`,
`--max-k` are FinetuneConfig's, the sampling settings are `Sampling`'s, so a default, help text
or bound is written once."""

from __future__ import annotations

from dataclasses import dataclass

from hydra_edge.choices import FormatChoice
from hydra_edge.inference.protocol import Sampling
from hydra_edge.settings import check_heads, check_max_k, field_problems, same_as, setting
from hydra_edge.training.config import FinetuneConfig

ADAPTER_HELP = "Adapter folder (the --out of finetune)."
ONNX_HELP = "Or an ONNX export folder (the --out of export)."
GGUF_HELP = "Or a GGUF export folder (export --format gguf), run in llama.cpp."
OTHER_BASE_HELP = "Load the adapter onto this base instead of the one it names."
DATA_HELP = "Data files or datasets folders (repeat --data to mix several)."


def _required(help: str, **bounds):
    """A setting with no default: the command refuses to run without it."""
    from dataclasses import field

    return field(metadata={"help": help, **bounds})


class _Checked:
    """Runs the fields' own checks (choices, bounds) when the settings are built."""

    def __post_init__(self) -> None:
        problems = field_problems(self) + self.problems()
        if problems:
            raise ValueError(problems[0])

    def problems(self) -> list[str]:
        return []


@dataclass
class EvalSettings(_Checked):
    data: str = _required("Held-out data file (any format finetune reads).")
    adapter: str | None = setting(None, ADAPTER_HELP)
    onnx: str | None = setting(None, ONNX_HELP)
    gguf: str | None = setting(None, GGUF_HELP)
    as_json: bool = setting(
        False, "Print one JSON object: loss, perplexity, exact_match, n, per_cluster.", flag="--json"
    )
    format: FormatChoice = same_as(FinetuneConfig, "format")
    model: str | None = setting(None, OTHER_BASE_HELP)
    seq_len: int = same_as(FinetuneConfig, "seq_len", help="Truncate rows to this many tokens for the loss.")
    max_new_tokens: int = same_as(FinetuneConfig, "max_new_tokens", help="Tokens generated per row for exact-match.")


@dataclass
class ChatSettings(_Checked):
    adapter: str | None = setting(None, ADAPTER_HELP)
    onnx: str | None = setting(None, ONNX_HELP)
    gguf: str | None = setting(None, GGUF_HELP)
    prompt: str | None = setting(None, "Answer this one prompt and exit (answer on stdout, routing on stderr).")
    system: str | None = setting(None, "System prompt.")
    model: str | None = setting(None, OTHER_BASE_HELP)
    max_new_tokens: int = same_as(Sampling, "max_new_tokens")
    temperature: float = same_as(Sampling, "temperature")
    top_p: float = same_as(Sampling, "top_p")


@dataclass
class ClusterSettings(_Checked):
    data: list[str] = _required(DATA_HELP)
    format: FormatChoice = same_as(FinetuneConfig, "format")
    max_k: int = same_as(FinetuneConfig, "max_k")
    heads: str = same_as(
        FinetuneConfig, "heads", help="'auto' (k at the elbow, as finetune --heads auto picks it) or a fixed N."
    )
    plot: str | None = setting(None, "Write the elbow curve and cluster sizes to this PNG.")
    as_json: bool = setting(False, "Print one JSON object: k, sizes, top_terms, labels, inertia_by_k.", flag="--json")
    skip_invalid: bool = same_as(FinetuneConfig, "skip_invalid", help="Ignore invalid rows instead of stopping.")

    def problems(self) -> list[str]:
        found = [check_heads(self.heads), check_max_k(self.max_k, self.heads)]
        if self.plot and not self.plot.lower().endswith(".png"):
            found.append(f"--plot {self.plot}: give a .png file name")
        return [p for p in found if p]

    @property
    def fixed_heads(self) -> int | None:
        return None if self.heads == "auto" else int(self.heads)


@dataclass
class ValidateSettings(_Checked):
    data: list[str] = _required(DATA_HELP)
    format: FormatChoice = same_as(FinetuneConfig, "format")
    max_problems: int = setting(50, "Most problem lines to print.", ge=1)


@dataclass
class PreviewSettings(_Checked):
    data: list[str] = _required(DATA_HELP)
    model: str = same_as(FinetuneConfig, "model", help="Whose tokenizer and chat template render the rows.")
    format: FormatChoice = same_as(FinetuneConfig, "format")
    n: int = setting(3, "How many samples to show.", ge=1)
    seq_len: int = same_as(FinetuneConfig, "seq_len", help="Truncate as training would.")
    as_json: bool = setting(False, "Print the token ids and labels as JSON lines.", flag="--json")
    chat_template: str | None = same_as(
        FinetuneConfig,
        "chat_template",
        help="Render with this template: chatml, llama3, gemma, qwen2.5 or a .jinja file.",
    )
