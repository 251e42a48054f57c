"""Files that a user, a full disk or damage can change under hydra-edge's feet.

One place for the rules every reader and writer follows: a JSON file is read as one object or
refused in one line; JSON and YAML text goes through `parse_json`/`parse_yaml`, which refuse a
number too long to hold (Python's digit limit; 64 bits for a setting) by name; a file name read
from inside a folder must stay inside it; writes go to a temporary name and are renamed into
place; and an output folder is probed for writing before any slow work starts, so a read-only or
full disk costs seconds, not a model load.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath

from hydra_edge.errors import UserError

# errno values that mean "the disk (or the quota, or the file size limit) is full".
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NumberTooLong(ValueError):
    """A JSON integer with more digits than Python converts from text (sys.get_int_max_str_digits(),
    4,300 by default, a guard against quadratic-time conversion). json.loads raises a bare
    ValueError for it that no caller tells from other damage; this one says what to fix."""

    def __init__(self, digits: str, limit: int) -> None:
        super().__init__(
            f"a number with {len(digits.lstrip('-')):,} digits, more than the {limit:,} Python reads; "
            "quote it as a string or shorten it"
        )
        self.digits = digits


def _json_int(digits: str) -> int:
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()  # 0: no limit (Python < 3.11, or turned off)
    if limit and len(digits.lstrip("-")) > limit:
        raise NumberTooLong(digits, limit)
    return int(digits)


def parse_json(text: str | bytes):
    """json.loads for text a user or a damaged file can supply: an integer too long for Python
    raises NumberTooLong (a ValueError) instead of the bare ValueError json.loads gives, so every
    reader reports it as "a number ... too long" at its file and line. Everything else is
    json.loads' own behaviour: JSONDecodeError for bad syntax, RecursionError for deep nesting,
    and a float out of range (1e999) read as inf, like any other JSON reader in Python."""
    return json.loads(text, parse_int=_json_int)


SETTING_INT_RANGE = (-(2**63), 2**63 - 1)  # what torch, numpy and the trainers take as a whole number


def parse_yaml(text: str):
    """yaml.safe_load for a settings file, refusing a whole number outside 64 bits with a
    yaml.YAMLError at its line (read as any other YAML mistake): such a number is never a valid
    setting, and letting it through fails far from the file (float() overflows, torch.manual_seed
    overflows, json.dumps of run_config.json hits Python's digit limit), while YAML's hex, binary
    and 60-based forms build any size of integer from a short text. Floats out of range (1.0e+999)
    read as inf, as in parse_json."""
    import yaml

    return yaml.load(text, Loader=_settings_loader())  # a SafeLoader subclass: as safe as safe_load


@functools.cache
def _settings_loader():
    import yaml

    class SettingsLoader(yaml.SafeLoader):
        pass

    def construct_int(loader: yaml.SafeLoader, node) -> int:
        text = loader.construct_scalar(node)
        try:
            # 70 characters hold any 64-bit number in every YAML spelling (0b + 64 binary digits);
            # a longer one is refused before PyYAML's 60-based form multiplies out a huge integer.
            value = yaml.SafeLoader.construct_yaml_int(loader, node) if len(text.replace("_", "")) <= 70 else None
        except ValueError:  # Python's digit limit
            value = None
        low, high = SETTING_INT_RANGE
        if value is None or not low <= value <= high:
            shown = text if len(text) <= 24 else f"{text[:12]}...{text[-6:]} ({len(text):,} characters)"
            problem = f"the number {shown} is too long: a setting takes whole numbers up to {high:,}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)
        return value

    SettingsLoader.add_constructor("tag:yaml.org,2002:int", construct_int)
    return SettingsLoader


def read_json_object(path: Path, remedy: str) -> dict:
    """A JSON object from a file, or one UserError line naming the file and what to do."""
    try:
        value = parse_json(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not valid JSON ({first}); {remedy}") from exc
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc}); {remedy}") from exc
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}; {remedy}")
    return value


def path_inside(folder: Path, name: object, named_in: Path) -> Path:
    """`folder / name` for a file name read from a file inside `folder`, refusing a name that
    would leave the folder: an absolute path, `..`, or a symlink that leads out. Data folders
    and exports are untrusted input (uploads, downloads): they must never make hydra-edge read
    elsewhere."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise UserError(f"{named_in}: names {name!r} as a file; expected a file name inside {folder}")
    root = Path(folder).resolve()
    target = (Path(folder) / name).resolve()
    if PurePath(name).is_absolute() or root not in target.parents:
        raise UserError(
            f"{named_in}: names {name!r}, outside {folder}; refusing to read it (a folder's files "
            "may only point inside that folder)"
        )
    return target


@contextlib.contextmanager
def atomic_target(path: Path, done: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary sibling to write `path` (a file or a folder) into: renamed into place when the
    block ends without error, removed whatever happens, so a crash, a kill or a full disk never
    leaves a half-written `path`. With `done`, a rename that fails because another process put a
    complete `path` there first (done(path) is true) counts as success (shared caches)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if done is None or not done(path):
                raise
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` (UTF-8) so that `path` holds either the old or the whole new text."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def disk_errors(path: Path):
    """Turns safetensors' I/O failures (a SafetensorError whose text holds the OS error) back into
    the OSError they are, so a full disk is reported as one, whichever library was writing."""
    try:
        yield
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if type(exc).__name__ != "SafetensorError" or not found:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, written to a temporary name and renamed into place (a crash or a
    full disk never leaves a half-written file), with disk failures as OSError (disk_errors)."""
    from safetensors.torch import save_file

    with atomic_target(path) as tmp, disk_errors(path):
        save_file(tensors, str(tmp), metadata=metadata)


def ensure_writable_dir(folder: Path, flag: str) -> None:
    """Creates `folder` if needed and writes a probe file into it, or a UserError naming the
    flag: read-only media, another user's folder and a full disk all fail here, early."""
    folder = Path(folder)
    probe = folder / f".hydra-edge-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
    except OSError as exc:
        raise UserError(
            f"{flag} {folder}: cannot write there ({exc.strerror or exc}); choose a folder you can write to"
        ) from exc
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (exports and checkpoints record these)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def free_bytes(folder: Path) -> int | None:
    """Free space where `folder` (or its nearest existing parent) lives; None if unknown."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"
