"""Label noise models (registry kind ``noise``): each kind is its own registered function, whose keyword
parameters are the ``noise.*`` settings it takes (:func:`kind_parameters`); ``registry.yaml`` names them, and
the pipeline, the benchmark and :func:`apply_noise` look a kind up only through the registry. The pipeline hands
a kind every setting (the NoiseModel protocol of :mod:`dmlp_plugin.interfaces`); one the kind does not take must
be unset, else a one-line UserError names it and the kind's parameters (:func:`check_settings`, also run on the
config before any work by :func:`check_config`).

Conventions differ between codebases (see BASELINES.md, "Noise conventions"), so each is named and
recorded: every result carries the requested rate, the measured flip rate (fraction of labels that differ
from the truth) and per-class flip rates.

- ``none`` (:func:`no_noise`, no parameters): the labels as given.
- ``symmetric`` (:func:`symmetric_noise`: rate, include_true_class): DivideMix's rule. Exactly ``int(rate * N)``
  samples, drawn by a permutation, get a new label uniform over all C classes (``include_true_class=True``: the
  true class can come back, flip rate ~ rate * (1 - 1/C), DivideMix and ELR) or over the other C-1 classes
  (``False``: flip rate ~ rate, Co-teaching).
- ``asymmetric`` (:func:`asymmetric_noise`: rate): DivideMix's CIFAR-10 mapping. ``int(rate * N)`` samples are
  drawn; those of a mapped class move (truck->automobile, bird->airplane, deer->horse, cat<->dog), the others
  keep their label, so each mapped class flips ~ rate and 40% noise flips ~20% of CIFAR-10.
- ``pairflip`` (:func:`pairflip_noise`: rate, pairs): Co-teaching's pair noise. Each sample of a source class i
  moves to ``pairs[i]`` with probability ``rate`` (an independent draw per sample); default pairs i -> (i + 1) mod C.
- ``human`` (:func:`human_noise`: file, key): labels read from a file (CIFAR-N style): .npy, .npz / .pt dicts of
  arrays with ``key``, or DivideMix's .json noise file (a list of int labels, e.g. ``0.8_sym.json``), in the
  training order.
- ``instance`` (:func:`apply_instance_noise`: rate, and the training images): instance-dependent noise, the
  generator of Xia et al., NeurIPS 2020: each image's flip distribution comes from a random projection of its
  pixels.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import re
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import numpy as np

from dmlp_plugin.errors import UserError
from dmlp_plugin.metrics import transition_matrix

__all__ = ["KINDS", "SETTINGS", "CIFAR10_ASYMMETRIC", "NoisyLabels", "apply_noise", "no_noise", "symmetric_noise",
           "asymmetric_noise", "pairflip_noise", "human_noise", "apply_instance_noise", "instance_flip_distribution",
           "kind_parameters", "check_settings"]

KINDS = ("none", "symmetric", "asymmetric", "pairflip", "human")

# The noise.* settings a config entry carries besides its kind (dmlp_plugin.config.NoiseConfig). The pipeline
# hands every one of them to the kind's function (the NoiseModel protocol, dmlp_plugin.interfaces); a function
# names the ones it takes as keyword parameters, and any other must be left unset (the value below). ``rate``
# is the one exception: every entry carries a noise level (NoiseConfig.rate defaults to 0.5, and `--set
# noise.kind=human` on a config that names a rate is the README's way to start from a file), and the kinds
# that take none (none, human) record the measured flip rate instead.
SETTINGS = ("rate", "include_true_class", "pairs", "file", "key")
UNSET = {"include_true_class": True, "pairs": None, "file": None, "key": None}
IGNORED_WHEN_NOT_TAKEN = ("rate",)
_NOT_SETTINGS = ("seed", "images", "kind")  # what the pipeline gives besides the settings

# DivideMix's dataloader_cifar.py: {truck: automobile, bird: airplane, deer: horse, cat: dog, dog: cat}
# in CIFAR-10's class order (0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse,
# 8 ship, 9 truck).
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

_CONVENTIONS = {
    "none": "labels as given; no noise added",
    "symmetric": "DivideMix symmetric: int(rate*N) samples drawn by a permutation get a label uniform over {}",
    "asymmetric": ("DivideMix asymmetric (CIFAR-10 class order): int(rate*N) samples drawn by a permutation; "
                   "those of a mapped class move truck->automobile, bird->airplane, deer->horse, cat<->dog"),
    "pairflip": "Co-teaching pair noise: each sample of class i moves to pairs[i] with probability rate",
    "human": "human labels read from a file; the rate is the measured flip rate",
}


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value, compare .labels instead
class NoisyLabels:
    """The training labels after noise.

    labels: (N,) int64. kind: the noise kind. rate: the requested rate (for ``human`` and ``none``, the
    measured flip rate). flip_rate: measured fraction of labels that differ from the truth.
    include_true_class: the symmetric convention (None for other kinds). details: JSON-able record
    (convention text, rates, mapping or pairs, file and key, per-class flip rates).
    """

    labels: np.ndarray
    kind: str
    rate: float
    flip_rate: float
    include_true_class: bool | None
    details: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# which settings a kind takes


def kind_parameters(fn) -> tuple[str, ...]:
    """The noise.* settings (:data:`SETTINGS`) the noise function ``fn`` takes by name, in signature order.
    A function with the whole protocol spelled out (a plugin's) takes them all."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return SETTINGS
    named = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return tuple(n for n in named if n in SETTINGS)


def _kinds_taking(setting: str) -> list[str]:
    """Registered noise kinds whose function takes ``setting`` (for the hint of a refusal)."""
    from dmlp_plugin.registry import load_registry  # noqa: PLC0415 - the registry imports noise targets lazily

    reg = load_registry()
    out = []
    for name in reg.names("noise"):
        try:
            fn = reg.get("noise", name)
        except UserError:  # a broken plugin: not a hint
            continue
        if setting in kind_parameters(fn) and set(kind_parameters(fn)) != set(SETTINGS):
            out.append(name)
    return out


def check_settings(kind: str, fn, settings: dict, where: str = "noise") -> None:
    """Refuse a noise.* setting that noise kind ``kind`` (registered function ``fn``) does not take: one line
    naming the setting and the kind's parameters. ``settings``: {name: value} of any of :data:`SETTINGS`
    (a value equal to :data:`UNSET` is not given; ``rate`` is ignored by kinds without one). Any other name
    is a UserError too (a typo)."""
    takes = kind_parameters(fn)
    for name, value in settings.items():
        if name in takes:
            continue
        if name not in SETTINGS:
            raise UserError(f"{where}: noise kind {kind!r} got the unknown setting {name!r} ({_takes_text(takes)}); "
                            f"give one of {', '.join(SETTINGS)}")
        if name in IGNORED_WHEN_NOT_TAKEN or (name in UNSET and value == UNSET[name]
                                              and type(value) is type(UNSET[name])):
            continue
        takers = _kinds_taking(name)
        hint = f" or set kind: {' / '.join(takers)}" if takers else ""
        raise UserError(f"{where}.{name}={value!r} is not a parameter of noise kind {kind!r} ({_takes_text(takes)}); "
                        f"remove it{hint}")


def check_config(noise, where: str = "noise") -> None:
    """A config's noise entry (:class:`dmlp_plugin.config.NoiseConfig`) against its kind's registered
    function: an unknown kind, or a setting the kind does not take (``pairs`` on symmetric, ``file`` on
    pairflip, ``include_true_class: false`` on anything but symmetric), is a one-line UserError naming the
    setting and the kind's parameters. ``rate`` passes for the kinds that take none (none, human: they record
    the measured flip rate), so ``--set noise.kind=human`` works on a config that names a rate. Run by the
    purify and bench validation, before any work."""
    from dmlp_plugin.registry import load_registry  # noqa: PLC0415

    fn = load_registry().get("noise", noise.kind)
    settings = {f.name: getattr(noise, f.name) for f in dataclasses.fields(noise) if f.name != "kind"}
    check_settings(noise.kind, fn, settings, where)


def check_configs(cfg) -> None:
    """:func:`check_config` on a PurifyConfig's noise entry or on each of a BenchConfig's."""
    if isinstance(cfg.noise, list):
        for i, n in enumerate(cfg.noise):
            check_config(n, f"noise[{i}]")
    else:
        check_config(cfg.noise)


def _takes_text(takes) -> str:
    return f"its parameters: {', '.join(takes)}" if takes else "it takes no parameters"


def _unused(kind: str, fn, unused: dict) -> None:
    """What a kind's function got besides its own parameters (the rest of the NoiseModel protocol): the kind
    must be its own, the settings unset."""
    given = unused.pop("kind", kind)
    if given != kind:
        raise UserError(f"noise kind {given!r} asked of the {kind!r} noise model; look the kind up in the registry "
                        f"(dmlp_plugin.data.noise.apply_noise(truth, C, kind={given!r}, ...))")
    if "rate" in unused:  # not this kind's, but a rate out of range is still a mistake
        _check_rate(unused["rate"])
    check_settings(kind, fn, unused)


def apply_noise(truth, num_classes: int, *, kind: str, **settings) -> NoisyLabels:
    """The registered noise model ``kind`` (registry kind ``noise``, plugins included) applied to the true
    labels ``truth`` (N,) of ``num_classes`` classes: ``settings`` are its parameters (``rate``, ``seed``,
    ``include_true_class``, ``pairs``, ``file``, ``key``, ``images``, as the kind takes them; see
    :func:`symmetric_noise`, :func:`asymmetric_noise`, :func:`pairflip_noise`, :func:`human_noise`,
    :func:`no_noise`, :func:`apply_instance_noise`). An unknown kind, or a setting the kind does not take:
    UserError. Randomness comes only from ``seed``: the same arguments give the same labels."""
    from dmlp_plugin.registry import load_registry  # noqa: PLC0415

    fn = load_registry().get("noise", kind)
    return fn(truth, num_classes, kind=kind, **settings)


# ---------------------------------------------------------------------------------------------------------
# the class-level kinds, one function each


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise UserError(f"noise.rate={rate!r} is outside [0, 1); give a fraction such as 0.5")
    return float(rate)


def _result(kind: str, truth: np.ndarray, labels: np.ndarray, num_classes: int, rate: float | None,
            details: dict, include_true_class: bool | None = None) -> NoisyLabels:
    """NoisyLabels with the measured rates recorded. ``rate`` None: nothing requested (human), the rate is
    the measured flip rate."""
    labels = labels.astype(np.int64, copy=False)
    flip_rate = float(np.mean(labels != truth))
    details.update({
        "requested_rate": rate,
        "flip_rate": flip_rate,
        "per_class_flip_rate": _per_class_flip_rates(truth, labels, num_classes),
    })
    if include_true_class is not None:
        details["include_true_class"] = include_true_class
    return NoisyLabels(labels=labels, kind=kind, rate=flip_rate if rate is None else rate, flip_rate=flip_rate,
                       include_true_class=include_true_class, details=details)


def no_noise(truth, num_classes: int, *, seed: int = 0, **unused) -> NoisyLabels:
    """Noise kind ``none``: the labels as given (rate 0). No parameters (``seed`` is not used)."""
    _unused("none", no_noise, unused)
    num_classes = _check_num_classes(num_classes)
    truth = _check_truth(truth, num_classes)
    return _result("none", truth, truth.copy(), num_classes, 0.0, {"convention": _CONVENTIONS["none"]})


def symmetric_noise(truth, num_classes: int, *, rate: float = 0.0, include_true_class: bool = True,
                    seed: int = 0, **unused) -> NoisyLabels:
    """Noise kind ``symmetric``, DivideMix's rule: exactly ``int(rate * N)`` samples, drawn by a permutation of
    ``np.random.default_rng(seed)``, get a new label uniform over all C classes (``include_true_class``: the
    true class can come back, flip rate ~ rate * (1 - 1/C)) or over the other C - 1 (False: flip rate ~ rate,
    Co-teaching's convention)."""
    rate = _check_rate(rate)
    _unused("symmetric", symmetric_noise, unused)
    num_classes = _check_num_classes(num_classes)
    truth = _check_truth(truth, num_classes)
    rng = np.random.default_rng(seed)
    labels = truth.copy()
    chosen = rng.permutation(truth.shape[0])[: int(rate * truth.shape[0])]
    if include_true_class:
        labels[chosen] = rng.integers(0, num_classes, size=chosen.size)
    else:
        if num_classes < 2:
            raise UserError("symmetric noise with include_true_class=false needs at least 2 classes")
        # An offset in 1..C-1 is uniform over the other classes and never lands on the true one.
        labels[chosen] = (truth[chosen] + rng.integers(1, num_classes, size=chosen.size)) % num_classes
    details = {"convention": _CONVENTIONS["symmetric"].format(
        f"all {num_classes} classes (the true class may come back)" if include_true_class
        else f"the other {num_classes - 1} classes"), "num_drawn": int(chosen.size)}
    return _result("symmetric", truth, labels, num_classes, rate, details, bool(include_true_class))


def asymmetric_noise(truth, num_classes: int, *, rate: float = 0.0, seed: int = 0, **unused) -> NoisyLabels:
    """Noise kind ``asymmetric``, DivideMix's CIFAR-10 mapping: ``int(rate * N)`` samples are drawn (a
    permutation of ``np.random.default_rng(seed)``); those of a mapped class move (truck->automobile,
    bird->airplane, deer->horse, cat<->dog), the others keep their label. Needs 10 classes."""
    rate = _check_rate(rate)
    _unused("asymmetric", asymmetric_noise, unused)
    num_classes = _check_num_classes(num_classes)
    truth = _check_truth(truth, num_classes)
    rng = np.random.default_rng(seed)
    if num_classes != 10:
        raise UserError(f"asymmetric noise is CIFAR-10's class mapping and needs 10 classes, not {num_classes}; "
                        f"use kind: pairflip with pairs: {{source: target, ...}} for other data sets")
    target = np.arange(10)
    for src, dst in CIFAR10_ASYMMETRIC.items():
        target[src] = dst
    labels = truth.copy()
    chosen = rng.permutation(truth.shape[0])[: int(rate * truth.shape[0])]
    labels[chosen] = target[truth[chosen]]
    details = {"convention": _CONVENTIONS["asymmetric"],
               "mapping": {str(s): d for s, d in CIFAR10_ASYMMETRIC.items()}, "num_drawn": int(chosen.size)}
    return _result("asymmetric", truth, labels, num_classes, rate, details)


def pairflip_noise(truth, num_classes: int, *, rate: float = 0.0, pairs: dict | None = None, seed: int = 0,
                   **unused) -> NoisyLabels:
    """Noise kind ``pairflip``, Co-teaching's pair noise: each sample of a source class i moves to
    ``pairs[i]`` with probability ``rate`` (an independent draw per sample from
    ``np.random.default_rng(seed)``). ``pairs``: source class -> target class (keys may be str, as YAML gives
    them); None: i -> (i + 1) mod C."""
    rate = _check_rate(rate)
    _unused("pairflip", pairflip_noise, unused)
    num_classes = _check_num_classes(num_classes)
    truth = _check_truth(truth, num_classes)
    rng = np.random.default_rng(seed)
    mapping = _check_pairs(pairs, num_classes)
    target = np.arange(num_classes)
    for src, dst in mapping.items():
        target[src] = dst
    flip = rng.random(truth.shape[0]) < rate
    labels = np.where(flip, target[truth], truth)
    details = {"convention": _CONVENTIONS["pairflip"], "pairs": {str(s): d for s, d in mapping.items()}}
    return _result("pairflip", truth, labels, num_classes, rate, details)


def human_noise(truth, num_classes: int, *, file=None, key: str | None = None, seed: int = 0,
                **unused) -> NoisyLabels:
    """Noise kind ``human``: labels read from ``file`` (CIFAR-N style), in the training order: a .npy, a .npz /
    .pt dict of arrays (``key`` picks one), or DivideMix's .json noise file (a list of int labels, e.g.
    ``0.8_sym.json``). Nothing is drawn (``seed`` is not used); the rate is the measured flip rate."""
    _unused("human", human_noise, unused)
    num_classes = _check_num_classes(num_classes)
    truth = _check_truth(truth, num_classes)
    labels, source = _read_human_labels(file, key, truth.shape[0], num_classes, truth)
    return _result("human", truth, labels, num_classes, None, {"convention": _CONVENTIONS["human"], **source})


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise UserError(f"num_classes={num_classes!r} is not a positive integer")
    return int(num_classes)


def _check_truth(truth, num_classes: int) -> np.ndarray:
    """(N,) integer labels in [0, C) -> (N,) int64 (the same array when it already is int64)."""
    truth = np.asarray(truth)
    if truth.ndim != 1 or truth.size == 0:
        raise UserError(f"true labels have shape {truth.shape}; expected a non-empty 1-d array (N,)")
    if not np.issubdtype(truth.dtype, np.integer):
        raise UserError(f"true labels have dtype {truth.dtype}; expected integer class indices")
    if truth.min() < 0 or truth.max() >= num_classes:
        raise UserError(f"true labels span {truth.min()}..{truth.max()}, outside 0..{num_classes - 1} "
                        f"for {num_classes} classes")
    return truth.astype(np.int64, copy=False)


def _as_class(value, what: str, num_classes: int) -> int:
    # YAML gives mapping keys as str ("3") or int; bools are ints in Python but never a class.
    if isinstance(value, bool):
        raise UserError(f"noise.pairs {what} {value!r} is not a class index")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise UserError(f"noise.pairs {what} {value!r} is not a class index; give e.g. pairs: {{9: 1, 2: 0}}")
    if not 0 <= value < num_classes:
        raise UserError(f"noise.pairs {what} {value} is outside 0..{num_classes - 1}")
    return int(value)


def _check_pairs(pairs, num_classes: int) -> dict[int, int]:
    """``pairs`` -> {source: target} with both in [0, C) and source != target; None -> i -> (i+1) mod C."""
    if pairs is None:
        if num_classes < 2:
            raise UserError("pairflip noise needs at least 2 classes")
        return {i: (i + 1) % num_classes for i in range(num_classes)}
    if not isinstance(pairs, dict) or not pairs:
        raise UserError(f"noise.pairs={pairs!r} is not a non-empty mapping; give source: target, e.g. {{9: 1, 2: 0}}")
    mapping: dict[int, int] = {}
    for src, dst in pairs.items():
        s, d = _as_class(src, "source", num_classes), _as_class(dst, "target", num_classes)
        if s == d:
            raise UserError(f"noise.pairs maps class {s} to itself; remove that pair")
        if s in mapping:
            raise UserError(f"noise.pairs names source class {s} twice (as {src!r}); keep one")
        mapping[s] = d
    return dict(sorted(mapping.items()))


def _per_class_flip_rates(truth: np.ndarray, labels: np.ndarray, num_classes: int) -> list:
    """[P(label != truth | truth = c) for c in range(C)], None for classes without samples."""
    t = transition_matrix(truth, labels, num_classes)
    counts = np.bincount(truth, minlength=num_classes)
    return [round(float(1.0 - t[c, c]), 6) if counts[c] else None for c in range(num_classes)]


def _torch_safe_numpy_globals() -> list:
    """What ``torch.load(weights_only=True)`` must be told to build numpy arrays of numbers: the array
    reconstructor under its numpy 2 and numpy 1 names, ndarray, dtype and the numeric dtype classes."""
    try:
        multiarray = import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = import_module("numpy.core.multiarray")
    reconstruct = multiarray._reconstruct
    dtype_names = ("BoolDType", "ByteDType", "UByteDType", "ShortDType", "UShortDType", "IntDType", "UIntDType",
                   "LongDType", "ULongDType", "LongLongDType", "ULongLongDType", "Int8DType", "UInt8DType",
                   "Int16DType", "UInt16DType", "Int32DType", "UInt32DType", "Int64DType", "UInt64DType",
                   "Float16DType", "Float32DType", "Float64DType")
    dtypes = [getattr(np.dtypes, n) for n in dtype_names if hasattr(np.dtypes, n)]
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, *dtypes]


def _load_label_arrays(path: Path) -> dict:
    """A labels file -> {key: array}; a .npy gives {None: array}."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return {None: _load_json_labels(path)}
    try:
        if suffix == ".npy":
            return {None: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".pt":
            import torch  # noqa: PLC0415 (only .pt files need torch)

            with torch.serialization.safe_globals(_torch_safe_numpy_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise UserError(f"noise.file {str(path)!r} holds a {type(obj).__name__}, not a dict of label "
                                f"arrays; save a dict, e.g. torch.save({{'aggre_label': labels}}, path)")
            return {str(k): (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in obj.items()}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (numpy/torch raise many types for a bad file; all mean the same)
        raise UserError(f"noise.file {str(path)!r} cannot be read as {suffix} label arrays ({_reason(e)}); "
                        f"it must hold only numeric arrays (no pickled objects)") from None
    raise UserError(f"noise.file {str(path)!r} has suffix {suffix!r}; give a .npy, .npz, .pt or .json file")


def _load_json_labels(path: Path) -> np.ndarray:
    """DivideMix's noise file (``'%.1f_%s.json' % (r, noise_mode)``): a JSON list of int labels, one per
    training sample in the data set's training order -> (N,) int64. Anything else: UserError."""
    import json  # noqa: PLC0415

    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"noise.file {str(path)!r} is not valid JSON ({_reason(e)}); give DivideMix's noise file, "
                        f"a JSON list of integer labels such as [3, 8, 8, 0, ...]") from None
    if not isinstance(obj, list) or not obj:
        raise UserError(f"noise.file {str(path)!r} holds a JSON {type(obj).__name__}, not a non-empty list of labels; "
                        f"give DivideMix's noise file, a JSON list of integer labels such as [3, 8, 8, 0, ...]")
    bad = next((i for i, v in enumerate(obj) if isinstance(v, bool) or not isinstance(v, int)), None)
    if bad is not None:
        raise UserError(f"noise.file {str(path)!r}: item {bad} is {obj[bad]!r}, not an integer class index; "
                        f"every item of the list must be an int")
    return np.asarray(obj, dtype=np.int64)


def _reason(err: Exception) -> str:
    """One line saying why a load failed. torch's weights_only error is a page of advice (to load with
    weights_only=False, which we never do) around one useful sentence: keep that sentence."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if found:
        return found.group(1).split(". ")[0].rstrip(". ")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _read_human_labels(file, key, n: int, num_classes: int, truth: np.ndarray) -> tuple[np.ndarray, dict]:
    """(N,) int64 labels from ``file`` (``key`` selects the array in a .npz/.pt) and a JSON-able record."""
    if file is None:
        raise UserError("noise kind human needs noise.file: a .npy, .npz, .pt or DivideMix .json of labels (e.g. "
                        "CIFAR-10_human.pt with key aggre_label, or 0.8_sym.json)")
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"noise.file {str(path)!r} not found; give the path of the human labels file "
                        f"(CIFAR-N: download CIFAR-10_human.pt from the CIFAR-N repository)")
    arrays = _load_label_arrays(path)
    if None in arrays:  # .npy
        if key is not None:
            raise UserError(f"noise.key={key!r} given but {str(path)!r} is a {path.suffix.lower()} holding one array; "
                            f"remove the key")
        labels = arrays[None]
    else:
        available = ", ".join(sorted(arrays))
        if key is None:
            raise UserError(f"noise.file {str(path)!r} holds several arrays; set noise.key to one of: {available}")
        if key not in arrays:
            raise UserError(f"noise.key={key!r} is not in {str(path)!r}; available keys: {available}")
        labels = arrays[key]
    labels = _check_label_array(np.asarray(labels), f"{str(path)!r}" + (f" key {key!r}" if key else ""),
                                n, num_classes)
    # CIFAR-N files carry the clean labels too: if they disagree with the data set's labels, the file is
    # for another data set or another sample order, and every "noisy" label would be misaligned.
    clean = arrays.get("clean_label") if key != "clean_label" else None
    if clean is not None:
        clean = np.asarray(clean)
        if clean.shape == truth.shape and np.issubdtype(clean.dtype, np.integer) and np.any(clean != truth):
            raise UserError(f"clean_label in noise.file {str(path)!r} differs from the data set's labels on "
                            f"{int(np.sum(clean != truth))} of {n} samples; the file belongs to another data set "
                            f"or sample order")
    return labels, {"file": str(path), "key": key}


def _check_label_array(labels: np.ndarray, where: str, n: int, num_classes: int) -> np.ndarray:
    if labels.ndim != 1:
        raise UserError(f"human labels {where} have shape {labels.shape}; expected 1-d (N,)")
    if labels.shape[0] != n:
        raise UserError(f"human labels {where} hold {labels.shape[0]} labels but the training split has {n}; "
                        f"give the labels file of this data set")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"human labels {where} have dtype {labels.dtype}; expected integer class indices")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"human labels {where} span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")
    return labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# instance-dependent noise


INSTANCE_CONVENTION = ("instance-dependent (Xia et al., NeurIPS 2020, 'Part-dependent label noise', Alg. 2): "
                       "flip rate q_n ~ TruncNormal(rate, {std}^2, [0, 1]) per image, W ~ N(0, 1) of shape (C, d, C), "
                       "p_n = q_n softmax(x_n W[y_n]) off the true class (x_n the image's pixels / 255), 1 - q_n on it")


def _image_uniforms(images: np.ndarray, seed: int) -> np.ndarray:
    """One number in (0, 1) per image, a hash of (seed, the image's bytes): identical images get the same."""
    import hashlib  # noqa: PLC0415

    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    salt = np.int64(seed).tobytes()
    out = np.empty(len(flat), dtype=np.float64)
    for i, row in enumerate(flat):
        h = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8, key=salt).digest(), "little")
        out[i] = (h + 0.5) / 2.0 ** 64
    return out


def instance_flip_distribution(images, truth, num_classes: int, rate: float, seed: int = 0,
                               norm_std: float = 0.1, chunk: int = 8192) -> np.ndarray:
    """The per-image label distribution (N, C) of :func:`apply_instance_noise` (float64 rows on the simplex).

    The mechanism of Xia et al. (NeurIPS 2020), Algorithm 2, as in their released ``get_instance_noisy_label``:
    1. q_n, the image's flip rate, from the normal N(rate, norm_std^2) truncated to [0, 1] (std 0.1 there);
    2. W ~ N(0, 1) of shape (C, d, C), d the number of pixels, drawn once from ``seed``;
    3. logits = x_n W[y_n] (x_n the flattened pixels scaled to [0, 1], as torchvision's ToTensor gives them),
       the true class's logit set to -inf; p_n = q_n softmax(logits), p_n[y_n] = 1 - q_n.
    One deviation, so that the flips depend on the image alone: the reference draws q_n from a sequential
    random stream (sample order decides), here q_n is the truncated-normal quantile of a hash of (seed,
    image), so two copies of one image (with one true label) get the same distribution wherever they are.
    """
    from scipy.stats import truncnorm  # noqa: PLC0415 - scipy comes with scikit-learn

    images = np.asarray(images)
    truth = np.asarray(truth, dtype=np.int64)
    n = truth.shape[0]
    if images.shape[0] != n:
        raise UserError(f"instance noise: {images.shape[0]} images but {n} labels; give one image per label")
    if not (norm_std > 0 and np.isfinite(norm_std)):
        raise UserError(f"instance noise: norm_std={norm_std!r} must be a positive number, e.g. 0.1")
    x = images.reshape(n, -1)
    d = x.shape[1]
    if rate == 0:
        q = np.zeros(n)
    else:
        a, b = (0.0 - rate) / norm_std, (1.0 - rate) / norm_std
        q = truncnorm.ppf(_image_uniforms(images, seed), a, b, loc=rate, scale=norm_std)
    rng = np.random.default_rng([seed, 7])
    out = np.empty((n, num_classes), dtype=np.float64)
    for c in range(num_classes):
        members = np.flatnonzero(truth == c)
        if members.size == 0:
            continue
        w = rng.standard_normal((d, num_classes)).astype(np.float32)  # W[c], drawn in class order
        for i in range(0, members.size, chunk):
            rows = members[i:i + chunk]
            z = (x[rows].astype(np.float32) / 255.0) @ w
            z = z.astype(np.float64)
            z[:, c] = -np.inf
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            p *= q[rows, None]
            p[:, c] = 1.0 - q[rows]
            out[rows] = p
    return out


def apply_instance_noise(truth, num_classes: int, *, images, rate: float = 0.0, seed: int = 0,
                         norm_std: float = 0.1, **unused) -> NoisyLabels:
    """Instance-dependent label noise (registry name ``instance``): each sample's noisy label is drawn from
    :func:`instance_flip_distribution` of its image (Xia et al., NeurIPS 2020, "Part-dependent label noise:
    towards instance-dependent label noise", Algorithm 2; the generator most LNL papers call "instance-
    dependent noise", with norm_std 0.1). The measured flip rate is about ``rate`` (the mean of the truncated
    normal; a little above it for rates below ~0.2, where the truncation at 0 lifts the mean) and is recorded.
    ``images``: (N, ...) the training images, in the labels' order. Seeded: the same arguments give the same
    labels. Parameters: ``rate`` (and ``norm_std``); ``include_true_class`` does not apply (the flip rate is
    q_n by construction)."""
    rate = _check_rate(rate)
    _unused("instance", apply_instance_noise, unused)
    if num_classes < 2:
        raise UserError("instance noise needs at least 2 classes")
    num_classes = _check_num_classes(num_classes)
    truth = _check_truth(truth, num_classes)
    dist = instance_flip_distribution(images, truth, num_classes, rate, seed, norm_std)
    u = np.random.default_rng([seed, 8]).random(truth.shape[0])
    labels = np.minimum((np.cumsum(dist, axis=1) < u[:, None]).sum(axis=1), num_classes - 1).astype(np.int64)
    flip_rate = float(np.mean(labels != truth))
    details = {"convention": INSTANCE_CONVENTION.format(std=norm_std), "norm_std": float(norm_std),
               "requested_rate": float(rate), "expected_flip_rate": float(1.0 - dist[np.arange(truth.size), truth].mean()),
               "flip_rate": flip_rate, "per_class_flip_rate": _per_class_flip_rates(truth, labels, num_classes)}
    return NoisyLabels(labels=labels, kind="instance", rate=float(rate), flip_rate=flip_rate, include_true_class=None,
                       details=details)
