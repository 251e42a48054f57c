"""The workspace: the one folder the web UI reads from and writes to.

A browser can type any path into a text box, so every path that comes from the UI goes through
`Workspace.resolve` before anything opens it: `..` components are refused outright, an absolute
path must already lie inside the workspace, and the result is resolved (symlinks followed) and
checked again, so a symlink inside the workspace cannot lead out of it.

    <workspace>/data/        training data (uploads land here; the demo files are copied here)
    <workspace>/runs/<name>  one `hydra-edge finetune --out` folder per run
    <workspace>/exports/<n>  one `hydra-edge export --out` folder per export
    <workspace>/models/<n>   local base models (Hugging Face folders) to train on
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

from hydra_edge.errors import UserError

DATA_DIR, RUNS_DIR, EXPORTS_DIR, MODELS_DIR = "data", "runs", "exports", "models"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Run and export names become folder names: keep them short, plain and unambiguous.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Workspace:
    """Path safety and listings for one workspace folder."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        created = not (root / DATA_DIR).exists()
        for sub in (DATA_DIR, RUNS_DIR, EXPORTS_DIR, MODELS_DIR):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        if created:
            self._copy_demo_data()

    def _copy_demo_data(self) -> None:
        """The bundled demo lives in the package, outside the workspace; a copy makes it usable
        without opening a hole in the rule that the UI reads only inside the workspace."""
        from hydra_edge.models.tiny import DEMO_EVAL, DEMO_TRAIN

        demo = self.root / DATA_DIR / "demo"
        demo.mkdir(exist_ok=True)
        for source, name in ((DEMO_TRAIN, "train.jsonl"), (DEMO_EVAL, "eval.jsonl")):
            if Path(source).is_file() and not (demo / name).exists():
                shutil.copyfile(source, demo / name)

    # -- the path check -------------------------------------------------------------------

    def resolve(
        self, user_path: str | Path, what: str = "path", must_exist: bool = True, kind: str | None = None
    ) -> Path:
        """A path typed in the UI -> an absolute path inside the workspace, or a UserError.

        Relative paths are taken from the workspace root. kind is "file", "dir" or None.
        """
        text = str(user_path).strip() if user_path is not None else ""
        if not text:
            raise UserError(f"{what}: empty; choose a file or folder in the workspace")
        if "\x00" in text:
            raise UserError(f"{what}: invalid characters in the path")
        parts = set(PurePosixPath(text).parts) | set(PureWindowsPath(text).parts)
        if ".." in parts:
            raise UserError(f"{what} {text}: '..' is not allowed; give a path inside the workspace")
        if text.startswith("~"):
            raise UserError(f"{what} {text}: '~' is not allowed; give a path inside the workspace")
        candidate = Path(text)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        if not _inside(candidate.absolute(), self.root):
            raise UserError(f"{what} {text}: outside the workspace ({self.root}); the UI only reads files inside it")
        resolved = candidate.resolve()
        if not _inside(resolved, self.root):  # a symlink that leads out
            raise UserError(f"{what} {text}: leads outside the workspace (a link); the UI only reads files inside it")
        if must_exist and not resolved.exists():
            raise UserError(f"{what} {text}: not found in the workspace")
        if must_exist and kind == "file" and not resolved.is_file():
            raise UserError(f"{what} {text}: not a file")
        if must_exist and kind == "dir" and not resolved.is_dir():
            raise UserError(f"{what} {text}: not a folder")
        return resolved

    def data_source(self, user_path: str | Path, what: str = "data") -> Path:
        """A data file or `datasets` folder under data/, as `data_files()` lists them, or a
        UserError. Stricter than `resolve`: not data/ itself, not a run or export folder, and a
        folder only when `datasets` wrote it (whose inner file names the reader keeps inside it)."""
        path = self.resolve(user_path, what)
        data_root = self.root / DATA_DIR
        if data_root not in path.parents:
            raise UserError(f"{what} {user_path}: choose a data file or datasets folder under {DATA_DIR}/")
        if path.is_file() and path.suffix.lower() in DATA_SUFFIXES:
            return path
        if path.is_dir() and _is_datasets_folder(path):
            return path
        raise UserError(
            f"{what} {user_path}: not a {', '.join(DATA_SUFFIXES)} file or a folder saved by datasets' save_to_disk"
        )

    def rel(self, path: str | Path) -> str:
        """How the UI shows a workspace path: relative to the root, with forward slashes."""
        path = Path(path)
        try:
            return path.resolve().relative_to(self.root).as_posix() or "."
        except ValueError:
            return str(path)

    def new_folder(self, parent: str, name: str, what: str) -> Path:
        """<workspace>/<parent>/<name> for a new run or export; the name must be a plain one."""
        name = (name or "").strip()
        if not NAME_PATTERN.match(name):
            raise UserError(
                f"{what} {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return self.resolve(f"{parent}/{name}", what, must_exist=False)

    # -- listings for the dropdowns -------------------------------------------------------

    def data_files(self) -> list[str]:
        """Data files (and `datasets` folders) under data/, as workspace-relative paths."""
        found = []
        for path in sorted((self.root / DATA_DIR).rglob("*")):
            if any(p.startswith(".") for p in path.relative_to(self.root).parts):
                continue
            if path.is_file() and path.suffix.lower() in DATA_SUFFIXES:
                found.append(self.rel(path))
            elif path.is_dir() and _is_datasets_folder(path):
                found.append(self.rel(path))
        return found

    def runs(self, finished_only: bool = False) -> list[str]:
        """Run folders under runs/, newest first; finished_only: those holding an adapter."""
        runs = [p for p in (self.root / RUNS_DIR).iterdir() if p.is_dir() and not p.name.startswith(".")]
        if finished_only:
            runs = [p for p in runs if (p / "adapter_config.json").is_file()]
        return [self.rel(p) for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def resumable_runs(self) -> list[str]:
        """Runs with a checkpoint and no final adapter: stopped (or crashed) mid-training."""
        return [
            r
            for r in self.runs()
            if _has_checkpoint(self.root / r) and not (self.root / r / "adapter_config.json").is_file()
        ]

    def exports(self, export_format: str | None = None) -> list[str]:
        """Finished exports, newest first; only those of one format (their manifest's) if given."""
        exports = [
            p
            for p in (self.root / EXPORTS_DIR).iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "export_manifest.json").is_file()
        ]
        if export_format is not None:
            exports = [p for p in exports if format_of_export(p) == export_format]
        return [self.rel(p) for p in sorted(exports, key=lambda p: p.stat().st_mtime, reverse=True)]

    def model_folders(self) -> list[str]:
        """Local base models under models/: Hugging Face folders (with config.json) and GGUF files."""
        return [
            self.rel(p)
            for p in sorted((self.root / MODELS_DIR).iterdir())
            if (p / "config.json").is_file() or (p.is_file() and p.suffix.lower() == ".gguf")
        ]


def _is_datasets_folder(path: Path) -> bool:
    """A folder written by datasets' save_to_disk: a DatasetDict or a Dataset."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _has_checkpoint(run: Path) -> bool:
    from hydra_edge.training.checkpoint import list_checkpoints

    return bool(list_checkpoints(run))


def format_of_export(folder: Path) -> str | None:
    """An export's format as its manifest states it (ONNX when the manifest predates formats)."""
    try:
        manifest = json.loads((folder / "export_manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest.get("format", "onnx") if isinstance(manifest, dict) else None
