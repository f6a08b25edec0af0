"""How good are features before any purification: the k-NN test accuracy of SSL features beside raw pixels.

Recorded with the features in their cache (``features.cache.get_features(..., quality=...)``): the usual SSL
monitor (the kNN evaluation of the InstDisc / SimCLR papers), true labels of the official splits, never used
by the purifier.
"""

from __future__ import annotations

import numpy as np

from dmlp_plugin.checks import knn
from dmlp_plugin.records import ImageSet


def feature_quality(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                    k: int = 20) -> float:
    """k-NN accuracy (cosine, majority vote, ties to the nearest) of test rows against labelled train rows:
    the usual SSL monitor (InstDisc / SimCLR papers' kNN evaluation). Rows are L2-normalised here."""
    def l2(a):
        a = np.asarray(a, dtype=np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sims, idx = knn.search(l2(train_x), k, queries=l2(test_x))
    soft = knn.vote(sims, idx, np.asarray(train_y), int(max(train_y.max(), test_y.max())) + 1, temperature=1e3)
    return float(np.mean(soft.argmax(1) == np.asarray(test_y)))


def feature_report(imageset: ImageSet, test: ImageSet, train_f: np.ndarray, test_f: np.ndarray) -> dict:
    """The quality figure stored with the features: 20-NN test accuracy of the features and of raw pixels."""
    # raw pixels standardised with the training split's statistics
    xtr = imageset.images.reshape(len(imageset), -1).astype(np.float32)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xte = (test.images.reshape(len(test), -1).astype(np.float32) - mu) / sd
    return {"metric": "20-NN accuracy (cosine, majority) on the test split, true labels",
            "ssl": feature_quality(train_f, imageset.labels, test_f, test.labels),
            "raw_pixels": feature_quality((xtr - mu) / sd, imageset.labels, xte, test.labels),
            "test_size": len(test)}
