"""``dmlp export``: hand a labels artifact (``labels.npz``) to the official code of other methods.

Every format holds one label per training sample in the data set's training order, the order ``dmlp`` loads
(CIFAR-10: data_batch_1 .. data_batch_5, rows in file order; CIFAR-100: the ``train`` file's order; both are
the order of torchvision's ``CIFAR10(train=True)`` and of DivideMix's ``dataloader_cifar.py``).

- ``dividemix``: DivideMix's noise file, a JSON list of ints. ``Train_CIFAR.py`` reads
  ``'%s/%.1f_%s.json' % (data_path, r, noise_mode)`` and silently makes new noise when that path does not
  exist, so a folder ``--out`` gets the file under exactly that name.
- ``elr``: a ``.npy`` of int64 labels. ELR's ``data_loader/cifar10.py`` makes its noise itself; load the
  file over it (:data:`ELR_NOTE`).
- ``cleanlab``: ``labels.npy`` (the given labels) and ``pred_probs.npy`` (DMLP's soft label distributions),
  for ``cleanlab.filter.find_label_issues(labels, pred_probs)``.
- ``csv``: ``index,label,confidence`` rows.

Which labels (``labels``): ``purified`` (the artifact's hard labels, the bench's purified arm) or ``noisy``
(the given labels with the trusted samples' labels put in, the bench's noisy arm). Files are written
atomically; bad input is a :class:`UserError`.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from dmlp_plugin.atomic import write_bytes, write_text
from dmlp_plugin.errors import UserError

FORMATS = ("dividemix", "elr", "cleanlab", "csv")
LABELS = ("purified", "noisy")
ORDER = ("the data set's training order, as dmlp loads it (CIFAR: data_batch_1..5 / train file order, the "
         "order of torchvision's CIFAR train set and of DivideMix's dataloader_cifar.py)")
# DivideMix's noise_mode names of our noise kinds (its dataloader knows 'sym' and 'asym')
DIVIDEMIX_MODES = {"symmetric": "sym", "asymmetric": "asym"}
ELR_NOTE = ("ELR makes its noise in data_loader/cifar10.py (CIFAR10_train.symmetric_noise / asymmetric_noise); "
            "instead of that call set train_dataset.train_labels = np.load(FILE)[train_dataset.indexs] "
            "(and val_dataset.train_labels = np.load(FILE)[val_idxs]): indexs are positions in CIFAR's training order")
CLEANLAB_NOTE = ("cleanlab: labels = np.load('labels.npy'); pred_probs = np.load('pred_probs.npy'); "
                 "cleanlab.filter.find_label_issues(labels, pred_probs)")
_SUFFIX = {"dividemix": ".json", "elr": ".npy", "csv": ".csv"}


def export_labels(artifact: str | os.PathLike, fmt: str, out: str | os.PathLike, *, labels: str | None = None,
                  rate: float | None = None, mode: str | None = None) -> dict:
    """Write the labels of ``artifact`` in format ``fmt`` at ``out`` and return a JSON-able record
    (format, labels, num_samples, num_classes, files, order, note, warnings).

    ``out``: a folder (it exists, ends in a separator or has no suffix) gets the format's file name
    (``<rate>_<mode>.json``, ``labels.npy``, ``labels.csv``, or cleanlab's two files); else the file itself.
    ``labels``: ``purified`` (default) or ``noisy`` (the default for cleanlab, whose ``labels`` are the given
    ones). ``rate`` / ``mode``: DivideMix's ``--r`` / ``--noise_mode`` for its file name, taken from the
    artifact's noise settings when not given."""
    from dmlp_plugin.artifacts import load_labels  # noqa: PLC0415

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; give one of {', '.join(FORMATS)}")
    if (rate is not None or mode is not None) and fmt != "dividemix":
        raise UserError(f"--rate / --mode name DivideMix's noise file; format {fmt} does not use them, remove them")
    which = labels or ("noisy" if fmt == "cleanlab" else "purified")
    if which not in LABELS:
        raise UserError(f"unknown labels {which!r}; give purified or noisy")
    art = load_labels(artifact)
    y = art.hard.copy() if which == "purified" else given_labels(art)
    record = {"format": fmt, "labels": which, "artifact": str(artifact), "num_samples": int(y.size),
              "num_classes": art.num_classes, "order": ORDER, "warnings": []}
    if fmt == "dividemix":
        record.update(_dividemix(art, y, Path(out), rate, mode))
    elif fmt == "elr":
        record.update(files=[_write_npy(_target(Path(out), "labels.npy", fmt), y)], note=ELR_NOTE)
    elif fmt == "cleanlab":
        record.update(_cleanlab(art, y, Path(out), artifact))
    else:
        record.update(files=[_write_csv(_target(Path(out), "labels.csv", fmt), y, _confidence(art, y, which))])
    return record


def given_labels(art) -> np.ndarray:
    """The given (noisy) labels with the trusted samples' labels put in: what the bench's noisy arm trains on."""
    y = art.noisy.copy()
    y[art.meta_indices] = art.meta_labels
    return y


def _is_folder(out: Path) -> bool:
    return out.is_dir() or str(out).endswith(("/", os.sep)) or not out.suffix


def _target(out: Path, name: str, fmt: str) -> Path:
    """The file to write: ``out/name`` for a folder, else ``out`` itself (its suffix must be the format's)."""
    if _is_folder(out):
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {str(out)!r} exists and is not a folder; give a folder or a {Path(name).suffix} file")
        return out / name
    want = _SUFFIX[fmt]
    if out.suffix.lower() != want:
        raise UserError(f"--out {str(out)!r}: format {fmt} writes a {want} file; give a {want} path or a folder")
    return out


def _write_npy(path: Path, array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(path, buf.getvalue())
    return str(path)


def _write_csv(path: Path, y: np.ndarray, confidence: np.ndarray) -> str:
    rows = "".join(f"{i},{int(label)},{float(c):.6f}\n" for i, (label, c) in enumerate(zip(y, confidence)))
    write_text(path, "index,label,confidence\n" + rows)
    return str(path)


def _confidence(art, y: np.ndarray, which: str) -> np.ndarray:
    """The purifier's confidence in each exported label: the artifact's confidence for purified labels, the
    soft probability of the given label for noisy ones."""
    if which == "purified":
        return art.confidence
    return art.soft[np.arange(y.size), y]


def dividemix_name(rate: float, mode: str) -> str:
    """DivideMix's noise file name: ``'%.1f_%s.json' % (r, noise_mode)`` (Train_CIFAR.py)."""
    return "%.1f_%s.json" % (rate, mode)


def _dividemix_setting(art, rate: float | None, mode: str | None) -> tuple[float, str]:
    """(r, noise_mode) for the file name: the given ones, else the artifact's noise settings."""
    noise = (art.provenance.get("config") or {}).get("noise") or {}
    kind = noise.get("kind")
    if mode is None:
        mode = DIVIDEMIX_MODES.get(kind)
        if mode is None:
            what = "does not record its noise kind" if kind is None else f"has noise kind {kind!r}, which has no " \
                                                                           f"DivideMix name"
            raise UserError(f"the artifact {what}; give --mode and --rate (DivideMix's --noise_mode and --r, which "
                            f"name the file it reads)")
    if rate is None:
        rate = noise.get("rate")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool):
            raise UserError("the artifact does not record its noise rate; give --rate (DivideMix's --r)")
    if not 0 <= float(rate) <= 1:
        raise UserError(f"--rate {rate!r} is outside [0, 1]; give DivideMix's --r, e.g. 0.8")
    if not mode or any(c in mode for c in "/\\") or mode.startswith("."):
        raise UserError(f"--mode {mode!r} is not a file-name part; give DivideMix's --noise_mode, e.g. sym or asym")
    return float(rate), mode


def _dividemix(art, y: np.ndarray, out: Path, rate: float | None, mode: str | None) -> dict:
    r, m = _dividemix_setting(art, rate, mode)
    name = dividemix_name(r, m)
    path = _target(out, name, "dividemix")
    warnings = []
    if path.name != name:
        warnings.append(f"DivideMix reads {name} in its --data_path (from --r {r:g} --noise_mode {m}) and "
                        f"silently makes new noise when it is missing: rename {path.name} to {name}")
    dataset = ((art.provenance.get("config") or {}).get("dataset") or {}).get("name")
    if y.size != 50000 or (dataset is not None and dataset not in ("cifar10", "cifar100")):
        warnings.append(f"DivideMix's dataloader_cifar.py reads the 50,000 CIFAR training labels; this artifact "
                        f"holds {y.size} labels of data set {dataset!r}")
    write_text(path, json.dumps([int(v) for v in y]))
    extra = " --dataset cifar100 --num_class 100" if dataset == "cifar100" else ""
    return {"files": [str(path)], "warnings": warnings,
            "note": f"DivideMix: python Train_CIFAR.py --data_path {path.parent} --r {r:g} --noise_mode {m}{extra} "
                    f"(--data_path: the folder holding data_batch_1..5 and {name})"}


def _cleanlab(art, y: np.ndarray, out: Path, artifact) -> dict:
    if not _is_folder(out):
        raise UserError(f"--out {str(out)!r}: format cleanlab writes two files (labels.npy, pred_probs.npy); "
                        f"give a folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder; give a folder")
    probs = _pred_probs(art.soft, artifact)
    return {"files": [_write_npy(out / "labels.npy", y), _write_npy(out / "pred_probs.npy", probs)],
            "note": CLEANLAB_NOTE}


def _pred_probs(soft: np.ndarray, artifact) -> np.ndarray:
    """The soft label distributions as cleanlab's ``pred_probs``: (N, C) float32, rows summing to 1.
    One-hot or invalid rows everywhere mean the artifact has no distributions to give: UserError."""
    where = f"labels artifact {str(artifact)!r}"
    if not np.all(np.isfinite(soft)) or soft.min() < 0:
        raise UserError(f"{where} has soft labels with NaN, Inf or negative values; rerun `dmlp purify`")
    sums = soft.sum(axis=1)
    if np.any(np.abs(sums - 1) > 1e-3):
        raise UserError(f"{where}: soft labels are not distributions (row {int(np.argmax(np.abs(sums - 1)))} sums to "
                        f"{sums[np.argmax(np.abs(sums - 1))]:.3f}); rerun `dmlp purify`")
    if np.all(soft.max(axis=1) >= 1 - 1e-6):
        raise UserError(f"{where} has one-hot soft labels only (preprocessor identity?), no predicted "
                        f"probabilities for cleanlab; purify with a preprocessor that gives distributions (dmlp)")
    return (soft / sums[:, None]).astype(np.float32)
