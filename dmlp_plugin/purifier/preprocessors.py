"""Preprocessors: configured objects with one verb, ``purify(PurifyInputs) -> PurifyResult``.

Each is a frozen dataclass whose fields are its parameters (validated when built from a config).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

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


@dataclass(frozen=True)
class DMLPAuthors(DMLP):
    """The paper's DMLP as the authors' released script runs it: :meth:`dmlp.DMLPConfig.authors` as defaults
    (doubled softmax in EAC with its 0.4 / 2200 weights, no ridge, 100 epochs, its exchange timing with the
    condition made to fire, its readout). The script loads one feature file for both views: pair it with
    ``features.second_view: same`` to run it as released. Every field can still be overridden."""

    epochs: int = 100
    ridge: float = 0.0
    eac_min_steps: int = 1
    eac_lr_decay_epoch: int | None = 3
    eac_balance_weight: float = 2200.0
    eac_double_softmax: bool = True
    eac_period: int = 20
    eac_exchange: str = "batch"
    readout: str = "authors"


# ---------------------------------------------------------------------------------------------------------
# auto: run the candidates, keep the one with the best label accuracy estimated without true labels

AUTO_CANDIDATES = ("dmlp", "knn_vote", "cleanlab", "trusted_only")
AUTO_RULE = ("keep the first candidate ({incumbent}) unless another beats it on the same held-out trusted samples "
             "with posterior probability >= {confidence:g} (paired per-class difference of the {folds}-fold "
             "estimates, Jeffreys-Dirichlet, class-weighted like the estimate); of several such, the highest "
             "estimate")


@dataclass
class AutoResult(PurifyResult):
    """:class:`Auto`'s result: the chosen candidate's labels, plus ``candidates``: {name: (component, its
    PurifyResult on the whole trusted subset)} for every candidate that ran (the report's comparisons reuse
    them instead of running again)."""

    candidates: dict = field(default_factory=dict)


def _build_candidate(name: str, params: dict):
    """A registered preprocessor built as a candidate of ``auto`` (errors name ``preprocessor.params.<name>``)."""
    from dmlp_plugin.config import from_mapping  # noqa: PLC0415
    from dmlp_plugin.registry import load_registry  # noqa: PLC0415

    obj = load_registry().get("preprocessors", name)
    where = f"preprocessor.params.{name}"
    try:
        if dataclasses.is_dataclass(obj):
            return from_mapping(obj, params, where)
        return obj(**params)
    except MissingDependency:
        raise
    except UserError as e:
        text = str(e)
        raise UserError(text.replace("preprocessor.params", where, 1) if text.startswith("preprocessor.params")
                        and not text.startswith(where) else f"{where}: {text}") from None
    except TypeError as e:
        raise UserError(f"{where} for {name!r} rejected: {e}") from None


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, labels: np.ndarray, num_classes: int,
                      class_prior: np.ndarray | None, level: float = 0.9, draws: int = 4000, seed: int = 0) -> dict:
    """How much more often corrector a is right than corrector b on the SAME scored samples (each trusted sample
    held out once, both correctors' labels for it): sum_c w_c (a_only_c - b_only_c) / n_c with the weights of
    :func:`dmlp_plugin.estimate.weighted_accuracy`, its Bayesian ``level`` interval and P(difference > 0), from
    a Dirichlet(1/2, 1/2, 1/2) posterior per class over (a right and b wrong, b right and a wrong, the same).
    Pairing removes what both get right or wrong alike, so a real difference shows with far fewer samples than
    two separate intervals need."""
    from dmlp_plugin.estimate import class_weights  # noqa: PLC0415

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    n_c = np.bincount(labels, minlength=num_classes).astype(np.float64)
    a_only = np.bincount(labels, weights=(a & ~b).astype(np.float64), minlength=num_classes)
    b_only = np.bincount(labels, weights=(b & ~a).astype(np.float64), minlength=num_classes)
    seen = n_c > 0
    w = class_weights(n_c, class_prior)
    rng = np.random.default_rng([seed, 13])
    diff = np.zeros(draws)
    for c in np.flatnonzero(seen):
        p = rng.dirichlet([a_only[c] + 0.5, b_only[c] + 0.5, n_c[c] - a_only[c] - b_only[c] + 0.5], size=draws)
        diff += w[c] * (p[:, 0] - p[:, 1])
    est = float(np.sum(np.divide(a_only - b_only, n_c, out=np.zeros_like(n_c), where=seen) * w))
    lo, hi = np.quantile(diff, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"difference": est, "low": float(lo), "high": float(hi), "level": level,
            "probability_better": float(np.mean(diff > 0)), "only_this_right": int(a_only.sum()),
            "only_other_right": int(b_only.sum())}


def _jsonable(info: dict) -> dict:
    return {k: v for k, v in (info or {}).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


@dataclass(frozen=True)
class Auto:
    """Run several preprocessors and keep the one whose label accuracy, estimated WITHOUT true labels, is best.

    candidates: registered preprocessor names, the first one the incumbent (default dmlp, then knn_vote,
    cleanlab, trusted_only); a candidate whose optional package is missing (cleanlab) is dropped with a note.
    dmlp, knn_vote, cleanlab, trusted_only: the parameters of that candidate (e.g. ``dmlp: {epochs: 60}``;
    another registered candidate runs with its defaults). knn_vote's k and views are picked by the estimate over
    the run's ``checks.vote_ks`` x ``checks.vote_views`` unless given here.

    Each candidate is estimated by the K-fold cross-validation over the trusted subset that every run reports
    (``checks.estimate_folds``, :func:`dmlp_plugin.estimate.cv_accuracy`; the class weights are the shares of
    the incumbent's purified labels on the untrusted rows, the same for every candidate). knn_vote's (views, k)
    is picked by that estimate too, nested: each fold's setting is picked by an inner K-fold over the other
    folds, so its estimate does not flatter it; its labels use the setting picked over the whole trusted subset.
    Rule (``confidence``, default 0.95): keep the incumbent unless another candidate beats it on the same
    held-out trusted samples with posterior probability >= confidence (:func:`paired_difference`); of several
    such, the one with the highest estimate. Paired, because the estimates rest on a few dozen samples (digits:
    40, a 90% interval about 10 points wide) and two candidates' separate intervals overlap even when one is
    clearly better on the samples where they differ; the incumbent is kept on near-ties because it is the
    method measured best on most settings (benchmarks/results/purify_quality.md), and a switch on noise would
    cost as much as it gains. No true label is used: the choice and the labels are the same whether or not the
    truth is known. With fewer trusted samples than max(K, 2 x classes), the incumbent is kept and the others
    are not run. Cost: every candidate once plus K runs of each, which is what the default checks of a plain dmlp
    run spend on its estimate anyway (``estimate_folds: 5``, ``estimate_compare``); the run's estimate reuses
    these. Not the default preprocessor: on configs/purify-digits.yaml (symmetric 50% and 80%) it kept dmlp every
    time, saving nothing, at 25-38 s a purification against 25-35 s for dmlp with the default checks and 4-8 s
    for dmlp without the estimate (README, "Let the estimate choose")."""

    candidates: list = field(default_factory=lambda: list(AUTO_CANDIDATES))
    dmlp: dict = field(default_factory=dict)
    knn_vote: dict = field(default_factory=dict)
    cleanlab: dict = field(default_factory=dict)
    trusted_only: dict = field(default_factory=dict)
    confidence: float = 0.95

    def __post_init__(self):
        names = [str(n) for n in self.candidates]
        if not names:
            raise UserError(f"preprocessor.params.candidates=[] gives auto nothing to choose from; list some of "
                            f"{', '.join(AUTO_CANDIDATES)}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"preprocessor.params.candidates lists {', '.join(twice)} twice; list each once")
        if "auto" in names:
            raise UserError("preprocessor.params.candidates lists auto itself; list the preprocessors auto chooses "
                            f"from, e.g. {', '.join(AUTO_CANDIDATES)}")
        from dmlp_plugin.registry import load_registry  # noqa: PLC0415

        reg = load_registry()
        for n in names:
            try:
                reg.entry("preprocessors", n)
            except UserError as e:
                raise UserError(f"preprocessor.params.candidates: {e}") from None
        for key in AUTO_CANDIDATES:
            if getattr(self, key) and key not in names:
                raise UserError(f"preprocessor.params.{key} is set but {key} is not among the candidates "
                                f"({', '.join(names)}); add it to preprocessor.params.candidates or drop its params")
        if isinstance(self.confidence, bool) or not 0.5 <= self.confidence < 1:
            raise UserError(f"preprocessor.params.confidence={self.confidence!r} must be in [0.5, 1): the posterior "
                            f"probability a candidate must beat the first one with, e.g. 0.95")
        built, dropped = {}, {}
        for n in names:
            try:
                built[n] = _build_candidate(n, dict(getattr(self, n, None) or {}) if n in AUTO_CANDIDATES else {})
            except MissingDependency as e:
                dropped[n] = f"not installed: {e.install}"
        if not built:
            why = "; ".join(f"{k} {v}" for k, v in dropped.items())
            raise UserError(f"preprocessor auto: none of its candidates can run ({why})")
        object.__setattr__(self, "candidates", names)
        object.__setattr__(self, "_built", built)
        object.__setattr__(self, "_dropped", dropped)
        object.__setattr__(self, "_run", {"folds": 5, "vote_ks": "auto", "view_sets": None})

    def with_checks(self, folds: int, vote_ks="auto", view_sets: list | None = None) -> "Auto":
        """This selector with the run's settings: ``checks.estimate_folds`` (K; 0 is refused: auto picks by the
        estimate), ``checks.vote_ks`` and the view sets of ``checks.vote_views`` (None: each distinct view and
        all of them concatenated), which knn_vote's setting is picked from."""
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise UserError(f"preprocessor auto picks by the label-accuracy estimate, which checks.estimate_folds="
                            f"{folds} turns off; set checks.estimate_folds to 2 or more (e.g. 5)")
        knn.check_ks(vote_ks)
        new = replace(self)
        object.__setattr__(new, "_run", {"folds": folds, "vote_ks": vote_ks, "view_sets": view_sets})
        return new

    @property
    def dropped(self) -> dict:
        """{candidate: why it was dropped} (an optional package not installed)."""
        return dict(self._dropped)

    def purify(self, inp: PurifyInputs) -> AutoResult:
        t0 = time.perf_counter()
        folds = self._run["folds"]
        c = inp.num_classes
        meta_idx = np.asarray(inp.meta_idx, dtype=np.int64)
        meta_labels = np.asarray(inp.meta_labels, dtype=np.int64)
        m = meta_idx.size
        names = [n for n in self.candidates if n in self._built]
        incumbent = names[0]
        rest = np.ones(len(inp.noisy), bool)
        rest[meta_idx] = False
        quiet = replace(inp, progress=False, checkpoint=None)
        report = {"chosen": None, "incumbent": incumbent, "reason": "",
                  "rule": AUTO_RULE.format(incumbent=incumbent, confidence=self.confidence, folds=folds),
                  "confidence": self.confidence, "folds": folds, "candidates": {},
                  "dropped": dict(self._dropped), "seconds": {"run": 0.0, "estimate": 0.0}}
        runs: dict = {}

        def full(name, pre):
            t = time.perf_counter()
            runs[name] = (pre, pre.purify(inp if name == incumbent else quiet))
            s = time.perf_counter() - t
            report["candidates"].setdefault(name, {})["seconds"] = {"run": s, "estimate": 0.0}
            report["seconds"]["run"] += s

        # the incumbent first: its labels give the class weights of every estimate (knn_vote as the incumbent:
        # its configured setting for that, then the setting its estimate picks for its labels)
        full(incumbent, self._built[incumbent])
        r0 = runs[incumbent][1]
        prior = np.bincount(r0.hard[rest], minlength=c) / max(int(rest.sum()), 1)
        report["class_prior"] = [float(v) for v in prior]
        report["weights"] = f"class shares of {incumbent}'s purified labels on the untrusted rows"
        if m < max(folds, 2 * c):
            report["chosen"] = incumbent
            report["reason"] = (f"kept {incumbent}: the {m} trusted samples are too few for the {folds}-fold estimate "
                                f"(it needs at least max({folds}, 2 x {c} classes) = {max(folds, 2 * c)}), so the "
                                f"other candidates were not run")
            return self._result(report, runs, incumbent, t0)
        correct = {}
        for name in names:
            try:
                if name == "knn_vote":
                    t = time.perf_counter()
                    est, corr, setting, picked = self._estimate_knn(quiet, prior)
                    s_est = time.perf_counter() - t
                    run_s = report["candidates"].get(name, {}).get("seconds", {}).get("run", 0.0)
                    full(name, picked)
                    report["candidates"][name]["seconds"]["run"] += run_s
                    report["candidates"][name]["setting"] = setting
                else:
                    if name != incumbent:
                        full(name, self._built[name])
                    t = time.perf_counter()
                    est, corr = self._estimate(self._built[name], quiet, prior)
                    s_est = time.perf_counter() - t
            except UserError as e:  # e.g. too few samples for a candidate's own cross-validation
                if name == incumbent:
                    raise
                report["candidates"].pop(name, None)
                runs.pop(name, None)
                report["dropped"][name] = f"failed: {e}"
                continue
            entry = report["candidates"][name]
            entry["estimate"] = est
            entry["seconds"]["estimate"] = s_est
            report["seconds"]["estimate"] += s_est
            correct[name] = corr
        others = [n for n in correct if n != incumbent]
        for name in others:
            report["candidates"][name]["versus_incumbent"] = paired_difference(
                correct[name], correct[incumbent], meta_labels, c, prior, seed=inp.seed)
        est = {n: report["candidates"][n]["estimate"]["estimate"] for n in correct}
        winners = [n for n in others if report["candidates"][n]["versus_incumbent"]["probability_better"]
                   >= self.confidence and est[n] > est[incumbent]]
        chosen = max(winners, key=lambda n: est[n]) if winners else incumbent
        report["chosen"] = chosen
        report["reason"] = self._reason(report, chosen, incumbent, others, m)
        return self._result(report, runs, chosen, t0)

    def _reason(self, report: dict, chosen: str, incumbent: str, others: list, m: int) -> str:
        cand = report["candidates"]

        def say(n):
            e = cand[n]["estimate"]
            s = cand[n].get("setting")
            where = f" (k {s['k']}, views {s['views']})" if s else ""
            return f"{n}{where} {e['estimate']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"

        dropped = "; dropped: " + ", ".join(f"{k} ({v})" for k, v in report["dropped"].items()) \
            if report["dropped"] else ""
        if chosen != incumbent:
            v = cand[chosen]["versus_incumbent"]
            return (f"chose {say(chosen)} over {say(incumbent)}: better by {100 * v['difference']:+.1f} points on "
                    f"the {m} held-out trusted samples with probability {v['probability_better']:.3f} >= "
                    f"{self.confidence:g}{dropped}")
        if not others:
            return f"kept {say(incumbent)}: no other candidate ran{dropped}"
        best = max(others, key=lambda n: cand[n]["versus_incumbent"]["probability_better"])
        v = cand[best]["versus_incumbent"]
        return (f"kept {say(incumbent)}: no candidate beats it with probability >= {self.confidence:g} (closest: "
                f"{say(best)}, {100 * v['difference']:+.1f} points, probability {v['probability_better']:.3f})"
                f"{dropped}")

    def _result(self, report: dict, runs: dict, chosen: str, t0: float) -> AutoResult:
        r = runs[chosen][1]
        info = {"chosen": chosen, **_jsonable(r.info), "auto": report}
        return AutoResult(soft=r.soft, hard=r.hard, confidence=r.confidence, history=r.history, info=info,
                          seconds=time.perf_counter() - t0,
                          candidates={n: (obj, res) for n, (obj, res) in runs.items() if res is not None})

    def _estimate(self, pre, inp: PurifyInputs, prior) -> tuple[dict, np.ndarray]:
        """:func:`cv_accuracy` of ``pre`` (the same call as the report's estimate) and which held-out trusted
        samples it got right (M,) bool, in the order of ``inp.meta_idx``."""
        from dmlp_plugin.estimate import cv_accuracy  # noqa: PLC0415

        meta_idx = np.asarray(inp.meta_idx, dtype=np.int64)
        meta_labels = np.asarray(inp.meta_labels, dtype=np.int64)

        def corrector(idx, lab):
            return pre.purify(replace(inp, meta_idx=idx, meta_labels=lab, truth=None)).hard

        details = {}
        est = cv_accuracy(corrector, meta_idx, meta_labels, inp.num_classes, self._run["folds"], inp.seed, prior,
                          details=details)
        return est, details["correct"]

    def _estimate_knn(self, inp: PurifyInputs, prior) -> tuple[dict, np.ndarray, dict, KnnVote]:
        """knn_vote's estimate with its (views, k) picked by the estimate, nested (class docstring): one neighbour
        search per view set at the largest k, votes recomputed only at the held-out rows for each trusted
        subset. Returns (estimate, held-out correctness (M,), setting, the KnnVote at the setting picked over
        the whole trusted subset)."""
        from dmlp_plugin.estimate import fold_count, stratified_folds, weighted_accuracy, weighted_point  # noqa: PLC0415

        base = self._built["knn_vote"]
        given = self.knn_vote or {}
        asked, seed, c = self._run["folds"], inp.seed, inp.num_classes
        n = len(inp.noisy)
        ks = [int(given["k"])] if "k" in given else knn.k_grid(n, self._run["vote_ks"])
        ks = sorted({min(k, n - 1) for k in ks})
        sets = [base.views] if "views" in given else (self._run["view_sets"] or knn.distinct_view_sets(inp.views))
        lists = {w: knn.search(knn.view_set(inp.views, w), ks[-1]) for w in sets}
        noisy = np.asarray(inp.noisy, dtype=np.int64)

        def held_votes(t_idx, t_lab, rows):  # {(views, k): (len(rows), C) votes} with t_idx trusted
            labels = noisy.copy()
            labels[t_idx] = t_lab
            out = {}
            for w, (sims, idx) in lists.items():
                for k, v in knn.vote_at(sims[rows], idx[rows], labels, c, ks, base.temperature).items():
                    out[(w, k)] = v
            return out

        def scored(t_idx, t_lab, fold, n_folds, settings):  # per setting: held-out correctness, trusted-label vote
            right = {s: np.zeros(t_idx.size, bool) for s in settings}
            prob = {s: np.zeros(t_idx.size) for s in settings}
            for f in range(n_folds):
                held = fold == f
                if not held.any():
                    continue
                votes = held_votes(t_idx[~held], t_lab[~held], t_idx[held])
                for s in settings:
                    v = votes[s]
                    right[s][held] = v.argmax(1) == t_lab[held]
                    prob[s][held] = v[np.arange(v.shape[0]), t_lab[held]]
            return right, prob

        settings = [(w, k) for w in sets for k in ks]

        def pick(t_idx, t_lab):  # the best setting by the K-fold estimate over this trusted subset
            if t_idx.size < 2:
                return (base.views, base.k) if (base.views, base.k) in settings else settings[0]
            inner = fold_count(t_lab, asked)
            right, prob = scored(t_idx, t_lab, stratified_folds(t_lab, inner, seed), inner, settings)
            # ties: the higher mean vote for the trusted label, then the first in grid order (views, then k)
            return max(settings, key=lambda s: (round(weighted_point(right[s], t_lab, c, prior), 12),
                                                 round(float(prob[s].mean()), 12)))

        meta_idx = np.asarray(inp.meta_idx, dtype=np.int64)
        meta_labels = np.asarray(inp.meta_labels, dtype=np.int64)
        folds = fold_count(meta_labels, asked)
        fold = stratified_folds(meta_labels, folds, seed)
        correct = np.zeros(meta_idx.size, dtype=bool)
        fold_picks = []
        for f in range(folds):
            held = fold == f
            s = pick(meta_idx[~held], meta_labels[~held])
            fold_picks.append({"views": s[0], "k": int(s[1])})
            v = held_votes(meta_idx[~held], meta_labels[~held], meta_idx[held])[s]
            correct[held] = v.argmax(1) == meta_labels[held]
        best = pick(meta_idx, meta_labels)
        est = weighted_accuracy(correct, meta_labels, c, prior)
        est.update({"folds": int(folds), "method": f"{folds}-fold cross-validation over the {meta_idx.size} trusted "
                                                   f"samples, each fold's k and views picked by an inner K-fold "
                                                   f"over the other folds",
                    "weights": "class shares of the untrusted rows' purified labels"})
        setting = {"k": int(best[1]), "views": best[0], "ks": ks, "view_sets": list(sets), "fold_picks": fold_picks,
                   "picked": "by the K-fold estimate over the trusted subset (no true labels)"}
        return est, correct, setting, replace(base, k=int(best[1]), views=best[0])
