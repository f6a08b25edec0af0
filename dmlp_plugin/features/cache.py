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

Under a launch of several processes process 0 alone trains SimCLR and extracts the features, exactly as one
process would (same key, same file, same bytes), while the others wait; so 1 and P processes purify the same
features and give the same labels. Waiting is a loop of small broadcasts from process 0 (a heartbeat at least
every minute while it trains), never one long collective that the process group's timeout (30 minutes) would
cut; process 0 then broadcasts the views (found or made: no shared file system is needed), all processes
measure the quality of made ones together (its neighbour searches may be sharded), and process 0 saves them and
says so, or says that it failed (the others then end with one line). Earlier versions trained SimCLR data-parallel under P > 1
processes (BatchNorm statistics per process, so other features) and put P into the key; those files are no
longer looked up, and a P-process run makes (or finds) the one-process file.

Every file is written atomically (temporary file + rename). A cache file that cannot be read or does not
match (wrong shapes, NaN) is rebuilt with a warning instead of crashing the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmlp_plugin.atomic import exclusive, write_json, write_npz
from dmlp_plugin.distributed import Dist, current
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


def cache_key(imageset: ImageSet, cfg, threads: int | None = None) -> str:
    """sha256 over (data fingerprint, settings as sorted JSON, format version, and ``threads``, torch's CPU
    thread count when SimCLR runs on the CPU: its sums are split by thread, so 1 and 2 threads give features
    that differ by up to ~0.16), 16 hex digits. Not the number of processes: one process makes the features
    under any launch (see the module docstring)."""
    payload = {"data": imageset.fingerprint(), "config": dataclasses.asdict(cfg), "format": FORMAT_VERSION}
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

    from dmlp_plugin.features.ssl import with_launcher_amp  # noqa: PLC0415

    cache_dir = Path(cache_dir)
    dist = current(device)
    cfg = with_launcher_amp(cfg)  # accelerate launch --mixed_precision: part of the settings, hence of the key
    threads = None if str(device).startswith("cuda") else torch.get_num_threads()
    key = cache_key(imageset, cfg, threads)
    make = functools.partial(_make_or_load, imageset, cfg, cache_dir, key, device, progress, test, threads, quality)
    if dist.world_size == 1:
        return make(_Solo())
    measured = _measured(imageset, test, quality)
    if dist.is_main:
        return _main_makes(make, _Channel(dist, device))
    return _others_wait(cache_dir / f"features-{key}.npz", device, dist, quality if measured else None)


def _measured(imageset: ImageSet, test: ImageSet | None, measure) -> bool:
    """Whether a build measures the features' quality on the test split (the same answer in every process)."""
    return measure is not None and test is not None and test.labels is not None and imageset.labels is not None \
        and len(test) > 0


# What process 0 broadcasts to the processes waiting for its features: still at work; the features it found
# in the cache or made (then its views follow, and for made ones every process measures their quality, which
# may search neighbours over all processes); saved; failed.
_ALIVE, _FOUND, _MADE, _SAVED, _FAILED = range(5)
HEARTBEAT_SECONDS = 60.0  # at most this long between two of its broadcasts while it trains (plus one step)


class _Solo:
    """One process: nothing to tell anyone."""

    def heartbeat(self) -> None:
        pass

    def share(self, views: dict) -> None:
        pass

    def measured(self) -> None:
        pass


class _Channel:
    """Process 0's side: heartbeats while it trains, then its views to the others (:func:`_others_wait`)."""

    def __init__(self, dist, device: str):
        import torch  # noqa: PLC0415

        self.dist, self.device = dist, device
        self.flag = torch.zeros(1, dtype=torch.int64, device=device)  # (on the device: NCCL sends GPU tensors)
        self.last = time.monotonic()
        self.phase = "alone"  # -> "together" (the others measure with it) -> "saving" (they wait for the word)

    def say(self, value: int) -> None:
        self.flag.fill_(value)
        self.dist.broadcast_(self.flag, src=0)
        self.last = time.monotonic()

    def heartbeat(self) -> None:
        if time.monotonic() - self.last >= HEARTBEAT_SECONDS:
            self.say(_ALIVE)

    def share(self, views: dict, made: bool = True) -> None:
        """The views to every process; for made ones, before their quality is measured (by all)."""
        self.say(_MADE if made else _FOUND)
        _send_views(self.dist, views, self.device)
        self.phase = "together" if made else "saving"

    def measured(self) -> None:
        """The quality measured (by all): the others now wait for process 0's word."""
        self.phase = "saving"


def _main_makes(make, channel: _Channel) -> FeatureBank:
    try:
        bank = make(channel)
        if channel.phase == "alone":  # found in the cache: the others have not had the views yet
            channel.share(bank.views, made=False)
        channel.phase = "saving"
    except BaseException:
        if channel.phase != "together":  # (together, every process meets the same error in the same place)
            channel.say(_FAILED)  # the others stop waiting with one line; process 0's own error says why
        raise
    channel.say(_SAVED)
    _send_object(channel.dist, [bank.path, bank.provenance])
    return bank


def _others_wait(path: Path, device: str, dist, measure) -> FeatureBank:
    import torch  # noqa: PLC0415

    flag = torch.zeros(1, dtype=torch.int64, device=device)

    def hear() -> int:
        dist.broadcast_(flag, src=0)
        return int(flag.item())

    views = None
    word = hear()
    while word == _ALIVE:
        word = hear()
    if word in (_FOUND, _MADE):
        views = _send_views(dist, None, device)
        if word == _MADE and measure is not None:
            measure(views["plain"], views["test_plain"])  # (process 0 records it; searches may be sharded)
        word = hear()
    if word != _SAVED or views is None:
        raise UserError(f"process {dist.rank}: process 0 could not make the SimCLR features {str(path)!r} (its "
                        f"message says why); fix that and rerun the same launch")
    where, provenance = _send_object(dist, None)
    return FeatureBank(views=views, path=where, provenance=provenance)


def _send_object(dist, obj):
    """Process 0's picklable ``obj`` on every process (returned)."""
    import torch  # noqa: PLC0415

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _send_views(dist, views: dict | None, device: str) -> dict:
    """Process 0's views (name -> float32 (n, d)) on every process; ``views`` None except on process 0."""
    import torch  # noqa: PLC0415

    shapes = _send_object(dist, None if views is None else {k: tuple(v.shape) for k, v in views.items()})
    out = {}
    for name, shape in shapes.items():
        t = torch.from_numpy(np.ascontiguousarray(views[name])).to(device) if views is not None else \
            torch.empty(shape, dtype=torch.float32, device=device)
        dist.broadcast_(t, src=0)
        out[name] = views[name] if views is not None else t.cpu().numpy()
    return out


def _make_or_load(imageset: ImageSet, cfg, cache_dir: Path, key: str, device: str, progress: bool,
                  test: ImageSet | None, threads: int | None, quality, channel) -> FeatureBank:
    """The one-process path: the cached bank (or a legacy one), else SimCLR trained and the views saved under
    the lock of ``key``. ``channel``: ``heartbeat()`` at every training step and between the extractions,
    ``share(views)`` once the views are made, before their quality is measured."""
    n = len(imageset)
    bank = _cached(cache_dir, key, n) or _legacy(cache_dir, imageset, cfg, threads, n)
    if bank is not None:
        return bank
    path = cache_dir / f"features-{key}.npz"
    try:
        with exclusive(cache_dir / f"ssl-{key}.lock", f"the SimCLR features {str(path)!r}"):
            # (made meanwhile by the run that held the lock?)
            return _cached(cache_dir, key, n) or \
                _build(imageset, cfg, cache_dir, key, device, progress, test, threads, quality, channel)
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


def _cached(cache_dir: Path, key: str, n: int) -> FeatureBank | None:
    path, sidecar = cache_dir / f"features-{key}.npz", cache_dir / f"features-{key}.json"
    bank = _load(path, n) if path.exists() else None
    if bank is not None and not sidecar.exists():
        with contextlib.suppress(OSError):  # (for people only; a read-only shared cache still serves)
            write_json(sidecar, bank.provenance)
    return bank


def _legacy(cache_dir: Path, imageset: ImageSet, cfg, threads: int | None, n: int) -> FeatureBank | None:
    """A cache file made before the thread count was in the key (its thread count unknown): used, with a
    warning naming it, so that existing caches and the results keyed on them stay valid."""
    if threads is None:
        return None
    old = cache_key(imageset, cfg)
    bank = _cached(cache_dir, old, n)
    if bank is not None:
        warnings.warn(f"feature cache {bank.path} was made before the CPU thread count was part of the cache key, "
                      f"so with an unknown thread count (features made on the CPU differ slightly by it); delete "
                      f"it to make them again with {threads} threads", RuntimeWarning, stacklevel=3)
    return bank


def _build(imageset: ImageSet, cfg, cache_dir: Path, key: str, device: str, progress: bool,
           test: ImageSet | None, threads: int | None, measure, channel) -> FeatureBank:
    """Train SimCLR (resuming from its checkpoint), extract the views and save them with their provenance."""
    import torch  # noqa: PLC0415

    from dmlp_plugin.features import ssl  # noqa: PLC0415
    from dmlp_plugin.features.extract import extract_features  # noqa: PLC0415

    path, sidecar = cache_dir / f"features-{key}.npz", cache_dir / f"features-{key}.json"
    n = len(imageset)

    ckpt = cache_dir / f"ssl-{key}.pt"
    cache_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    # one process, whatever the launch (dist=Dist()): the features of 1 and of P processes are the same
    model = ssl.train_simclr(imageset.images, cfg, device=device, progress=progress, checkpoint=ckpt,
                             dist=Dist(), on_step=channel.heartbeat)
    train_seconds = time.perf_counter() - t
    views = {}
    for name in VIEWS:
        channel.heartbeat()
        views[name] = extract_features(model, imageset.images, cfg.image_size, device, flip=(name == "hflip"))
    quality = None
    if test is not None and test.labels is not None and imageset.labels is not None and len(test):
        channel.heartbeat()
        views["test_plain"] = extract_features(model, test.images, cfg.image_size, device)
    channel.share(views)
    if _measured(imageset, test, measure):
        quality = measure(views["plain"], views["test_plain"])
    channel.measured()
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
        "world_size": 1,  # SimCLR trains in one process under any launch (the module docstring)
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
    return FeatureBank(views=views, path=str(path), provenance=provenance)


def _timm_version() -> str:
    import timm  # noqa: PLC0415

    return str(timm.__version__)
