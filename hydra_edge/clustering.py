"""Finding the data's intrinsic components: TF-IDF + LSA + k-means, k chosen at the elbow.

The featurizer uses character n-grams inside word boundaries, so it works for any script
(Chinese has no spaces between words, code has few). The sparse TF-IDF rows are projected
onto a few latent directions (LSA, truncated SVD) and L2-normalised before k-means: in the raw
n-gram space short texts are nearly orthogonal and k-means splits on noise; in the latent space
it finds languages, scripts and task families. The fit is saved as plain arrays (JSON
vocabulary and top terms; safetensors idf, projection and centroids), so assigning a text to
a cluster needs no pickle.

    <out>/clusters.json         k, elbow curve, sizes, top terms, featurizer settings, the
                                cluster id of every training row, vocabulary
    <out>/clusters.safetensors  idf [V], projection [d, V], centroids [k, d]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hydra_edge.errors import UserError
from hydra_edge.request_router import nearest_centroid

CLUSTERS_JSON = "clusters.json"
CLUSTERS_TENSORS = "clusters.safetensors"
NGRAM_RANGE = (1, 4)
MAX_FEATURES = 20000
LSA_DIMS = 16
SEED = 0


@dataclass
class ClusterModel:
    vocabulary: dict[str, int]
    idf: np.ndarray  # (V,)
    projection: np.ndarray  # (d, V): LSA directions; d == 0 (tiny data) means none
    centroids: np.ndarray  # (k, d), in the L2-normalised latent space
    inertia_by_k: dict[int, float]
    sizes: list[int]
    top_terms_by_cluster: list[list[str]] = field(default_factory=list)

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def _vectorizer(self):
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(
            analyzer="char_wb", ngram_range=NGRAM_RANGE, sublinear_tf=True, vocabulary=self.vocabulary
        )
        vec.idf_ = self.idf
        return vec

    def features(self, texts: list[str]) -> np.ndarray:
        """Latent features, L2-normalised. (n, d)"""
        return _project(self._vectorizer().transform(texts), self.projection)

    def assign(self, texts: list[str]) -> np.ndarray:
        """The nearest centroid of each text. (n,) int."""
        return nearest_centroid(self.features(texts), self.centroids)

    def top_terms(self, n: int = 8) -> list[list[str]]:
        """The heaviest n-grams of each cluster (found at fit time): a hint at what it holds."""
        return [terms[:n] for terms in self.top_terms_by_cluster]


def _project(tfidf, projection: np.ndarray) -> np.ndarray:
    """(n, V) sparse TF-IDF -> (n, d) dense, L2-normalised rows."""
    from sklearn.preprocessing import normalize

    if projection.shape[0] == 0:
        return normalize(tfidf).toarray()
    return normalize(np.asarray(tfidf @ projection.T))


def _top_terms(tfidf, labels: np.ndarray, k: int, vocabulary: dict[str, int], n: int = 8) -> list[list[str]]:
    """Per cluster, the n-grams with the largest mean TF-IDF weight among its rows."""
    inverse = {i: t.strip() for t, i in vocabulary.items()}

    def readable(term: str) -> bool:  # single Latin letters and spaces say nothing
        return len(term) >= 2 or (len(term) == 1 and not term.isascii())

    lengths = np.array([len(inverse[i]) for i in range(len(inverse))])
    tops = []
    for c in range(k):
        weights = np.asarray(tfidf[labels == c].mean(axis=0)).ravel()  # (V,)
        terms: list[str] = []
        for i in np.argsort(-weights * np.sqrt(lengths)):  # longer n-grams read better
            term = inverse[int(i)]
            if readable(term) and not any(term in t for t in terms):
                terms.append(term)
            if len(terms) == n:
                break
        tops.append(terms)
    return tops


def elbow_k(inertia_by_k: dict[int, float]) -> int:
    """The k farthest below the straight line from the first to the last point (kneedle)."""
    ks = sorted(inertia_by_k)
    if len(ks) <= 2:
        return ks[0]
    x = np.array(ks, dtype=float)
    y = np.array([inertia_by_k[k] for k in ks], dtype=float)
    x = (x - x[0]) / (x[-1] - x[0])
    y = (y - y.min()) / max(y.max() - y.min(), 1e-12)
    line = y[0] + (y[-1] - y[0]) * x
    return ks[int(np.argmax(line - y))]


def fit_clusters(texts: list[str], heads: int | None, max_k: int = 8) -> tuple[ClusterModel, np.ndarray]:
    """Fits the featurizer and k-means. heads=None picks k by the elbow over k = 2..max_k.

    Returns the model and the cluster id of every text.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=NGRAM_RANGE, sublinear_tf=True, max_features=MAX_FEATURES)
    tfidf = vec.fit_transform(texts)  # (n, V) sparse
    dims = min(max(LSA_DIMS, 2 * max_k), tfidf.shape[0] - 1, tfidf.shape[1] - 1)
    if dims >= 2:
        projection = TruncatedSVD(dims, random_state=SEED).fit(tfidf).components_  # (d, V)
    else:
        projection = np.zeros((0, tfidf.shape[1]))
    x = _project(tfidf, projection)  # (n, d)
    distinct = len(set(texts))
    if heads is None:
        candidates = [k for k in range(2, max_k + 1) if k <= distinct]
        if not candidates:
            candidates = [1]
    else:
        if heads > distinct:
            raise UserError(f"--heads {heads}: the data has only {distinct} distinct prompts; use fewer heads")
        candidates = [heads]
    fits, inertia = {}, {}
    for k in candidates:
        km = KMeans(n_clusters=k, n_init=10, random_state=SEED).fit(x)
        fits[k], inertia[k] = km, float(km.inertia_)
    k = elbow_k(inertia) if heads is None else heads
    km = fits[k]
    labels = km.labels_.astype(np.int64)
    vocabulary = {t: int(i) for t, i in vec.vocabulary_.items()}
    model = ClusterModel(
        vocabulary=vocabulary,
        idf=vec.idf_.astype(np.float64),
        projection=np.asarray(projection, dtype=np.float64),
        centroids=np.asarray(km.cluster_centers_, dtype=np.float64),
        inertia_by_k=inertia,
        sizes=np.bincount(labels, minlength=k).tolist(),
        top_terms_by_cluster=_top_terms(tfidf, labels, k, vocabulary),
    )
    return model, labels


def save_clusters(model: ClusterModel, out_dir: Path, labels: np.ndarray | None = None) -> None:
    """Writes the fit; `labels` (the cluster id of each training row, in data order) is kept too."""
    import torch

    from hydra_edge.files import atomic_write_text, save_tensors

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "k": model.k,
        "sizes": model.sizes,
        "inertia_by_k": {str(k): v for k, v in sorted(model.inertia_by_k.items())},
        "featurizer": {
            "analyzer": "char_wb",
            "ngram_range": list(NGRAM_RANGE),
            "sublinear_tf": True,
            "lsa_dims": int(model.projection.shape[0]),
            "l2_normalised": True,
        },
        "top_terms": model.top_terms(),
        "labels": [] if labels is None else [int(x) for x in labels],
        "vocabulary": model.vocabulary,
    }
    arrays = {"idf": model.idf, "projection": model.projection, "centroids": model.centroids}
    save_tensors(
        {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}, out_dir / CLUSTERS_TENSORS
    )
    atomic_write_text(out_dir / CLUSTERS_JSON, json.dumps(meta, ensure_ascii=False) + "\n")


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


def load_clusters(out_dir: Path, expected_k: int | None = None) -> ClusterModel:
    meta, arrays = read_cluster_files(out_dir, expected_k)
    return ClusterModel(
        vocabulary=meta["vocabulary"],
        idf=arrays["idf"],
        projection=arrays["projection"],
        centroids=arrays["centroids"],
        inertia_by_k={int(k): v for k, v in meta["inertia_by_k"].items()},
        sizes=meta["sizes"],
        top_terms_by_cluster=meta["top_terms"],
    )


def summary_lines(model: ClusterModel) -> list[str]:
    """A short human summary: chosen k, elbow curve, sizes and top terms."""
    curve = ", ".join(f"k={k}: {v:.1f}" for k, v in sorted(model.inertia_by_k.items()))
    lines = [f"clusters: k={model.k} (inertia {curve})"]
    for c, (size, terms) in enumerate(zip(model.sizes, model.top_terms(6))):
        lines.append(f"  cluster {c}: {size} rows; top terms: {', '.join(terms)}")
    return lines
