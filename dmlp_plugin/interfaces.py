"""What a component must provide: the interfaces the pipeline and the benchmark call, as ``typing.Protocol``s.

A component is registered under a kind (``registry.yaml`` or an entry point in the group ``dmlp_plugin.<kind>``,
see the README, "Writing a plugin"; ``examples/dmlp_example_plugin`` is a worked one) and named in configs:

========================  =====================  ===============================================================
kind (entry-point group)  Protocol               how it is used
========================  =====================  ===============================================================
``preprocessors``         :class:`Preprocessor`   built from ``preprocessor.params`` (a dataclass: its fields are
                                                  its parameters, checked by name and type), then
                                                  ``purify(PurifyInputs) -> PurifyResult`` (``dmlp purify``,
                                                  ``dmlp bench``, :func:`dmlp_plugin.purify_labels`)
``methods``               :class:`TrainingMethod` ``cls.from_preset(preset, **params)`` then ``run(TrainData, ...)
                                                  -> RunResult`` for each arm of ``dmlp bench``
``noise``                 :class:`NoiseModel`     called with the true labels and ``noise.*`` -> ``NoisyLabels``
``datasets``              :class:`DatasetLoader`  called with ``dataset.params`` -> ``DataSplits``
========================  =====================  ===============================================================

Errors: raise :class:`dmlp_plugin.errors.UserError` for input the user can fix (a bad parameter, a missing
file): the command prints it as one line and exits with code 2. Any other exception is a bug and keeps its
traceback. Check a component with :func:`check_component` (the test suite runs it on every registered one).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - torch-heavy imports for annotations only
    import numpy as np

    from baselines.common import RunResult, TrainData
    from dmlp_plugin.data.noise import NoisyLabels
    from dmlp_plugin.records import DataSplits, PurifyInputs, PurifyResult


@runtime_checkable
class Preprocessor(Protocol):
    """Corrects noisy labels. A (frozen) dataclass whose fields are its parameters, validated in
    ``__post_init__`` (raise UserError naming ``preprocessor.params.<field>``).

    ``purify(inp)``: ``inp`` is a :class:`dmlp_plugin.records.PurifyInputs` (``views``: list of (N, d_v)
    float32 L2-normalised feature matrices, view 1 first; ``noisy`` (N,) int64; ``meta_idx`` / ``meta_labels``
    the trusted subset (may be empty); ``num_classes``; ``device``; ``progress``; ``seed``: use it, not a field
    of your own, for randomness; ``checkpoint``: a path you may save progress to; ``truth``: for progress
    logs only, never to decide). Return a :class:`dmlp_plugin.records.PurifyResult`: ``soft`` (N, C) float32
    rows on the simplex, ``hard`` (N,) int64, ``confidence`` (N,) float32, optionally ``history`` (per-epoch
    dicts), ``info`` (JSON-able; scalars show up in ``metrics.json``) and ``seconds``. Trusted rows should
    carry their trusted labels. The K-fold accuracy estimate calls ``purify`` again with parts of the
    trusted subset, so it must not keep state between calls."""

    def purify(self, inp: PurifyInputs) -> PurifyResult: ...


@runtime_checkable
class ChecksAware(Protocol):
    """Optional for a preprocessor: ``with_checks(folds, vote_ks, view_sets)`` returns a copy that knows the
    run's ``checks.estimate_folds``, ``checks.vote_ks`` and ``checks.vote_views`` (``auto`` uses them)."""

    def with_checks(self, folds: int, vote_ks: Any = "auto", view_sets: list | None = None) -> ChecksAware: ...


@runtime_checkable
class TrainingMethod(Protocol):
    """Trains a classifier on (noisy or purified) labels. A frozen dataclass whose fields are its
    hyperparameters (``dataclasses.asdict`` of it keys the benchmark's resumable runs).

    ``from_preset(name, **overrides)`` (a classmethod): the configured trainer of preset ``name`` (``small``
    is what configs use by default; ``dmlp_plugin``'s own methods also have ``cifar10``/``cifar100``), unknown
    presets or fields a UserError (:func:`baselines.common.config_from_preset` does both).
    ``run(data, device, seed, progress, checkpoint_dir, true_labels)``: ``data`` a
    :class:`baselines.common.TrainData` (uint8 images, (N,) hard or (N, C) soft labels, test split);
    ``device`` ``cpu`` or ``cuda``; ``checkpoint_dir`` a folder to save and resume from; ``true_labels`` for
    logging only. Return a :class:`baselines.common.RunResult`: ``test_accuracy`` of the LAST epoch, ``curve``
    (one dict per epoch with at least ``epoch`` and ``test_accuracy``, plotted by the report), ``seconds`` of
    training (set it: the report shows it), ``info`` (JSON-able)."""

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TrainingMethod: ...

    def run(self, data: TrainData, device: str | None = None, seed: int = 0, progress: bool = True,
            checkpoint_dir: Any = None, true_labels: np.ndarray | None = None) -> RunResult: ...


NOISE_KEYWORDS = ("kind", "rate", "seed", "include_true_class", "pairs", "file", "key")


class NoiseModel(Protocol):
    """Makes noisy labels: ``fn(truth, num_classes, *, kind, rate, seed, include_true_class, pairs, file, key)``
    (the ``noise.*`` settings; ``kind`` is the registered name, so one function may serve several) ->
    :class:`dmlp_plugin.data.noise.NoisyLabels` (``labels`` (N,) int64, ``kind``, ``rate``, ``flip_rate``
    measured, ``include_true_class``, ``details`` JSON-able). A model that also takes ``images`` (uint8 (N, H,
    W, C)) is given the training images (instance-dependent noise). Same seed, same labels."""

    def __call__(self, truth: np.ndarray, num_classes: int, *, kind: str, rate: float, seed: int,
                 include_true_class: bool, pairs: dict | None, file: Any, key: str | None) -> NoisyLabels: ...


class DatasetLoader(Protocol):
    """Loads a data set: ``fn(**dataset.params) -> DataSplits`` (``train`` and optional ``test``
    :class:`dmlp_plugin.records.ImageSet`: uint8 images (N, H, W, C), int64 labels, ``num_classes``); a
    missing file is a UserError naming it and how to get it."""

    def __call__(self, **params: Any) -> DataSplits: ...


PROTOCOLS = {"preprocessors": Preprocessor, "methods": TrainingMethod, "noise": NoiseModel,
             "datasets": DatasetLoader}


def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _takes(sig: inspect.Signature, names, where: str) -> list[str]:
    """Problems: the keyword arguments of ``names`` that ``sig`` cannot take."""
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    bad = [n for n in names if n not in params or params[n].kind is inspect.Parameter.POSITIONAL_ONLY]
    return [f"{where} does not take the keyword argument(s) {', '.join(bad)}"] if bad else []


def _check_preprocessor(obj) -> list[str]:
    if not isinstance(obj, type):
        return [] if callable(obj) else ["a preprocessor must be a class (a dataclass of its parameters)"]
    purify = getattr(obj, "purify", None)
    if not callable(purify):
        return ["has no purify(inputs) method"]
    sig = _signature(purify)
    if sig is not None and len([p for p in sig.parameters.values() if p.default is p.empty
                                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) != 2:
        return [f"purify{sig} must take exactly one argument besides self (the PurifyInputs)"]
    return []


def _check_method(obj) -> list[str]:
    problems = []
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        problems.append("a training method must be a dataclass (its fields are its hyperparameters)")
    if not isinstance(inspect.getattr_static(obj, "from_preset", None), classmethod):
        problems.append("has no classmethod from_preset(name, **overrides)")
    run = getattr(obj, "run", None)
    sig = _signature(run) if callable(run) else None
    if sig is None:
        problems.append("has no run(data, device, seed, progress, checkpoint_dir, true_labels) method")
    else:
        problems += _takes(sig, ("device", "seed", "progress", "checkpoint_dir", "true_labels"), "run")
    return problems


def _check_noise(obj) -> list[str]:
    sig = _signature(obj) if callable(obj) else None
    if sig is None:
        return ["a noise model must be a function (truth, num_classes, *, kind, rate, seed, ...)"]
    positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = [] if len(positional) >= 2 else ["must take (truth, num_classes) positionally"]
    return problems + _takes(sig, NOISE_KEYWORDS, "the noise model")


def _check_dataset(obj) -> list[str]:
    sig = _signature(obj) if callable(obj) else None
    if sig is None:
        return ["a dataset loader must be a function taking dataset.params as keyword arguments"]
    bad = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL)]
    return [f"takes positional-only argument(s) {', '.join(bad)}; dataset.params are passed by keyword"] if bad else []


def check_component(kind: str, obj) -> list[str]:
    """What ``obj`` (the registered object: a class or function, not yet configured) lacks to work as a
    component of ``kind``; [] when it fits. Checks the structure only (names and signatures)."""
    checks = {"preprocessors": _check_preprocessor, "methods": _check_method, "noise": _check_noise,
              "datasets": _check_dataset}
    if kind not in checks:
        raise ValueError(f"unknown component kind {kind!r}; use one of {', '.join(checks)}")
    return checks[kind](obj)
