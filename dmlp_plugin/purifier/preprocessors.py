"""Preprocessors: configured objects with one verb, ``purify(PurifyInputs) -> PurifyResult``.

Each is a frozen dataclass whose fields are its parameters (validated when built from a config).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from dmlp_plugin.checks import knn
from dmlp_plugin.errors import MissingDependency, UserError
from dmlp_plugin.purifier import dmlp
from dmlp_plugin.records import PurifyInputs, PurifyResult

CLEANLAB_INSTALL = "pip install 'dmlp_plugin[cleanlab]'"


def _from_soft(soft: np.ndarray, inp: PurifyInputs, t0: float, **extra) -> PurifyResult:
    soft = soft.astype(np.float32, copy=True)
    soft[inp.meta_idx] = np.eye(inp.num_classes, dtype=np.float32)[inp.meta_labels]
    return PurifyResult(soft=soft, hard=soft.argmax(1).astype(np.int64), confidence=soft.max(1),
                        seconds=time.perf_counter() - t0, **extra)


@dataclass(frozen=True)
class Identity:
    """Keep the given labels; trusted samples take their trusted labels."""

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        t0 = time.perf_counter()
        return _from_soft(np.eye(inp.num_classes, dtype=np.float32)[inp.noisy], inp, t0)


def _check_views(views, where: str) -> str:
    """``views`` as given in a config (``1``, ``"2"``, ``"all"``) -> its string form; bad values: UserError."""
    text = str(views) if isinstance(views, int) and not isinstance(views, bool) else views
    if not (isinstance(text, str) and (text == "all" or (text.isdigit() and int(text) >= 1))):
        raise UserError(f"{where}.views={views!r} is not known; use 1 or 2 (one feature view) or all (the views "
                        f"concatenated)")
    return text


def _given_labels(inp: PurifyInputs) -> np.ndarray:
    """The noisy labels with the trusted rows carrying their trusted labels: what a comparison learns from."""
    labels = np.asarray(inp.noisy, dtype=np.int64).copy()
    labels[inp.meta_idx] = inp.meta_labels
    return labels


@dataclass(frozen=True)
class KnnVote:
    """Relabel each sample by the similarity-weighted vote (weight exp(sim/temperature)) of its k nearest
    neighbours (cosine, faiss), trusted samples voting with their trusted labels. The honest baseline DMLP must
    beat: the same features and the same trusted labels.

    views: the features searched: ``"1"`` (view 1, the default: the learned features alone), ``"2"`` (view 2)
    or ``"all"`` (every view L2-normalised, concatenated and renormalised: the cosine is then the mean of the
    views' cosines). The report's comparison tries every view set and a wide k grid (:meth:`sweep`)."""

    k: int = 20
    temperature: float = 0.1
    views: str | int = "1"

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise UserError(f"preprocessor.params.k={self.k!r} must be a positive integer (neighbours that vote), "
                            f"e.g. 20")
        if not self.temperature > 0:
            raise UserError(f"preprocessor.params.temperature={self.temperature!r} must be > 0, e.g. 0.1")
        object.__setattr__(self, "views", _check_views(self.views, "preprocessor.params"))

    def sweep(self, inp: PurifyInputs, ks, view_sets) -> Iterator[tuple[str, dict[int, np.ndarray], float]]:
        """The vote at every k of ``ks`` on every view set of ``view_sets``, with ONE search per view set (at
        the largest k; each smaller k votes with the first k neighbours of that list, see
        :func:`knn.vote_at`). Yields (view set, {k: hard labels (N,) int64, trusted rows = trusted labels},
        seconds spent on that view set); k above N - 1 is cut to N - 1."""
        labels = _given_labels(inp)
        ks = sorted({int(k) for k in ks})
        for which in view_sets:
            t0 = time.perf_counter()
            sims, idx = knn.search(knn.view_set(inp.views, which), ks[-1])
            kept = sorted({min(k, idx.shape[1]) for k in ks})
            votes = knn.vote_at(sims, idx, labels, inp.num_classes, kept, self.temperature)
            del sims, idx
            hard = {}
            for k in ks:
                h = votes[min(k, kept[-1])].argmax(1).astype(np.int64)
                h[inp.meta_idx] = inp.meta_labels
                hard[k] = h
            yield which, hard, time.perf_counter() - t0

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        t0 = time.perf_counter()
        sims, idx = knn.search(knn.view_set(inp.views, self.views), self.k)
        soft = knn.vote(sims, idx, _given_labels(inp), inp.num_classes, self.temperature)
        return _from_soft(soft, inp, t0, info={"k": self.k, "views": self.views, "backend": knn.backend_name()})


@dataclass(frozen=True)
class TrustedOnly:
    """Ignore the noisy labels: a multinomial logistic regression fitted on the trusted subset alone
    (view 1) labels every sample. What the trusted labels are worth without any purification."""

    c: float = 1.0

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - heavy import, used here only

        t0 = time.perf_counter()
        x = np.asarray(inp.views[0], dtype=np.float32)
        present = np.unique(inp.meta_labels)
        clf = LogisticRegression(C=self.c, max_iter=2000).fit(x[inp.meta_idx], inp.meta_labels)
        soft = np.zeros((x.shape[0], inp.num_classes), dtype=np.float32)
        soft[:, present] = clf.predict_proba(x)
        return _from_soft(soft, inp, t0, info={"views": "1", "trusted": int(np.asarray(inp.meta_idx).size)})


def cleanlab_filter():
    """The ``cleanlab.filter`` module, or :class:`MissingDependency` naming the pip command that installs it."""
    try:
        from cleanlab import filter as cleanlab_filter  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError:
        raise MissingDependency("preprocessor 'cleanlab'", "cleanlab", CLEANLAB_INSTALL) from None
    return cleanlab_filter


L2_PATH = (100.0, 10.0, 1.0, 0.1, 0.01, 0.001)  # Cleanlab(l2="auto"): strongest first, each fit warm-starts the next


def oof_softmax_regression(x, y, fold, num_classes: int, l2s, max_iter: int = 50, trusted=None, trusted_labels=None,
                           patience: int = 1) -> tuple[np.ndarray, float, list[dict]]:
    """Out-of-fold probabilities of a multinomial logistic regression, along an L2 path.

    x: (n, d) float torch tensor; y: (n,) int64 labels to fit; fold: (n,) int64 fold of each row (0..F-1).
    The F models (fold f's model is fitted on the rows outside fold f) are fitted together as one problem:
    the sum over folds of the mean cross-entropy of their training rows + l2/2 * ||W_f||^2 (biases not
    penalised), full-batch L-BFGS (strong Wolfe line search, at most ``max_iter`` iterations) from zero
    weights, then from the previous solution for each next l2 of ``l2s`` (strongest first). Deterministic
    (no sampling); one (n, d) x (d, F*C) product per evaluation serves every fold, and the held-out rows'
    logits come with it. Each l2 is scored by the held-out accuracy on the ``trusted`` rows against
    ``trusted_labels`` (when given) and then by the held-out log-loss of ``y``; the path stops after
    ``patience`` l2 values without a better score. Returns (probs (n, C) float32 at the chosen l2, that l2,
    the path: [{l2, trusted_accuracy, log_loss, evaluations}])."""
    import torch  # noqa: PLC0415

    n, d = x.shape
    c = num_classes
    folds = int(fold.max()) + 1
    rows = torch.arange(n, device=x.device)
    train = (fold[:, None] != torch.arange(folds, device=x.device)[None, :]).to(x.dtype)  # (n, F)
    weight = (train / train.sum(0, keepdim=True))[:, :, None]  # row i's weight in fold model f's mean loss
    onehot = torch.nn.functional.one_hot(y, c).to(x.dtype)[:, None, :]
    theta = torch.nn.Parameter(torch.zeros(d + 1, folds * c, dtype=x.dtype, device=x.device))
    trusted = None if trusted is None or len(trusted) == 0 else torch.as_tensor(trusted, device=x.device)
    path, best = [], None
    for l2 in l2s:
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-10)
        calls = [0]

        def closure(l2=l2, calls=calls):
            with torch.no_grad():
                calls[0] += 1
                w = theta[:-1]
                z = (x @ w + theta[-1]).view(n, folds, c)
                top = z.amax(2, keepdim=True)
                e = (z - top).exp_()
                total = e.sum(2, keepdim=True)
                nll = (top + total.log() - (z * onehot).sum(2, keepdim=True)) * weight
                loss = nll.sum() + 0.5 * l2 * (w * w).sum()
                g = ((e / total - onehot) * weight).view(n, folds * c)
                grad = torch.empty_like(theta)
                grad[:-1] = (g.T @ x).T + l2 * w  # G^T X: several times faster than X^T G on a CPU
                grad[-1] = g.sum(0)
                theta.grad = grad
            return loss

        opt.step(closure)
        with torch.no_grad():
            held = (x @ theta[:-1] + theta[-1]).view(n, folds, c)[rows, fold]  # each row by the model that never saw it
            log_loss = float((torch.logsumexp(held, 1) - held[rows, y]).mean())
            acc = None if trusted is None else float(
                (held[trusted].argmax(1).cpu().numpy() == np.asarray(trusted_labels)).mean())
        path.append({"l2": float(l2), "trusted_accuracy": acc, "log_loss": log_loss, "evaluations": calls[0]})
        score = (acc if acc is not None else 0.0, -log_loss)
        if best is None or score > best[0]:
            best = (score, float(l2), torch.softmax(held, 1).cpu().numpy().astype(np.float32), len(path))
        elif len(path) - best[3] >= patience:
            break
    return best[2], best[1], path


@dataclass(frozen=True)
class Cleanlab:
    """Confident learning (Northcutt et al., JAIR 2021) with the cleanlab library: the label fix most people
    in the field reach for first.

    Out-of-fold predicted probabilities: ``folds``-fold stratified cross-validation (shuffled, seeded by the
    run's seed) of a multinomial logistic regression (:func:`oof_softmax_regression`: full-batch L-BFGS, L2
    penalty) on the features of ``views`` (default ``all``: the distinct views concatenated, columns
    standardised) and the given labels, the trusted rows carrying their trusted labels. ``l2``: a number, or
    ``auto``: the path 100, 10, 1, 0.1, 0.01, 0.001 (warm-started), keeping the l2 whose out-of-fold predictions
    are most often right on the trusted rows (ties: the lower out-of-fold log-loss of the given labels; no
    true label is used). Then ``cleanlab.filter.find_label_issues(labels, pred_probs, filter_by=...)`` flags
    the likely wrong labels and each flagged row takes the argmax of its predicted probabilities; trusted rows
    keep their trusted labels. soft: the one-hot of the resulting label; confidence: its out-of-fold
    probability (1 for trusted rows). Needs ``pip install 'dmlp_plugin[cleanlab]'``."""

    folds: int = 5
    l2: float | str = "auto"
    max_iter: int = 50
    views: str | int = "all"
    filter_by: str = "prune_by_noise_rate"

    def __post_init__(self):
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise UserError(f"preprocessor.params.folds={self.folds!r} must be an integer >= 2 (cross-validation "
                            f"folds), e.g. 5")
        if self.l2 != "auto" and (isinstance(self.l2, (str, bool)) or not self.l2 >= 0):
            raise UserError(f"preprocessor.params.l2={self.l2!r} must be auto or a number >= 0, e.g. 0.1")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise UserError(f"preprocessor.params.max_iter={self.max_iter!r} must be a positive integer, e.g. 50")
        filters = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
                   "low_normalized_margin", "low_self_confidence")
        if self.filter_by not in filters:
            raise UserError(f"preprocessor.params.filter_by={self.filter_by!r} is not a cleanlab filter; use one of "
                            f"{', '.join(filters)}")
        object.__setattr__(self, "views", _check_views(self.views, "preprocessor.params"))
        cleanlab_filter()  # not installed: fail when the config is checked, before any work

    def pred_probs(self, inp: PurifyInputs) -> tuple[np.ndarray, float, list[dict]]:
        """Out-of-fold predicted probabilities (N, C) float32 of the linear model, the l2 it used and its
        path (see the class docstring)."""
        import torch  # noqa: PLC0415
        from sklearn.model_selection import StratifiedKFold  # noqa: PLC0415

        labels = _given_labels(inp)
        n = labels.shape[0]
        if n < 2 * self.folds:
            raise UserError(f"preprocessor 'cleanlab': {n} samples are too few for {self.folds}-fold "
                            f"cross-validation; lower preprocessor.params.folds")
        with warnings.catch_warnings():  # a class with fewer rows than folds: sklearn warns, the folds still work
            warnings.simplefilter("ignore", UserWarning)
            splits = StratifiedKFold(self.folds, shuffle=True, random_state=inp.seed).split(np.zeros(n), labels)
            fold = np.zeros(n, dtype=np.int64)
            for f, (_, held) in enumerate(splits):
                fold[held] = f
        device = inp.device if str(inp.device).startswith("cuda") else "cpu"
        x = torch.from_numpy(knn.view_set(inp.views, self.views)).to(device)
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # standardised columns: L-BFGS converges in far fewer steps
        l2s = L2_PATH if self.l2 == "auto" else (float(self.l2),)
        return oof_softmax_regression(x, torch.from_numpy(labels).to(device), torch.from_numpy(fold).to(device),
                                      inp.num_classes, l2s, self.max_iter, trusted=np.asarray(inp.meta_idx),
                                      trusted_labels=np.asarray(inp.meta_labels))

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        t0 = time.perf_counter()
        find_label_issues = cleanlab_filter().find_label_issues
        labels = _given_labels(inp)
        probs, l2, path = self.pred_probs(inp)
        fit_seconds = time.perf_counter() - t0
        issues = np.asarray(find_label_issues(labels, probs, filter_by=self.filter_by, n_jobs=1), dtype=bool)
        issues[inp.meta_idx] = False
        hard = labels.copy()
        hard[issues] = probs[issues].argmax(1)
        soft = np.eye(inp.num_classes, dtype=np.float32)[hard]
        confidence = probs[np.arange(hard.size), hard].astype(np.float32)
        confidence[inp.meta_idx] = 1.0
        info = {"folds": self.folds, "views": self.views, "l2": l2, "flagged": int(issues.sum()),
                "filter_by": self.filter_by, "fit_seconds": fit_seconds, "l2_path": path,
                "model": "multinomial logistic regression (L-BFGS), out-of-fold"}
        return PurifyResult(soft=soft, hard=hard, confidence=confidence, info=info, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class DMLP(dmlp.DMLPConfig):
    """Decoupled Meta Label Purifier; parameters are those of :class:`dmlp.DMLPConfig` (its ``seed`` is
    replaced by the run's seed)."""

    def purify(self, inp: PurifyInputs) -> PurifyResult:
        cfg = replace(self, seed=inp.seed)
        return dmlp.purify(inp.views, inp.noisy, inp.meta_idx, inp.meta_labels, inp.num_classes, cfg,
                           truth=inp.truth, device=inp.device, progress=inp.progress, checkpoint=inp.checkpoint)
