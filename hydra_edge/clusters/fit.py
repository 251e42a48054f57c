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

from hydra_edge.clusters.files import CLUSTERS_JSON, CLUSTERS_TENSORS, read_cluster_files
from hydra_edge.clusters.router import nearest_centroid
from hydra_edge.errors import UserError

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


def fit_clusters(texts: list[str], heads: int | None, max_k: int) -> tuple[ClusterModel, np.ndarray]:
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
