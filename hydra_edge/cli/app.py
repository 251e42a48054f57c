"""The `hydra-edge` command line (Typer).

Heavy imports happen inside the commands so `hydra-edge --help` answers at once. Every error
a user can cause ends as one line on stderr with exit code 2 (see `main`).
"""

from __future__ import annotations

import inspect
import json
import sys

import typer

from hydra_edge.cli.options import options_of, settings_command
from hydra_edge.cli.settings import ChatSettings, EvalSettings
from hydra_edge.errors import TrainingStopped, UserError
from hydra_edge.training.config import FinetuneConfig, build_config, read_yaml_config

app = typer.Typer(
    name="hydra-edge",
    help="Fine-tune language models with HydraLoRA on a 4-bit base, then evaluate and chat.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def finetune_parameters(config_class: type[FinetuneConfig] = FinetuneConfig) -> list[inspect.Parameter]:
    """`finetune`'s options: --config, then one per config field (cli/options.py), every default
    None so a flag the user did not give leaves the YAML's or the preset's value alone."""
    config = typer.Option(None, "--config", help="YAML file with any of these settings; flags override it.")
    first = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config, annotation=str | None)
    return [first, *options_of(config_class, unset_defaults=True)]


def finetune_command(config_class: type[FinetuneConfig] = FinetuneConfig):
    """The `finetune` command for a settings dataclass (FinetuneConfig, or a subclass in tests)."""

    def finetune(**options) -> None:
        """Train a HydraLoRA adapter. With no arguments: the tiny preset on the bundled demo data."""
        config = options.pop("config")
        cli_settings = {k: v for k, v in options.items() if v is not None and v != []}
        yaml_settings = read_yaml_config(config, config_class) if config else {}
        settings = build_config(yaml_settings, cli_settings, config_class)
        run_and_report(settings, set(yaml_settings) | set(cli_settings))

    params = finetune_parameters(config_class)
    finetune.__signature__ = inspect.Signature(params)
    finetune.__annotations__ = {p.name: p.annotation for p in params}
    return finetune


def run_and_report(settings: FinetuneConfig, explicit: set[str]) -> None:
    from hydra_edge.training.finetune import run_finetune

    result = run_finetune(settings, explicit)
    if result.get("secondary_process"):
        return
    train = result["train"]
    print(
        f"trained {train['steps']} steps in {train['train_time_s']:.1f}s; final loss {train['final_loss']:.4f}; "
        f"adapter: {result['adapter']}"
    )
    if "eval" in result:
        scores = result["eval"]
        em = scores["exact_match"]
        em_text = "n/a" if em is None else f"{100 * em:.1f}%"
        print(
            f"held-out: exact-match {em_text} on {scores['n']} rows, loss {scores['loss']:.4f}, perplexity "
            f"{scores['perplexity']:.2f}"
        )
    print(f"total time {result['total_time_s']:.1f}s")


app.command("finetune")(finetune_command())


def _print_scores(scores: dict) -> None:
    """The scores table; n/a where a score has nothing to average (no answer tokens, say)."""

    def shown(v, spec: str, scale: float = 1.0, unit: str = "") -> str:
        return "n/a" if v is None else f"{scale * v:{spec}}{unit}"

    print(f"{'cluster':>8} {'n':>5} {'loss':>8} {'ppl':>9} {'exact':>7}")
    for c, s in [*scores["per_cluster"].items(), ("all", scores)]:
        loss, ppl = shown(s["loss"], ".4f"), shown(s["perplexity"], ".2f")
        print(f"{c:>8} {s['n']:>5} {loss:>8} {ppl:>9} {shown(s['exact_match'], '5.1f', 100, '%'):>7}")


def evaluate_adapter(settings: EvalSettings) -> None:
    """Score an adapter: loss, perplexity and exact-match, overall and per cluster."""
    from hydra_edge.data.records import read_records
    from hydra_edge.inference.engines import open_engine
    from hydra_edge.inference.evaluate import evaluate

    records = read_records(settings.data, settings.format)
    engine = open_engine(settings.adapter, settings.onnx, settings.model, settings.gguf)
    scores = evaluate(engine, records, settings.seq_len, settings.max_new_tokens)
    if settings.as_json:
        print(json.dumps(scores))
    else:
        _print_scores(scores)


def chat(settings: ChatSettings) -> None:
    """Chat with an adapter; tokens stream as they are generated and the routed cluster is shown."""
    from hydra_edge.inference.engines import open_engine

    engine = open_engine(settings.adapter, settings.onnx, settings.model, settings.gguf)
    history = [{"role": "system", "content": settings.system}] if settings.system else []

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    def answer(text: str) -> None:
        messages = history + [{"role": "user", "content": text}]
        mix = engine.gate_mix(messages)
        sampling = (settings.max_new_tokens, settings.temperature, settings.top_p)
        cluster, reply = engine.answer(messages, *sampling, show)
        sys.stdout.write("\n")
        about = "gates " + " ".join(f"h{i}={g:.2f}" for i, g in enumerate(mix)) if mix else engine.describe()
        print(f"[cluster {cluster} | {about}]", file=sys.stderr, flush=True)
        history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": reply}])

    if settings.prompt is not None:
        answer(settings.prompt)
        return
    print("hydra-edge chat: type a message; /reset clears the history, /exit quits.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            del history[len([m for m in history if m["role"] == "system"]) :]
            continue
        if text.strip():
            answer(text)


app.command("eval")(settings_command(EvalSettings, evaluate_adapter))
app.command("chat")(settings_command(ChatSettings, chat))

from hydra_edge.cli.data import clusters_command, data_app  # noqa: E402
from hydra_edge.cli.presets import PresetsSettings, presets  # noqa: E402  (registered after the core commands)

app.add_typer(data_app, name="data")
app.command("clusters")(clusters_command)
app.command("presets")(settings_command(PresetsSettings, presets))


_registered: set[str] = set()


def _register_plugins() -> None:
    """Adds the commands of installed layers above the core (export, ui) via entry points, once
    per process (main() may run many times in one: tests, a notebook)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="hydra_edge.commands"):
        if entry.name in _registered:
            continue
        _registered.add(entry.name)
        try:
            register = entry.load()
        except ImportError as exc:  # a broken or partial install: the other commands still work
            print(f"hydra-edge: warning: the '{entry.name}' command is unavailable ({exc})", file=sys.stderr)
            continue
        register(app)


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError that reached the top: the file, what went wrong, what to do."""
    from hydra_edge.files import is_out_of_space

    where = f"{exc.filename}: " if exc.filename else ""
    if is_out_of_space(exc):
        return (
            f"{where}the disk is full ({exc.strerror}); free some space and run the command again "
            "(a stopped training continues with --resume)"
        )
    return f"{where}{exc.strerror or exc}; check that the path exists and that you may read and write it"


def main(argv: list[str] | None = None) -> None:
    """Entry point: turns user errors into one line + exit 2, and a stop into its signal code."""
    args = sys.argv[1:] if argv is None else list(argv)
    _register_plugins()
    command = typer.main.get_command(app)
    usage_error = typer.BadParameter.__base__  # the UsageError of the click that typer uses
    try:
        code = command.main(args=args or ["--help"], prog_name="hydra-edge", standalone_mode=False)
    except usage_error as exc:
        print(f"hydra-edge: error: {exc.format_message().rstrip('.')}; see --help", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        print("hydra-edge: aborted", file=sys.stderr)
        sys.exit(130)
    except UserError as exc:
        for line in getattr(exc, "lines", []):  # DataProblems: one FILE:LINE line per bad row
            print(line, file=sys.stderr)
        print(f"hydra-edge: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # the disk, not the code: full, read-only, gone, not ours
        print(f"hydra-edge: error: {describe_os_error(exc)}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as exc:
        print(
            f"hydra-edge: {exc}; checkpoint saved to {exc.checkpoint}. Continue with: hydra-edge finetune --out "
            f"{exc.checkpoint.parent.parent} --resume",
            file=sys.stderr,
        )
        sys.exit(128 + exc.signum)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main", "FinetuneConfig"]
