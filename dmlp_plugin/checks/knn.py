"""Nearest-neighbour checks on L2-normalised features: faiss inner-product search (GPU index when faiss-gpu
and a CUDA device are present, CPU index otherwise, exact torch search when faiss is not installed).

Uses: (a) automatic selection of a trusted meta set, (b) a per-sample neighbour-agreement score,
(c) the ``knn_vote`` relabelling baseline (weighted vote, lightly's kNN semantics: weight exp(sim / T)).
"""

from __future__ import annotations

import numpy as np
import torch

from dmlp_plugin.errors import UserError


def _faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError:
        return None
    return faiss


def backend_name() -> str:
    """Which search backend :func:`search` uses on this machine: faiss-gpu, faiss-cpu or torch."""
    faiss = _faiss()
    if faiss is None:
        return "torch"
    if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    return "faiss-cpu"


def search(features: np.ndarray, k: int, queries: np.ndarray | None = None, exclude_self: bool = True,
           backend: str = "auto", chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours by inner product (cosine for L2-normalised rows).

    features: (N, d) float32 database. queries: (Q, d) or None for the database itself, in which case
    ``exclude_self`` drops each sample from its own list. Returns sims (Q, k) float32 and indices (Q, k)
    int64, best first.
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    q = x if queries is None else np.ascontiguousarray(queries, dtype=np.float32)
    drop_self = exclude_self and queries is None
    kk = min(k + int(drop_self), x.shape[0])
    backend = backend_name() if backend == "auto" else backend
    if backend.startswith("faiss"):
        faiss = _faiss()
        index = faiss.IndexFlatIP(x.shape[1])
        if backend == "faiss-gpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(x)
        sims, idx = index.search(q, kk)
    else:
        xt = torch.from_numpy(x)
        out_s, out_i = [], []
        for i in range(0, q.shape[0], chunk):
            s, j = torch.topk(torch.from_numpy(q[i:i + chunk]) @ xt.T, kk, dim=1)
            out_s.append(s.numpy())
            out_i.append(j.numpy())
        sims, idx = np.concatenate(out_s), np.concatenate(out_i)
    idx = idx.astype(np.int64)
    if drop_self:
        # remove the sample itself wherever it appears (ties may put a duplicate first)
        rows = np.arange(q.shape[0])[:, None]
        keep = idx != rows
        order = np.argsort(~keep, axis=1, kind="stable")[:, : kk - 1]
        sims = np.take_along_axis(sims, order, axis=1)
        idx = np.take_along_axis(idx, order, axis=1)
    return sims[:, :k].astype(np.float32), idx[:, :k]


def neighbour_agreement(idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Fraction of each sample's neighbours (idx: (N, k)) whose label equals its own; (N,) float32."""
    labels = np.asarray(labels)
    return (labels[idx] == labels[:, None]).mean(axis=1).astype(np.float32)


def vote(sims: np.ndarray, idx: np.ndarray, labels: np.ndarray, num_classes: int,
         temperature: float = 0.1) -> np.ndarray:
    """Weighted neighbour vote: (N, C) distribution, weight of neighbour j = exp(sim_j / T)."""
    w = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
    out = np.zeros((idx.shape[0], num_classes), dtype=np.float64)
    np.add.at(out, (np.repeat(np.arange(idx.shape[0]), idx.shape[1]), np.asarray(labels)[idx].ravel()), w.ravel())
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def select_meta(features: np.ndarray, labels: np.ndarray, num_classes: int, size: int, k: int = 10,
                backend: str = "auto") -> np.ndarray:
    """Pick a class-balanced trusted set without true labels: within each given class, the samples whose
    k nearest neighbours agree most with their label (ties broken by index). Returns sorted indices.

    This is our extension (the paper assumes a clean subset): it trusts the densest, most consistent
    region of each class, which is clean with high probability when the noise is not dominant locally.
    """
    labels = np.asarray(labels)
    _, idx = search(features, k, backend=backend)
    agree = neighbour_agreement(idx, labels)
    per_class = max(1, size // num_classes)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            raise UserError(f"trusted.source=knn_auto: no sample carries label {c}; give a trusted index file instead")
        order = members[np.lexsort((members, -agree[members]))]
        chosen.append(order[:per_class])
    return np.sort(np.concatenate(chosen))


def trusted_separability(features: np.ndarray, meta_idx: np.ndarray, meta_labels: np.ndarray) -> dict | None:
    """Do the features tell the trusted samples' classes apart? Leave-one-out 1-nearest-neighbour accuracy
    among the trusted samples (cosine), with what features unrelated to the images would score: the chance
    that a random other trusted sample has the same label, and a line 3 standard errors above it. Features
    whose rows are not in the data set's order score at chance. None when no class has two trusted samples."""
    m = int(np.asarray(meta_idx).size)
    labels = np.asarray(meta_labels, dtype=np.int64)
    if m < 2:
        return None
    x = np.asarray(features[np.asarray(meta_idx)], dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    accuracy = float(np.mean(labels[sims.argmax(axis=1)] == labels))
    counts = np.bincount(labels).astype(np.float64)
    chance = float(np.sum(counts * (counts - 1)) / (m * (m - 1)))
    if chance == 0.0:  # no class has two trusted samples: a neighbour can never share the label
        return None
    line = chance + 3.0 * float(np.sqrt(chance * (1.0 - chance) / m))
    return {"accuracy": accuracy, "chance": chance, "at_chance": accuracy <= line, "trusted": m}
