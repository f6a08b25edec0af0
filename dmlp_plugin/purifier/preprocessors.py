"""Preprocessors: configured objects with one verb, ``purify(PurifyInputs) -> PurifyResult``.

Each is a frozen dataclass whose fields are its parameters (validated when built from a config).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from dmlp_plugin.checks import knn
from dmlp_plugin.purifier import dmlp
from dmlp_plugin.records import PurifyInputs, PurifyResult


def _from_soft(soft: np.ndarray, inp: PurifyInputs, t0: float, **extra) -> PurifyResult:
    soft = soft.astype(np.float32, copy=True)
    soft[inp.meta_idx] = np.eye(inp.num_classes, dtype=np.float32)[inp.meta_labels]
    return PurifyResult(soft=soft, hard=soft.argmax(1).astype(np.int64), confidence=soft.max(1),
                        seconds=time.perf_counter() - t0, **extra)


@dataclass(frozen=True)
class Identity:
    """Keep the given labels; trusted samples take their trusted labels."""

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        t0 = time.perf_counter()
        return _from_soft(np.eye(inp.num_classes, dtype=np.float32)[inp.noisy], inp, t0)


@dataclass(frozen=True)
class KnnVote:
    """Relabel each sample by the similarity-weighted vote (weight exp(sim/temperature)) of its k nearest
    neighbours on view 1, trusted samples voting with their trusted labels. The honest baseline DMLP must
    beat: it uses the same features and the same trusted labels."""

    k: int = 20
    temperature: float = 0.1

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        t0 = time.perf_counter()
        labels = np.asarray(inp.noisy).copy()
        labels[inp.meta_idx] = inp.meta_labels
        sims, idx = knn.search(inp.views[0], self.k)
        soft = knn.vote(sims, idx, labels, inp.num_classes, self.temperature)
        return _from_soft(soft, inp, t0, info={"k": self.k, "backend": knn.backend_name()})


@dataclass(frozen=True)
class TrustedOnly:
    """Ignore the noisy labels: a multinomial logistic regression fitted on the trusted subset alone
    (view 1) labels every sample. What the trusted labels are worth without any purification."""

    c: float = 1.0

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - heavy import, used here only

        t0 = time.perf_counter()
        x = np.asarray(inp.views[0], dtype=np.float32)
        present = np.unique(inp.meta_labels)
        clf = LogisticRegression(C=self.c, max_iter=2000).fit(x[inp.meta_idx], inp.meta_labels)
        soft = np.zeros((x.shape[0], inp.num_classes), dtype=np.float32)
        soft[:, present] = clf.predict_proba(x)
        return _from_soft(soft, inp, t0)


@dataclass(frozen=True)
class DMLP(dmlp.DMLPConfig):
    """Decoupled Meta Label Purifier; parameters are those of :class:`dmlp.DMLPConfig` (its ``seed`` is
    replaced by the run's seed)."""

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        cfg = replace(self, seed=inp.seed)
        return dmlp.purify(inp.views, inp.noisy, inp.meta_idx, inp.meta_labels, inp.num_classes, cfg,
                           truth=inp.truth, device=inp.device, progress=inp.progress, checkpoint=inp.checkpoint)
