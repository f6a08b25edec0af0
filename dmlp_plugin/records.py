"""Plain records passed between stages (numpy only, no torch)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ImageSet:
    """Images of one split held in memory.

    images: uint8, shape (N, H, W, C) with C in {1, 3}; None for a data set of labels only (features
        brought by the user: ``dataset.name: npy`` without ``images``).
    labels: int64, shape (N,), the labels the source provides (the true labels of a benchmark data set),
        or None when unknown.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int
    class_names: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.images.shape[0] if self.images is not None else self.labels.shape[0])

    def fingerprint(self) -> str:
        """sha256 over shape, pixels and labels: identifies the samples and their order (labels only when
        there are no images)."""
        h = hashlib.sha256()
        if self.images is not None:
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).tobytes())
        else:
            h.update(b"labels only")
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class DataSplits:
    """A data set as loaded: the training split (purified, trained on) and an optional test split."""

    train: ImageSet
    test: ImageSet | None


@dataclass(frozen=True)
class PurifyInputs:
    """What a preprocessor sees.

    views: feature matrices (N, d_v) float32, rows L2-normalised (view 1 first).
    noisy: (N,) int64 given labels. meta_idx: (M,) indices of the trusted subset, meta_labels: (M,) their
    trusted labels. truth: (N,) true labels when known, for progress logging only: a preprocessor must not
    use it to decide anything. checkpoint: a file path a preprocessor may use to resume after a kill.
    """

    views: list
    noisy: np.ndarray
    meta_idx: np.ndarray
    meta_labels: np.ndarray
    num_classes: int
    truth: np.ndarray | None = None
    device: str = "cpu"
    progress: bool = True
    seed: int = 0
    checkpoint: str | None = None  # where a long preprocessor may save its progress (resumed when it exists)


@dataclass
class PurifyResult:
    """soft: (N, C) float32 rows on the simplex; hard: (N,) int64; confidence: (N,) float32;
    history: per-epoch dicts (for iterative preprocessors); info: JSON-able details."""

    soft: np.ndarray
    hard: np.ndarray
    confidence: np.ndarray
    history: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0
