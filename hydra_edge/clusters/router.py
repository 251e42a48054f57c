"""The request router at inference time: text -> cluster, with numpy alone.

It replays the featurizer fitted in training (fit.py) from its saved arrays:
sklearn's `char_wb` n-grams of the lower-cased text, sublinear TF x IDF, L2 norm, the LSA
projection, L2 norm again, then the nearest centroid. No scikit-learn, no pickle, so an export
can route requests on any machine that has numpy and safetensors.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from hydra_edge.clusters.files import read_cluster_files


def char_wb_ngrams(text: str, ngram_range: tuple[int, int]) -> list[str]:
    """sklearn's analyzer="char_wb" (lowercase=True): n-grams inside space-padded words."""
    low, high = ngram_range
    grams = []
    for word in text.lower().split():
        word = f" {word} "
        for n in range(low, high + 1):
            offset = 0
            grams.append(word[offset : offset + n])
            while offset + n < len(word):
                offset += 1
                grams.append(word[offset : offset + n])
            if offset == 0:  # a word shorter than n is counted once
                break
    return grams


def nearest_centroid(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid of each row, the k-means assignment training and serving share.
    (n, d) features, (k, d) centroids -> (n,) int."""
    if centroids.shape[0] == 1:
        return np.zeros(features.shape[0], dtype=np.int64)
    # ||x - c||^2 = ||x||^2 - 2 x·c + ||c||^2; ||x||^2 is the same for every centroid.
    scores = 2 * (features @ centroids.T) - (centroids**2).sum(axis=1)[None, :]  # (n, k)
    return np.asarray(scores).argmax(axis=1)


def _l2(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


class RequestRouter:
    def __init__(
        self,
        vocabulary: dict[str, int],
        idf: np.ndarray,
        projection: np.ndarray,
        centroids: np.ndarray,
        ngram_range: tuple[int, int],
    ) -> None:
        self.vocabulary, self.idf, self.projection = vocabulary, idf, projection  # (V,), (d, V)
        self.centroids, self.ngram_range = centroids, ngram_range  # (k, d)

    @classmethod
    def from_dir(cls, folder: str | Path) -> RequestRouter:
        meta, arrays = read_cluster_files(Path(folder))
        return cls(
            meta["vocabulary"],
            arrays["idf"],
            arrays["projection"],
            arrays["centroids"],
            tuple(meta["featurizer"]["ngram_range"]),
        )

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def features(self, texts: list[str]) -> np.ndarray:
        """(n, d) latent features, as in training."""
        tfidf = np.zeros((len(texts), len(self.idf)))  # (n, V)
        for row, text in enumerate(texts):
            for gram, count in Counter(char_wb_ngrams(text, self.ngram_range)).items():
                column = self.vocabulary.get(gram)
                if column is not None:
                    tfidf[row, column] = (1.0 + math.log(count)) * self.idf[column]
        tfidf = _l2(tfidf)
        if self.projection.shape[0] == 0:
            return tfidf
        return _l2(tfidf @ self.projection.T)

    def route(self, texts: list[str]) -> np.ndarray:
        """The cluster of each text. (n,) int."""
        return nearest_centroid(self.features(texts), self.centroids)
