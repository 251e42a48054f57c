"""The clusters picture: the elbow curve (chosen k marked) and the size of each cluster."""

from __future__ import annotations

import warnings
from pathlib import Path

from hydra_edge.clusters.fit import ClusterModel


def plot_clusters(model: ClusterModel, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    ks = sorted(model.inertia_by_k)
    fig, (elbow, sizes) = plt.subplots(1, 2, figsize=(10, 4))
    elbow.plot(ks, [model.inertia_by_k[k] for k in ks], marker="o")
    if model.k in model.inertia_by_k:
        elbow.plot(
            [model.k],
            [model.inertia_by_k[model.k]],
            marker="o",
            markersize=12,
            color="tab:red",
            label=f"chosen k = {model.k}",
        )
        elbow.legend()
    elbow.set(title="Elbow: k-means inertia by k", xlabel="k (clusters = heads)", ylabel="inertia")
    bars = sizes.bar(range(model.k), model.sizes, color="tab:blue")
    sizes.set(title="Rows per cluster", xlabel="cluster", ylabel="rows", xticks=range(model.k))
    for bar, terms in zip(bars, model.top_terms(3)):
        sizes.annotate(
            ", ".join(terms),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
            rotation=20,
        )
    with warnings.catch_warnings():  # a font without CJK glyphs draws boxes; not worth a warning
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
        fig.savefig(str(path), dpi=110)
    plt.close(fig)
