"""Label-quality metrics (pure numpy)."""

from __future__ import annotations

import numpy as np


def label_accuracy(labels: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of ``labels`` equal to ``truth`` (both int, shape (N,))."""
    labels = np.asarray(labels)
    truth = np.asarray(truth)
    if labels.shape != truth.shape:
        raise ValueError(f"shape mismatch: {labels.shape} vs {truth.shape}")
    return float(np.mean(labels == truth)) if labels.size else float("nan")


def transition_matrix(truth: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Empirical T[i, j] = P(noisy = j | true = i), shape (C, C); rows of absent classes are zero."""
    counts = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(counts, (np.asarray(truth, dtype=np.int64), np.asarray(noisy, dtype=np.int64)), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def fixed_broken(noisy: np.ndarray, purified: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """How many wrong labels purification fixed, and how many right ones it broke."""
    noisy, purified, truth = (np.asarray(a) for a in (noisy, purified, truth))
    return {
        "fixed": int(np.sum((noisy != truth) & (purified == truth))),
        "broken": int(np.sum((noisy == truth) & (purified != truth))),
    }
