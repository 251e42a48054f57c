"""Small modules and short functions: no Python file in the project over 400 lines and no function
over 80 (from its `def` to its last line). ruff's complexity and statement-count rules (pyproject)
catch most long functions while editing; this is the exact rule."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("hydra_edge", "tests", "benchmarks", "scripts")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def python_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [
        f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_file_is_over_400_lines():
    assert len(python_files()) > 100
    too_long = [
        f"{p.relative_to(ROOT)} ({n} lines)" for p in python_files() if (n := len(p.read_text().splitlines())) > 400
    ]
    assert too_long == []


def test_no_function_is_over_80_lines():
    assert [line for path in python_files() for line in long_functions(path)] == []


def test_the_rule_sees_a_long_function(tmp_path):
    source = tmp_path / "long.py"
    source.write_text("def f():\n" + "    x = 1\n" * 80 + "\n\ndef g():\n    pass\n")
    assert [line.split(":")[-1] for line in long_functions(source)] == ["1 f (81 lines)"]
