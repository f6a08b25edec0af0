"""Stage 1 entry point: SimCLR features of a data set, computed once and cached on disk.

The cache key is sha256 over (the data set's fingerprint, the SimCLR settings as sorted JSON, a format
version): another data set, backbone or any other setting gives another file. Files in ``cache_dir``:

- ``features-<key>.npz``: arrays ``plain`` and ``hflip`` (N, d) float32 with L2-normalised rows (features
  of the images and of their mirror images) and ``provenance`` (a JSON string); no object arrays, loaded
  with ``allow_pickle=False``.
  With a test split given, also ``test_plain`` (its features from the same backbone) and, in the provenance,
  ``quality``: k-NN accuracy on the test split against the true labels for these features and for raw
  standardised pixels (what the SSL stage bought).
- ``features-<key>.json``: the provenance again, for people.
- ``ssl-<key>.pt``: the SimCLR checkpoint while training runs (a killed run resumes from it); deleted
  once the features are saved.

Every file is written atomically (temporary file + rename). A cache file that cannot be read or does not
match (wrong shapes, NaN) is rebuilt with a warning instead of crashing the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmlp_plugin.atomic import write_json, write_npz
from dmlp_plugin.distributed import current
from dmlp_plugin.records import ImageSet

FORMAT_VERSION = 1
VIEWS = ("plain", "hflip")


@dataclass(frozen=True)
class FeatureBank:
    """Cached features of one data set.

    views: name -> float32 (N, d) with L2-normalised rows: ``plain`` (the images) and ``hflip`` (their
    left-right mirror images). path: the ``.npz`` file. provenance: JSON-able details (method, backbone,
    epochs, seconds, final loss, cache key, data fingerprint, settings).
    """

    views: dict
    path: str
    provenance: dict = field(default_factory=dict)


def cache_key(imageset: ImageSet, cfg, world_size: int = 1) -> str:
    """sha256 over (data fingerprint, settings as sorted JSON, format version, and the number of processes
    when more than one: data-parallel SimCLR keeps BatchNorm statistics per process, so its features differ
    from one process's), 16 hex digits."""
    payload = {"data": imageset.fingerprint(), "config": dataclasses.asdict(cfg), "format": FORMAT_VERSION}
    if world_size > 1:
        payload["world_size"] = world_size
    payload = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load(path: Path, n: int) -> FeatureBank | None:
    """The cached bank, or None with a warning when the file is damaged or does not fit the data."""
    try:
        with np.load(path, allow_pickle=False) as z:
            views = {name: np.asarray(z[name]) for name in VIEWS}
            if "test_plain" in z.files:
                views["test_plain"] = np.asarray(z["test_plain"])
            provenance = json.loads(str(z["provenance"]))
        for name, x in views.items():
            if x.dtype != np.float32 or x.ndim != 2 or (x.shape[0] != n and name in VIEWS) or not np.isfinite(x).all():
                raise ValueError(f"view {name!r} is {x.dtype} {x.shape}, expected finite float32 ({n}, d)")
        if not isinstance(provenance, dict):
            raise ValueError("provenance is not a mapping")
    except Exception as e:  # noqa: BLE001 - any damage (truncated zip, missing key, bad JSON): rebuild
        warnings.warn(f"feature cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it",
                      RuntimeWarning, stacklevel=3)
        return None
    return FeatureBank(views=views, path=str(path), provenance=provenance)


def feature_quality(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                    k: int = 20) -> float:
    """k-NN accuracy (cosine, majority vote, ties to the nearest) of test rows against labelled train rows:
    the usual SSL monitor (InstDisc / SimCLR papers' kNN evaluation). Rows are L2-normalised here."""
    from dmlp_plugin.checks import knn  # noqa: PLC0415

    def l2(a):
        a = np.asarray(a, dtype=np.float32)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    sims, idx = knn.search(l2(train_x), k, queries=l2(test_x))
    soft = knn.vote(sims, idx, np.asarray(train_y), int(max(train_y.max(), test_y.max())) + 1, temperature=1e3)
    return float(np.mean(soft.argmax(1) == np.asarray(test_y)))


def _quality(imageset: ImageSet, test: ImageSet, train_f: np.ndarray, test_f: np.ndarray) -> dict:
    # raw pixels standardised with the training split's statistics
    xtr = imageset.images.reshape(len(imageset), -1).astype(np.float32)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xte = (test.images.reshape(len(test), -1).astype(np.float32) - mu) / sd
    return {"metric": "20-NN accuracy (cosine, majority) on the test split, true labels",
            "ssl": feature_quality(train_f, imageset.labels, test_f, test.labels),
            "raw_pixels": feature_quality((xtr - mu) / sd, imageset.labels, xte, test.labels),
            "test_size": len(test)}


def get_features(imageset: ImageSet, cfg, cache_dir: str | os.PathLike, device: str = "cpu",
                 progress: bool = True, test: ImageSet | None = None) -> FeatureBank:
    """SimCLR features of ``imageset.images`` (uint8 (N, H, W, C)) for settings ``cfg`` (a SimCLRConfig).

    Loads ``<cache_dir>/features-<key>.npz`` when it exists and is sound; otherwise trains SimCLR
    (``ssl.train_simclr``, resuming from ``<cache_dir>/ssl-<key>.pt`` if a previous run was killed),
    extracts the ``plain`` and ``hflip`` views, saves them atomically with a JSON sidecar and deletes the
    checkpoint. Labels are never used to train (they only enter the data fingerprint). ``test``: a labelled
    test split; its features are extracted too (``views["test_plain"]``) and the provenance gets ``quality``
    (k-NN test accuracy of these features and of raw pixels; see :func:`feature_quality`).
    """
    import torch  # noqa: PLC0415 - heavy imports on use (a cache hit still needs none of the model code)

    cache_dir = Path(cache_dir)
    dist = current(device)
    key = cache_key(imageset, cfg, dist.world_size)
    path = cache_dir / f"features-{key}.npz"
    sidecar = cache_dir / f"features-{key}.json"
    n = len(imageset)
    dist.barrier()  # under several processes every one sees the same cache
    if path.exists():
        bank = _load(path, n)
        if bank is not None:
            if not sidecar.exists() and dist.is_main:
                write_json(sidecar, bank.provenance)
            return bank

    from dmlp_plugin.features import ssl  # noqa: PLC0415
    from dmlp_plugin.features.extract import extract_features  # noqa: PLC0415

    ckpt = cache_dir / f"ssl-{key}.pt"
    cache_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model = ssl.train_simclr(imageset.images, cfg, device=device, progress=progress, checkpoint=ckpt, dist=dist)
    train_seconds = time.perf_counter() - t
    if not dist.is_main:  # process 0 extracts and writes the features; the others read them
        dist.barrier()
        bank = _load(path, n)
        if bank is None:
            raise RuntimeError(f"process {dist.rank}: the features process 0 wrote to {path} cannot be read")
        return bank
    views = {name: extract_features(model, imageset.images, cfg.image_size, device, flip=(name == "hflip"))
             for name in VIEWS}
    quality = None
    if test is not None and test.labels is not None and imageset.labels is not None and len(test):
        views["test_plain"] = extract_features(model, test.images, cfg.image_size, device)
        quality = _quality(imageset, test, views["plain"], views["test_plain"])
    losses = [round(float(v), 5) for v in getattr(model, "simclr_losses", [])]
    provenance = {
        "method": "SimCLR (Chen et al. 2020), NT-Xent; features = pooled backbone output, L2-normalised",
        "backbone": cfg.backbone,
        "cifar_stem": cfg.cifar_stem,
        "image_size": cfg.image_size,
        "epochs": cfg.epochs,
        "seconds": round(getattr(model, "simclr_seconds", train_seconds), 2),  # SimCLR training, resumes included
        "final_loss": losses[-1] if losses else None,
        "loss_history": losses,
        "dim": int(views["plain"].shape[1]),
        "key": key,
        "data_fingerprint": imageset.fingerprint(),
        "data_name": imageset.name,
        "n": n,
        "device": str(device),
        "world_size": dist.world_size,
        "torch": torch.__version__,
        "timm": _timm_version(),
        "format": FORMAT_VERSION,
        "ssl_config": dataclasses.asdict(cfg),
        "quality": quality,
    }
    write_npz(path, **views, provenance=np.array(json.dumps(provenance)))
    write_json(sidecar, provenance)
    ckpt.unlink(missing_ok=True)
    dist.barrier()
    return FeatureBank(views=views, path=str(path), provenance=provenance)


def _timm_version() -> str:
    import timm  # noqa: PLC0415

    return str(timm.__version__)
