"""The export folder's manifest: what was built and validated, and the sha256 of every file,
so `verify_export` refuses a tampered or incomplete folder before anything loads it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hydra_edge.errors import UserError
from hydra_edge.files import sha256_of

MANIFEST = "export_manifest.json"


def verify_export(folder: str | Path, required_files: Callable[[dict], list[str]] | None = None) -> dict:
    """The export's manifest, once every file in the folder is accounted for: each listed file
    is present, inside the folder and unchanged (sha256); no file or link is there that the
    manifest does not list; every file a `genai_config.json` names and every external-data
    reference of every ONNX file stays inside its model folder and is a listed file. Anything
    else is refused with one line, before onnxruntime opens a byte of it. `required_files`
    (the export format's: manifest -> relative paths) names what the folder must hold to be
    served; it refuses a manifest whose own fields are wrong for the format."""
    from hydra_edge.files import read_json_object

    folder = Path(folder)
    manifest = _read_manifest(folder)
    files = manifest["files"]
    _check_listed_files(folder, files)
    listed = {(folder / rel).resolve() for rel in files}
    for rel in required_files(manifest) if required_files else ():
        if (folder / rel).resolve() not in listed:
            raise UserError(f"{folder}: {rel} is missing from the export; re-export")
    for config_path in sorted(folder.glob("models/*/genai_config.json")):
        for name in _named_files(read_json_object(config_path, "the export is damaged; re-export")):
            _listed_inside(config_path.parent, name, config_path, listed, folder)
    for model_file in sorted(p for p in folder.rglob("*.onnx") if p.is_file()):
        for location in _external_data_locations(model_file, folder):
            _listed_inside(model_file.parent, location, model_file, listed, folder)
    return manifest


def _read_manifest(folder: Path) -> dict:
    """The manifest, with its table of files and its clusters checked for shape."""
    from hydra_edge.files import read_json_object

    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{folder}: not a hydra-edge export ({MANIFEST} missing)")
    manifest = read_json_object(manifest_path, "the export is damaged; re-export")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(d, str) for d in files.values()):
        raise UserError(f"{manifest_path}: no 'files' table of sha256 digests; the export is damaged, re-export")
    clusters = manifest.get("clusters")
    if (
        not isinstance(manifest.get("format", "onnx"), str)
        or not isinstance(clusters, list)
        or not clusters
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in clusters)
    ):
        raise UserError(f"{manifest_path}: format or clusters missing or invalid; the export is damaged, re-export")
    return manifest


def _check_listed_files(folder: Path, files: dict[str, str]) -> None:
    """No link and no unlisted file in the folder; every listed file inside it, present and unchanged."""
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise UserError(f"{folder}: {rel} is a link; an export holds plain files only, refusing it")
        if path.is_file() and rel != MANIFEST and rel not in files:
            raise UserError(f"{folder}: {rel} is not in {MANIFEST}; remove it or re-export")
    for rel, digest in files.items():
        path = (folder / rel).resolve()
        if root not in path.parents:
            raise UserError(f"{folder}: manifest names {rel!r}, outside the export folder; refusing it")
        if not path.is_file():
            raise UserError(f"{folder}: {rel} is missing; re-export")
        if sha256_of(path) != digest:
            raise UserError(f"{folder}: {rel} changed since export (sha256 differs); re-export")


def _named_files(config, key: str = "") -> list[str]:
    """Every file name in a genai_config.json: values of `filename` or `*_filename` keys, at any depth."""
    if isinstance(config, dict):
        return [n for k, v in config.items() for n in _named_files(v, k)]
    if isinstance(config, list):
        return [n for v in config for n in _named_files(v, key)]
    if key == "filename" or key.endswith("_filename"):
        return [config]
    return []


def _external_data_locations(model_file: Path, folder: Path) -> list[str]:
    import onnx

    try:
        graph = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:  # DecodeError and friends: not an ONNX model
        raise UserError(f"{folder}: {model_file.relative_to(folder)} is not a readable ONNX model; re-export") from exc
    tensors = list(graph.graph.initializer) + [
        n.attribute[0].t
        for n in graph.graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t")
    ]
    return [entry.value for t in tensors for entry in t.external_data if entry.key == "location"]


def _listed_inside(model_dir: Path, name, named_in: Path, listed: set[Path], folder: Path) -> None:
    """A file named from inside model_dir must stay in model_dir and be one the manifest lists."""
    from hydra_edge.files import path_inside

    where = named_in.relative_to(folder)
    target = path_inside(model_dir, name, where)
    if target not in listed:
        raise UserError(f"{folder}: {where} names {name!r}, which the manifest does not list; re-export")
