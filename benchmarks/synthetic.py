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


def latent_features(path, n: int, d: int, num_classes: int, latent: int = 32, modes_per_class: int = 4,
                    spread: float = 1.2, noise: float = 0.05, seed: int = 0, micro: int = 0,
                    micro_spread: float = 0.5, purity: float = 1.0, block: int = 50000):
    """Features shaped like a learned embedding, written block by block into ``path`` (a float32 .npy, never
    held whole in memory): each class is ``modes_per_class`` Gaussian blobs in a ``latent``-dimensional space
    (centres N(0, I), std ``spread``), mapped to ``d`` dimensions by a fixed random ReLU layer, plus isotropic
    noise of std ``noise`` per coordinate, rows L2-normalised. ``micro`` > 0: each blob is made of ``micro``
    tight clusters instead (centres drawn from the blob, std ``spread``; samples std ``micro_spread`` around
    them), the way photos of one product or one scene gather in a learned embedding, and a sample's true class
    is its cluster's class with probability ``purity``, else a class drawn uniformly (classes that overlap,
    as Clothing1M's do). Returns the true labels (n,) int64."""
    import numpy.lib.format as fmt

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes * modes_per_class, latent)).astype(np.float32)
    a = (rng.standard_normal((latent, d)) / np.sqrt(latent)).astype(np.float32)
    groups = num_classes * modes_per_class
    if micro:
        centres = np.repeat(centres, micro, axis=0) + spread * rng.standard_normal((groups * micro, latent)).astype(np.float32)
        within, per_class = micro_spread, modes_per_class * micro
    else:
        within, per_class = spread, modes_per_class
    labels = rng.integers(0, num_classes, n)
    cluster = labels * per_class + rng.integers(0, per_class, n)
    if purity < 1.0:
        swap = rng.random(n) >= purity
        labels = np.where(swap, rng.integers(0, num_classes, n), labels)
    out = fmt.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for i in range(0, n, block):
        m = cluster[i:i + block]
        z = centres[m] + within * rng.standard_normal((m.size, latent)).astype(np.float32)
        x = np.maximum(z @ a, 0) + noise * rng.standard_normal((m.size, d)).astype(np.float32)
        out[i:i + block] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return labels.astype(np.int64)
