"""serve-vllm.sh: the vLLM command line that serves an export's PEFT folders, one LoRA adapter per
cluster under the name `hydra-edge serve --upstream` asks for (cluster_<c>; the base as `base`).

vLLM batches requests for many adapters on one GPU; hydra-edge then only routes. The script runs
from its own folder, so the export can be moved or copied to the GPU machine as a whole.
"""

from __future__ import annotations

import shlex
from pathlib import Path

SCRIPT = "serve-vllm.sh"
# The values vLLM's --max-lora-rank accepts (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds rank r."""
    fitting = [rank for rank in VLLM_LORA_RANKS if rank >= r]
    if not fitting:
        raise ValueError(f"LoRA rank {r} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")
    return fitting[0]


def vllm_arguments(clusters: list[int], r: int) -> list[str]:
    """`vllm serve` and its arguments, paths relative to the export's folder."""
    modules = [f"cluster_{c}=peft/cluster_{c}" for c in clusters]
    return [
        "vllm", "serve", "peft/base",
        "--served-model-name", "base",
        "--enable-lora",
        "--max-lora-rank", str(max_lora_rank(r)),
        "--max-loras", str(len(clusters)),
        "--lora-modules", *modules,
    ]  # fmt: skip


def write_vllm_script(out_dir: Path, clusters: list[int], r: int) -> Path:
    command = " \\\n  ".join(shlex.join(part) for part in _lines(vllm_arguments(clusters, r)))
    path = out_dir / SCRIPT
    path.write_text(
        "#!/usr/bin/env bash\n"
        "# Serves this export with vLLM (NVIDIA GPU): the dequantized base (peft/base) and one LoRA\n"
        "# adapter per cluster (peft/cluster_<c>), named as `hydra-edge serve --upstream` asks for them.\n"
        "#   bash serve-vllm.sh                       # OpenAI-compatible API on http://127.0.0.1:8001/v1\n"
        "#   PORT=9000 bash serve-vllm.sh --max-model-len 4096   # more flags go to `vllm serve`\n"
        "# Then route every request to its cluster's adapter:\n"
        "#   hydra-edge serve --onnx THIS_FOLDER --upstream http://127.0.0.1:8001/v1\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f'exec {command} \\\n  --host "${{HOST:-127.0.0.1}}" --port "${{PORT:-8001}}" "$@"\n'
    )
    path.chmod(0o755)
    return path


def _lines(arguments: list[str]) -> list[list[str]]:
    """One line per option (with its values), so the script reads like the vLLM docs."""
    lines: list[list[str]] = [[]]
    for argument in arguments:
        if argument.startswith("--"):
            lines.append([])
        lines[-1].append(argument)
    return lines
