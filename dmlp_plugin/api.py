"""The array API: purify labels given as plain numpy arrays, from Python.

::

    from dmlp_plugin import purify_labels, select_trusted
    trusted = select_trusted(y_known, 40)                    # or the indices of samples you checked by hand
    result = purify_labels(features, noisy, trusted, y_known[trusted])
    result.hard, result.soft, result.confidence, result.estimated_accuracy

Every function here runs the stage functions ``dmlp purify`` runs (:mod:`dmlp_plugin.pipeline`: the
registered preprocessor built and run by ``build_component`` / ``with_checks`` / ``run_preprocessor``, the
estimate of ``estimate_accuracy``, the neighbour agreement, the trusted draw of ``select_trusted``), so the
same inputs give the same labels as ``dmlp purify`` with ``features.source: npy``. Bad input raises
:class:`dmlp_plugin.errors.UserError` with a one-line message naming the argument and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmlp_plugin import pipeline
from dmlp_plugin.config import ChecksConfig, FeaturesConfig, PurifyConfig, TrustedConfig, refuse_own_seed
from dmlp_plugin.errors import MissingDependency, UserError
from dmlp_plugin.records import ImageSet
from dmlp_plugin.records import PurifyResult as _PreprocessorResult
from dmlp_plugin.registry import KINDS, load_registry

SECOND_VIEWS = ("random_relu", "same")


@dataclass
class PurifyResult(_PreprocessorResult):
    """What :func:`purify_labels` returns: the preprocessor's result (``soft`` (N, C) float32 rows on the
    simplex, ``hard`` (N,) int64, ``confidence`` (N,) float32, ``history``, ``info``, ``seconds``) and the
    inputs it came from. ``estimated_accuracy``: the label accuracy estimated without true labels by
    K-fold cross-validation over the trusted subset (``estimate``, its interval ``low``..``high`` at
    ``level``, ``folds``, ...), None when turned off or the trusted subset is too small (fewer than
    max(K, 2 x classes) samples). ``neighbour_agreement`` (N,): the fraction of each sample's 10 nearest
    neighbours (view 1) whose purified label equals its own."""

    noisy: np.ndarray | None = None
    trusted_indices: np.ndarray | None = None
    trusted_labels: np.ndarray | None = None
    neighbour_agreement: np.ndarray | None = None
    estimated_accuracy: dict | None = None
    method: str = ""

    @property
    def changed(self) -> np.ndarray:
        """(N,) bool: the samples whose purified label differs from the given (noisy) one."""
        return self.hard != self.noisy

    def to_artifact(self, true_labels=None):
        """This result as the :class:`dmlp_plugin.artifacts.LabelsArtifact` that ``dmlp purify`` writes
        (``labels.npz``); its fingerprint is that of a labels-only data set of these noisy labels."""
        from dmlp_plugin.artifacts import LabelsArtifact  # noqa: PLC0415

        c = int(self.soft.shape[1])
        truth = None if true_labels is None else _labels(true_labels, "true_labels", len(self.noisy), c)
        return LabelsArtifact(hard=self.hard, soft=self.soft, confidence=self.confidence,
                              neighbour_agreement=self.neighbour_agreement, noisy=self.noisy,
                              meta_indices=self.trusted_indices, meta_labels=self.trusted_labels,
                              fingerprint=ImageSet("arrays", None, self.noisy, c).fingerprint(), true_labels=truth,
                              provenance={"api": "dmlp_plugin.purify_labels", "method": self.method,
                                          "info": {k: v for k, v in self.info.items()
                                                   if isinstance(v, (str, int, float, bool, type(None)))}})


# ---------------------------------------------------------------------------------------------------------
# validation at the boundary


def _matrix(x, what: str, rows: int | None = None) -> np.ndarray:
    """A feature matrix checked (2-d, numeric, finite, no all-zero row) and L2-normalised as ``dmlp purify``
    does with a features file: (N, d) float32."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise UserError(f"{what} has dtype {x.dtype}; give numeric features, e.g. np.asarray({what}, dtype=np.float32)")
    if x.ndim != 2:
        hint = " (one sample: x[None, :])" if x.ndim == 1 else " (several views: pass a list of 2-d arrays)"
        raise UserError(f"{what} has shape {x.shape}; give a 2-d (N, d) array, one row per sample{hint}")
    if rows is not None and x.shape[0] != rows:
        raise UserError(f"{what} has {x.shape[0]} rows but noisy_labels has {rows} labels; give one feature row "
                        f"per sample, in the order of the labels")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise UserError(f"{what} has shape {x.shape}; give at least 2 samples and 1 feature")
    finite = np.isfinite(x).all(axis=1) if x.dtype.kind == "f" else np.ones(x.shape[0], bool)
    if not finite.all():
        raise UserError(f"{what} has NaN or Inf values in {int((~finite).sum())} row(s), the first row "
                        f"{int(np.flatnonzero(~finite)[0])}; clean or drop those rows")
    zero = ~np.any(x != 0, axis=1)
    if zero.any():
        raise UserError(f"{what} has {int(zero.sum())} all-zero rows (first: row {int(np.flatnonzero(zero)[0])}), "
                        f"which have no direction to compare; give every sample a non-zero feature row")
    return pipeline._l2(x)


def _labels(y, what: str, n: int | None = None, num_classes: int | None = None) -> np.ndarray:
    """(N,) class indices as int64; floats must be whole numbers; range [0, num_classes) when given."""
    y = np.asarray(y)
    if y.dtype.kind not in "iuf" or y.dtype == bool:
        raise UserError(f"{what} has dtype {y.dtype}; give integer class indices 0..C-1 (class names: "
                        f"names, {what} = np.unique(names, return_inverse=True))")
    if y.ndim != 1:
        raise UserError(f"{what} has shape {y.shape}; give a 1-d array of class indices (soft labels: argmax(1))")
    if n is not None and y.shape[0] != n:
        raise UserError(f"{what} has {y.shape[0]} entries but there are {n} samples; give one label per sample")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and np.all(y == np.round(y))):
        bad = int(np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))[0])
        raise UserError(f"{what}[{bad}] = {y[bad].item()!r} is not a class index; give integer labels 0..C-1")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        bad = int(np.flatnonzero(y < 0)[0])
        raise UserError(f"{what}[{bad}] = {y[bad]} is negative; give class indices 0..C-1")
    if num_classes is not None and y.size and y.max() >= num_classes:
        bad = int(np.flatnonzero(y >= num_classes)[0])
        raise UserError(f"{what}[{bad}] = {y[bad]} is outside 0..{num_classes - 1} (num_classes={num_classes}); "
                        f"give labels below num_classes or raise num_classes")
    return y


def _trusted(indices, labels, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, labels) checked and sorted by index, as ``dmlp purify`` orders a trusted file."""
    idx = np.asarray([] if indices is None else indices)
    if idx.dtype == bool:
        raise UserError("trusted_indices is a boolean mask; give the indices, np.flatnonzero(mask)")
    idx = _labels(idx, "trusted_indices")
    if idx.size and idx.max() >= n:
        bad = int(np.flatnonzero(idx >= n)[0])
        raise UserError(f"trusted_indices[{bad}] = {idx[bad]} is outside 0..{n - 1} ({n} samples); give row "
                        f"indices of features")
    values, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"trusted_indices lists sample {int(values[counts > 1][0])} more than once; list each "
                        f"trusted sample once")
    lab = np.asarray([] if labels is None else labels)
    if lab.shape[:1] != idx.shape:
        raise UserError(f"trusted_labels has {lab.shape[0] if lab.ndim else 'no'} entries but trusted_indices has "
                        f"{idx.size}; give one trusted label per trusted index, in the same order")
    lab = _labels(lab, "trusted_labels")
    order = np.argsort(idx, kind="stable")
    return idx[order], lab[order]


def _views(features, second_view, seed: int) -> pipeline.Views:
    """The feature views ``dmlp purify`` would build from the same arrays: each one checked and L2-normalised;
    one view gets a second made as ``features.second_view`` makes it (``random_relu``: random ReLU features
    of view 1, the CLI's default; ``same``: view 1 again) or the array ``second_view``."""
    several = isinstance(features, (list, tuple)) and len(features) > 0 and all(
        getattr(v, "ndim", None) == 2 for v in features)
    if several and len(features) > 1:
        if second_view is not None:
            raise UserError("second_view is given but features is already a list of several views; pass the views "
                            "in features, or one array in features and the other as second_view")
        arrays = [_matrix(features[0], "features[0]")]
        arrays += [_matrix(v, f"features[{i}]", arrays[0].shape[0]) for i, v in enumerate(features[1:], 1)]
        return pipeline.Views(arrays, {"source": "arrays", "dims": [int(a.shape[1]) for a in arrays]})
    v1 = _matrix(features[0] if several else features, "features")
    made = "random_relu" if second_view is None else second_view
    if isinstance(made, str):
        if made not in SECOND_VIEWS:
            raise UserError(f"second_view={made!r} is not known; use {' or '.join(SECOND_VIEWS)}, or give the second "
                            f"view as an (N, d2) array")
        dim = FeaturesConfig().second_view_dim
        v2 = pipeline.random_relu_view(v1, dim, seed) if made == "random_relu" else v1
        how = f"random ReLU features of view 1 (dim {dim})" if made == "random_relu" else "view 1 again"
    else:
        v2, how = _matrix(made, "second_view", v1.shape[0]), "array"
    return pipeline.Views([v1, v2], {"source": "arrays", "view2": {"source": how},
                                     "dims": [int(v1.shape[1]), int(v2.shape[1])]})


def _num_classes(num_classes, *labels: np.ndarray) -> int:
    if num_classes is None:
        return max(2, 1 + max((int(y.max()) for y in labels if y.size), default=1))
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise UserError(f"num_classes={num_classes!r}: give the number of classes, an integer >= 2 (or None: "
                        f"1 + the largest label)")
    return int(num_classes)


def _reworded(err: UserError, renames: dict) -> UserError:
    """A config-worded message (``preprocessor.params.k=...``) in the words of this API's arguments."""
    text = str(err)
    for old, new in renames.items():
        text = text.replace(old, new)
    return UserError(text)


def _preprocessor(method: str, params, folds: int):
    """The registered preprocessor ``method`` built from ``params`` as ``dmlp purify`` builds it."""
    if not isinstance(method, str):
        raise UserError(f"method={method!r}: give a registered preprocessor name, e.g. 'dmlp' (list_components"
                        f"('preprocessors') lists them)")
    if params is not None and not isinstance(params, dict):
        raise UserError(f"params={params!r}: give a dict of {method}'s parameters, e.g. {{'epochs': 60}}")
    checks = PurifyConfig(checks=ChecksConfig(estimate_folds=folds))
    try:
        load_registry().entry("preprocessors", method)
        return pipeline.with_checks(checks, pipeline.build_component("preprocessors", method, dict(params or {})))
    except MissingDependency:
        raise
    except UserError as e:
        raise _reworded(e, {"preprocessor.params": "params", "checks.estimate_folds": "estimate_folds",
                            "unknown preprocessor": "method: unknown preprocessor"}) from None


def purify_labels(features, noisy_labels, trusted_indices, trusted_labels, *, method: str = "dmlp",
                  second_view=None, params: dict | None = None, seed: int = 0, device: str = "auto",
                  progress: bool = False, num_classes: int | None = None, estimate_folds: int = 5) -> PurifyResult:
    """Purify ``noisy_labels`` with a registered preprocessor (default DMLP), as ``dmlp purify`` does.

    features: an (N, d) array, one row per sample (one view), or a list of such arrays (several views, e.g.
        SSL features and pixels). Rows are L2-normalised for you (as ``dmlp purify`` does with a features
        file), so scale does not matter; NaN/Inf or all-zero rows are refused.
    noisy_labels: (N,) integer class indices 0..C-1, the labels to purify.
    trusted_indices, trusted_labels: (M,) rows whose label you trust and those labels (e.g. checked by hand,
        or drawn by :func:`select_trusted`); DMLP needs at least one per class. Empty for ``identity``,
        ``knn_vote`` or ``cleanlab``.
    method: a preprocessor name (``list_components("preprocessors")``: dmlp, dmlp_authors, knn_vote, cleanlab,
        trusted_only, auto, identity, or a plugin's). params: its parameters (``dmlp``: the fields of
        :class:`dmlp_plugin.purifier.dmlp.DMLPConfig`, e.g. ``{"epochs": 60}``).
    second_view: with one array in ``features``, how DMLP's second view is made: ``"random_relu"`` (None,
        the default: random ReLU features of the first, as ``features.second_view: random_relu``),
        ``"same"`` (the first again, the authors' script) or an (N, d2) array (``features.path2``).
    seed: seeds the preprocessor, the random second view and the estimate's folds. device: ``auto``, ``cpu``
        or ``cuda[:N]``. num_classes: C (default: 1 + the largest label). estimate_folds: K of the
        accuracy estimate without true labels (0: off; it costs K more purifications).

    Returns a :class:`PurifyResult` (``hard``, ``soft``, ``confidence``, ``estimated_accuracy``, ``changed``,
    ``info``; ``save_labels`` writes it as ``labels.npz``). Raises :class:`UserError` on bad input."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError(f"seed={seed!r}: give an integer")
    if isinstance(estimate_folds, bool) or not isinstance(estimate_folds, int) or estimate_folds == 1 \
            or estimate_folds < 0:
        raise UserError(f"estimate_folds={estimate_folds!r}: give 0 (no estimate) or a number of folds >= 2, e.g. 5")
    noisy = _labels(noisy_labels, "noisy_labels")
    views = _views(features, second_view, int(seed))
    n = views.arrays[0].shape[0]
    if noisy.shape[0] != n:
        raise UserError(f"noisy_labels has {noisy.shape[0]} labels but features has {n} rows; give one label per "
                        f"feature row, in the same order")
    meta_idx, meta_labels = _trusted(trusted_indices, trusted_labels, n)
    c = _num_classes(num_classes, noisy, meta_labels)
    _labels(noisy, "noisy_labels", n, c)
    _labels(meta_labels, "trusted_labels", None, c)
    _check_coverage(method, meta_labels, c)
    refuse_own_seed(params or {}, "params", "seed", seed)  # the preprocessor is seeded by seed=
    pre = _preprocessor(method, params, estimate_folds)
    dev = pipeline.resolve_device(device)
    result = pipeline.run_preprocessor(pre, views, noisy, meta_idx, meta_labels, c, None, dev, bool(progress),
                                       int(seed))
    estimate = _estimate(pre, result, views, noisy, meta_idx, meta_labels, c, dev, int(seed), estimate_folds)
    info = {**(result.info or {}), "method": method, "num_classes": c, "device": dev, "views": views.provenance}
    return PurifyResult(soft=result.soft, hard=result.hard, confidence=result.confidence, history=result.history,
                        info=info, seconds=result.seconds, noisy=noisy, trusted_indices=meta_idx,
                        trusted_labels=meta_labels, estimated_accuracy=estimate, method=method,
                        neighbour_agreement=pipeline.neighbour_agreement(views.arrays[0], result.hard,
                                                                         ChecksConfig().k))


def _check_coverage(method: str, meta_labels: np.ndarray, c: int) -> None:
    """As ``dmlp purify``: a preprocessor that needs a trusted subset gets one, with every class in it."""
    if meta_labels.size == 0:
        if method in pipeline.NEEDS_TRUSTED:
            raise UserError(f"method {method!r} needs trusted samples; give trusted_indices and trusted_labels (at "
                            f"least one per class), or use method='knn_vote' or 'cleanlab'")
        return
    missing = sorted(set(range(c)) - set(meta_labels.tolist()))
    if missing:
        raise UserError(f"trusted_labels has no sample of class(es) {missing[:10]}; give at least one trusted sample "
                        f"per class (or num_classes if the classes are fewer)")


def _estimate(pre, result, views, noisy, meta_idx, meta_labels, c, device, seed, folds) -> dict | None:
    """The accuracy estimate ``dmlp purify`` reports for the preprocessor: auto's estimate of the candidate it
    chose, else :func:`pipeline.estimate_accuracy` weighted by the purified labels' class shares."""
    if not folds or meta_idx.size < max(folds, 2 * c):
        return None
    auto = result.info.get("auto") if isinstance(result.info.get("auto"), dict) else None
    if auto is not None:
        chosen = auto["candidates"].get(auto["chosen"], {})
        return dict(chosen["estimate"], chosen=auto["chosen"]) if "estimate" in chosen else None
    rest = np.ones(len(noisy), bool)
    rest[meta_idx] = False
    prior = np.bincount(result.hard[rest], minlength=c) / max(int(rest.sum()), 1)
    return pipeline.estimate_accuracy(pre, views, noisy, meta_idx, meta_labels, c, device, seed, folds, prior)


def select_trusted(labels, size: float, *, seed: int = 0, balanced: bool = True, source: str = "clean_sample",
                   features=None, k: int = 10, num_classes: int | None = None) -> np.ndarray:
    """Indices (M,) int64, sorted, of a trusted subset drawn as ``dmlp purify`` draws it (``trusted.*``).

    source ``clean_sample``: ``labels`` are labels you know to be right (e.g. the true labels of a benchmark);
        ``size`` samples (a fraction < 1 or a count) are drawn at random with ``seed``, class-balanced when
        ``balanced``. The same seed and size give the indices ``dmlp purify`` picks with that ``seed``.
    source ``knn_auto``: ``labels`` are the noisy labels and ``features`` (N, d) are needed: class-balanced
        samples whose ``k`` nearest neighbours agree with their label (no label known to be right; the
        estimate is optimistic then).
    Either way the trusted labels are ``labels[indices]``. Every class must get at least one sample."""
    if source not in ("clean_sample", "knn_auto"):
        raise UserError(f"source={source!r} is not known; use clean_sample (labels known to be right) or knn_auto "
                        f"(noisy labels and features)")
    y = _labels(labels, "labels")
    c = _num_classes(num_classes, y)
    _labels(y, "labels", None, c)
    view1 = None
    if source == "knn_auto":
        if features is None:
            raise UserError("source='knn_auto' picks samples by their features' neighbours; give features (N, d)")
        view1 = _matrix(features, "features", y.shape[0])
    if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
        raise UserError(f"size={size!r}: give a fraction (< 1) or a count (>= 1) of samples")
    cfg = PurifyConfig(seed=int(seed), trusted=TrustedConfig(source=source, size=size, balanced=bool(balanced),
                                                           k=int(k)))
    try:
        idx, _ = pipeline.select_trusted(cfg, y, y if source == "clean_sample" else None, c, view1)
    except UserError as e:
        raise _reworded(e, {"trusted.size": "size", "trusted.balanced": "balanced", "trusted.k=": "k=",
                            "trusted.source": "source"}) from None
    return idx


def save_labels(path: str | Path, result: PurifyResult, true_labels=None) -> None:
    """Write ``result`` as ``dmlp purify``'s ``labels.npz`` (atomically; readable by :func:`load_labels`)."""
    from dmlp_plugin import artifacts  # noqa: PLC0415

    if not isinstance(result, PurifyResult):
        raise UserError(f"save_labels needs the PurifyResult of purify_labels, got {type(result).__name__}")
    artifacts.save_labels(path, result.to_artifact(true_labels))


def load_labels(path: str | Path, expected_fingerprint: str | None = None):
    """Read a ``labels.npz`` (from ``dmlp purify`` or :func:`save_labels`): a
    :class:`dmlp_plugin.artifacts.LabelsArtifact` with ``hard``, ``soft``, ``confidence``, ``noisy``,
    ``meta_indices``, ``meta_labels``, ``provenance``. A damaged or foreign file is a UserError."""
    from dmlp_plugin import artifacts  # noqa: PLC0415

    return artifacts.load_labels(path, expected_fingerprint)


_SINGULAR = {"dataset": "datasets", "preprocessor": "preprocessors", "method": "methods", "noises": "noise"}


def list_components(kind: str | None = None) -> dict:
    """Registered components: {name: summary} of ``kind`` (datasets, noise, preprocessors, methods), or
    {kind: {name: summary}} of every kind when ``kind`` is None. Plugins installed through entry points
    are included (as ``dmlp registry list`` shows them)."""
    reg = load_registry()
    if kind is None:
        return {k: list_components(k) for k in KINDS}
    kind = _SINGULAR.get(kind, kind)
    if kind not in KINDS:
        raise UserError(f"kind={kind!r} is not known; use one of {', '.join(KINDS)}")
    return {e.name: e.summary for e in reg.entries(kind)}
