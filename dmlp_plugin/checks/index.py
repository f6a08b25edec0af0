"""Neighbour search at Clothing1M size: exact below a size threshold, an approximate faiss index above it.

Every neighbour search of a run (the ``knn_vote`` comparison, ``knn_auto`` trusted selection, the
neighbour-agreement score and DMLP's neighbour readout) asks :func:`plan` which kind of search a database of
N rows gets. Exact search (faiss ``IndexFlatIP`` or torch) costs O(N^2 d) for a self-search: about 11 s at
50,000 x 512 rows on 2 cores, roughly 75 minutes at 1,000,000. Above ``threshold`` rows (``auto``, default
200,000) an approximate index is used instead:

- ``ivf`` (the default approximate kind): an inverted-file index of ``nlist`` cells (faiss k-means, spherical,
  10 iterations, on a strided training sample; ``nlist`` ``auto``: 2 sqrt(N), at most N / 39 so each centroid
  has 39 training rows; ``train_size`` ``auto``: 40 rows a cell). Every row is filed under its nearest centroid
  and the rows are kept grouped by cell (one float32 copy, like faiss's IVF-Flat lists). A query filed under
  cell c is compared exactly with every row of the ``nprobe`` cells whose centroids are nearest c's (c
  included). All queries of one cell share those candidates, so the search runs as one matrix product per
  cell (BLAS speed: a per-query IVF scan is memory-bound on a CPU, ~4x slower here) followed by a top-k.
  Deterministic: k-means and the products give the same cells and neighbours whatever the thread count.
- ``hnsw``: faiss ``IndexHNSWFlat`` (``hnsw_m`` links a node, ``ef_construction``, ``ef_search``). Its
  multi-threaded build is not reproducible, so it is built with one thread (slower to build, deterministic).

Each approximate index measures its own recall: for ``recall_sample`` database rows (a fixed stride) the
``recall_k`` nearest neighbours (self excluded) by exact search against the whole database, compared with the
index's; the recall, the parameters and the seconds are kept in :func:`records` (the pipeline writes them into
``metrics.json`` as ``neighbour_index``). The database is read through a ``rows(selection)`` function, block by
block, so a memory-mapped matrix is never copied whole; the approximate index itself holds one copy of the
rows (N d 4 bytes) plus the cells.

The settings of a run are installed with :func:`using` (the purify stage does it for ``checks.index``); outside
one, the defaults apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dmlp_plugin.errors import UserError

KINDS = ("auto", "exact", "ivf", "hnsw")
Rows = Callable[[object], np.ndarray]  # rows(slice or int array) -> float32 (len, d)


@dataclass(frozen=True)
class IndexSettings:
    """``checks.index``: which neighbour search a database of N rows gets (see the module docstring).
    kind: ``auto`` (exact below ``threshold`` rows, ``ivf`` at or above), ``exact``, ``ivf`` or ``hnsw``."""

    kind: str = "auto"
    threshold: int = 200_000
    nlist: int | str = "auto"
    nprobe: int = 16
    train_size: int | str = "auto"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    recall_sample: int = 1000
    recall_k: int = 10

    @classmethod
    def from_dict(cls, given: dict | None) -> "IndexSettings":
        """Build from the config's ``checks.index`` mapping; unknown keys and bad values: UserError."""
        given = dict(given or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in given:
            if key not in names:
                raise UserError(f"checks.index: unknown key {key!r}; known keys: {', '.join(names)}")
        out = cls(**given)
        out.check()
        return out

    def check(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"checks.index.kind={self.kind!r} is not known; use {', '.join(KINDS)}")
        for name in ("threshold", "nprobe", "hnsw_m", "ef_construction", "ef_search", "recall_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"checks.index.{name}={v!r} must be a positive integer")
        if isinstance(self.recall_sample, bool) or not isinstance(self.recall_sample, int) or self.recall_sample < 0:
            raise UserError(f"checks.index.recall_sample={self.recall_sample!r} must be a count >= 0 (0: not measured)")
        for name in ("nlist", "train_size"):
            v = getattr(self, name)
            if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UserError(f"checks.index.{name}={v!r} must be auto or a positive integer")

    def plan(self, n: int) -> str:
        """The search a database of ``n`` rows gets: ``exact``, ``ivf`` or ``hnsw``."""
        if self.kind == "auto":
            return "ivf" if n >= self.threshold else "exact"
        return self.kind

    def cells(self, n: int) -> int:
        """IVF cells for ``n`` rows: ``nlist`` or 2 sqrt(n), at most n // 39 (and at least 1)."""
        want = int(round(2 * math.sqrt(n))) if self.nlist == "auto" else int(self.nlist)
        return max(1, min(want, n // 39))

    def training_rows(self, n: int, cells: int) -> int:
        return min(n, 40 * cells if self.train_size == "auto" else int(self.train_size))


_CURRENT: list[IndexSettings] = [IndexSettings()]
_RECORDS: list[dict] = []


@contextlib.contextmanager
def using(settings: IndexSettings):
    """Within the block, every search plans with ``settings``; the records made inside are kept."""
    _CURRENT.append(settings)
    try:
        yield settings
    finally:
        _CURRENT.pop()


def current() -> IndexSettings:
    return _CURRENT[-1]


def plan(n: int) -> str:
    """The kind of search (``exact``, ``ivf``, ``hnsw``) a database of ``n`` rows gets under the current settings."""
    return current().plan(n)


def records() -> list[dict]:
    """What each approximate index built in this process measured (kind, rows, parameters, recall, seconds)."""
    return [dict(r) for r in _RECORDS]


def clear_records() -> None:
    _RECORDS.clear()


class ApproxIndex:
    """An approximate inner-product index over N rows (:func:`build`); ``search`` returns global row ids."""

    def __init__(self, faiss_index, n: int, d: int, record: dict):
        self.index, self.n, self.d, self.record = faiss_index, n, d, record

    def search(self, queries: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) sims float32 and ids int64, best first; a row the index found fewer than k neighbours for
        is padded with id -1 and similarity -inf (only with tiny cells; the recall check sees it)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(int(k), self.n)
        sims = np.empty((q.shape[0], k), dtype=np.float32)
        idx = np.empty((q.shape[0], k), dtype=np.int64)
        for a in range(0, q.shape[0], chunk):
            s, i = self.index.search(q[a:a + chunk], k)
            sims[a:a + chunk], idx[a:a + chunk] = s, i
        sims[idx < 0] = -np.inf
        return sims, idx


class CellIndex:
    """The ``ivf`` index (module docstring): rows grouped by cell, each cell's ``nprobe`` nearest cells."""

    def __init__(self, xs, order: np.ndarray, offsets: np.ndarray, centroids: np.ndarray, near: np.ndarray,
                 record: dict):
        self.xs, self.order, self.offsets, self.centroids, self.near, self.record = \
            xs, order, offsets, centroids, near, record
        self.n, self.d = int(xs.shape[0]), int(xs.shape[1])
        self.device = xs.device
        self.position = np.empty(self.n, dtype=np.int64)  # original row id -> place in xs
        self.position[order] = np.arange(self.n, dtype=np.int64)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def self_search(self, qid: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest neighbours of database rows ``qid`` (each row's own id excluded): (Q, k) float32 sims
        and int64 ids, best first; id -1 (sim -inf) where a cell's candidates run out."""
        qpos = self.position[np.asarray(qid, dtype=np.int64)]
        cells = np.searchsorted(self.offsets, qpos, side="right") - 1
        return self._grouped(cells, lambda sel: self.xs[self._t(qpos[sel])], qpos, k)

    def search(self, queries: np.ndarray, k: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows of each query vector (queries (Q, d)), best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self._grouped(self.cells_of(q, block), lambda sel: self._t(q[sel]), None, k)

    def cells_of(self, q: np.ndarray, block: int = 65536) -> np.ndarray:
        """The cell each query vector is filed under (its nearest centroid), in fixed blocks of rows."""
        if not q.shape[0]:
            return np.zeros(0, np.int64)
        return np.concatenate([np.argmax(q[a:a + block] @ self.centroids.T, axis=1)
                               for a in range(0, q.shape[0], block)])

    def share(self, k: int, rank: int = 0, world: int = 1, queries: np.ndarray | None = None,
              block: int = 65536, out=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Process ``rank`` of ``world``'s share of a whole search: the queries filed under cells c with
        c % world == rank, each cell's queries batched exactly as one process batches them (so every list is
        bit for bit what one process computes). ``queries`` None: every database row (a self-search, own id
        excluded). Returns (query numbers: row ids or query positions, sims (m, k), ids (m, k))."""
        mine_cells = np.arange(rank, len(self.offsets) - 1, world)
        if queries is None:
            qpos = np.concatenate([np.arange(self.offsets[c], self.offsets[c + 1]) for c in mine_cells] or
                                  [np.zeros(0, np.int64)])
            cells = np.searchsorted(self.offsets, qpos, side="right") - 1
            if world == 1 and out is not None:  # straight into the caller's (N, k) arrays, in row order
                self._grouped(cells, lambda sel: self.xs[self._t(qpos[sel])], qpos, k, out=(*out, self.order[qpos]))
                return self.order[qpos], out[0], out[1]
            sims, ids = self._grouped(cells, lambda sel: self.xs[self._t(qpos[sel])], qpos, k)
            return self.order[qpos], sims, ids
        q = np.ascontiguousarray(queries, dtype=np.float32)
        cells = self.cells_of(q, block)
        picked = np.flatnonzero(cells % world == rank)
        sims, ids = self._grouped(cells[picked], lambda sel: self._t(q[picked[sel]]), None, k)
        return picked, sims, ids


    def _grouped(self, cells: np.ndarray, vectors, qpos, k: int, chunk: int = 4096, out=None):
        """Lists of queries 0..len(cells)-1 (query j filed under cells[j]; ``vectors(sel)`` their vectors;
        ``qpos`` their places in xs for a self-search, else None), batched by cell. ``out``: (sims, ids, rows)
        to write query j's lists into row rows[j] of (instead of new (Q, k) arrays)."""
        nq = cells.size
        k = min(int(k), self.n - (1 if qpos is not None else 0))
        if out is None:
            sims = np.full((nq, k), -np.inf, dtype=np.float32)
            ids = np.full((nq, k), -1, dtype=np.int64)
            place = None
        else:
            sims, ids, place = out
        by_cell = np.argsort(cells, kind="stable")
        bounds = np.searchsorted(cells[by_cell], np.arange(len(self.offsets)))
        off = self.offsets
        for c in range(len(off) - 1):
            mine = by_cell[bounds[c]:bounds[c + 1]]
            if mine.size == 0:
                continue
            cand = np.concatenate([np.arange(off[u], off[u + 1]) for u in self.near[c]])
            xc = self.xs[self._t(cand)]
            kk = min(k + (1 if qpos is not None else 0), cand.size)
            for a in range(0, mine.size, chunk):
                sel = mine[a:a + chunk]
                prod = vectors(sel) @ xc.T
                if qpos is not None:  # a row is not its own neighbour
                    own = self._t(qpos[sel][:, None] == cand[None, :])
                    prod.masked_fill_(own, -float("inf"))
                top_s, top_j = torch.topk(prod, kk, dim=1)
                top_s, top_j = top_s.cpu().numpy(), top_j.cpu().numpy()
                got = self.order[cand[top_j]]
                got[~np.isfinite(top_s)] = -1
                m = min(k, kk)
                rows = sel if place is None else place[sel]
                sims[rows, :m], ids[rows, :m] = top_s[:, :m], got[:, :m]
        return sims, ids


def whole_search(index: CellIndex, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every query's k nearest neighbours (``queries`` None: every row's, own id excluded) in query order. Under
    P processes (a torch.distributed group) each process searches its share of the cells (:meth:`CellIndex.share`)
    and every process gets all lists; the same lists, bit for bit, as one process."""
    td = torch.distributed
    world = td.get_world_size() if td.is_available() and td.is_initialized() else 1
    rank = td.get_rank() if world > 1 else 0
    nq = index.n if queries is None else int(queries.shape[0])
    width = min(int(k), index.n - (1 if queries is None else 0))
    out_s = np.full((nq, width), -np.inf, dtype=np.float32)
    out_i = np.full((nq, width), -1, dtype=np.int64)
    if world == 1 and queries is None:  # written in place: no second (N, k) copy
        index.share(k, 0, 1, None, out=(out_s, out_i))
        return out_s, out_i
    who, sims, ids = index.share(k, rank, world, queries)
    if world == 1:
        out_s[who], out_i[who] = sims, ids
        return out_s, out_i
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    td.all_gather(counts, torch.tensor([who.size], dtype=torch.int64))
    width = max(int(c) for c in counts)
    parts = []
    for a in (who.astype(np.int64)[:, None], sims, ids):
        t = torch.from_numpy(np.ascontiguousarray(a))
        pad = torch.zeros((width, t.shape[1]), dtype=t.dtype)
        pad[: t.shape[0]] = t
        got = [torch.empty_like(pad) for _ in range(world)]
        td.all_gather(got, pad)
        parts.append(torch.cat([g[: int(c)] for g, c in zip(got, counts)]).numpy())
    rows = parts[0][:, 0]
    out_s[rows], out_i[rows] = parts[1], parts[2]
    return out_s, out_i

def build_cells(rows: Rows, n: int, d: int, settings: IndexSettings | None = None, block: int = 65536,
                device: str = "cpu") -> CellIndex:
    """The ``ivf`` index over rows ``rows(selection)`` of an n x d database, read block by block; its recall
    against exact search is measured on ``recall_sample`` rows and appended to :func:`records`. ``device``
    ``cuda``: the grouped rows, the products and the top-k live on the GPU (N d 4 bytes of its memory)."""
    faiss = _faiss_or_error("ivf")
    s = settings or current()
    t0 = time.perf_counter()
    cells = s.cells(n)
    train = _strided(n, s.training_rows(n, cells))
    km = faiss.Kmeans(d, cells, niter=10, seed=1234, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(rows(train), dtype=np.float32))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    flat = faiss.IndexFlatIP(d)
    flat.add(centroids)
    home = np.empty(n, dtype=np.int64)
    for a in range(0, n, block):
        home[a:a + block] = flat.search(np.ascontiguousarray(rows(slice(a, min(n, a + block))), dtype=np.float32),
                                        1)[1][:, 0]
    order = np.argsort(home, kind="stable")
    offsets = np.searchsorted(home[order], np.arange(cells + 1)).astype(np.int64)
    xs = torch.empty((n, d), dtype=torch.float32, device=device)
    for a in range(0, n, block):  # the rows grouped by cell (read in file order within each block)
        ids = order[a:a + block]
        sorted_ids = np.sort(ids)
        got = np.asarray(rows(sorted_ids), dtype=np.float32)
        xs[a:a + ids.size] = torch.from_numpy(got[np.searchsorted(sorted_ids, ids)]).to(device)
    probes = min(s.nprobe, cells)
    near = np.argsort(-(centroids @ centroids.T), axis=1, kind="stable")[:, :probes]
    near[:, 0] = np.arange(cells)  # a cell's own rows first (a duplicate centroid could tie)
    sizes = np.diff(offsets)
    record = {"kind": "ivf", "rows": int(n), "dims": int(d), "nlist": int(cells), "nprobe": int(probes),
              "training_rows": int(train.size), "kmeans_iterations": 10,
              "cell_rows": {"min": int(sizes.min()), "median": int(np.median(sizes)), "max": int(sizes.max())},
              "device": str(device),
              "seconds_build": round(time.perf_counter() - t0, 3)}
    out = CellIndex(xs, order, offsets, centroids, near, record)
    if s.recall_sample:
        record.update(_recall(lambda q, k: out.self_search(q, k), rows, n, s.recall_sample, s.recall_k, block))
    _RECORDS.append(record)
    return out


def _faiss_or_error(kind: str):
    try:
        return _faiss()
    except ImportError:
        raise UserError(f"checks.index.kind={kind} (used from {current().threshold} rows) needs faiss; "
                        f"pip install 'dmlp_plugin[faiss]', or set checks.index.kind=exact") from None


def _faiss():
    import faiss  # noqa: PLC0415 - the approximate kinds need faiss (pip install 'dmlp_plugin[faiss]')

    return faiss


def _strided(n: int, count: int) -> np.ndarray:
    count = max(1, min(n, count))
    return np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))


def build(rows: Rows, n: int, d: int, kind: str, settings: IndexSettings | None = None, gpu: bool = False,
          block: int = 65536) -> ApproxIndex:
    """A faiss HNSW index (``kind`` ``hnsw``) over rows ``rows(slice(a, b))`` of an ``n`` x ``d`` database,
    filled block by block with one thread (reproducible); its recall is measured and appended to
    :func:`records`. (``ivf`` is :func:`build_cells`.)"""
    if kind != "hnsw":
        raise ValueError(f"build: kind {kind!r} is not hnsw (ivf: build_cells)")
    faiss = _faiss_or_error(kind)
    s = settings or current()
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(d, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = s.ef_construction
    index.hnsw.efSearch = s.ef_search
    record = {"kind": kind, "rows": int(n), "dims": int(d), "hnsw_m": s.hnsw_m, "ef_construction": s.ef_construction,
              "ef_search": s.ef_search}
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # a multi-threaded HNSW build differs from run to run
    try:
        for a in range(0, n, block):
            index.add(np.ascontiguousarray(rows(slice(a, min(n, a + block))), dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    record["seconds_build"] = round(time.perf_counter() - t0, 3)
    out = ApproxIndex(index, n, d, record)
    if s.recall_sample:
        def approx(qid, k):
            got_s, got_i = out.search(rows(qid), k + 1)
            s_, i_ = drop_ids(got_s, got_i, np.asarray(qid)[:, None])
            return s_[:, :k], i_[:, :k]

        record.update(_recall(approx, rows, n, s.recall_sample, s.recall_k, block))
    _RECORDS.append(record)
    return out


def drop_ids(sims, idx, ids):
    """Remove each row's own id (``ids`` (Q, 1)) wherever it appears (ties may put a duplicate first); a row
    without it loses its last column. Returns (Q, K - 1) lists."""
    keep = idx != ids
    order = np.argsort(~keep, axis=1, kind="stable")[:, : idx.shape[1] - 1]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def exact_self_neighbours(rows: Rows, n: int, qid: np.ndarray, k: int, block: int = 65536):
    """The exact k nearest neighbours (inner product, the row itself excluded) of rows ``qid`` among all n,
    reading the database in blocks: (len(qid), k) sims and ids, ties to the lower id."""
    faiss = _faiss()
    q = np.ascontiguousarray(rows(qid), dtype=np.float32)
    best_s = np.full((qid.size, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((qid.size, 0), dtype=np.int64)
    for a in range(0, n, block):
        db = np.ascontiguousarray(rows(slice(a, min(n, a + block))), dtype=np.float32)
        flat = faiss.IndexFlatIP(db.shape[1])
        flat.add(db)
        s, i = flat.search(q, min(k + 1, db.shape[0]))
        i = i.astype(np.int64) + a
        s = np.where(i == qid[:, None], -np.inf, s)
        best_s, best_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return best_s, best_i


def _recall(approx, rows: Rows, n: int, sample: int, k: int, block: int = 65536) -> dict:
    """Recall@k of ``approx(qid, k) -> (sims, ids)`` against exact search on ``sample`` database rows (a fixed
    stride, each row's own id excluded)."""
    t0 = time.perf_counter()
    k = min(k, n - 1)
    qid = _strided(n, sample)
    _, exact = exact_self_neighbours(rows, n, qid, k, block)
    _, got = approx(qid, k)
    hits = sum(len(set(map(int, a)) & set(map(int, e))) for a, e in zip(got, exact))
    return {f"recall_at_{k}": round(hits / (qid.size * k), 4), "recall_queries": int(qid.size),
            "seconds_recall": round(time.perf_counter() - t0, 3)}


# Built indexes kept for the next search of the same matrix (the comparison's sweep, then the agreement score,
# then a benchmark's next noise setting): keyed by the matrix's digest and the settings; the index holds a copy
# of the rows, so at most INDEX_CACHE_BYTES of them.
INDEX_CACHE_BYTES = 6 << 30
_INDEXES: "OrderedDict[tuple, ApproxIndex]" = OrderedDict()


def digest(x: np.ndarray, block: int = 65536) -> str:
    """sha1 of a matrix's shape, dtype and values, read block by block (a memory map stays on disk)."""
    h = hashlib.sha1(str((x.shape, np.dtype(x.dtype).str)).encode(), usedforsecurity=False)
    for a in range(0, x.shape[0], block):
        h.update(memoryview(np.ascontiguousarray(x[a:a + block])).cast("B"))
    return h.hexdigest()


def cached_build(key: str, rows: Rows, n: int, d: int, kind: str, gpu: bool = False):
    """:func:`build_cells` (``ivf``) or :func:`build` (``hnsw``), or the index built before for the same ``key``
    (a digest of the rows) and settings."""
    s = current()
    ck = (key, kind, s, gpu)
    hit = _INDEXES.get(ck)
    if hit is not None:
        _INDEXES.move_to_end(ck)
        _RECORDS.append({**hit.record, "reused": True, "seconds_build": 0.0, "seconds_recall": 0.0})
        return hit
    if kind == "ivf":
        out = build_cells(rows, n, d, s, device="cuda" if gpu else "cpu")
    else:
        out = build(rows, n, d, kind, s, gpu)
    _INDEXES[ck] = out
    while len(_INDEXES) > 1 and sum(i.n * i.d * 4 for i in _INDEXES.values()) > INDEX_CACHE_BYTES:
        _INDEXES.popitem(last=False)
    return out


def clear_cache() -> None:
    """Forget the indexes kept for reuse (:func:`cached_build`)."""
    _INDEXES.clear()
