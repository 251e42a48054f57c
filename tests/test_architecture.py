"""The tree draws the architecture: layers that import only downward, no import cycle (between
modules or subpackages, imports inside functions included), and every subpackage stating its job."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from import_graph import (  # noqa: E402
    RANKS,
    cycles,
    import_graph,
    package_graph,
    subpackage,
    violations,
)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_the_package_has_no_import_cycle(graph):
    assert cycles(graph) == []
    assert cycles(package_graph(graph)) == []


def test_every_import_points_down_the_layers(graph):
    assert violations(graph) == []


def test_the_graph_sees_imports_inside_functions_and_relative_ones(graph):
    assert "hydra_edge.inference.torch_engine" in graph["hydra_edge.inference.engines"]  # inside open_engine
    assert "hydra_edge.exporters.formats" in graph["hydra_edge.exporters.formats.vllm"]  # `from ... import peft`
    assert "hydra_edge.exporters.formats.peft" in graph["hydra_edge.exporters.formats.vllm"]


def test_every_subpackage_states_its_job_and_has_a_rank():
    for init in sorted((ROOT / "hydra_edge").glob("*/__init__.py")):
        name = init.parent.name
        doc = ast.get_docstring(ast.parse(init.read_text()))
        if name == "demo":  # the demo data's folder, no code
            continue
        assert doc and len(doc.split()) >= 5, f"hydra_edge/{name}/__init__.py: no docstring stating its job"
        assert name in RANKS, f"{name}: no rank in scripts/import_graph.py"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "hydra_edge" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [tmp_path / "hydra_edge", *(tmp_path / "hydra_edge").rglob("*")]:
        if folder.is_dir() and not (folder / "__init__.py").exists():
            (folder / "__init__.py").write_text('"""A package."""\n')
    return tmp_path


def test_a_core_module_importing_a_front_end_is_caught(tmp_path):
    root = _tree(
        tmp_path,
        {
            "training/loop.py": "def f():\n    from hydra_edge.ui.app import create_ui\n",
            "ui/app.py": "def create_ui():\n    pass\n",
            "exporters/merge.py": "from hydra_edge.server import app\n",
            "server/app.py": "",
        },
    )
    found = violations(import_graph(root))
    assert found == [
        "hydra_edge.exporters.merge imports hydra_edge.server.app: exporters may not import server",
        "hydra_edge.training.loop imports hydra_edge.ui.app: training may not import ui (above the core)",
    ]


def test_an_upward_import_inside_the_core_and_a_foundation_import_are_caught(tmp_path):
    root = _tree(
        tmp_path,
        {
            "data/records.py": "from ..adapter import layer\n",  # relative, upward
            "adapter/layer.py": "",
            "errors.py": "import hydra_edge.models.base\n",
            "models/base.py": "",
        },
    )
    found = violations(import_graph(root))
    assert "hydra_edge.data.records imports hydra_edge.adapter.layer: data may not import adapter" in found
    assert "hydra_edge.errors imports hydra_edge.models.base: the foundation may not import models" in found


def test_a_cycle_through_a_function_level_import_is_caught(tmp_path):
    root = _tree(
        tmp_path,
        {
            "clusters/fit.py": "from hydra_edge.clusters.router import nearest\n",
            "clusters/router.py": "def load():\n    from hydra_edge.clusters.fit import read\n",
        },
    )
    graph = import_graph(root)
    assert cycles(graph) == [["hydra_edge.clusters.fit", "hydra_edge.clusters.router"]]
    assert violations(graph) == []  # one subpackage: only the cycle rule sees it


def test_a_subpackage_without_a_rank_is_caught(tmp_path):
    root = _tree(tmp_path, {"plugins/extra.py": "from hydra_edge.errors import UserError\n", "errors.py": ""})
    assert subpackage("hydra_edge.plugins.extra") == "plugins"
    assert "hydra_edge.plugins.extra: subpackage 'plugins' has no rank in scripts/import_graph.py RANKS" in (
        violations(import_graph(root))
    )
