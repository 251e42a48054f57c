"""Building the ONNX decoders: onnxruntime-genai's model builder (genai_builder.py) on the
plain base, then the graph surgery each mode needs (LoRA weights as inputs for `adapters`, the
router and heads inside the graph for `dynamic`, folded weights for `merged`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from hydra_edge.adapter.config import AdapterConfig
from hydra_edge.errors import UserError
from hydra_edge.exporters.merge import (
    fold_cluster_into_base,
    write_peft_adapter,
)

# Block 16 rather than the builder's 32: the base is NF4 (non-uniform levels), and re-rounding it
# onto uniform int4 in blocks of 32 cost the demo adapter 8.8 points of exact-match; blocks of
# 16 cost 1.3. accuracy_level=4 (int8 activations in the MatMulNBits kernels) cost nothing more
# on the demo and decodes the Qwen2.5-0.5B-shaped model at 21.8 tok/s, against 15.3 with float32
# activations (README.md, Export).
# k_quant_mixed is llama.cpp's Q4_K_M recipe in the builder: int8 for the LM head and for the
# most rounding-sensitive MatMuls (attention V/QKV and MLP down in the first and last eighth of
# the layers and every third layer between), int4 for the rest. On Gemma 3 270M (a 262,144-token
# tied head) all-int4 agreed with PyTorch on the next token at 31-35 % of validation positions,
# the int8 head alone 69-71 %, the mix 72-83 %, for 392 MB against 301 MB.
INT4_OPTIONS = ["accuracy_level=4", "algo_config=k_quant_mixed", "block_size=16"]


def lora_node_names(modules) -> list[str]:
    names = []
    for module in modules:
        parts = module.split(".")
        base = f"/model/layers.{parts[2]}/" + "/".join("attn" if p == "self_attn" else p for p in parts[3:])
        names += [f"{base}/lora_A/MatMul", f"{base}/lora_B/MatMul"]
    return names


def build_onnx(
    hf_dir: Path,
    out_dir: Path,
    precision: str,
    device: str,
    cache_dir: Path,
    adapter_path: Path | None = None,
    keep_float: list[str] | None = None,
) -> None:
    """Runs onnxruntime-genai's model builder (through genai_builder.py) on an HF folder (with a PEFT
    LoRA: LoRA branches)."""
    cmd = [
        sys.executable,
        "-m",
        "hydra_edge.exporters.genai_builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        device,
        "-c",
        str(cache_dir),
    ]
    extra = [f"adapter_path={adapter_path}"] if adapter_path is not None else []
    if keep_float:
        extra.append("nodes_to_exclude=" + ",".join(keep_float))
    if precision == "int4":
        extra += INT4_OPTIONS
    if extra:
        cmd += ["--extra_options", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"export: the ONNX model builder failed ({tail[0]})")


def build_merged(work: Path, plain: Path, heads_by_cluster, scaling, precision, device, log) -> dict:
    """One full ONNX model per cluster, (A, B̄_c) folded into the weights."""
    for cluster, heads in heads_by_cluster.items():
        log(f"export: cluster {cluster}: folding B̄_c·A into the base and building ONNX ({precision}, {device})")
        folded_dir = work / "tmp" / f"folded_{cluster}"
        _fold(plain, heads, scaling).save_pretrained(folded_dir)
        shutil.copytree(
            plain, folded_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json")
        )
        build_onnx(folded_dir, work / "models" / f"cluster_{cluster}", precision, device, work / "tmp" / "cache")
    return {}


def build_adapters(work: Path, plain: Path, heads_by_cluster, scaling, precision, device, log) -> dict:
    """One base ONNX model whose LoRA weights are graph inputs, plus one adapter file per cluster.

    The builder (`adapter_path=`) emits MatMul(lora_A) -> MatMul(lora_B, pre-scaled) -> Add per
    module with the weights as initializers; those become graph inputs whose zero-valued
    initializers are the defaults (no adapter active = the base). Returns {cluster: feeds}."""
    import onnxruntime as ort

    first = next(iter(heads_by_cluster))
    log(f"export: building the base ONNX model with LoRA inputs ({precision}, {device})")
    rank = next(iter(heads_by_cluster[first].values()))[0].shape[0]
    model_dir = work / "models" / "base"
    _build_with_lora(work, plain, model_dir, heads_by_cluster[first], rank, precision, device)
    lora_dtypes = _lora_initializers_to_inputs(model_dir)
    (work / "adapters").mkdir()
    feeds_by_cluster = {}
    for cluster, heads in heads_by_cluster.items():
        params = {}
        for module, (a, b) in heads.items():
            params[f"{module}.lora_A.MatMul.weight"] = np.ascontiguousarray(a.numpy().T)  # (in, r)
            params[f"{module}.lora_B.MatMul.weight"] = np.ascontiguousarray((scaling * b).numpy().T)  # (r, out)
        missing = set(lora_dtypes) ^ set(params)
        if missing:
            raise UserError(
                f"export: the builder's LoRA weights do not match the adapter's modules ({sorted(missing)[:2]})"
            )
        params = {k: v.astype(lora_dtypes[k]) for k, v in params.items()}  # float16 in an fp16 export
        adapter = ort.AdapterFormat()
        adapter.set_adapter_version(1)
        adapter.set_model_version(1)
        adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
        adapter.export_adapter(str(work / "adapters" / f"cluster_{cluster}.onnx_adapter"))
        feeds_by_cluster[cluster] = params
    return feeds_by_cluster


def _build_with_lora(work: Path, plain: Path, model_dir: Path, heads: dict, rank: int, precision, device) -> None:
    """The builder's decoder with a LoRA branch (A, B) per adapted module, from a template PEFT
    adapter whose weights the caller then replaces; the branches stay float in an int4 export."""
    template = write_peft_adapter(work / "tmp" / "template", str(plain), rank, float(rank), heads)
    keep_float = lora_node_names(heads) if precision == "int4" else None
    build_onnx(
        plain, model_dir, precision, device, work / "tmp" / "cache", adapter_path=template, keep_float=keep_float
    )


def build_dynamic(work: Path, plain: Path, adapter_dir: Path, config: AdapterConfig, precision, device, log) -> dict:
    """One ONNX model that runs the router and all heads per token, exactly as in training.

    The builder's LoRA branch per module, MatMul(x, Aᵀ) -> MatMul(h, B_scaledᵀ), is rewritten to
        g = Softmax(MatMul(x, W_routerᵀ / T))              (B, T, N)
        g = ScatterElements(0·g, idx, v / Σv)  with v, idx = TopK(g, k)   (only with --router-top-k)
        gh = Reshape(Unsqueeze(g, -1) * Unsqueeze(h, -2))    (B, T, N·r)
        delta = MatMul(gh, B_cat)                           B_cat: (N·r, out), scaled by alpha/r
    i.e. the layer's own flattened computation (hydra_edge/adapter/layer.py)."""
    import onnx

    from hydra_edge.adapter.inject import read_adapter_weights

    weights = read_adapter_weights(adapter_dir)
    modules = config.target_modules
    log(f"export: building the dynamic ONNX model (router + {config.heads} heads per module; {precision}, {device})")
    template_heads = {m: (weights[f"{m}.hydra_A"].float(), weights[f"{m}.hydra_B"][0].float()) for m in modules}
    model_dir = work / "models" / "dynamic"
    _build_with_lora(work, plain, model_dir, template_heads, config.rank, precision, device)

    graph_model = onnx.load(str(model_dir / "model.onnx"))
    rewritten = _route_every_lora_branch(graph_model.graph, weights, config)
    if rewritten != len(modules):
        raise UserError(f"export: found {rewritten} LoRA branches in the built model, expected {len(modules)}")
    _save_over(graph_model, model_dir)
    return {}


def _route_every_lora_branch(graph, weights: dict, config: AdapterConfig) -> int:
    """Rewrites each of the builder's LoRA branches in `graph` into the routed one (build_dynamic),
    the gate nodes placed just before the branch's second MatMul; returns how many it rewrote."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    graph.initializer.extend(
        [  # the constants every module's gate nodes share
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "hydra_axes_last"),
            numpy_helper.from_array(np.array([-2], dtype=np.int64), "hydra_axes_second_last"),
            numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "hydra_shape_flatten_heads"),
            numpy_helper.from_array(np.array([config.router_top_k], dtype=np.int64), "hydra_top_k"),
        ]
    )
    new_nodes, rewritten = [], 0
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1].endswith(".lora_B.MatMul.weight"):
            new_nodes += _routed_branch(graph, node, producers[node.input[0]], initializers, weights, config)
            rewritten += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return rewritten


def _routed_branch(graph, b_node, a_node, initializers: dict, weights: dict, config: AdapterConfig) -> list:
    """One module's branch made routed: its A and B initializers replaced by the adapter's A and
    all heads' B side by side (B_cat, scaled), the router's weights added, and b_node fed the
    gated h. Returns the gate nodes that go before b_node."""
    from onnx import numpy_helper

    module = b_node.input[1][: -len(".lora_B.MatMul.weight")]
    x, h = a_node.input[0], b_node.input[0]  # a_node: MatMul(x, lora_A)
    heads = weights[f"{module}.hydra_B"].float()  # (N, out, r)
    n_heads, out_features, rank = heads.shape
    dtype = numpy_helper.to_array(initializers[b_node.input[1]]).dtype  # the graph's float type
    b_cat = (config.scaling * heads.permute(0, 2, 1).reshape(n_heads * rank, out_features)).numpy()  # (N·r, out)
    prefix = f"/hydra/{module}"
    router_name, b_name = f"{module}.hydra_router_T", f"{module}.hydra_B_cat"
    router_t = weights[f"{module}.hydra_router"].float().numpy().T / config.router_temperature  # (in, N)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(router_t, dtype=dtype), router_name))
    initializers[b_node.input[1]].CopyFrom(numpy_helper.from_array(b_cat.astype(dtype), b_node.input[1]))
    a_t = np.ascontiguousarray(weights[f"{module}.hydra_A"].float().numpy().T, dtype=dtype)
    initializers[a_node.input[1]].CopyFrom(numpy_helper.from_array(a_t, a_node.input[1]))
    top_k = 0 < config.router_top_k < config.heads
    b_node.input[0] = f"{prefix}/gh_flat"
    b_node.input[1] = b_name
    initializers[f"{module}.lora_B.MatMul.weight"].name = b_name
    return _gate_nodes(prefix, x, h, router_name, top_k)


def _gate_nodes(prefix: str, x: str, h: str, router_name: str, top_k: bool) -> list:
    """f"{prefix}/gh_flat" (B, T, N·r): the gates of x (softmax of the router, top-k if asked)
    times each head's share of h."""
    from onnx import helper

    softmax_out = f"{prefix}/soft" if top_k else f"{prefix}/gates"
    return [
        helper.make_node("MatMul", [x, router_name], [f"{prefix}/router_logits"], name=f"{prefix}/router/MatMul"),
        helper.make_node("Softmax", [f"{prefix}/router_logits"], [softmax_out], name=f"{prefix}/Softmax", axis=-1),
        *(_top_k_nodes(prefix) if top_k else []),
        helper.make_node(
            "Unsqueeze", [f"{prefix}/gates", "hydra_axes_last"], [f"{prefix}/gates_u"], name=f"{prefix}/UnsqueezeG"
        ),
        helper.make_node("Unsqueeze", [h, "hydra_axes_second_last"], [f"{prefix}/h_u"], name=f"{prefix}/UnsqueezeH"),
        helper.make_node("Mul", [f"{prefix}/gates_u", f"{prefix}/h_u"], [f"{prefix}/gh"], name=f"{prefix}/Mul"),
        helper.make_node(
            "Reshape", [f"{prefix}/gh", "hydra_shape_flatten_heads"], [f"{prefix}/gh_flat"], name=f"{prefix}/Reshape"
        ),
    ]


def _top_k_nodes(prefix: str) -> list:
    """f"{prefix}/gates" (B, T, N) from the softmax's f"{prefix}/soft": its k largest entries
    renormalised, the rest zero (layers.top_k_gates)."""
    from onnx import helper

    p = prefix
    return [
        helper.make_node("TopK", [f"{p}/soft", "hydra_top_k"], [f"{p}/top_v", f"{p}/top_i"], name=f"{p}/TopK", axis=-1),
        helper.make_node("ReduceSum", [f"{p}/top_v", "hydra_axes_last"], [f"{p}/top_sum"], name=f"{p}/TopK/Sum"),
        helper.make_node("Div", [f"{p}/top_v", f"{p}/top_sum"], [f"{p}/top_norm"], name=f"{p}/TopK/Div"),
        helper.make_node("Sub", [f"{p}/soft", f"{p}/soft"], [f"{p}/zeros"], name=f"{p}/TopK/Zeros"),
        helper.make_node(
            "ScatterElements",
            [f"{p}/zeros", f"{p}/top_i", f"{p}/top_norm"],
            [f"{p}/gates"],
            name=f"{p}/TopK/Scatter",
            axis=-1,
        ),
    ]


def _save_over(graph_model, model_dir: Path) -> None:
    """Writes a rewritten decoder over model_dir's, weights in one external file as the builder
    lays them out (genai_config.json names model.onnx)."""
    import onnx

    (model_dir / "model.onnx.data").unlink()
    onnx.save_model(
        graph_model,
        str(model_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


def _lora_initializers_to_inputs(model_dir: Path) -> dict[str, np.dtype]:
    """Turns every LoRA weight initializer into a graph input with a zero default; returns
    {name: dtype} (the adapter files must match it)."""
    import onnx
    from onnx import helper, numpy_helper

    path = model_dir / "model.onnx"
    graph_model = onnx.load(str(path))
    names = {}
    for init in graph_model.graph.initializer:
        if ".lora_A.MatMul.weight" in init.name or ".lora_B.MatMul.weight" in init.name:
            zeros = np.zeros_like(numpy_helper.to_array(init))
            init.CopyFrom(numpy_helper.from_array(zeros, init.name))
            graph_model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(zeros.shape)))
            names[init.name] = zeros.dtype
    _save_over(graph_model, model_dir)
    return names


def _fold(plain_dir: Path, heads, scaling: float):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float32)
    fold_cluster_into_base(model, heads, scaling)
    return model
