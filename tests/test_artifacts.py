"""The labels artifact round-trips, and a bad file is a clean UserError, never a crash or a pickle load."""

import numpy as np
import pytest

from dmlp_plugin.artifacts import LabelsArtifact, load_labels, save_labels
from dmlp_plugin.errors import UserError


def _artifact(n=50, c=4, seed=0):
    rng = np.random.default_rng(seed)
    soft = rng.dirichlet(np.ones(c), n).astype(np.float32)
    return LabelsArtifact(hard=soft.argmax(1).astype(np.int64), soft=soft, confidence=soft.max(1),
                          neighbour_agreement=rng.random(n).astype(np.float32),
                          noisy=rng.integers(0, c, n), meta_indices=np.array([1, 5, 9]),
                          meta_labels=np.array([0, 1, 2]), fingerprint="abc123",
                          true_labels=rng.integers(0, c, n), provenance={"config": {"seed": 3}})


def test_round_trip(tmp_path):
    art = _artifact()
    save_labels(tmp_path / "labels.npz", art)
    back = load_labels(tmp_path / "labels.npz", expected_fingerprint="abc123")
    for k in ("hard", "soft", "confidence", "neighbour_agreement", "noisy", "meta_indices", "meta_labels",
              "true_labels"):
        np.testing.assert_array_equal(getattr(back, k), getattr(art, k))
    assert back.provenance == {"config": {"seed": 3}}
    assert back.hard.dtype == np.int64 and back.num_classes == 4
    # no pickle needed to read it
    with np.load(tmp_path / "labels.npz", allow_pickle=False) as z:
        assert z["hard"].dtype.kind == "i"


def test_truncated_file_is_a_user_error(tmp_path):
    save_labels(tmp_path / "labels.npz", _artifact())
    data = (tmp_path / "labels.npz").read_bytes()
    (tmp_path / "labels.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_labels(tmp_path / "labels.npz")


def test_wrong_data_set_is_refused(tmp_path):
    save_labels(tmp_path / "labels.npz", _artifact())
    with pytest.raises(UserError, match="another data set or sample order"):
        load_labels(tmp_path / "labels.npz", expected_fingerprint="different")


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_labels(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", hard=np.zeros(3, np.int64))
    with pytest.raises(UserError, match="lacks"):
        load_labels(tmp_path / "other.npz")


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    save_labels(tmp_path / "labels.npz", _artifact(seed=0))
    before = (tmp_path / "labels.npz").read_bytes()
    import dmlp_plugin.atomic as atomic

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        save_labels(tmp_path / "labels.npz", _artifact(seed=1))
    assert (tmp_path / "labels.npz").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["labels.npz"]  # no temp file left behind
