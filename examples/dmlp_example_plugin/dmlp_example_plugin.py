"""An example dmlp_plugin preprocessor (see dmlp_plugin.interfaces.Preprocessor for the contract).

Registered by the entry point in pyproject.toml; configs then name it (``preprocessor.name: trusted_centroid``)
and give its parameters under ``preprocessor.params`` (or ``preprocessor.params_for.trusted_centroid``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from dmlp_plugin.errors import UserError
from dmlp_plugin.records import PurifyInputs, PurifyResult


@dataclass(frozen=True)
class TrustedCentroid:
    """Relabel each sample by its nearest trusted-class centroid (cosine similarity on one feature view).

    temperature: softmax temperature of the similarities (soft labels). noisy_weight: the share of the soft
    label kept on the given (noisy) label, 0 to 1. view: which feature view (1 = the first)."""

    temperature: float = 0.05
    noisy_weight: float = 0.0
    view: int = 1

    def __post_init__(self):  # bad parameters: UserError, which the CLI prints as one line (exit code 2)
        if not self.temperature > 0:
            raise UserError(f"preprocessor.params.temperature={self.temperature!r} must be > 0, e.g. 0.05")
        if not 0.0 <= self.noisy_weight <= 1.0:
            raise UserError(f"preprocessor.params.noisy_weight={self.noisy_weight!r} must be in [0, 1], e.g. 0.2")
        if self.view < 1:
            raise UserError(f"preprocessor.params.view={self.view!r} must be 1 or more (the first view is 1)")

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        t0 = time.perf_counter()
        if self.view > len(inp.views):
            raise UserError(f"preprocessor.params.view={self.view} but this run has {len(inp.views)} feature views")
        meta_idx = np.asarray(inp.meta_idx, dtype=np.int64)
        meta_labels = np.asarray(inp.meta_labels, dtype=np.int64)
        if meta_idx.size == 0:
            raise UserError("preprocessor 'trusted_centroid' needs a trusted subset; set trusted.source")
        x = np.asarray(inp.views[self.view - 1], dtype=np.float32)
        c = inp.num_classes
        centroids = np.zeros((c, x.shape[1]), dtype=np.float32)
        np.add.at(centroids, meta_labels, x[meta_idx])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        sims = x @ centroids.T
        sims[:, np.bincount(meta_labels, minlength=c) == 0] = -np.inf  # a class without trusted samples
        logits = sims / self.temperature
        soft = np.exp(logits - logits.max(1, keepdims=True))
        soft /= soft.sum(1, keepdims=True)
        eye = np.eye(c, dtype=np.float32)
        soft = (1 - self.noisy_weight) * soft + self.noisy_weight * eye[np.asarray(inp.noisy, dtype=np.int64)]
        soft[meta_idx] = eye[meta_labels]  # trusted rows keep their trusted labels
        soft = soft.astype(np.float32)
        return PurifyResult(soft=soft, hard=soft.argmax(1).astype(np.int64), confidence=soft.max(1),
                            info={"temperature": self.temperature, "view": self.view,
                                  "noisy_weight": self.noisy_weight},
                            seconds=time.perf_counter() - t0)
