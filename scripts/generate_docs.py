"""Writes the generated parts of README.md and docs/*.md from the code they describe.

A generated part sits between `<!-- generated: NAME -->` and `<!-- end generated -->`; the text
around it is written by hand. `python scripts/generate_docs.py` rewrites every part;
`--check` changes nothing and exits 1 naming each stale part (tests/test_docs_generated.py runs
it, so a setting or a module added without its documentation fails the suite).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

MARKER = re.compile(r"(<!-- generated: (?P<name>[\w:-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _import_graph() -> str:
    from import_graph import markdown

    return markdown(ROOT)


def _module_list() -> str:
    from import_graph import module_list

    return module_list(ROOT)


def generators() -> dict[str, Callable[[], str]]:
    """Part name -> the function that writes it."""
    parts: dict[str, Callable[[], str]] = {"import-graph": _import_graph, "module-list": _module_list}
    from hydra_edge.cli.options_doc import option_tables  # needs the package installed (.venv/bin/python)

    for name, table in option_tables().items():  # commands, options:<command>
        parts[name] = lambda table=table: table
    return parts


def render(text: str, parts: dict[str, Callable[[], str]], source: Path) -> str:
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in parts:
            raise SystemExit(f"{source}: unknown generated part {name!r}")
        return match.group(1) + parts[name]() + match.group(4)

    return MARKER.sub(fill, text)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str]) -> int:
    check = "--check" in argv
    parts = generators()
    stale = []
    for path in documents():
        text = path.read_text()
        new = render(text, parts, path)
        if new != text:
            stale.append(path)
            if not check:
                path.write_text(new)
    for path in stale:
        verb = "is stale; run python scripts/generate_docs.py" if check else "rewritten"
        print(f"{path.relative_to(ROOT)}: {verb}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
