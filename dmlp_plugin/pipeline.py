"""Stage functions: data + noise -> features -> purifier -> labels artifact (+ metrics and report).

Each function reads plain inputs, calls components by registry name and returns plain results; only
:func:`purify_run` writes files (into a staging folder beside the output folder, which then replaces it
as a whole: a failed or killed run leaves the previous output folder as it was, never files of two runs).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmlp_plugin import __version__, memory
from dmlp_plugin.config import PurifyConfig, check_values, from_mapping, to_dict
from dmlp_plugin.errors import MissingDependency, UserError
from dmlp_plugin.hardware import apply_threads, resolve_device, threads_info
from dmlp_plugin.records import DataSplits, PurifyInputs, PurifyResult
from dmlp_plugin.registry import load_registry


# ---------------------------------------------------------------------------------------------------------
# building components


def build_component(kind: str, name: str, params: dict):
    """Instantiate a registered component; its parameters are validated here (before any work)."""
    obj = load_registry().get(kind, name)
    where = f"{'preprocessor' if kind == 'preprocessors' else kind}.params"
    if dataclasses.is_dataclass(obj):
        return from_mapping(obj, params, where)
    try:
        return obj(**params)
    except TypeError as e:
        raise UserError(f"{where} for {name!r} rejected: {e}") from None


def validate(cfg: PurifyConfig) -> dict:
    """Check every name and parameter of a purify config; returns the built components. Raises UserError."""
    check_values(cfg)
    from dmlp_plugin.data.noise import check_configs  # noqa: PLC0415

    check_configs(cfg)
    reg = load_registry()
    reg.entry("datasets", cfg.dataset.name)
    reg.entry("noise", cfg.noise.kind)
    if not 0.0 <= cfg.noise.rate < 1.0:
        raise UserError(f"noise.rate={cfg.noise.rate} is outside [0, 1); give a fraction such as 0.5")
    if cfg.trusted.source not in ("clean_sample", "index_file", "knn_auto", "none"):
        raise UserError(f"trusted.source={cfg.trusted.source!r} is not known; use clean_sample, index_file, knn_auto or none")
    if cfg.trusted.source == "index_file" and not cfg.trusted.file:
        raise UserError("trusted.source=index_file needs trusted.file (a .npy of indices or a .csv of index,label rows)")
    if cfg.trusted.size < 0:
        raise UserError(f"trusted.size={cfg.trusted.size} is negative; give a fraction (< 1) or a count (>= 1)")
    if cfg.features.source not in ("ssl", "npy", "raw"):
        raise UserError(f"features.source={cfg.features.source!r} is not known; use ssl, npy or raw")
    if cfg.features.source == "npy" and not cfg.features.path:
        raise UserError("features.source=npy needs features.path (an (N, d) float .npy file)")
    if cfg.features.second_view not in ("random_relu", "raw", "hflip", "same"):
        raise UserError(f"features.second_view={cfg.features.second_view!r} is not known; use random_relu, raw, "
                        f"hflip or same")
    if cfg.features.second_view == "hflip" and cfg.features.source != "ssl":
        raise UserError("features.second_view=hflip needs features.source=ssl; use random_relu or same")
    if cfg.checks.estimate_folds != 0 and cfg.checks.estimate_folds < 2:
        raise UserError(f"checks.estimate_folds={cfg.checks.estimate_folds} must be 0 (off) or at least 2 folds, "
                        f"e.g. 5")
    if cfg.checks.k < 1:
        raise UserError(f"checks.k={cfg.checks.k} must be a positive integer (neighbours for the agreement score), "
                        f"e.g. 10")
    from dmlp_plugin.checks.knn import check_ks  # noqa: PLC0415 - torch import on use

    check_ks(cfg.checks.vote_ks)
    _vote_views(cfg.checks.vote_views)
    index_settings(cfg)
    if cfg.trusted.source == "none" and cfg.preprocessor.name in NEEDS_TRUSTED:
        raise UserError(f"preprocessor {cfg.preprocessor.name!r} needs a trusted subset; set trusted.source to "
                        f"clean_sample, index_file or knn_auto")
    built = {"preprocessor": with_checks(cfg, build_component("preprocessors", cfg.preprocessor.name,
                                                              cfg.preprocessor.params))}
    views = getattr(built["preprocessor"], "views", None)  # a run has two feature views (make_views)
    if isinstance(views, str) and views.isdigit() and not 1 <= int(views) <= 2:
        raise UserError(f"preprocessor.params.views={views} names a feature view this run does not have; use 1, 2 "
                        f"or all (the two views concatenated)")
    for name in cfg.checks.compare:
        reg.entry("preprocessors", name)
    for name in cfg.preprocessor.params_for:  # a typo there would otherwise be ignored silently
        try:
            reg.entry("preprocessors", str(name))
        except UserError as e:
            raise UserError(f"preprocessor.params_for: {e}") from None
    if cfg.features.source == "ssl":
        built["ssl"] = ssl_config(cfg)
    resolve_device(cfg.device)
    return built


NEEDS_TRUSTED = ("dmlp", "trusted_only", "auto")  # preprocessors that cannot run without a trusted subset


def index_settings(cfg: PurifyConfig):
    """``checks.index`` as :class:`dmlp_plugin.checks.index.IndexSettings` (bad keys or values: UserError)."""
    from dmlp_plugin.checks.index import IndexSettings  # noqa: PLC0415

    if not isinstance(cfg.checks.index, dict):
        raise UserError(f"checks.index={cfg.checks.index!r} must be a mapping such as {{kind: ivf, nprobe: 32}}")
    return IndexSettings.from_dict(cfg.checks.index)


def with_checks(cfg: PurifyConfig, pre):
    """A preprocessor that needs the run's ``checks`` settings (``auto``: the estimate's folds and knn_vote's
    grid) gets them through its ``with_checks``; any other is returned as it is. Bad settings: UserError."""
    hook = getattr(pre, "with_checks", None)
    if not callable(hook):
        return pre
    return hook(cfg.checks.estimate_folds, cfg.checks.vote_ks, _vote_views(cfg.checks.vote_views))


def _vote_views(views) -> list[str] | None:
    """``checks.vote_views``: None for ``auto`` (each distinct view and all concatenated), else the list of
    view sets as strings ('1', '2', 'all'). Bad values: UserError."""
    if views == "auto":
        return None
    items = views if isinstance(views, list) else [views]
    out = []
    for v in items:
        text = str(v) if isinstance(v, int) and not isinstance(v, bool) else v
        if text not in ("1", "2", "all"):
            raise UserError(f"checks.vote_views={views!r}: {v!r} is not a view set; use auto or a list of 1, 2 and "
                            f"all (the views concatenated)")
        out.append(text)
    if not out:
        raise UserError("checks.vote_views=[] searches nothing; use auto or a list of 1, 2 and all")
    return list(dict.fromkeys(out))


def ssl_config(cfg: PurifyConfig):
    from dmlp_plugin.features.ssl import SimCLRConfig  # noqa: PLC0415 - torch/timm import on use

    params = {"seed": cfg.seed, **cfg.features.ssl}
    return from_mapping(SimCLRConfig, params, "features.ssl")


# ---------------------------------------------------------------------------------------------------------
# stages


def load_data(cfg: PurifyConfig) -> DataSplits:
    loader = load_registry().get("datasets", cfg.dataset.name)
    try:
        data = loader(**cfg.dataset.params)
    except TypeError as e:
        raise UserError(f"dataset.params for {cfg.dataset.name!r} rejected: {e}") from None
    labels = data.train.labels
    if labels is not None and len(labels) and np.unique(labels).size < 2:
        raise UserError(f"dataset {cfg.dataset.name!r} has one class only (every training label is {int(labels[0])}); "
                        f"purifying labels needs samples of at least 2 classes: check dataset.params")
    return data


def make_noisy(cfg: PurifyConfig, data: DataSplits):
    """Returns (NoisyLabels, truth or None). With noise kind ``none`` the given labels are taken as they
    are and the truth is unknown."""
    truth = data.train.labels
    if truth is None:
        raise UserError(f"dataset {cfg.dataset.name!r} has no labels for its training split; give labels")
    fn = load_registry().get("noise", cfg.noise.kind)
    extra = {}
    if "images" in inspect.signature(fn).parameters:  # instance-dependent models see the images too
        if data.train.images is None:
            raise UserError(f"noise.kind={cfg.noise.kind} needs the training images, which dataset "
                            f"{cfg.dataset.name!r} does not have; use a class-level noise model (symmetric, pairflip)")
        extra["images"] = data.train.images
    noisy = fn(truth, data.train.num_classes, kind=cfg.noise.kind, rate=cfg.noise.rate, seed=cfg.seed,
               include_true_class=cfg.noise.include_true_class, pairs=cfg.noise.pairs, file=cfg.noise.file,
               key=cfg.noise.key, **extra)
    return noisy, (None if cfg.noise.kind == "none" else truth)


def _count(size: float, n: int) -> int:
    return int(round(size * n)) if size < 1 else int(size)


def select_trusted(cfg: PurifyConfig, noisy: np.ndarray, truth: np.ndarray | None, num_classes: int,
                   view1: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The trusted meta subset: (indices (M,), labels (M,)), with at least one sample of every class (the
    meta loss anchors each class through its trusted samples; a class without any could not be purified)."""
    idx, labels = _select_trusted(cfg, noisy, truth, num_classes, view1)
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if labels.size and missing:
        where = f"trusted.file {cfg.trusted.file!r}" if cfg.trusted.source == "index_file" else \
            f"the trusted subset (trusted.source={cfg.trusted.source}, size {labels.size})"
        raise UserError(f"{where} has no sample of class(es) {missing[:10]}; give at least one trusted sample per "
                        f"class (or a larger trusted.size with trusted.balanced: true)")
    return idx, labels


def _select_trusted(cfg: PurifyConfig, noisy: np.ndarray, truth: np.ndarray | None, num_classes: int,
                    view1: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    n = noisy.shape[0]
    t = cfg.trusted
    rng = np.random.default_rng([cfg.seed, 1])
    if t.source == "none":
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if t.source == "index_file":
        return _read_index_file(Path(t.file), n, num_classes, truth)
    m = _count(t.size, n)
    if m >= n:
        raise UserError(f"trusted.size={t.size} asks for {m} samples but the training set has {n}"
                        f"{', leaving none to purify' if m == n else ''}; give a smaller size")
    if m < 1:
        raise UserError(f"trusted.size={t.size} selects no sample of {n}; give a fraction such as 0.02 or a count")
    if t.source == "knn_auto":
        from dmlp_plugin.checks.knn import select_meta  # noqa: PLC0415

        if t.k >= n:
            raise UserError(f"trusted.k={t.k} asks for as many neighbours as the {n} training samples or more; "
                            f"give a k below {n}, e.g. 10")

        idx = select_meta(view1, noisy, num_classes, m, k=t.k)
        return idx, noisy[idx].astype(np.int64)
    if truth is None:
        raise UserError("trusted.source=clean_sample needs the true labels, which noise.kind=none does not have; "
                        "use trusted.source=index_file or knn_auto")
    if t.balanced:
        per = m // num_classes
        if per < 1:
            raise UserError(f"trusted.size={t.size} gives {m} samples, fewer than the {num_classes} classes a balanced "
                            f"trusted set needs; give at least {num_classes} or set trusted.balanced=false")
        chosen = []
        for c in range(num_classes):
            members = np.flatnonzero(truth == c)
            if members.size < per:
                raise UserError(f"trusted set: class {c} has {members.size} samples, fewer than the {per} asked per class; "
                                f"lower trusted.size or set trusted.balanced=false")
            chosen.append(rng.choice(members, per, replace=False))
        idx = np.sort(np.concatenate(chosen))
    else:
        idx = np.sort(rng.choice(n, m, replace=False))
    return idx.astype(np.int64), truth[idx].astype(np.int64)


def _read_index_file(path: Path, n: int, num_classes: int, truth: np.ndarray | None):
    if not path.is_file():
        raise UserError(f"trusted.file {str(path)!r} not found; give a .npy of indices or a .csv of index,label rows")
    labels = None
    try:
        if path.suffix == ".npy":
            idx = np.load(path, allow_pickle=False)
        else:  # (utf-8-sig: a byte-order mark, as spreadsheet programs write, is not part of the first row)
            first = path.read_text(encoding="utf-8-sig").lstrip().split("\n", 1)[0]
            header = bool(first) and not first.split(",")[0].strip().lstrip("+-").replace(".", "", 1).isdigit()
            rows = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64, skiprows=int(header),
                              encoding="utf-8-sig")
            idx = rows[:, 0]
            labels = rows[:, 1] if rows.shape[1] > 1 else None
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"trusted.file {str(path)!r} could not be read ({type(e).__name__}: {e}); use a .npy of "
                        f"indices or integer index[,label] rows") from None
    if not isinstance(idx, np.ndarray):
        raise UserError(f"trusted.file {str(path)!r} is an .npz archive; give a .npy of indices (np.save) or a .csv")
    idx = np.asarray(idx).ravel()
    if idx.size == 0:
        raise UserError(f"trusted.file {str(path)!r} lists no sample; give the indices of the trusted samples, at "
                        f"least one per class")
    if idx.dtype.kind == "f" and np.any(idx != np.round(idx)):
        raise UserError(f"trusted.file {str(path)!r} holds non-integer indices; give sample indices 0..{n - 1}")
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise UserError(f"trusted.file {str(path)!r} has index {int(idx.max() if idx.max() >= n else idx.min())} "
                        f"outside 0..{n - 1}")
    if np.unique(idx).size != idx.size:
        raise UserError(f"trusted.file {str(path)!r} lists an index twice; list each trusted sample once")
    if labels is None:
        if truth is None:
            raise UserError(f"trusted.file {str(path)!r} has no labels column and the true labels are unknown; "
                            f"write index,label rows")
        labels = truth[idx]
    labels = np.asarray(labels)
    if labels.size and np.any(labels != np.round(labels)):
        bad = labels[labels != np.round(labels)][0]
        raise UserError(f"trusted.file {str(path)!r} has a non-integer label {bad:g}; labels are class indices "
                        f"0..{num_classes - 1}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise UserError(f"trusted.file {str(path)!r} has label {int(bad)} outside 0..{num_classes - 1}")
    order = np.argsort(idx)
    return idx[order], labels.astype(np.int64)[order]


@dataclass(frozen=True)
class Views:
    arrays: list
    provenance: dict


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def random_relu_view(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """A second, nonlinear view: L2-normalised ReLU(x R) with R ~ N(0, 1) of shape (d, dim) (random
    features of the arc-cosine kernel), so the two linear correctors see different hypothesis classes."""
    rng = np.random.default_rng([seed, 2])
    r = rng.standard_normal((x.shape[1], dim)).astype(np.float32)
    out = np.empty((x.shape[0], dim), dtype=np.float32)
    for i in range(0, x.shape[0], 8192):
        out[i:i + 8192] = np.maximum(x[i:i + 8192] @ r, 0)
    return _l2(out)


IN_MEMORY_BYTES = 256 << 20  # a feature file larger than this is memory-mapped, never read whole


def _load_feature_file(path: str, n: int, what: str, cache_dir: str | None = None) -> np.ndarray:
    """An (N, d) .npy of features, checked and L2-normalised by row. A file over ``IN_MEMORY_BYTES`` is
    memory-mapped and checked block by block: used as it is when its rows are float32 and unit length already,
    else normalised block by block into ``cache_dir`` (``normalised-<key>.npy``, kept for the next run of the
    same file) and that copy mapped; so the features are never copied whole into memory."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path!r} not found; give an (N, d) .npy file of features")
    big = p.stat().st_size > IN_MEMORY_BYTES
    try:
        x = np.load(p, allow_pickle=False, mmap_mode="r" if big else None)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{what} {path!r} could not be read without pickle ({type(e).__name__}: {e}); save a plain "
                        f"float array with np.save") from None
    if not isinstance(x, np.ndarray):  # an .npz archive, whatever its name
        names = list(x.files)
        x.close()
        raise UserError(f"{what} {path!r} is an .npz archive (arrays {', '.join(names[:5]) or 'none'}), not one array; "
                        f"save the (N, d) features alone with np.save(path, array)")
    if x.dtype.kind not in "fiu":
        raise UserError(f"{what} {path!r} has dtype {x.dtype}; give float features")
    if x.ndim != 2:
        raise UserError(f"{what} {path!r} has shape {x.shape}; give a 2-d (N, d) array")
    if x.shape[0] != n:
        raise UserError(f"{what} {path!r} has {x.shape[0]} rows but the data set has {n} training samples; "
                        f"give one feature row per sample, in the data set's order")
    unit, zero, first_zero = True, 0, None
    block = max(1, (64 << 20) // max(1, x.shape[1] * x.itemsize))
    for a in range(0, n, block):
        ok, z, fz = _check_feature_rows(np.asarray(x[a:a + block]), a, path, what)
        unit, zero = unit and ok, zero + z
        first_zero = first_zero if first_zero is not None else fz
    if zero:
        raise UserError(f"{what} {path!r} has {zero} all-zero rows (first: row {first_zero}), which have no direction "
                        f"to compare; give every sample a non-zero feature row")
    if not big:
        return _rescaled_l2(x)
    if unit and x.dtype == np.float32:
        return x  # the mapped file itself
    return _normalised_copy(p, x, Path(cache_dir or ".dmlp_cache"), block)


def _check_feature_rows(x: np.ndarray, offset: int, path: str, what: str) -> tuple[bool, int, int | None]:
    """One block of rows (``offset``...): UserError for NaN/Inf; returns (every row unit length, the number of
    all-zero rows, the first one's row or None)."""
    if not np.all(np.isfinite(x)):
        bad = offset + int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise UserError(f"{what} {path!r} has NaN or Inf values (first in row {bad}); clean the features")
    zero = ~np.any(x != 0, axis=1)
    first = offset + int(np.flatnonzero(zero)[0]) if zero.any() else None
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # extreme rows are rescaled later
        norms = np.linalg.norm(x.astype(np.float64), axis=1)
    return bool(np.all(np.abs(norms - 1.0) < 1e-4)), int(zero.sum()), first


def _rescaled_l2(x: np.ndarray) -> np.ndarray:
    scale = np.abs(x).max(axis=1).astype(np.float64)
    if scale.max() > 1e18 or scale.min() < 1e-18:  # float32 squares would overflow or vanish: rescale rows first
        x = (x.astype(np.float64) / scale[:, None]).astype(np.float32)
    return _l2(np.asarray(x, dtype=np.float32))


def _normalised_copy(p: Path, x: np.ndarray, cache_dir: Path, block: int) -> np.ndarray:
    """The rows of mapped ``x`` L2-normalised into ``cache_dir`` (atomically: a partial copy is never used),
    keyed by the file's path, size and modification time; returned memory-mapped, read-only."""
    from dmlp_plugin.atomic import exclusive  # noqa: PLC0415

    st = p.stat()
    key = hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode(), usedforsecurity=False).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"normalised-{key}.npy"
    with exclusive(target.with_suffix(".lock"), f"the normalised copy {str(target)!r}"):
        if not target.exists():
            tmp = target.with_name(target.name + f".partial{os.getpid()}")
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=x.shape)
                for a in range(0, x.shape[0], block):
                    out[a:a + block] = _rescaled_l2(np.asarray(x[a:a + block]))
                out.flush()
                del out
                os.replace(tmp, target)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise UserError(f"could not write the normalised features {str(target)!r} ({e.strerror or e}); free "
                                f"disk space or set features.cache_dir to a writable folder") from None
    return np.load(target, mmap_mode="r")


def raw_pixel_features(images: np.ndarray) -> np.ndarray:
    """Flattened pixels, standardised per pixel, rows L2-normalised: (N, H*W*C) float32."""
    x = images.reshape(len(images), -1).astype(np.float32)
    return _l2((x - x.mean(0)) / (x.std(0) + 1e-6))


def make_views(cfg: PurifyConfig, data: DataSplits, device: str, built: dict, progress: bool) -> Views:
    f = cfg.features
    n = len(data.train)
    if data.train.images is None:  # labels only: the features must come from files
        if f.source != "npy":
            raise UserError(f"features.source={f.source} needs images, and dataset {cfg.dataset.name!r} has none "
                            f"(labels only); set features.source=npy with features.path, or give the images")
        if not f.path2 and f.second_view in ("raw", "hflip"):
            raise UserError(f"features.second_view={f.second_view} needs images, and dataset {cfg.dataset.name!r} has "
                            f"none (labels only); use second_view: random_relu (or same), or give features.path2")
    if f.source == "npy":
        v1 = _load_feature_file(f.path, n, "features.path", f.cache_dir)
        prov = {"source": "npy", "path": str(f.path)}
    elif f.source == "raw":
        v1 = raw_pixel_features(data.train.images)
        prov = {"source": "raw pixels (standardised)"}
    else:
        from dmlp_plugin.features.cache import get_features  # noqa: PLC0415

        from dmlp_plugin.checks.quality import feature_report  # noqa: PLC0415

        bank = get_features(data.train, built["ssl"], f.cache_dir, device=device, progress=progress, test=data.test,
                            quality=lambda train_f, test_f: feature_report(data.train, data.test, train_f, test_f))
        v1 = bank.views["plain"]
        prov = {"source": "ssl", "cache": bank.path, **bank.provenance}
    if f.path2:
        v2 = _load_feature_file(f.path2, n, "features.path2", f.cache_dir)
        prov["view2"] = {"source": "npy", "path": f.path2}
    elif f.second_view == "hflip":
        v2 = bank.views["hflip"]
        prov["view2"] = {"source": "ssl features of horizontally flipped images"}
    elif f.second_view == "raw":
        v2 = raw_pixel_features(data.train.images)
        prov["view2"] = {"source": "raw pixels (standardised): errors unlike those of the learned view 1"}
    elif f.second_view == "random_relu":
        v2 = random_relu_view(v1, f.second_view_dim, cfg.seed)
        prov["view2"] = {"source": f"random ReLU features of view 1 (dim {f.second_view_dim})"}
    else:
        v2 = v1
        prov["view2"] = {"source": "view 1 again (authors' script)"}
    prov["dims"] = [int(v1.shape[1]), int(v2.shape[1])]
    return Views([v1, v2], prov)


def neighbour_agreement(view1: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    from dmlp_plugin.checks import knn  # noqa: PLC0415

    _, idx = knn.search(view1, k)
    return knn.neighbour_agreement(idx, labels)


# ---------------------------------------------------------------------------------------------------------
# the whole purify run


def check_out_dir(out: Path) -> None:
    long = next((part for part in out.parts if len(os.fsencode(part)) > 255), None)
    if long is not None:
        raise UserError(f"--out: the name {long[:30] + '...'!r} is {len(os.fsencode(long))} bytes long, more than "
                        f"the 255 a file system allows; give a shorter name")
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {str(out)!r} is a symbolic link to {os.readlink(out)!r}, which does not exist (or "
                        f"loops); remove the link or give another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder; give a folder path")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {str(out)!r}: cannot write into {str(parent)!r}; choose a writable folder")


PURIFY_FILES = ("labels.npz", "metrics.json", "history.json", "config.yaml", "report.md")  # and plots (*.png)


def check_replaceable(out: Path) -> None:
    """``dmlp purify`` replaces ``--out`` as a whole (staged beside it): refuse a folder holding files it did not
    write, the working folder or one above it, and a folder whose parent cannot be written."""
    try:
        real = out.resolve()
    except (OSError, RuntimeError) as e:
        raise UserError(f"--out {str(out)!r} cannot be resolved ({e}); remove the looping link or give another "
                        f"folder") from None
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UserError(f"--out {str(out)!r} is the working folder or above it, and dmlp purify replaces its --out as "
                        f"a whole; give a folder of its own, e.g. --out runs/purify")
    if real.is_dir():
        foreign = sorted(p.name for p in real.iterdir() if p.name not in PURIFY_FILES and not
                         (p.suffix == ".png" and p.is_file()))
        if foreign:
            raise UserError(f"--out {str(out)!r} holds {foreign[0]!r}, which dmlp purify did not write, and the "
                            f"folder is replaced as a whole; give a new or empty folder (or move that out)")
    parent = next((p for p in real.parents if p.exists()), Path("/"))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {str(out)!r}: its replacement is built beside it, in {str(parent)!r}, which cannot "
                        f"be written; make that folder writable or choose an --out in a writable folder")


def config_hash(raw: dict) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:12]


def versions() -> dict:
    import torch  # noqa: PLC0415

    out = {"dmlp_plugin": __version__, "python": platform.python_version(), "numpy": np.__version__,
           "torch": torch.__version__}
    for mod in ("timm", "faiss", "sklearn", "cleanlab"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            out[mod] = None
    return out


def run_preprocessor(pre, views: Views, noisy, meta_idx, meta_labels, num_classes, truth, device, progress,
                     seed, checkpoint: str | None = None) -> PurifyResult:
    inp = PurifyInputs(views=views.arrays, noisy=noisy, meta_idx=meta_idx, meta_labels=meta_labels,
                       num_classes=num_classes, truth=truth, device=device, progress=progress, seed=seed,
                       checkpoint=checkpoint)
    return pre.purify(inp)


@dataclass
class Purified:
    """What one purification produced: the preprocessor's result, the labels artifact and the metrics."""

    result: PurifyResult
    artifact: object  # LabelsArtifact
    metrics: dict


def purify_labels(cfg: PurifyConfig, data: DataSplits, views: Views, built: dict, device: str,
                  progress: bool = True, raw: dict | None = None, timings: dict | None = None,
                  checkpoint: str | None = None) -> Purified:
    """noise -> trusted subset -> preprocessor (+ the comparison preprocessors when the truth is known)
    for one seed (``cfg.seed``), on features already made. Writes nothing but the preprocessor's
    ``checkpoint`` (a killed run resumes from it; the caller deletes it once its outputs are written).
    Every neighbour search inside follows ``checks.index``; what each approximate index measured (recall
    against exact search on a sample) goes into the metrics as ``neighbour_index``."""
    from dmlp_plugin.checks import index as ix  # noqa: PLC0415

    settings = index_settings(cfg)
    ix.clear_records()
    with ix.using(settings):
        out = _purify_labels(cfg, data, views, built, device, progress, raw, timings, checkpoint)
    out.metrics["neighbour_index"] = {"kind": settings.plan(len(out.result.hard)),
                                      "settings": dataclasses.asdict(settings), "indexes": ix.records()}
    return out


def memory_needed(cfg: PurifyConfig, views: Views, num_classes: int, comparing: bool) -> tuple[int, str]:
    """Bytes the run will hold at its peak beyond what it holds now, roughly, and the part that dominates:
    the kNN searches (each view set searched: the concatenated views made in memory, an approximate index's
    copy of the rows, the neighbour lists at the largest k and the votes) or the purifier (its neighbour graph
    and the (N, C) tables). Memory-mapped views count nothing; views held in memory already count nothing."""
    from dmlp_plugin.checks import knn  # noqa: PLC0415

    arrays = views.arrays
    n = int(arrays[0].shape[0])
    settings = index_settings(cfg)
    knn_runs = (comparing and "knn_vote" in cfg.checks.compare) or cfg.preprocessor.name in ("knn_vote", "auto")
    searches = 0
    if knn_runs:
        kmax = knn.k_grid(n, cfg.checks.vote_ks)[-1]
        for which in _vote_views(cfg.checks.vote_views) or knn.distinct_view_sets(arrays):
            d = sum(int(a.shape[1]) for a in arrays) if which == "all" else int(arrays[int(which) - 1].shape[1])
            made = n * d * 4 if which == "all" else 0
            index = n * d * 4 if settings.plan(n) != "exact" else 0
            searches = max(searches, made + index + n * kmax * 12 + n * num_classes * 4 * 9)
    dmlp = n * 300 * 12 + n * num_classes * 4 * 8 if cfg.preprocessor.name in ("dmlp", "auto") else 0
    return (searches, "the kNN comparison") if searches >= dmlp else (dmlp, "the purifier")


def check_memory(cfg: PurifyConfig, views: Views, num_classes: int, comparing: bool) -> None:
    """Refuse, before the long work, a run that would need more memory than the machine has left."""
    need, what = memory_needed(cfg, views, num_classes, comparing)
    left = memory.available_bytes()
    if left is not None and need > 0.9 * left:
        d = "+".join(str(int(a.shape[1])) for a in views.arrays)
        n = len(views.arrays[0])
        raise UserError(f"this run would need about {need / 2**30:.1f} GiB more memory for {what} (N={n:,}, views "
                        f"{d} dims) but {left / 2**30:.1f} GiB is available; use features.second_view=same or a "
                        f"smaller features.second_view_dim, checks.vote_views=[1], or drop knn_vote from checks.compare")


def _purify_labels(cfg: PurifyConfig, data: DataSplits, views: Views, built: dict, device: str,
                   progress: bool = True, raw: dict | None = None, timings: dict | None = None,
                   checkpoint: str | None = None) -> Purified:
    from dmlp_plugin import metrics as M  # noqa: PLC0415
    from dmlp_plugin.artifacts import LabelsArtifact  # noqa: PLC0415
    from dmlp_plugin.checks.knn import trusted_separability  # noqa: PLC0415
    from dmlp_plugin.distributed import current  # noqa: PLC0415

    dist = current(device)
    timings, peaks = dict(timings or {}), {}
    noisy_labels, truth = make_noisy(cfg, data)
    noisy = noisy_labels.labels
    c = data.train.num_classes
    check_memory(cfg, views, c, comparing=truth is not None)
    meta_idx, meta_labels = select_trusted(cfg, noisy, truth, c, views.arrays[0])
    if meta_idx.size == 0 and cfg.preprocessor.name in NEEDS_TRUSTED:
        raise UserError(f"preprocessor {cfg.preprocessor.name!r} needs a trusted subset; set trusted.source to "
                        f"clean_sample, index_file or knn_auto")
    per_class = np.bincount(meta_labels, minlength=c) if meta_idx.size else None
    if per_class is not None and per_class.min() < 2 and dist.is_main:
        few = [int(k) for k in np.flatnonzero(per_class < 2)]
        print(f"warning: the trusted subset has fewer than 2 samples of class(es) {few[:10]} ({int(per_class.min())} "
              f"at least; {meta_idx.size} trusted in all): the purifier anchors each class on its trusted samples, "
              f"so those classes are purified poorly; give more trusted samples of them", file=sys.stderr)
    t = time.perf_counter()
    with memory.stage(peaks, "checks"):
        separability = trusted_separability(views.arrays[0], meta_idx, meta_labels)
    timings["checks"] = time.perf_counter() - t
    if separability is not None and separability["at_chance"] and dist.is_main:
        print(f"warning: the features do not tell the {separability['trusted']} trusted samples' classes apart "
              f"(1-NN accuracy among them {separability['accuracy']:.2f}, chance {separability['chance']:.2f}); "
              f"are the feature rows in the data set's training order? (see the README, 'Your own features')",
              file=sys.stderr)

    pre = with_checks(cfg, built["preprocessor"])  # (cfg may differ from the one validated: a benchmark's cells)
    t = time.perf_counter()
    with memory.stage(peaks, "purify"):
        result = run_preprocessor(pre, views, noisy, meta_idx, meta_labels, c, truth, device, progress, cfg.seed,
                                  checkpoint)
    timings["purify"] = time.perf_counter() - t
    auto = result.info.get("auto") if isinstance(result.info.get("auto"), dict) else None
    if auto is not None:  # auto's K-fold estimates are the run's estimate work: timed as such, reused below
        timings["purify"] -= auto["seconds"]["estimate"]
        timings["estimate"] = auto["seconds"]["estimate"]

    is_meta = np.zeros(len(noisy), bool)
    is_meta[meta_idx] = True
    rest = ~is_meta
    metrics: dict = {
        "dataset": cfg.dataset.name, "num_samples": int(len(noisy)), "num_classes": int(c),
        "preprocessor": cfg.preprocessor.name, "seed": cfg.seed, "device": device, "world_size": dist.world_size,
        "noise": {"kind": noisy_labels.kind, "rate": noisy_labels.rate, "flip_rate": noisy_labels.flip_rate,
                  "include_true_class": noisy_labels.include_true_class},
        "trusted": {"source": cfg.trusted.source, "size": int(meta_idx.size),
                    "fraction": float(meta_idx.size / len(noisy))},
        "features": views.provenance,
        "mean_confidence": float(result.confidence[rest].mean()) if rest.any() else None,
        "trusted_separability": separability,
        "seconds": timings, "threads": threads_info(),
        "config_hash": config_hash(raw or to_dict(cfg)), "versions": versions(),
        # what the preprocessor chose for itself (dmlp: its readout's vote, k and power), scalars only
        "preprocessor_info": {k: v for k, v in (result.info or {}).items()
                              if isinstance(v, (str, int, float, bool, type(None)))},
    }
    if auto is not None:
        metrics["auto"] = copy.deepcopy(auto)  # (the artifact's provenance keeps auto's report without the truth)
        if truth is not None:  # for the report only: the choice above never saw these
            for name, (_, r) in getattr(result, "candidates", {}).items():
                metrics["auto"]["candidates"][name]["label_accuracy_after"] = M.label_accuracy(r.hard[rest],
                                                                                              truth[rest])
    if truth is not None:
        metrics["evaluated_on"] = "the samples outside the trusted subset"
        metrics["label_accuracy_before"] = M.label_accuracy(noisy[rest], truth[rest])
        metrics["label_accuracy_after"] = M.label_accuracy(result.hard[rest], truth[rest])
        metrics.update(M.fixed_broken(noisy[rest], result.hard[rest], truth[rest]))
        with memory.stage(peaks, "compare"):
            metrics.update(_compare(cfg, views, noisy, meta_idx, meta_labels, c, truth, device, rest, timings,
                                    reuse=getattr(result, "candidates", None)))
    with memory.stage(peaks, "estimate"):
        estimates = _estimates(cfg, pre, views, noisy, meta_idx, meta_labels, c, device, result.hard[rest],
                               metrics, timings, auto=auto)
    t = time.perf_counter()  # after the comparison: its kNN lists (k up to 400) serve this k = 10 search
    with memory.stage(peaks, "checks"):
        agreement = neighbour_agreement(views.arrays[0], result.hard, cfg.checks.k)
    timings["checks"] += time.perf_counter() - t
    metrics["mean_neighbour_agreement"] = float(agreement.mean())
    if estimates:
        metrics["estimated_accuracy"] = estimates
    timings["total"] = sum(v for k, v in timings.items() if k != "total")
    metrics["seconds"] = timings
    metrics["peak_rss_mib"] = peaks  # per stage: the high-water mark, and the part that is not mapped files

    art = LabelsArtifact(hard=result.hard, soft=result.soft, confidence=result.confidence,
                         neighbour_agreement=agreement, noisy=noisy.astype(np.int64), meta_indices=meta_idx,
                         meta_labels=meta_labels, fingerprint=data.train.fingerprint(), true_labels=truth,
                         provenance={"config": raw or to_dict(cfg), "features": views.provenance,
                                     "versions": metrics["versions"], "noise": noisy_labels.details,
                                     **({"auto": auto} if auto is not None else {})})
    return Purified(result=result, artifact=art, metrics=metrics)


def _compare(cfg: PurifyConfig, views: Views, noisy, meta_idx, meta_labels, c, truth, device, rest,
             timings: dict, reuse: dict | None = None) -> dict:
    """The comparison preprocessors (``checks.compare``), scored on the untrusted samples: {name: entry}, each
    entry with ``label_accuracy_after``, its setting and ``seconds``; each one's seconds also go into
    ``timings`` as ``compare_<name>`` (so into ``seconds.total``). A comparison whose optional package is not
    installed gets ``label_accuracy_after: None`` and ``status: "not installed: <pip command>"``. ``reuse``:
    {name: (component, result)} runs made already (``auto``'s candidates); a comparison equal to one of them
    takes its result (``seconds``: what that run took, counted in ``seconds.purify``; ``reused`` says so)."""
    from dmlp_plugin import metrics as M  # noqa: PLC0415

    inp = PurifyInputs(views=views.arrays, noisy=noisy, meta_idx=meta_idx, meta_labels=meta_labels, num_classes=c,
                       truth=truth, device=device, progress=False, seed=cfg.seed)
    out = {}
    for name in cfg.checks.compare:
        if name == cfg.preprocessor.name or (meta_idx.size == 0 and name == "trusted_only"):
            continue
        t = time.perf_counter()
        try:
            pre = build_component("preprocessors", name, {})
        except MissingDependency as e:
            entry = {"label_accuracy_after": None, "status": f"not installed: {e.install}"}
        else:
            made = (reuse or {}).get(name)
            reused = name != "knn_vote" and made is not None and made[0] == pre  # the same component, same inputs
            if name == "knn_vote":
                entry = _knn_sweep(cfg, pre, inp, truth, rest)
            else:
                r = made[1] if reused else pre.purify(inp)
                entry = {"label_accuracy_after": M.label_accuracy(r.hard[rest], truth[rest]),
                         **{k: v for k, v in r.info.items() if isinstance(v, (str, int, float, bool, list, dict))}}
            if reused:
                entry["reused"] = (f"the run of {cfg.preprocessor.name}'s candidate {name} (its seconds are in "
                                   f"seconds.purify)")
        timings[f"compare_{name}"] = time.perf_counter() - t
        entry["seconds"] = float(made[1].seconds) if entry.get("reused") else timings[f"compare_{name}"]
        out[name] = entry
    return out


def _estimates(cfg: PurifyConfig, pre, views: Views, noisy, meta_idx, meta_labels, c, device, purified_rest,
               metrics: dict, timings: dict, auto: dict | None = None) -> dict:
    """Label accuracy of the preprocessor and of each comparison estimated WITHOUT true labels: K-fold
    cross-validation over the trusted subset (:func:`dmlp_plugin.estimate.cv_accuracy`), class-weighted by the
    class shares of the preprocessor's purified labels on the untrusted rows. {name: estimate}; the time goes
    into ``timings["estimate"]``. knn_vote is estimated at the k and views its comparison picked (default
    k 20 on view 1 when no true labels picked them). {} when off or when the trusted subset is too small.
    ``auto``: the report of the ``auto`` preprocessor, whose candidates were estimated already (with the class
    weights of its first candidate's labels): those estimates are taken as they are (nothing runs twice), the
    ``auto`` entry is its chosen candidate's (``chosen``), and any other comparison is estimated with the same
    weights."""
    folds = cfg.checks.estimate_folds
    if not folds or meta_idx.size < max(folds, 2 * c):
        return {}
    t0 = time.perf_counter()

    def estimate(p):
        return estimate_accuracy(p, views, noisy, meta_idx, meta_labels, c, device, cfg.seed, folds, prior)

    done = {n: e for n, e in (auto or {}).get("candidates", {}).items() if "estimate" in e}
    if done:
        prior = np.asarray(auto["class_prior"])
        chosen = auto["chosen"]
        out = {cfg.preprocessor.name: {**done[chosen]["estimate"], "chosen": chosen,
                                       "note": f"the estimate of the candidate auto chose ({chosen}); picked as the "
                                               f"best of {len(done)}, it flatters a switch slightly"}}
        out.update({n: {**e["estimate"], **({"setting": {"k": e["setting"]["k"], "views": e["setting"]["views"]}}
                                            if "setting" in e else {})} for n, e in done.items()})
    else:
        prior = np.bincount(purified_rest, minlength=c) / max(purified_rest.size, 1)
        out = {cfg.preprocessor.name: estimate(pre)}
    names = [n for n in cfg.checks.compare if n not in out] if cfg.checks.estimate_compare else []
    for name in names:
        entry = metrics.get(name) if isinstance(metrics.get(name), dict) else {}
        if entry.get("status", "").startswith("not installed"):
            continue
        params = {"k": int(entry["k"]), "views": str(entry["views"])} if name == "knn_vote" and "k" in entry else {}
        try:
            p = build_component("preprocessors", name, params)
        except MissingDependency:
            continue
        out[name] = estimate(p)
        if params:
            out[name]["setting"] = params
    timings["estimate"] = timings.get("estimate", 0.0) + time.perf_counter() - t0
    return out


def estimate_accuracy(pre, views: Views, noisy, meta_idx, meta_labels, num_classes: int, device: str, seed: int,
                      folds: int, class_prior) -> dict:
    """Label accuracy of preprocessor ``pre`` estimated WITHOUT true labels: ``folds``-fold cross-validation
    over the trusted subset (:func:`dmlp_plugin.estimate.cv_accuracy`), each fold purified by a run that trusts
    the other folds, class-weighted by ``class_prior``. The estimate of ``dmlp purify`` and of the array API."""
    from dmlp_plugin.estimate import cv_accuracy  # noqa: PLC0415

    def corrector(idx, lab):
        return run_preprocessor(pre, views, noisy, idx, lab, num_classes, None, device, False, seed).hard

    return cv_accuracy(corrector, meta_idx, meta_labels, num_classes, folds, seed, class_prior)


def _knn_sweep(cfg: PurifyConfig, pre, inp: PurifyInputs, truth, rest) -> dict:
    """knn_vote over the k grid (``checks.vote_ks``) on every view set (``checks.vote_views``): one search per
    view set at the largest k (:meth:`KnnVote.sweep`); the best (views, k) by label accuracy is reported."""
    from dmlp_plugin import metrics as M  # noqa: PLC0415
    from dmlp_plugin.checks import knn  # noqa: PLC0415

    ks = knn.k_grid(len(inp.noisy), cfg.checks.vote_ks)
    sets = _vote_views(cfg.checks.vote_views) or knn.distinct_view_sets(inp.views)
    table, seconds = {}, {}
    for which, hard, s in pre.sweep(inp, ks, sets):
        table[which] = {str(k): M.label_accuracy(h[rest], truth[rest]) for k, h in hard.items()}
        seconds[which] = s
    best_views, best_k = max(((w, k) for w in table for k in table[w]), key=lambda wk: table[wk[0]][wk[1]])
    return {"label_accuracy_after": table[best_views][best_k], "k": int(best_k), "views": best_views,
            "ks": ks, "view_sets": sets, "by_views_k": table, "search_seconds": seconds,
            "temperature": pre.temperature, "backend": knn.backend_name(),
            "note": "the best k and views are chosen with the true labels (flatters this baseline)"}


def purify_run(cfg: PurifyConfig, out: str | Path, raw: dict | None = None, progress: bool = True) -> dict:
    """Run ``dmlp purify``: writes labels.npz, metrics.json, report.md and plots into ``out``.
    Returns the metrics dict."""
    from dmlp_plugin.atomic import exclusive  # noqa: PLC0415
    from dmlp_plugin.distributed import current, launcher_rank  # noqa: PLC0415

    out = Path(out)
    check_out_dir(out)
    check_replaceable(out)
    built = validate(cfg)
    apply_threads(cfg.threads, warn=launcher_rank() == 0)  # before any torch work (features' cache key has it)
    device = resolve_device(cfg.device)
    dist = current(device)  # under accelerate launch / torchrun: the purifier shards its rows
    progress = progress and dist.is_main
    timings, peaks = {}, {}
    t = time.perf_counter()
    with memory.stage(peaks, "data"):
        data = load_data(cfg)
    timings["data"] = time.perf_counter() - t
    t = time.perf_counter()
    with memory.stage(peaks, "features"):
        views = make_views(cfg, data, device, built, progress)  # every process: see features.cache.get_features
    timings["features"] = time.perf_counter() - t
    # the purifier's progress, kept beside the features until DIR is written (a killed run resumes from it);
    # its lock keeps a second run of the same config off it while this one runs
    ckpt = Path(cfg.features.cache_dir) / (f"purify-{config_hash(raw or to_dict(cfg))}-"
                                           f"{data.train.fingerprint()[:12]}.pt")
    lock = exclusive(ckpt.with_suffix(".lock"), f"the purifier checkpoint {str(ckpt)!r}") if dist.is_main \
        else contextlib.nullcontext()
    with lock:
        p = purify_labels(cfg, data, views, built, device, progress, raw, timings, checkpoint=str(ckpt))
        p.metrics["peak_rss_mib"] = {**peaks, **p.metrics.get("peak_rss_mib", {})}
        if not dist.is_main:  # process 0 writes; the others wait until it has
            dist.barrier()
            return p.metrics
        try:
            write_out_folder(out, p, yaml_dump(raw or to_dict(cfg)), data.train.class_names)
        finally:
            dist.barrier()
        for f in ckpt.parent.glob(ckpt.name + "*"):  # done: every process's checkpoint goes
            f.unlink(missing_ok=True)
    return p.metrics


def write_out_folder(out: Path, p: Purified, config_yaml: str, class_names=()) -> None:
    """Write ``out`` as a whole: every file is made in a staging folder beside it, which then replaces the
    folder in one step (:func:`dmlp_plugin.atomic.replace_folder`), so ``out`` never holds files of two runs.
    Staging folders of killed runs are removed first. A failed write: UserError; the previous ``out`` intact."""
    from dmlp_plugin.artifacts import save_labels  # noqa: PLC0415
    from dmlp_plugin.atomic import clean_stale, replace_folder, staging_folder, write_json, write_text  # noqa: PLC0415
    from dmlp_plugin.report import write_purify_report  # noqa: PLC0415

    real = out.resolve()
    staging = None
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(real)
        staging = staging_folder(real)
        save_labels(staging / "labels.npz", p.artifact)
        write_json(staging / "metrics.json", p.metrics)
        write_json(staging / "history.json", p.result.history)
        write_text(staging / "config.yaml", config_yaml)
        write_purify_report(staging, p.metrics, p.result, p.artifact, class_names=class_names)
        replace_folder(staging, real)
    except OSError as e:
        full = e.errno == errno.ENOSPC
        raise UserError(f"--out {str(out)!r} could not be written ({'the disk is full' if full else e.strerror or e}"
                        f"{'' if full or not e.filename else ': ' + str(e.filename)}); the previous contents of "
                        f"{str(out)!r} are intact and no temporary file was left; "
                        f"{'free some space' if full else 'fix that'} and rerun") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def yaml_dump(obj) -> str:
    import yaml  # noqa: PLC0415

    return yaml.safe_dump(obj, sort_keys=False)
