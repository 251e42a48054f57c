"""The Data tab: the intrinsic components of a dataset, as `--heads auto` will find them
(k chosen at the elbow, cluster sizes, top terms, an example prompt per cluster, the elbow plot).

API name: clusters.
"""

from __future__ import annotations

import gradio as gr

from hydra_edge.choices import FORMATS
from hydra_edge.ui.datasets import DEFAULT_MAX_K, find_clusters
from hydra_edge.ui.handlers import AppContext, refreshed, user_errors
from hydra_edge.ui.train_form import setting_widget


def build(ctx: AppContext, demo: gr.Blocks) -> gr.Dropdown:
    ws = ctx.ws
    files = ws.data_files()
    preferred = "data/demo/train.jsonl" if "data/demo/train.jsonl" in files else (files[0] if files else None)
    gr.Markdown(
        "HydraLoRA gives each *intrinsic component* of the data its own head. The prompts are clustered "
        "(character n-gram TF-IDF, LSA, k-means) and k is chosen at the elbow of the inertia curve: "
        "this is what `--heads auto` will use."
    )
    with gr.Row():
        data = gr.Dropdown(
            files,
            value=preferred,
            allow_custom_value=True,
            label="Data file",
            info="a file under data/ in the workspace (upload on the Train tab)",
            scale=4,
        )
        fmt = gr.Dropdown(["auto", *FORMATS], value="auto", label="Format", scale=1, min_width=140)
        max_k = setting_widget("max_k", DEFAULT_MAX_K, min_width=120, scale=1, label="Largest k tried")
        heads = gr.Dropdown(
            ["auto", *map(str, range(1, 9))],
            value="auto",
            allow_custom_value=True,
            label="k",
            info="auto = elbow",
            scale=1,
            min_width=110,
        )
    run = gr.Button("Find clusters", variant="primary", elem_id="find-clusters")
    summary = gr.Markdown(elem_id="clusters-summary")
    table = gr.Dataframe(
        headers=["#", "rows", "top terms", "example prompt"],
        interactive=False,
        wrap=True,
        label="Clusters",
        column_widths=["6%", "8%", "36%", "50%"],
        elem_id="clusters-table",
    )
    picture = gr.Image(
        label="Elbow curve and cluster sizes",
        type="pil",
        interactive=False,
        height=420,
        buttons=["download"],
        elem_id="clusters-plot",
    )
    result = gr.JSON(visible=False)

    @user_errors
    def clusters(data: str, format: str = "auto", max_k: float = DEFAULT_MAX_K, heads: str = "auto"):
        """k, sizes, top terms and elbow curve of a workspace data file (what --heads auto finds)."""
        found, image = find_clusters(ws, data, format, max_k, heads)
        curve = ", ".join(f"k={k}: {v:.1f}" for k, v in found["inertia_by_k"].items())
        text = (
            f"**{found['file']}**: {found['rows']:,} prompts → **k = {found['k']}** clusters"
            + (f" ({found['skipped_invalid']} invalid rows left out)" if found["skipped_invalid"] else "")
            + f". Inertia by k: {curve}."
        )
        rows = [
            [c, size, ", ".join(terms), example]
            for c, (size, terms, example) in enumerate(zip(found["sizes"], found["top_terms"], found["examples"]))
        ]
        return found, text, rows, image

    run.click(clusters, [data, fmt, max_k, heads], [result, summary, table, picture], api_name="clusters")
    return data


def refresh(ctx: AppContext, current: str | None):
    return refreshed(ctx.ws.data_files(), current)
