"""Nearest-neighbour checks on L2-normalised features: faiss inner-product search (GPU index when faiss-gpu
and a CUDA device are present, CPU index otherwise, exact torch search when faiss is not installed).

Uses: (a) automatic selection of a trusted meta set, (b) a per-sample neighbour-agreement score,
(c) the ``knn_vote`` relabelling baseline (weighted vote, lightly's kNN semantics: weight exp(sim / T)),
swept over a k grid from one search at the largest k (:func:`vote_at`) on each view and on the views
concatenated (:func:`view_set`).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict

import numpy as np
import torch

from dmlp_plugin.checks import index as ix
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


# Self-searches kept for reuse: the features do not change between the checks, comparisons and cells of one
# process (the knn sweep's lists at k = 245 serve the neighbour-agreement check at k = 10, and a benchmark's
# next noise setting), so an exact search of the same matrix is done once. Keyed by a digest of the matrix;
# least recently used first out, at most SEARCH_CACHE_BYTES of neighbour lists. DMLP_KNN_CACHE=0 turns it off.
SEARCH_CACHE_BYTES = 6 << 30
_SEARCH_CACHE: "OrderedDict[tuple, tuple[np.ndarray, np.ndarray]]" = OrderedDict()


def _digest(x: np.ndarray) -> str:
    h = hashlib.sha1(str((x.shape, x.dtype.str)).encode(), usedforsecurity=False)
    h.update(memoryview(np.ascontiguousarray(x)).cast("B"))
    return h.hexdigest()


def clear_caches() -> None:
    """Forget the neighbour lists and the approximate indexes kept for reuse in this process."""
    _SEARCH_CACHE.clear()
    ix.clear_cache()


def _cached_search(key: tuple, n: int, k: int, run) -> tuple[np.ndarray, np.ndarray]:
    """``run(k)``'s lists, or the first k columns of lists kept for ``key`` at k or more. The caller owns a
    copy, except of lists over ``SHARE_ABOVE_BYTES``: those come read-only, shared with the kept ones (at
    1,000,000 rows and k = 400 they are 4.8 GB)."""
    if os.environ.get("DMLP_KNN_CACHE", "1") == "0":
        return run(k)
    hit = _SEARCH_CACHE.get(key)
    if hit is not None and hit[1].shape[1] >= min(k, n - 1):
        _SEARCH_CACHE.move_to_end(key)
        return _handed(hit[0][:, :k], hit[1][:, :k])
    sims, idx = run(k)
    sims.setflags(write=False)
    idx.setflags(write=False)
    _SEARCH_CACHE[key] = (sims, idx)
    while sum(s.nbytes + i.nbytes for s, i in _SEARCH_CACHE.values()) > SEARCH_CACHE_BYTES and len(_SEARCH_CACHE) > 1:
        _SEARCH_CACHE.popitem(last=False)
    if sims.nbytes + idx.nbytes > SEARCH_CACHE_BYTES:
        _SEARCH_CACHE.pop(key, None)
    return _handed(sims, idx)


SHARE_ABOVE_BYTES = 256 << 20


def _handed(sims: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if sims.nbytes + idx.nbytes > SHARE_ABOVE_BYTES:
        return sims, idx
    return sims.copy(), idx.copy()


def search(features, k: int, queries: np.ndarray | None = None, exclude_self: bool = True,
           backend: str = "auto", chunk: int = 4096, shard: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours by inner product (cosine for L2-normalised rows).

    features: (N, d) float32 database (an array or a np.memmap). queries: (Q, d) or None for the database
    itself, in which case ``exclude_self`` drops each sample from its own list. Returns sims (Q, k) float32 and
    indices (Q, k) int64, best first. Exact below ``checks.index.threshold`` database rows, an approximate faiss
    index at or above it (:mod:`dmlp_plugin.checks.index`: built once per matrix, its recall recorded).
    A self-search (no queries, exclude_self) of a matrix searched before in this process at k or more is
    served from memory (the first k columns of the longer lists: the same neighbours).

    Under P processes (torchrun / accelerate launch) with ``shard`` (the default: every process passes the
    same features and queries), each process searches its block of the queries and the lists are gathered,
    so every process returns what one process would; ``shard=False`` when each process passes its own queries.
    """
    backend = backend_name() if backend == "auto" else backend
    n = int(features.shape[0])
    kind = ix.plan(n)
    dist = _dist() if shard else None
    if kind != "exact":
        if queries is None and exclude_self:
            key = (ix.digest(features), backend, kind, ix.current())
            return _cached_search(key, n, k, lambda kk: _approx_search(features, kk, None, True, backend, kind, dist))
        return _approx_search(features, k, queries, exclude_self, backend, kind, dist)
    if queries is None and exclude_self:
        x = np.ascontiguousarray(features, dtype=np.float32)
        return _cached_search((_digest(x), backend), n, k, lambda kk: _sharded(x, kk, None, True, backend, chunk, dist))
    return _sharded(features, k, queries, exclude_self, backend, chunk, dist)


def _dist():
    """This process's place in a launch (``Dist()`` when there is no process group)."""
    from dmlp_plugin.distributed import Dist  # noqa: PLC0415

    td = torch.distributed
    if td.is_available() and td.is_initialized() and td.get_world_size() > 1:
        return Dist(rank=td.get_rank(), world_size=td.get_world_size())
    return Dist()


def _gather(dist, parts: tuple[np.ndarray, np.ndarray], nq: int) -> tuple[np.ndarray, np.ndarray]:
    """Every process's block of neighbour lists (rows ``dist.block(nq)``), in query order, on every process."""
    if dist is None or dist.world_size == 1:
        return parts
    sims, idx = (dist.gather_blocks(torch.from_numpy(np.ascontiguousarray(a)), nq).numpy() for a in parts)
    return sims, idx


def _sharded(features, k, queries, exclude_self, backend, chunk, dist):
    if dist is None or dist.world_size == 1:
        return _search(features, k, queries, exclude_self, backend, chunk)
    nq = int(features.shape[0] if queries is None else queries.shape[0])
    lo, hi = dist.block(nq)
    if queries is None:  # a self-search: my block of rows against all, each row's own id dropped
        x = np.ascontiguousarray(features, dtype=np.float32)
        ids = np.arange(lo, hi) if exclude_self else None
        part = _search(x, k, x[lo:hi], exclude_self, backend, chunk, self_ids=ids)
    else:
        part = _search(features, k, queries[lo:hi], exclude_self, backend, chunk)
    return _gather(dist, part, nq)


def _approx_search(features, k, queries, exclude_self, backend, kind, dist):
    n, d = int(features.shape[0]), int(features.shape[1])

    def rows(sel):
        return np.asarray(features[sel], dtype=np.float32)

    built = ix.cached_build(ix.digest(features), rows, n, d, kind, gpu=backend == "faiss-gpu")
    drop_self = exclude_self and queries is None
    nq = n if queries is None else int(queries.shape[0])
    lo, hi = dist.block(nq) if dist is not None else (0, nq)
    if kind == "ivf":  # sharded by cells, not by queries: the same lists whatever the process count
        if drop_self:
            return ix.whole_search(built, k)
        return ix.whole_search(built, k, rows(slice(0, n)) if queries is None else queries)
    out_s, out_i = [], []
    for a in range(lo, hi, 65536):
        b = min(hi, a + 65536)
        q = rows(slice(a, b)) if queries is None else np.asarray(queries[a:b], dtype=np.float32)
        s, i = built.search(q, min(k + int(drop_self), n))
        if drop_self:
            s, i = ix.drop_ids(s, i, np.arange(a, b)[:, None])
        out_s.append(s[:, :k])
        out_i.append(i[:, :k])
    part = (np.concatenate(out_s) if out_s else np.zeros((0, k), np.float32),
            np.concatenate(out_i) if out_i else np.zeros((0, k), np.int64))
    return _gather(dist, part, nq)


def _search(features, k, queries, exclude_self, backend, chunk, self_ids=None):
    """Exact search. ``self_ids``: the queries are database rows with these ids (a process's block of a
    self-search), each dropped from its own list."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    q = x if queries is None else np.ascontiguousarray(queries, dtype=np.float32)
    drop_self = (exclude_self and queries is None) or self_ids is not None
    kk = min(k + int(drop_self), x.shape[0])
    if backend.startswith("faiss"):
        faiss = _faiss()
        index = faiss.IndexFlatIP(x.shape[1])
        if backend == "faiss-gpu":
            gpu = torch.cuda.current_device()  # cuda:N: resolve_device set it
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)
        index.add(x)
        sims, idx = index.search(q, kk)
    else:
        xt = torch.from_numpy(x)
        out_s, out_i = [], []
        for i in range(0, q.shape[0], chunk):
            s, j = torch.topk(torch.from_numpy(q[i:i + chunk]) @ xt.T, kk, dim=1)
            out_s.append(s.numpy())
            out_i.append(j.numpy())
        sims, idx = (np.concatenate(out_s), np.concatenate(out_i)) if out_s else \
            (np.zeros((0, kk), np.float32), np.zeros((0, kk), np.int64))
    idx = idx.astype(np.int64)
    if drop_self:
        ids = np.arange(q.shape[0]) if self_ids is None else np.asarray(self_ids)
        sims, idx = ix.drop_ids(sims, idx, ids[:, None])
    return sims[:, :k].astype(np.float32), idx[:, :k]


def neighbour_agreement(idx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Fraction of each sample's neighbours (idx: (N, k)) whose label equals its own; (N,) float32."""
    labels = np.asarray(labels)
    return (labels[idx] == labels[:, None]).mean(axis=1).astype(np.float32)


def vote(sims: np.ndarray, idx: np.ndarray, labels: np.ndarray, num_classes: int,
         temperature: float = 0.1) -> np.ndarray:
    """Weighted neighbour vote: (N, C) distribution, weight of neighbour j = exp(sim_j / T)."""
    return vote_at(sims, idx, labels, num_classes, [idx.shape[1]], temperature)[idx.shape[1]]


def vote_at(sims: np.ndarray, idx: np.ndarray, labels: np.ndarray, num_classes: int, ks,
            temperature: float = 0.1, chunk: int = 65536) -> dict[int, np.ndarray]:
    """:func:`vote` for several k from ONE neighbour list: sims, idx (N, K) best first (as :func:`search`
    returns them) and each k <= K; the vote at k uses the first k columns, which are the k nearest
    neighbours, so it equals a fresh search at k followed by :func:`vote` (up to ties in similarity).
    The weights are shifted by each row's top similarity (column 0 whatever k is). Returns {k: (N, C)
    float32}; one pass over the columns, accumulating the slice between consecutive k."""
    idx = np.asarray(idx)
    n, kmax = idx.shape
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > kmax:
        raise ValueError(f"ks {ks} must lie in 1..{kmax} (the neighbour lists' length)")
    labels = np.asarray(labels, dtype=np.int64)
    out = {k: np.empty((n, num_classes), dtype=np.float32) for k in ks}
    for a in range(0, n, chunk):  # rows in blocks: the temporaries are O(chunk * K), not O(N * K)
        b = min(n, a + chunk)
        s = np.asarray(sims[a:b], dtype=np.float32)
        w = np.exp((s - s[:, :1]) / temperature)
        m = b - a
        acc = np.zeros(m * num_classes, dtype=np.float64)
        rows = np.arange(m, dtype=np.int64)[:, None] * num_classes
        start = 0
        for k in ks:
            if k > start:
                flat = (rows + labels[idx[a:b, start:k]]).ravel()
                acc += np.bincount(flat, weights=w[:, start:k].ravel().astype(np.float64), minlength=m * num_classes)
                start = k
            table = acc.reshape(m, num_classes)
            out[k][a:b] = table / table.sum(axis=1, keepdims=True)
    return out


def k_grid(n: int, ks="auto") -> list[int]:
    """The k values the ``knn_vote`` comparison tries on ``n`` samples. ``auto``: 5, 10, 20, 50, 100, 200,
    300, 400 up to max(200, sqrt(n)) (capped at 400), that bound itself when it lies well past the last grid
    value (e.g. 245 for n = 60,000), and never more than n - 1 (a sample is not its own neighbour).
    A list: those values (positive integers), the ones above n - 1 replaced by n - 1."""
    if n < 2:
        raise UserError(f"the knn_vote comparison needs at least 2 samples, got {n}")
    check_ks(ks)
    if ks == "auto":
        top = min(400, max(200, int(np.ceil(np.sqrt(n)))), n - 1)
        grid = [k for k in (5, 10, 20, 50, 100, 200, 300, 400) if k <= top]
        if not grid or top > 1.2 * grid[-1]:
            grid.append(top)
        return grid
    return sorted({min(int(k), n - 1) for k in ks})


def check_ks(ks) -> None:
    """``checks.vote_ks`` is ``auto`` or a non-empty list of positive integers; else UserError."""
    if isinstance(ks, str) and ks == "auto":
        return
    if isinstance(ks, (list, tuple)):
        bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    else:
        bad = [ks]
    if bad or not ks:
        what = "give at least one k" if not bad else f"{bad[0]!r} is not a positive integer"
        raise UserError(f"checks.vote_ks={ks!r}: {what}; use auto or a list of positive integers such as [5, 20, 100]")


def view_set(views: list, which: str) -> np.ndarray:
    """The features a neighbour search of ``which`` runs on: view ``"1"``, ``"2"``, ... alone, or ``"all"``:
    the distinct views (a repeat of an earlier view is left out), each L2-normalised, concatenated and
    renormalised (the inner product is then the mean of the views' cosine similarities). views: (N, d_v)."""
    if which == "all":
        keep = _distinct(views)
        if len(keep) == 1:
            return _l2(views[keep[0]])
        return _l2(np.concatenate([_l2(views[i]) for i in keep], axis=1))
    if not (isinstance(which, str) and which.isdigit() and 1 <= int(which) <= len(views)):
        raise UserError(f"views={which!r} is not one of the {len(views)} feature views; use "
                        f"{', '.join(repr(str(i + 1)) for i in range(len(views)))} or 'all' (concatenated)")
    return np.asarray(views[int(which) - 1], dtype=np.float32)


def distinct_view_sets(views: list) -> list[str]:
    """Each view alone and all views concatenated, without repeats: a view equal to an earlier one
    (``features.second_view: same``) adds nothing, and with one distinct view ``all`` is that view."""
    singles = _distinct(views)
    return [str(i + 1) for i in singles] + (["all"] if len(singles) > 1 else [])


def _distinct(views: list) -> list[int]:
    keep = []
    for i, v in enumerate(views):
        if not any(v is views[j] or (v.shape == views[j].shape and np.array_equal(v, views[j])) for j in keep):
            keep.append(i)
    return keep


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
    x = _l2(np.asarray(features[np.sort(np.asarray(meta_idx))], dtype=np.float32))
    order = np.argsort(np.asarray(meta_idx), kind="stable")
    x = x[np.argsort(order, kind="stable")]  # back to meta_idx's order (rows read in file order: a memory map)
    _, nearest = search(x, 1)  # O(M) memory: at 1,000,000 rows and 2% trusted, M = 20,000
    accuracy = float(np.mean(labels[nearest[:, 0]] == labels))
    counts = np.bincount(labels).astype(np.float64)
    chance = float(np.sum(counts * (counts - 1)) / (m * (m - 1)))
    if chance == 0.0:  # no class has two trusted samples: a neighbour can never share the label
        return None
    line = chance + 3.0 * float(np.sqrt(chance * (1.0 - chance) / m))
    return {"accuracy": accuracy, "chance": chance, "at_chance": accuracy <= line, "trusted": m}
