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
  once the features are saved. ``ssl-<key>.lock`` (pid and host) while a run trains it: a second run of
  the same key is refused with one line instead of resuming (and tearing) the first one's checkpoint.

On the CPU the key includes torch's thread count (features made with 1 and 2 threads differ slightly); a
file made before that, under the key without it, is still used, with a warning.

Every file is written atomically (temporary file + rename). A cache file that cannot be read or does not
match (wrong shapes, NaN) is rebuilt with a warning instead of crashing the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmlp_plugin.atomic import exclusive, write_json, write_npz
from dmlp_plugin.distributed import current
from dmlp_plugin.errors import UserError
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


def cache_key(imageset: ImageSet, cfg, world_size: int = 1, threads: int | None = None) -> str:
    """sha256 over (data fingerprint, settings as sorted JSON, format version, the number of processes
    when more than one: data-parallel SimCLR keeps BatchNorm statistics per process, so its features differ
    from one process's; and ``threads``, torch's CPU thread count when SimCLR runs on the CPU: its sums are
    split by thread, so 1 and 2 threads give features that differ by up to ~0.16), 16 hex digits."""
    payload = {"data": imageset.fingerprint(), "config": dataclasses.asdict(cfg), "format": FORMAT_VERSION}
    if world_size > 1:
        payload["world_size"] = world_size
    if threads is not None:
        payload["threads"] = threads
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


def get_features(imageset: ImageSet, cfg, cache_dir: str | os.PathLike, device: str = "cpu",
                 progress: bool = True, test: ImageSet | None = None, quality=None) -> FeatureBank:
    """SimCLR features of ``imageset.images`` (uint8 (N, H, W, C)) for settings ``cfg`` (a SimCLRConfig).

    Loads ``<cache_dir>/features-<key>.npz`` when it exists and is sound; otherwise trains SimCLR
    (``ssl.train_simclr``, resuming from ``<cache_dir>/ssl-<key>.pt`` if a previous run was killed),
    extracts the ``plain`` and ``hflip`` views, saves them atomically with a JSON sidecar and deletes the
    checkpoint. Labels are never used to train (they only enter the data fingerprint). ``test``: a labelled
    test split; its features are extracted too (``views["test_plain"]``), and when ``quality`` is given (a
    function (train features, test features) -> dict, e.g. :func:`dmlp_plugin.checks.quality.feature_report`
    of the two splits) the provenance gets what it returns.
    """
    import torch  # noqa: PLC0415 - heavy imports on use (a cache hit still needs none of the model code)

    cache_dir = Path(cache_dir)
    dist = current(device)
    threads = None if str(device).startswith("cuda") else torch.get_num_threads()
    key = cache_key(imageset, cfg, dist.world_size, threads)
    path = cache_dir / f"features-{key}.npz"
    n = len(imageset)
    dist.barrier()  # under several processes every one sees the same cache
    bank = _cached(cache_dir, key, n, dist) or _legacy(cache_dir, imageset, cfg, dist, threads, n)
    if bank is not None:
        return bank
    lock = exclusive(cache_dir / f"ssl-{key}.lock", f"the SimCLR features {str(path)!r}") if dist.is_main \
        else contextlib.nullcontext()
    try:
        with lock:
            # (made meanwhile by the run that held the lock? one process only: all of several must agree)
            return (dist.world_size == 1 and _cached(cache_dir, key, n, dist)) or \
                _build(imageset, cfg, cache_dir, key, device, progress, test, dist, threads, quality)
    except OSError as e:
        raise _write_failed(cache_dir, e) from None
    except RuntimeError as e:  # torch.save reports a full disk so ("PytorchStreamWriter failed writing file")
        if "failed writing" not in str(e) and "write failed" not in str(e):
            raise
        raise _write_failed(cache_dir, e) from None


def _write_failed(cache_dir: Path, e: Exception) -> UserError:
    full = isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ENOSPC
    return UserError(f"features.cache_dir {str(cache_dir)!r} could not be written "
                     f"({'the disk is full' if full else getattr(e, 'strerror', None) or e}); no half-written cache "
                     f"file was left (a SimCLR checkpoint already saved is kept, and a rerun resumes from it); "
                     f"{'free some space' if full else 'fix that'} or set features.cache_dir elsewhere, and rerun")


def _cached(cache_dir: Path, key: str, n: int, dist) -> FeatureBank | None:
    path, sidecar = cache_dir / f"features-{key}.npz", cache_dir / f"features-{key}.json"
    bank = _load(path, n) if path.exists() else None
    if bank is not None and not sidecar.exists() and dist.is_main:
        with contextlib.suppress(OSError):  # (for people only; a read-only shared cache still serves)
            write_json(sidecar, bank.provenance)
    return bank


def _legacy(cache_dir: Path, imageset: ImageSet, cfg, dist, threads: int | None, n: int) -> FeatureBank | None:
    """A cache file made before the thread count was in the key (its thread count unknown): used, with a
    warning naming it, so that existing caches and the results keyed on them stay valid."""
    if threads is None:
        return None
    old = cache_key(imageset, cfg, dist.world_size)
    bank = _cached(cache_dir, old, n, dist)
    if bank is not None and dist.is_main:
        warnings.warn(f"feature cache {bank.path} was made before the CPU thread count was part of the cache key, "
                      f"so with an unknown thread count (features made on the CPU differ slightly by it); delete "
                      f"it to make them again with {threads} threads", RuntimeWarning, stacklevel=3)
    return bank


def _build(imageset: ImageSet, cfg, cache_dir: Path, key: str, device: str, progress: bool,
           test: ImageSet | None, dist, threads: int | None, measure=None) -> FeatureBank:
    """Train SimCLR (resuming from its checkpoint), extract the views and save them with their provenance."""
    import torch  # noqa: PLC0415

    from dmlp_plugin.features import ssl  # noqa: PLC0415
    from dmlp_plugin.features.extract import extract_features  # noqa: PLC0415

    path, sidecar = cache_dir / f"features-{key}.npz", cache_dir / f"features-{key}.json"
    n = len(imageset)

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
        quality = measure(views["plain"], views["test_plain"]) if measure is not None else None
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
        "threads": threads,
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
