"""`hydra-edge data validate|preview` and `hydra-edge clusters`: look at the data before training."""

from __future__ import annotations

import json
import sys

import typer

from hydra_edge.errors import UserError

data_app = typer.Typer(help="Check and inspect training data before training.", no_args_is_help=True)

DATA_HELP = "Data files or datasets folders (repeat --data to mix several)."
FORMAT_HELP = "auto, alpaca, sharegpt, messages, prompt_completion or text."


@data_app.command("validate")
def validate(
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    max_problems: int = typer.Option(50, "--max-problems", min=1, help="Most problem lines to print."),
) -> None:
    """Check every row; print one FILE:LINE line per problem. Exit code 2 when any row is invalid."""
    from hydra_edge.data import load_records

    loaded = load_records(data, format, skip_invalid=True, max_problems=max_problems, require_rows=False)
    for problem in loaded.problems[:max_problems]:
        print(problem)
    if len(loaded.problems) > max_problems:
        print(f"... and {len(loaded.problems) - max_problems} more")
    for path, fmt in loaded.formats.items():
        print(f"{path}: format {fmt}")
    counts = ", ".join(f"{reason}: {n}" for reason, n in loaded.skipped.most_common()) or "none"
    print(f"{len(loaded.records)} valid rows, {len(loaded.problems)} invalid ({counts})")
    if loaded.problems:
        raise UserError(f"{len(loaded.problems)} invalid rows; fix them, or train with --skip-invalid")


def _segments(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """[(trained?, text)] runs of consecutive tokens with the same loss flag."""
    from hydra_edge.data import IGNORE_INDEX

    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, tokenizer.decode(tokens)) for trained, tokens in runs]


@data_app.command("preview")
def preview(
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    model: str = typer.Option("tiny", "--model", help="Whose tokenizer and chat template render the rows."),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    n: int = typer.Option(3, "--n", min=1, help="How many samples to show."),
    seq_len: int = typer.Option(1024, "--seq-len", min=1, help="Truncate as training would."),
    as_json: bool = typer.Option(False, "--json", help="Print the token ids and labels as JSON lines."),
    chat_template: str | None = typer.Option(
        None, "--chat-template", help="Render with this template: chatml, llama3, gemma, qwen2.5 or a .jinja file."
    ),
) -> None:
    """Show the first samples as the model will see them, trained tokens marked [[like this]]."""
    from hydra_edge.chat_templates import resolve_chat_template
    from hydra_edge.data import IGNORE_INDEX, load_records, tokenize_record
    from hydra_edge.models import load_tokenizer

    template = resolve_chat_template(chat_template) if chat_template else None
    records = load_records(data, format).records[:n]
    tokenizer = load_tokenizer(model, chat_template=template)
    color = sys.stdout.isatty()
    for record in records:
        try:
            sample = tokenize_record(tokenizer, record, seq_len)
        except UserError as exc:
            raise UserError(f"{record.source}: {exc}") from exc
        trained = sum(label != IGNORE_INDEX for label in sample.labels)
        if as_json:
            print(json.dumps({"source": record.source, "input_ids": sample.input_ids, "labels": sample.labels}))
            continue
        print(
            f"--- {record.source}: {len(sample.input_ids)} tokens, {trained} trained"
            + (" (truncated)" if sample.truncated else "")
            + " ---"
        )
        pieces = []
        for is_trained, text in _segments(tokenizer, sample.input_ids, sample.labels):
            if is_trained:
                text = f"\033[32m{text}\033[0m" if color else f"[[{text}]]"
            pieces.append(text)
        print("".join(pieces))


def clusters(
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    format: str = typer.Option("auto", "--format", help=FORMAT_HELP),
    max_k: int = typer.Option(8, "--max-k", min=2, help="Largest k tried for the elbow."),
    heads: int | None = typer.Option(None, "--heads", min=1, help="Fix k instead of choosing it at the elbow."),
    plot: str | None = typer.Option(None, "--plot", help="Write the elbow curve and cluster sizes to this PNG."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: k, sizes, top_terms, labels, inertia_by_k."
    ),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Ignore invalid rows instead of stopping."),
) -> None:
    """Show the data's intrinsic components: the k chosen for --heads auto, sizes and top terms."""
    from hydra_edge.clustering import fit_clusters, summary_lines
    from hydra_edge.data import load_records

    loaded = load_records(data, format, skip_invalid)
    model, labels = fit_clusters([r.prompt_text for r in loaded.records], heads, max_k)
    if plot:
        if not plot.lower().endswith(".png"):
            raise UserError(f"--plot {plot}: give a .png file name")
        from hydra_edge.plots import plot_clusters

        plot_clusters(model, plot)
    if as_json:
        print(
            json.dumps(
                {
                    "k": model.k,
                    "sizes": model.sizes,
                    "top_terms": model.top_terms(),
                    "labels": [int(x) for x in labels],
                    "inertia_by_k": {str(k): v for k, v in sorted(model.inertia_by_k.items())},
                },
                ensure_ascii=False,
            )
        )
        return
    for line in summary_lines(model):
        print(line)
    if plot:
        print(f"plot: {plot}")
