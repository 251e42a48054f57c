"""The work of the `peft` and `vllm` formats (formats/peft.py, formats/vllm.py): the base the
adapter was trained against, dequantized to a float32 Hugging Face folder, and one PEFT LoRA folder
per cluster holding (A, B̄_c).

Validated from the files written: each cluster's adapter is read back, folded into the base
(W + alpha/r · B̄_c · A) and its logits compared with the PyTorch model pinned to that cluster, at
float32's tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.adapter.gates import cluster_gates
from hydra_edge.data.records import prompt_ids
from hydra_edge.errors import UserError
from hydra_edge.exporters.folder import base_entry, building, prepare, seal
from hydra_edge.exporters.merge import (
    fold_cluster_into_base,
    hydra_on_plain_base,
    merged_heads,
    pinned_logits,
    save_plain_base,
    write_peft_adapter,
)
from hydra_edge.exporters.validation import (
    compare_logits,
    describe_check,
    describe_criteria,
    validation_problem,
    validation_prompts,
)

PEFT_PREFIX = "base_model.model."
LORA_A = ".lora_A.weight"


def write_peft_folders(work: Path, adapter_dir: Path, config: AdapterConfig, out_dir: Path, log) -> dict:
    """peft/base and peft/cluster_<c> in work, each cluster validated from its written file;
    returns the manifest's entries."""
    gates_by_cluster = cluster_gates(adapter_dir)
    log("export: writing the dequantized base")
    plain = save_plain_base(config, work / "peft" / "base")
    reference, tokenizer = hydra_on_plain_base(plain, adapter_dir)
    prompts = [prompt_ids(tokenizer, messages) for messages in validation_prompts(adapter_dir)]
    checks = {}
    for cluster, heads in merged_heads(reference, gates_by_cluster).items():
        folder = write_peft_adapter(work / "peft" / f"cluster_{cluster}", "../base", config.rank, config.alpha, heads)
        expected = pinned_logits(reference, gates_by_cluster[cluster], prompts)
        with folded_into_base(reference, folder / "adapter_model.safetensors", config.scaling):
            got = pinned_logits(reference, torch.zeros(config.heads), prompts)  # heads off: the fold alone
        check = compare_logits(got, expected)
        problem = validation_problem(check, "fp32")
        if problem:
            raise UserError(f"export: validation failed for cluster {cluster}: {problem}; nothing written to {out_dir}")
        log(f"export: cluster {cluster} validated ({describe_check(check, 'fp32')})")
        checks[str(cluster)] = {**check, "prompts": len(prompts)}
    return {
        "base": base_entry(config),
        "clusters": sorted(int(c) for c in gates_by_cluster),
        "heads": config.heads,
        "rank": config.rank,
        "alpha": config.alpha,
        "validation": {"criteria": describe_criteria("fp32"), "checks": checks},
    }


@contextmanager
def folded_into_base(model: torch.nn.Module, weights_file: Path, scaling: float) -> Iterator[None]:
    """The model with a written PEFT adapter folded into its base weights (merge.fold_cluster_into_base
    on each wrapped base layer): with the HydraLoRA heads off, its forward is what a runtime loading
    base + adapter computes. Every weight is restored on the way out."""
    weights = load_file(str(weights_file))
    heads = {  # the wrapped base layer of each adapted module: (A (r, in), B̄ (out, r))
        f"{key[len(PEFT_PREFIX) : -len(LORA_A)]}.base_layer": (
            a.float(),
            weights[key.replace("lora_A", "lora_B")].float(),
        )
        for key, a in weights.items()
        if key.endswith(LORA_A)
    }
    saved = {name: model.get_submodule(name).weight.detach().clone() for name in heads}
    try:
        fold_cluster_into_base(model, heads, scaling)
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)


def export(adapter_dir: Path, out_dir: Path, log, required_files, extra=None) -> dict:
    """A `peft` export; `extra(work, entries)` lets a format built on it (vllm) add its files and
    manifest fields before the folder is sealed with the format's `required_files`."""
    config = prepare(adapter_dir, out_dir)
    with building(out_dir) as work:
        entries = {"format": "peft", **write_peft_folders(work, adapter_dir, config, out_dir, log)}
        if extra:
            entries = extra(work, entries)
        return seal(work, out_dir, adapter_dir, entries, required_files)
