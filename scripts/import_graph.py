"""The package's import graph, read from the source with `ast` (imports inside functions included),
and the rules its layout keeps (tests/test_architecture.py checks them; docs/architecture.md draws
the graph, written by scripts/generate_docs.py). Runs on any folder, so a test
can build a tree that breaks a rule and see the rule catch it."""

from __future__ import annotations

import ast
from pathlib import Path

# Where each subpackage stands: a module imports only its own subpackage and those of a lower rank.
# Root modules (errors, files, choices, progress, settings) are the foundation at rank 0. Equal ranks do not
# import each other (data and clusters; server and ui).
RANKS = {
    "": 0,
    "data": 1,
    "clusters": 1,
    "models": 2,
    "adapter": 3,
    "inference": 4,
    "training": 5,
    "cli": 6,
    "exporters": 7,
    "server": 8,
    "ui": 8,
    "__main__": 9,
}
ABOVE_THE_CORE = ("exporters", "server", "ui")
FOUNDATION = {"errors", "files", "choices", "progress", "settings", "demo"}


def module_files(root: Path, package: str = "hydra_edge") -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root/package."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path, package: str = "hydra_edge") -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside a function)."""
    files = module_files(root, package)
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == package and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one node (Tarjan), sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def subpackage(module: str) -> str:
    """`hydra_edge.training.loop` -> `training`; a foundation module (`hydra_edge.errors`) -> ''."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FOUNDATION:
        return ""
    return parts[1]


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Subpackage -> the subpackages its modules import."""
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        own = subpackage(module)
        packages.setdefault(own, set()).update(subpackage(d) for d in deps if subpackage(d) != own)
    return packages


def violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per import that breaks the layering (a subpackage missing from RANKS is one too)."""
    lines = []
    for module, deps in sorted(graph.items()):
        own = subpackage(module)
        if own not in RANKS:
            lines.append(f"{module}: subpackage {own!r} has no rank in scripts/import_graph.py RANKS")
            continue
        for dep in sorted(deps):
            other = subpackage(dep)
            if other == own:
                continue
            if other not in RANKS or RANKS[other] >= RANKS[own]:
                above = " (above the core)" if other in ABOVE_THE_CORE and own not in ABOVE_THE_CORE else ""
                lines.append(f"{module} imports {dep}: {own or 'the foundation'} may not import {other}{above}")
    return lines


def markdown(root: Path) -> str:
    """The subpackages, each with its job (its docstring's first line) and what it imports."""
    graph = import_graph(root)
    packages = package_graph(graph)
    rows = ["| rank | subpackage | job | imports |", "| --- | --- | --- | --- |"]
    for name in sorted(packages, key=lambda n: (RANKS.get(n, 99), n)):
        if name == "__main__":
            continue
        if name:
            init = root / "hydra_edge" / name / "__init__.py"
            job = ast.get_docstring(ast.parse(init.read_text())).splitlines()[0]
        else:
            job = "The foundation: " + ", ".join(f"`{m}`" for m in sorted(FOUNDATION - {"demo"})) + "."
        label = f"`{name}/`" if name else "(root)"
        uses = ", ".join(f"`{d}`" for d in sorted(packages[name], key=lambda n: (RANKS.get(n, 99), n)) if d) or "-"
        counts = sum(1 for m in graph if subpackage(m) == name)
        rows.append(f"| {RANKS.get(name, '?')} | {label} ({counts} modules) | {job} | {uses} |")
    return "\n".join(rows) + "\n"


def module_list(root: Path) -> str:
    """Every module under its subpackage, with its docstring's first sentence."""
    lines = []
    files = module_files(root)
    for name, path in files.items():
        if path.name == "__init__.py" or name.endswith("__main__"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        first = doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")
        lines.append(f"- `{name.removeprefix('hydra_edge.').replace('.', '/')}.py`: {first}")
    return "\n".join(lines) + "\n"
