"""The labels artifact (``labels.npz``): purified labels with their provenance and a sample-order
fingerprint, written atomically and read back without pickle."""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmlp_plugin.atomic import write_npz
from dmlp_plugin.errors import UserError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LabelsArtifact:
    """Purified labels of the N training samples of one data set, in the data set's order.

    hard (N,) int64 purified labels; soft (N, C) float32 distributions; confidence (N,) float32 = max of
    soft; neighbour_agreement (N,) float32: fraction of a sample's k faiss neighbours whose purified label
    equals its own; noisy (N,) int64 labels before purification; meta_indices (M,) int64 trusted samples,
    meta_labels (M,) their labels; true_labels (N,) int64 when known, else None. fingerprint: the data
    set's sample-order fingerprint; provenance: JSON-able dict (config, features, versions).
    """

    hard: np.ndarray
    soft: np.ndarray
    confidence: np.ndarray
    neighbour_agreement: np.ndarray
    noisy: np.ndarray
    meta_indices: np.ndarray
    meta_labels: np.ndarray
    fingerprint: str
    true_labels: np.ndarray | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.soft.shape[1])


_ARRAYS = ("hard", "soft", "confidence", "neighbour_agreement", "noisy", "meta_indices", "meta_labels")


def save_labels(path: str | Path, art: LabelsArtifact) -> None:
    arrays = {k: getattr(art, k) for k in _ARRAYS}
    if art.true_labels is not None:
        arrays["true_labels"] = art.true_labels
    arrays["fingerprint"] = np.array(art.fingerprint)
    arrays["format_version"] = np.array(FORMAT_VERSION)
    arrays["provenance_json"] = np.array(json.dumps(art.provenance, default=str))
    write_npz(path, **arrays)


def load_labels(path: str | Path, expected_fingerprint: str | None = None) -> LabelsArtifact:
    """Read and check a labels artifact; any problem is a UserError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labels artifact {str(path)!r} not found; run `dmlp purify CONFIG --out DIR` to make DIR/labels.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise UserError(f"labels artifact {str(path)!r} is corrupt or truncated ({type(e).__name__}); "
                        f"delete it and rerun `dmlp purify`") from None
    missing = [k for k in (*_ARRAYS, "fingerprint") if k not in data]
    if missing:
        raise UserError(f"labels artifact {str(path)!r} lacks {', '.join(missing)}; it was not written by dmlp purify, rerun it")
    n = data["hard"].shape[0]
    checks = [
        (data["hard"].ndim == 1 and data["hard"].dtype.kind in "iu", "hard must be a 1-d integer array"),
        (data["soft"].ndim == 2 and data["soft"].shape[0] == n, "soft must be (N, C) with N = len(hard)"),
        (data["noisy"].shape == (n,), "noisy must have one label per sample"),
        (data["confidence"].shape == (n,), "confidence must have one value per sample"),
        (data["meta_indices"].shape == data["meta_labels"].shape, "meta_indices and meta_labels differ in length"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"labels artifact {str(path)!r} is inconsistent: {msg}; rerun `dmlp purify`")
    c = data["soft"].shape[1]
    if n and (data["hard"].min() < 0 or data["hard"].max() >= c):
        raise UserError(f"labels artifact {str(path)!r} has hard labels outside [0, {c}); rerun `dmlp purify`")
    fingerprint = str(data["fingerprint"])
    if expected_fingerprint is not None and fingerprint != expected_fingerprint:
        raise UserError(f"labels artifact {str(path)!r} belongs to another data set or sample order "
                        f"(fingerprint {fingerprint}, this data set {expected_fingerprint}); purify this data set again")
    try:
        provenance = json.loads(str(data.get("provenance_json", "{}")))
    except json.JSONDecodeError:
        provenance = {}
    return LabelsArtifact(
        hard=data["hard"].astype(np.int64), soft=data["soft"].astype(np.float32),
        confidence=data["confidence"].astype(np.float32),
        neighbour_agreement=data["neighbour_agreement"].astype(np.float32),
        noisy=data["noisy"].astype(np.int64), meta_indices=data["meta_indices"].astype(np.int64),
        meta_labels=data["meta_labels"].astype(np.int64), fingerprint=fingerprint,
        true_labels=data["true_labels"].astype(np.int64) if "true_labels" in data else None,
        provenance=provenance)
