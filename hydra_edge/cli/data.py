"""`hydra-edge data validate|preview` and `hydra-edge clusters`: look at the data before training."""

from __future__ import annotations

import json
import sys

import typer

from hydra_edge.cli.options import settings_command
from hydra_edge.cli.settings import ClusterSettings, PreviewSettings, ValidateSettings
from hydra_edge.errors import UserError

data_app = typer.Typer(help="Check and inspect training data before training.", no_args_is_help=True)


def validate(settings: ValidateSettings) -> None:
    """Check every row; print one FILE:LINE line per problem. Exit code 2 when any row is invalid."""
    from hydra_edge.data.records import load_records

    max_problems = settings.max_problems
    loaded = load_records(
        settings.data, settings.format, skip_invalid=True, max_problems=max_problems, require_rows=False
    )
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
    from hydra_edge.data.records import IGNORE_INDEX

    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, tokenizer.decode(tokens)) for trained, tokens in runs]


def preview(settings: PreviewSettings) -> None:
    """Show the first samples as the model will see them, trained tokens marked [[like this]]."""
    from hydra_edge.data.chat_templates import resolve_chat_template
    from hydra_edge.data.records import IGNORE_INDEX, load_records, tokenize_record
    from hydra_edge.models.base import load_tokenizer

    template = resolve_chat_template(settings.chat_template) if settings.chat_template else None
    records = load_records(settings.data, settings.format).records[: settings.n]
    tokenizer = load_tokenizer(settings.model, chat_template=template)
    color = sys.stdout.isatty()
    for record in records:
        try:
            sample = tokenize_record(tokenizer, record, settings.seq_len)
        except UserError as exc:
            raise UserError(f"{record.source}: {exc}") from exc
        trained = sum(label != IGNORE_INDEX for label in sample.labels)
        if settings.as_json:
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


def clusters(settings: ClusterSettings) -> None:
    """Show the data's intrinsic components: the k chosen for --heads auto, sizes and top terms."""
    from hydra_edge.clusters.fit import fit_clusters, summary_lines
    from hydra_edge.data.records import load_records

    loaded = load_records(settings.data, settings.format, settings.skip_invalid)
    model, labels = fit_clusters([r.prompt_text for r in loaded.records], settings.fixed_heads, settings.max_k)
    if settings.plot:
        from hydra_edge.clusters.plots import plot_clusters

        plot_clusters(model, settings.plot)
    if settings.as_json:
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
    if settings.plot:
        print(f"plot: {settings.plot}")


data_app.command("validate")(settings_command(ValidateSettings, validate))
data_app.command("preview")(settings_command(PreviewSettings, preview))
clusters_command = settings_command(ClusterSettings, clusters)
