"""`hydra-edge presets`: the built-in presets, YAML files in the format of a user's `--config`.
`--show NAME` prints one, to start a config of your own from it."""

from __future__ import annotations

from dataclasses import dataclass

from hydra_edge.errors import UserError
from hydra_edge.settings import setting
from hydra_edge.training.config import PRESET_DEFAULTS, preset_files


@dataclass
class PresetsSettings:
    show: str | None = setting(None, "Print this preset's YAML file (save it and pass it to finetune --config).")


def description(name: str, text: str) -> str:
    """A preset file's leading comment block, as one line (without the `name:` it opens with)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return " ".join(lines).removeprefix(f"{name}: ")


def presets(settings: PresetsSettings) -> None:
    """List the presets (--model NAME): what each is for and the settings it fills in."""
    files = preset_files()
    if settings.show is not None:
        if settings.show not in files:
            raise UserError(f"--show {settings.show}: no such preset; the presets are {', '.join(files)}")
        print(files[settings.show].read_text(encoding="utf-8"), end="")
        return
    for name, path in files.items():
        print(f"{name}: {description(name, path.read_text(encoding='utf-8'))}")
        values = ", ".join(f"{key}={value}" for key, value in PRESET_DEFAULTS[name].items())
        print(f"  settings: {values}")
        print(f"  file: {path}")
