"""The clusters' two files, as `fit` writes them and the router and loaders read them back.

    clusters.json         k, elbow curve, sizes, top terms, featurizer settings, the cluster id of
                          every training row, vocabulary
    clusters.safetensors  idf [V], projection [d, V], centroids [k, d]

Reading checks every array against the others, so a damaged file is one clear error here rather
than a crash inside scoring; nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hydra_edge.errors import UserError

CLUSTERS_JSON = "clusters.json"
CLUSTERS_TENSORS = "clusters.safetensors"


def read_cluster_files(folder: Path, expected_k: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(clusters.json, arrays of clusters.safetensors) of a run or an export's router/, checked
    for consistency (vocabulary -> idf columns, projection and centroid shapes, finite values),
    so a damaged file is one clear error here instead of a crash inside scoring."""
    from safetensors.numpy import load_file

    from hydra_edge.files import read_json_object

    json_path, tensor_path = Path(folder) / CLUSTERS_JSON, Path(folder) / CLUSTERS_TENSORS
    if not json_path.is_file() or not tensor_path.is_file():
        raise UserError(f"{folder}: missing {CLUSTERS_JSON} / {CLUSTERS_TENSORS}; retrain the adapter")
    remedy = "the cluster router is damaged; restore the folder or retrain"
    meta = read_json_object(json_path, remedy)
    try:
        arrays = load_file(str(tensor_path))
    except Exception as exc:  # SafetensorError and friends: damaged or truncated file
        raise UserError(f"{tensor_path}: cannot be read ({exc}); {remedy}") from exc

    def bad(what: str) -> UserError:
        return UserError(f"{json_path if what.startswith('json') else tensor_path}: {what.split(':', 1)[1]}; {remedy}")

    vocabulary, featurizer = meta.get("vocabulary"), meta.get("featurizer")
    if not isinstance(vocabulary, dict) or not vocabulary:
        raise bad("json: 'vocabulary' is missing or empty")
    if (
        not isinstance(featurizer, dict)
        or featurizer.get("analyzer") != "char_wb"
        or featurizer.get("sublinear_tf") is not True
    ):
        raise bad("json: 'featurizer' is missing or not the char_wb TF-IDF this version reads")
    ngrams = featurizer.get("ngram_range")
    if not (
        isinstance(ngrams, list)
        and len(ngrams) == 2
        and all(_whole(n) for n in ngrams)
        and 1 <= ngrams[0] <= ngrams[1] <= 16
    ):
        raise bad(f"json: 'featurizer.ngram_range' is {ngrams!r}")
    idf, centroids = arrays.get("idf"), arrays.get("centroids")
    if idf is None or centroids is None or idf.ndim != 1 or centroids.ndim != 2:
        raise bad("tensors: needs idf (V,) and centroids (k, d)")
    size = idf.shape[0]
    projection = arrays.get("projection", np.zeros((0, size)))  # fits without LSA
    if projection.ndim != 2 or projection.shape[1] != size:
        raise bad(f"tensors: projection {list(projection.shape)} does not fit idf ({size},)")
    width = projection.shape[0] or size
    k = centroids.shape[0]
    if centroids.shape[1] != width or k < 1 or (expected_k is not None and k != expected_k):
        raise bad(f"tensors: centroids {list(centroids.shape)} do not fit (k={expected_k or 'k'}, {width})")
    columns = list(vocabulary.values())
    if len(vocabulary) != size or not all(_whole(c) for c in columns) or sorted(columns) != list(range(size)):
        raise bad(f"json: 'vocabulary' does not map onto the {size} idf columns")
    if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in (idf, projection, centroids)):
        raise bad("tensors: non-finite or non-float values")
    for key, check in (
        ("sizes", lambda v: isinstance(v, list) and len(v) == k and all(_whole(n) for n in v)),
        ("inertia_by_k", lambda v: isinstance(v, dict) and all(str(x).isdigit() for x in v)),
        ("top_terms", lambda v: isinstance(v, list) and all(isinstance(t, list) for t in v)),
    ):
        if not check(meta.get(key)):
            raise bad(f"json: '{key}' is missing or malformed")
    arrays["projection"] = projection
    return meta, arrays


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
