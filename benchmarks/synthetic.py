"""Synthetic clustered features with known labels (for purifier tests and benchmarks)."""

from __future__ import annotations

import numpy as np


def clustered_features(n: int, d: int, num_classes: int, spread: float = 1.0, seed: int = 0,
                       modes_per_class: int = 1):
    """L2-normalised features: each class is ``modes_per_class`` Gaussian blobs around random unit
    centres (isotropic noise with total norm ~``spread``). Returns (x float32 (n, d), labels int64 (n,))."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes * modes_per_class, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, num_classes, n)
    mode = labels * modes_per_class + rng.integers(0, modes_per_class, n)
    x = np.empty((n, d), dtype=np.float32)
    for i in range(0, n, 10000):
        sl = slice(i, i + 10000)
        x[sl] = centres[mode[sl]] + rng.standard_normal((len(labels[sl]), d)).astype(np.float32) * (spread / np.sqrt(d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def symmetric_noise(labels: np.ndarray, rate: float, num_classes: int, seed: int = 0) -> np.ndarray:
    """DivideMix convention (the true class may be drawn)."""
    rng = np.random.default_rng(seed)
    out = labels.copy()
    idx = rng.permutation(len(labels))[: int(rate * len(labels))]
    out[idx] = rng.integers(0, num_classes, len(idx))
    return out
