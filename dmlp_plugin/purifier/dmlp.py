"""DMLP: the decoupled meta label purifier (Tu et al., "Learning from Noisy Labels with Decoupled Meta
Label Purifier", CVPR 2023), on frozen features.

Per view v (a feature matrix X_v, N x d, L2-normalised rows) the purifier keeps a label matrix Y_v (N x C,
unconstrained reals, initialised to one-hot of the noisy labels) and a linear head H_v (d -> C).

IPC (intrinsic primary correction), per batch B of training rows, with Y_v the parameters (Adam):
    W_B  = (X_B^T X_B + ridge * tr(X_B^T X_B)/d * I)^-1 X_B^T Y_B            (closed form, Cholesky)
    loss = CE(X_M W_B, y_M) + sum_{i in M, c} (X_M W_B - onehot(y_M))_{ic}^2
           + KL(uniform || mean_{i in B} softmax(X_B W_B)_i)
The meta loss on the trusted set M reaches Y_B only through W_B, so labels move toward what makes a
least-squares fit on them predict the trusted labels. The Cholesky factor of each batch is computed once
(the batches are fixed) and reused every epoch.

EAC (extrinsic auxiliary correction): H_v is trained in mini-batches on argmax(Y_B) with
    CE + conf_weight * mean(sum p log p) + balance_weight * KL(uniform || mean p)
(one softmax: the authors' script applies softmax twice, so its 0.4 / 2200 weights were tuned on nearly
flat distributions and are re-tuned here). Every ``eac_period`` epochs the views exchange information:
Y_1 <- mix(Y_1, softmax(H_2 X_2)) and Y_2 <- mix(Y_2, softmax(H_1 X_1)), a hard swap for
``eac_mix = 1`` (the paper), an exponential moving average for smaller values.

The authors' script never fires that exchange with its own settings (its condition needs
``epoch % 20 == 0 and epoch == 99``), inverts X^T X without a ridge, applies softmax twice, evaluates with
Python loops and never saves the labels. None of that is copied; each piece is a knob here so the ablation
benchmark can show its effect.

The released algorithm (``DMLPConfig.authors()``; ``benchmarks/authors_check.py`` runs it beside the script):
``eac_double_softmax: true`` is the script's EAC loss: its head is Linear+Softmax, p = softmax(z), and the
cross-entropy applies log-softmax again, so the loss is CE(softmax(p), t) + 0.4 * mean(sum q log q) with
q = softmax(p), + 2200 * KL(uniform || mean softmax(q)) (a third softmax: the weights were tuned on these nearly
flat distributions; exchanged labels are still p, the head's output). ``eac_exchange: batch`` is its timing
with the condition made to fire: in epochs T+1, 2T+1, ... (its ``i % T == 0 and i != 0`` counting from 0),
each batch's labels are replaced by the other head's p right after that batch's EAC training, so the last
exchange is followed by T - 1 epochs of IPC (``epoch``, ours: after every T-th epoch, all rows at once).
``readout: authors`` is its readout: hard = argmax of the views' raw label matrices averaged, soft = softmax of
that mean (the script's ``outputs_w``; nearly flat, so its confidence is low by construction). With
``ridge: 0`` the Gram matrix is factorised as it is; only a singular one gets the smallest jitter that
factorises (:func:`_factorise`), where the script's ``torch.inverse`` would return garbage.

Output (``readout``): ``labels`` is the paper's: the views' label matrices averaged (each row clipped at 0
and normalised; no neighbour readout); ``authors`` the released script's (above). ``posterior`` (our default)
reads the labels out of the views' EAC heads instead, each calibrated by a temperature fitted on the trusted
rows (which EAC never trains on),
averaged, and combined with the given label's likelihood under a noise transition matrix estimated by EM:
q_n(y) ∝ p_n(y) T[y, noisy_n]. At low noise T is sharp, so a given label is kept unless the heads are sure
it is wrong (the label-matrix readout lost to a kNN vote at 20% noise on digits: 0.969 vs 0.976); at high
noise T is flat and the heads decide. hard = argmax, confidence = max probability; trusted rows keep their
trusted labels. ``eac_target: posterior`` uses the same posterior as the exchanged labels (an option; the
paper's exchange uses the other head's prediction).

Neighbour readout (ours; ``neighbour_*`` settings). Every corrector above is LINEAR in the features: IPC's
closed-form least squares, the EAC heads, and so the posterior read out of the heads. On features whose classes
are not linearly separable (raw pixels, tabular data, concentric rings: classes made of many modes or
wrapped round each other) the best linear head is wrong on whole regions, and purification can end below the
given labels; a k-nearest-neighbour vote, which is local, then beats it. The fix keeps the correctors and makes
the READOUT local: the prior of the posterior is taken from each row's k nearest neighbours (cosine, exact
search on ``neighbour_view``, default ``all``: the views L2-normalised and concatenated, so a neighbour must
be near in every view; a view wider than ``neighbour_dims`` (64) is searched on its top principal directions,
:func:`search_projections`; weights exp((sim - top sim) / ``neighbour_temperature``)), either their k = 0
posteriors (heads + their own given labels; ``posterior`` votes, with the row's own heads' prior as a self
term) or their given labels (``labels`` votes), averaged, then sharpened by a power t and combined with the
row's own given label through the EM noise transition as before: q_n(y) ∝ s_n(y)^t T[y, noisy_n]. A
neighbourhood average is a function of the features that no linear head can represent, and it is the
average of neighbours whose labels are independent noisy looks at (nearly) the same class, so it is sharper
evidence than its mean suggests: the power t > 1 lets a consistent neighbourhood outvote a row's own wrong
label (the mean of 10 agreeing 60%-right votes is far surer than 60%).

Which prior, k (``neighbour_ks``, 0 = the heads alone, today's readout), t (``neighbour_powers``) and vote
(``neighbour_votes``) is chosen per run without true labels beyond the trusted ones: by the likelihood of the
labels we were given (:func:`_neighbour_readout`). A neighbourhood prior leaves the row's own label out, so
the likelihood of the untrusted rows' given labels under it (through T) is an honest score over all N rows,
and the trusted rows add theirs (their prior built from their neighbours and their own GIVEN label, scored
against their trusted label; the heads never trained on them). The heads' prior was fitted to the untrusted
rows' labels, so it meets the best neighbourhood prior on the trusted rows alone. On linearly separable
features the heads (k = 0) or an equally good smooth prior wins; on rings/XOR, raw pixels and tabular data a
neighbourhood prior wins (``benchmarks/purify_quality.py`` ablates it: ``neighbour_ks: [0]`` turns it off).
Since the labels are argmaxes, a candidate whose posterior names the trusted label on clearly more trusted rows
(a paired sign test) replaces the likelihood's choice (:func:`_neighbour_readout`).
Sharding: the neighbour search runs per process on its own rows against the whole feature file read in
blocks (each row's list does not depend on the split); the readout gathers the k = 0 posteriors and the
given labels (N x C) and all-reduces its scores, so every process picks the same candidate. It runs once, at
the end (with true labels given for logging, earlier epochs log the heads' readout, the last epoch both).
Why all views and k up to 300: at high noise a neighbourhood is evidence in proportion to its size, and
neighbours near in both views are more often of one class. Fashion-MNIST, symmetric 80%, 1,000 trusted, the
same trained purifier: heads alone 0.822; best neighbourhood prior on view 1 (SimCLR) 0.836; on both views
(raw pixels projected to 64 dims) 0.862 (label votes, k 200, power 4; picked by the score), above the best
kNN vote of the report (0.853, k 200 on both full views, chosen with the true labels). The full 880-dim
concatenation reached 0.860 at 4x the search cost.
Cost: one kNN search over d = the searched width, exact below ``checks.index.threshold`` rows, O(N^2 d)
(60,000 x 160: ~15 s on 2 cores), an approximate IVF index at or above it (:mod:`dmlp_plugin.checks.index`;
1,000,000 x 128 at k = 300: recall@10 0.9996; the whole purifier at that size, 10 epochs and the search,
986 s on 2 cores: benchmarks/results/purify_scale.md), one SVD per wide view, and ~40 EM runs,
O(N C^2) each; memory O(N k) for the neighbour lists (the IVF index adds its grouped copy of the searched rows,
N d float32).

Memory beyond the features: O(n_batches * d^2 + N * C) (label matrices, Adam moments, Cholesky factors);
per-batch temporaries are O(B * d) for the gathered rows, O(N_local * k) for the neighbour lists. Under P
processes (:mod:`dmlp_plugin.distributed`) each holds N/P rows and the factors of 1/P of the batches:
O(n_batches * d^2 / P + N * C / P + d^2), plus the gathered (N, C) votes of the readout.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dmlp_plugin.checks import index
from dmlp_plugin.distributed import Dist, current
from dmlp_plugin.errors import UserError
from dmlp_plugin.records import PurifyResult


@dataclass(frozen=True)
class DMLPConfig:
    """Hyperparameters of the purifier. Defaults are ours (tuned on digits and synthetic clusters, see
    ``benchmarks/purify_quality.py``); ``DMLPConfig.authors()`` gives the released script's settings."""

    epochs: int = 30
    batch_size: int = 7000
    # IPC
    use_ipc: bool = True
    ipc_lr: float = 0.01
    ipc_betas: tuple[float, float] = (0.5, 0.999)
    ipc_weight_decay: float = 3e-4
    ridge: float = 1e-3
    ipc_balance_weight: float = 1.0
    # EAC
    use_eac: bool = True
    eac_lr: float = 0.006
    eac_betas: tuple[float, float] = (0.5, 0.999)
    eac_weight_decay: float = 3e-4
    eac_batch_size: int = 500
    eac_min_steps: int = 30
    eac_lr_decay_epoch: int | None = None
    eac_conf_weight: float = 0.4
    eac_balance_weight: float = 1.0
    # the released script's EAC loss (a Linear+Softmax head under a loss that applies softmax again)
    eac_double_softmax: bool = False
    eac_period: int = 5
    # when the views exchange: "epoch" (ours: after every eac_period-th epoch) or "batch" (the script's)
    eac_exchange: str = "epoch"
    eac_mix: float = 1.0
    eac_target: str = "prediction"
    readout: str = "posterior"
    transition_prior: float = 1.0
    # neighbour readout (see the module docstring): candidate neighbour counts (0: the heads alone) and
    # sharpening powers, chosen per run by the likelihood of the given and trusted labels
    neighbour_ks: tuple[int, ...] = (0, 10, 30, 100, 300)
    neighbour_powers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    neighbour_votes: tuple[str, ...] = ("posterior", "labels")
    neighbour_temperature: float = 0.1
    neighbour_view: str | int = "all"
    neighbour_dims: int = 64
    # views
    num_views: int = 2
    seed: int = 0

    def __post_init__(self):
        def bad(key: str, why: str):
            raise UserError(f"preprocessor.params.{key}={getattr(self, key)!r} {why}")

        for key in ("epochs", "batch_size", "eac_batch_size", "eac_min_steps", "num_views"):
            if getattr(self, key) < 1:
                bad(key, "must be a positive integer")
        for key in ("ipc_lr", "eac_lr"):
            if not (getattr(self, key) > 0 and math.isfinite(getattr(self, key))):
                bad(key, "must be a positive learning rate, e.g. 0.01")
        for key in ("ipc_weight_decay", "eac_weight_decay", "ridge", "ipc_balance_weight", "eac_conf_weight",
                    "eac_balance_weight", "transition_prior"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                bad(key, "must be a number >= 0")
        for key in ("ipc_betas", "eac_betas"):
            if len(getattr(self, key)) != 2 or not all(0 <= b < 1 for b in getattr(self, key)):
                bad(key, "must be two Adam betas in [0, 1), e.g. [0.5, 0.999]")
        if not 0 < self.eac_mix <= 1:
            bad("eac_mix", "must be in (0, 1]: 1 replaces a view's labels by the other view's predictions")
        if self.eac_target not in ("prediction", "posterior"):
            bad("eac_target", "must be 'prediction' (the paper: the other view's head) or 'posterior'")
        if self.readout not in ("posterior", "labels", "authors"):
            bad("readout", "must be 'posterior' (ours), 'labels' (the paper: the label matrices averaged) or 'authors' "
                           "(the released script: argmax of the raw label matrices averaged)")
        if not isinstance(self.eac_double_softmax, bool):
            bad("eac_double_softmax", "must be true (the released script's EAC loss) or false (ours: one softmax)")
        if self.eac_period < 0:
            bad("eac_period", "must be >= 0 (0 turns the cross-view exchange off)")
        if self.eac_exchange not in ("epoch", "batch"):
            bad("eac_exchange", "must be 'epoch' (ours: after every eac_period-th epoch) or 'batch' (the released "
                                "script: in epochs eac_period+1, 2*eac_period+1, ..., each batch after its EAC)")
        if self.eac_exchange == "batch" and self.eac_target != "prediction":
            bad("eac_exchange", "'batch' exchanges the other head's predictions batch by batch; it needs "
                                "eac_target: prediction")
        if not (self.use_ipc or self.use_eac):
            raise UserError("preprocessor.params: use_ipc and use_eac are both false; nothing would purify")
        if self.use_eac and self.eac_period > self.epochs - (self.eac_exchange == "batch"):
            # the defect of the authors' script: an exchange that never fires leaves the labels as IPC made them
            if self.eac_exchange == "batch":
                raise UserError(f"preprocessor.params: eac_period={self.eac_period} >= epochs={self.epochs} with "
                                f"eac_exchange: batch (it fires in epoch eac_period + 1), so the cross-view exchange "
                                f"would never fire; set epochs > eac_period (or eac_period: 0 to turn it off on "
                                f"purpose)")
            raise UserError(f"preprocessor.params: eac_period={self.eac_period} > epochs={self.epochs}, so the "
                            f"cross-view exchange would never fire; set epochs >= eac_period (or eac_period: 0 to "
                            f"turn it off on purpose)")
        if self.eac_lr_decay_epoch is not None and self.eac_lr_decay_epoch < 0:
            bad("eac_lr_decay_epoch", "must be >= 0 or null")
        ks = self.neighbour_ks
        if (not isinstance(ks, (tuple, list)) or not ks
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in ks)):
            bad("neighbour_ks", "must be a non-empty list of neighbour counts >= 0, e.g. [0, 10, 30, 100] (0: the "
                                "heads' readout alone; [0] turns the neighbour readout off)")
        powers = self.neighbour_powers
        if (not isinstance(powers, (tuple, list)) or not powers
                or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t))
                       for t in powers)):
            bad("neighbour_powers", "must be a non-empty list of sharpening powers > 0, e.g. [0.5, 1, 2, 4, 8] "
                                    "([1] keeps the neighbours' mean as it is)")
        votes = self.neighbour_votes
        if (not isinstance(votes, (tuple, list)) or not votes
                or any(v not in ("posterior", "labels") for v in votes) or len(set(votes)) != len(votes)):
            bad("neighbour_votes", "must list what each neighbour votes with, without repeats: posterior (its k = 0 "
                                   "posterior) and/or labels (its given label), e.g. [posterior, labels]")
        object.__setattr__(self, "neighbour_votes", tuple(votes))
        temp = self.neighbour_temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (temp > 0 and math.isfinite(temp)):
            bad("neighbour_temperature", "must be a number > 0 (neighbour weight exp((sim - top sim) / T)), e.g. 0.1")
        view = self.neighbour_view
        text = str(view) if isinstance(view, int) and not isinstance(view, bool) else view
        if not (isinstance(text, str) and (text == "all" or (text.isdigit() and 1 <= int(text) <= self.num_views))):
            bad("neighbour_view", f"must name the features searched for neighbours: a view 1..{self.num_views} or "
                                  f"all (the views concatenated), e.g. 1")
        object.__setattr__(self, "neighbour_view", text)
        dims = self.neighbour_dims
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 0:
            bad("neighbour_dims", "must be an integer >= 0: views wider than this are searched on their top principal "
                                  "directions (0 searches the full features), e.g. 64")
        object.__setattr__(self, "neighbour_ks", tuple(ks))
        object.__setattr__(self, "neighbour_powers", tuple(float(t) for t in powers))

    @staticmethod
    def authors() -> "DMLPConfig":
        """The released script's algorithm (DMLP.py): 100 epochs, 7,000-row IPC batches, no ridge, its EAC
        loss with the doubled softmax and its weights 0.4 / 2200, lr 0.006 x0.1 after epoch 3, one EAC pass per
        batch, T = 20 with its exchange timing (``eac_exchange: batch``; its condition made to fire: in epochs
        21, 41, 61, 81) and its readout (argmax of the raw label matrices averaged). Give it the same features
        twice, as the script loads one file for both views."""
        return DMLPConfig(epochs=100, batch_size=7000, eac_period=20, eac_balance_weight=2200.0,
                          ridge=0.0, eac_mix=1.0, eac_lr_decay_epoch=3, eac_min_steps=1,
                          eac_double_softmax=True, eac_exchange="batch", readout="authors")

    def to_dict(self) -> dict:
        return asdict(self)


def _to_simplex(y: torch.Tensor) -> torch.Tensor:
    """Clip unconstrained label rows at 0 and normalise; an all-zero row falls back to its argmax."""
    pos = y.clamp_min(0)
    s = pos.sum(dim=1, keepdim=True)
    onehot = F.one_hot(y.argmax(dim=1), y.shape[1]).to(y.dtype)
    return torch.where(s > 0, pos / s.clamp_min(1e-12), onehot)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature t minimising the cross-entropy of softmax(logits / t) on held-out labelled rows
    (grid search over 10^-3 .. 10^2; 1.0 when there are no rows). logits: (M, C); labels: (M,)."""
    if labels.numel() == 0:
        return 1.0
    grid = torch.logspace(-3, 2, 101, dtype=logits.dtype, device=logits.device)
    losses = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return float(grid[int(torch.argmin(losses))])


def label_posterior(pred: torch.Tensor, noisy: torch.Tensor, meta_idx: torch.Tensor, meta_labels: torch.Tensor,
                    prior: float = 1.0, iters: int = 10, dist: Dist = Dist()) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior of the true label given a classifier's prediction and the given (noisy) label.

    q_n(y) ∝ pred_n(y) * T[y, noisy_n], where T[i, j] = P(given label j | true class i) is estimated by EM
    (Dawid-Skene style, ``iters`` rounds): E-step q as above, with the trusted rows fixed to their trusted
    labels; M-step T[i, j] ∝ sum_n q_n(i) [noisy_n = j] + prior / C (``prior`` pseudo-counts spread
    uniformly over each row: smoothing for rare classes), rows normalised. Low noise gives a
    sharp T (keep the given label unless the classifier is sure), high noise a flat T (follow the
    classifier); asymmetric noise gets its own T. pred: (N, C) rows on the simplex; noisy: (N,) int64.
    Returns q (N, C) and T (C, C). Sharded (``dist``): each process passes its rows (meta_idx local to them)
    and the counts are summed over the processes."""
    n, c = pred.shape
    onehot = F.one_hot(noisy, c).to(pred.dtype)  # (N, C)
    q = pred.clone()
    trans = None
    for _ in range(iters):
        q[meta_idx] = F.one_hot(meta_labels, c).to(pred.dtype)
        counts = dist.sum_(q.T @ onehot) + prior / c  # (C, C): expected count of (true i, given j)
        trans = counts / counts.sum(dim=1, keepdim=True)
        q = pred * trans[:, noisy].T
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
    q[meta_idx] = F.one_hot(meta_labels, c).to(pred.dtype)
    return q, trans


def _readout(state: list, cfg: "DMLPConfig", noisy: torch.Tensor, meta_loc: torch.Tensor, meta_loc_labels: torch.Tensor,
             meta_labels: torch.Tensor, dist: Dist, graph: "_Graph | None" = None,
             meta_noisy: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The purified label distributions of this process's rows (N_local, C) and what the readout chose.
    ``labels``: the views' label matrices averaged (the paper). ``posterior``: the views' EAC heads, each
    calibrated on the trusted rows (a temperature fitted on them; EAC never trains on them), averaged as a prior
    and combined with the given label's likelihood under the EM-estimated noise transition
    (:func:`label_posterior`); with a neighbour graph (``graph``, see :func:`_neighbour_graph`) the prior may
    be replaced by a neighbourhood one (:func:`_neighbour_readout`). Trusted rows get their trusted labels
    either way. meta_loc: this process's trusted rows (local indices); meta_noisy: the given labels of all
    trusted rows (M,)."""
    c = state[0].y.shape[1]
    info: dict = {}
    if cfg.readout == "posterior" and cfg.use_eac:
        prior = sum(F.softmax(v.logits() / v.temperature(meta_labels), dim=1) for v in state) / len(state)
        soft, trans = label_posterior(prior, noisy, meta_loc, meta_loc_labels, cfg.transition_prior, dist=dist)
        if graph is not None:
            with torch.no_grad():
                pm = _trusted_prior([v.head(v.xm) for v in state], meta_labels)
            soft, info = _neighbour_readout(cfg, prior, pm, soft, trans, noisy, meta_loc, meta_loc_labels, meta_labels,
                                            meta_noisy, graph, dist)
    elif cfg.readout == "authors":  # the released script: softmax of the raw matrices' mean (argmax: its labels)
        soft = F.softmax(sum(v.y.detach() for v in state) / len(state), dim=1)
    else:
        soft = sum(_to_simplex(v.y.detach()) for v in state) / len(state)
    soft[meta_loc] = F.one_hot(meta_loc_labels, c).to(soft.dtype)
    return soft, info


# ---------------------------------------------------------------------------------------------------------
# the neighbour readout


@dataclass
class _Graph:
    """Neighbour lists (global row indices, best first, the row itself left out) with their weights
    exp((sim - top sim) / T): of this process's rows (``w``, ``idx``: (N_local, K)) and of every trusted row
    (``mw``, ``midx``: (M, K), held by every process)."""

    w: torch.Tensor
    idx: torch.Tensor
    mw: torch.Tensor
    midx: torch.Tensor
    n: int
    seconds: float


def _rows(v, sel) -> np.ndarray:
    arr = v[sel].numpy() if torch.is_tensor(v) else np.asarray(v[sel])
    return np.ascontiguousarray(arr, dtype=np.float32)


def _l2(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def search_projections(views: list, which: str, dims: int, sample: int = 20000) -> list:
    """Per view searched (view ``which`` or ``all`` of them): None, or a (d_v, dims) matrix onto the view's top
    ``dims`` principal directions when the view is wider than ``dims`` (0: never). The directions are the
    leading right singular vectors of the L2-normalised rows, uncentred (they keep the dot products, hence
    the cosines, best in least squares), from every ceil(N / ``sample``)-th row: a fixed sample, so every
    process computes the same matrix. Cost O(sample * d_v^2), once."""
    picked = range(len(views)) if which == "all" else [int(which) - 1]
    out = [None] * len(views)
    for i in picked:
        v = views[i]
        n, d = int(v.shape[0]), int(v.shape[1])
        if dims and d > dims:
            rows = _l2(_rows(v, slice(0, n, max(1, math.ceil(n / sample))))).astype(np.float64)
            _, _, vt = np.linalg.svd(rows, full_matrices=False)
            out[i] = np.ascontiguousarray(vt[:dims].T, dtype=np.float32)
    return out


def _search_features(views: list, which: str, sel, proj: list | None = None) -> np.ndarray:
    """Rows ``sel`` (a slice or an index array) of the features the neighbour search runs on: view ``which``
    ("1", "2", ...) or ``all`` (each view L2-normalised, concatenated, renormalised: the cosine is then the
    mean of the views' cosines), float32; a view with a projection in ``proj`` (:func:`search_projections`)
    is L2-normalised, projected and normalised again first. Reads only those rows (a np.memmap stays on disk)."""
    proj = proj or [None] * len(views)

    def view(i):
        a = _rows(views[i], sel)
        return a if proj[i] is None else _l2(_l2(a) @ proj[i])

    if which == "all":
        return np.ascontiguousarray(_l2(np.concatenate([_l2(view(i)) for i in range(len(views))], axis=1)))
    return np.ascontiguousarray(view(int(which) - 1))


def _neighbour_graph(views: list, cfg: "DMLPConfig", lo: int, hi: int, meta_idx: np.ndarray, device,
                     chunk: int = 65536) -> "_Graph | None":
    """The k = min(max(neighbour_ks), N - 1) nearest neighbours (cosine) of this process's rows [lo, hi) and of
    the trusted rows among all N rows of ``cfg.neighbour_view``. Exact (faiss or torch, see
    :func:`dmlp_plugin.checks.knn.search`) below ``checks.index.threshold`` rows: each process searches for its
    own rows only, reading the database in blocks of ``chunk`` rows (memory O(chunk * d + (N_local + M) * k)).
    Approximate at or above it (:func:`_approximate_graph`): the whole graph, sharded by cells, every process
    holding all N lists (O(N k)). Either way a row's list does not depend on the process count. None when no
    k > 0 is asked for."""
    from dmlp_plugin.checks import knn  # noqa: PLC0415 - faiss import on use

    t0 = time.perf_counter()
    n = int(views[0].shape[0])
    k = min(max(cfg.neighbour_ks), n - 1)
    if k < 1:
        return None
    which = cfg.neighbour_view
    qid = np.concatenate([np.arange(lo, hi, dtype=np.int64), meta_idx.astype(np.int64)])
    proj = search_projections(views, which, cfg.neighbour_dims)
    kind = index.plan(n)
    if kind != "exact":  # an approximate index over all rows, the same on every process (index.build)
        parts = _approximate_graph(views, which, proj, qid, k, kind, chunk, hi - lo)
    else:
        queries = np.concatenate([_search_features(views, which, slice(lo, hi), proj),
                                  _search_features(views, which, meta_idx, proj)])
        best_s = np.zeros((qid.size, 0), dtype=np.float32)
        best_i = np.zeros((qid.size, 0), dtype=np.int64)
        for a in range(0, n, chunk):
            db = _search_features(views, which, slice(a, min(n, a + chunk)), proj)
            sims, idx = knn.search(db, min(k + 1, db.shape[0]), queries=queries, exclude_self=False, shard=False)
            idx = idx + a
            sims = np.where(idx == qid[:, None], -np.inf, sims)  # a row is not its own neighbour
            best_s, best_i = np.concatenate([best_s, sims], axis=1), np.concatenate([best_i, idx], axis=1)
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]  # ties: the lower block first
            best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
        nl = hi - lo
        parts = (best_s[:nl], best_i[:nl], best_s[nl:], best_i[nl:])
    own_s, own_i, meta_s, meta_i = parts  # my rows' lists, then the trusted rows'

    def weights(sims):
        return torch.from_numpy(np.exp((sims - sims[:, :1]) / cfg.neighbour_temperature).astype(np.float32)).to(device)

    def ids(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return _Graph(w=weights(own_s), idx=ids(own_i), mw=weights(meta_s), midx=ids(meta_i), n=n,
                  seconds=time.perf_counter() - t0)


def _approximate_graph(views: list, which: str, proj: list, qid: np.ndarray, k: int, kind: str,
                       chunk: int, own: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The k nearest neighbours of rows ``qid`` (this process's ``own`` rows, then the trusted rows) from an
    approximate index (:mod:`dmlp_plugin.checks.index`) over all rows of the search features, read ``chunk``
    rows at a time, each row's own id dropped: (own sims, own ids, trusted sims, trusted ids)."""
    from dmlp_plugin.checks import knn  # noqa: PLC0415

    n = int(views[0].shape[0])
    d = sum(int(v.shape[1]) if p is None else int(p.shape[1]) for v, p in zip(views, proj)) if which == "all" else \
        (int(views[int(which) - 1].shape[1]) if proj[int(which) - 1] is None else int(proj[int(which) - 1].shape[1]))
    key = "|".join([which, str([None if p is None else int(p.shape[1]) for p in proj])] +
                   [index.digest(v) for v in views])

    def rows(sel):
        return _search_features(views, which, sel, proj)

    built = index.cached_build(key, rows, n, d, kind, gpu=knn.backend_name() == "faiss-gpu")
    if kind == "ivf":  # the whole graph, sharded by cells (bit for bit what one process gets), then my rows
        sims, ids = index.whole_search(built, k)
        lo = int(qid[0]) if own else 0
        meta = qid[own:]
        return sims[lo:lo + own], ids[lo:lo + own], sims[meta], ids[meta]  # (views of the whole lists, no copy)
    out_s, out_i = [], []
    for a in range(0, qid.size, chunk):
        ids = qid[a:a + chunk]
        s, i = built.search(rows(ids), min(k + 1, n))
        s, i = index.drop_ids(s, i, ids[:, None])
        out_s.append(s[:, :k])
        out_i.append(i[:, :k])
    s, i = np.concatenate(out_s), np.concatenate(out_i)
    return s[:own], i[:own], s[own:], i[own:]


def _neighbour_sums(q_all: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, ks: list[int],
                    chunk: int = 8192) -> dict[int, torch.Tensor]:
    """{k: sum over each row's first k neighbours of weight * q_all[neighbour]} (rows, C), for every k of the
    sorted ``ks`` in one pass over the neighbour columns, ``chunk`` rows at a time."""
    rows, c = idx.shape[0], q_all.shape[1]
    out = {k: torch.zeros(rows, c, dtype=q_all.dtype, device=q_all.device) for k in ks}
    for r in range(0, rows, chunk):
        acc = torch.zeros(min(chunk, rows - r), c, dtype=q_all.dtype, device=q_all.device)
        start = 0
        for k in ks:
            acc = acc + (w[r:r + chunk, start:k, None] * q_all[idx[r:r + chunk, start:k]]).sum(1)
            start = k
            out[k][r:r + chunk] = acc
    return out


def _trusted_prior(logits: list[torch.Tensor], meta_labels: torch.Tensor, folds: int = 5) -> torch.Tensor:
    """The heads' prior on the trusted rows (M, C) from each view's head logits on them (M, C), each view's
    temperature fitted on the OTHER trusted rows (``folds``-fold cross-fitting, the folds dealt round-robin in
    class order): the trusted rows score the readouts, and a temperature fitted on the very rows it is scored
    on would flatter the heads."""
    m = int(meta_labels.numel())
    with torch.no_grad():
        if m < 2:
            return sum(F.softmax(z / fit_temperature(z, meta_labels), dim=1) for z in logits) / len(logits)
        order = torch.argsort(meta_labels.cpu(), stable=True)
        fold = torch.empty(m, dtype=torch.long)
        fold[order] = torch.arange(m) % min(folds, m)
        fold = fold.to(meta_labels.device)
        out = torch.zeros_like(logits[0])
        for f in range(int(fold.max()) + 1):
            held, fit = fold == f, fold != f
            for z in logits:
                out[held] += F.softmax(z[held] / fit_temperature(z[fit], meta_labels[fit]), dim=1) / len(logits)
    return out


def _normalise(s: torch.Tensor) -> torch.Tensor:
    return s / s.sum(dim=1, keepdim=True).clamp_min(1e-12)


def _sharpen(s: torch.Tensor, power: float) -> torch.Tensor:
    """Rows of s (on the simplex) raised to ``power`` and renormalised (> 1 sharper, < 1 flatter)."""
    return F.softmax(power * torch.log(s.clamp_min(1e-6)), dim=1)


# scores (log-likelihood per row) closer than this are a tie, kept by the earlier candidate: sums in another
# order (several processes) must not flip the choice
_SCORE_TIE = 1e-9
# a candidate right on clearly more trusted rows than the likelihood's choice replaces it (a sign test at this z)
_SWITCH_Z = 2.0


def clearly_better(hits: dict[str, torch.Tensor], chosen: str, z: float = _SWITCH_Z) -> str | None:
    """The candidate right on clearly more trusted rows than ``chosen``, or None. hits: {name: (M,) bool, whether
    that candidate's posterior names each trusted row's trusted label}. Paired on the same rows: wins - losses >
    z * sqrt(wins + losses) (a sign test: under "no better", wins - losses has standard deviation
    sqrt(wins + losses)); of several such, the one right on the most rows, ties kept by the earlier in ``hits``."""
    base = hits[chosen]
    best = None
    for name, hit in hits.items():
        wins, losses = int((hit & ~base).sum()), int((~hit & base).sum())
        if wins - losses > z * math.sqrt(wins + losses) and (best is None or int(hit.sum()) > int(hits[best].sum())):
            best = name
    return best


def _neighbour_readout(cfg: "DMLPConfig", prior: torch.Tensor, pm: torch.Tensor, q0: torch.Tensor,
                       trans0: torch.Tensor, noisy: torch.Tensor, meta_loc: torch.Tensor, meta_loc_labels: torch.Tensor,
                       meta_labels: torch.Tensor, meta_noisy: torch.Tensor, graph: "_Graph",
                       dist: Dist) -> tuple[torch.Tensor, dict]:
    """The posterior readout with a neighbourhood prior; which one is chosen by likelihood.

    prior: the heads' calibrated prior p of this process's rows; pm: the same for the trusted rows (M, C),
    calibrated on the other trusted rows (:func:`_trusted_prior`); q0, trans0: the k = 0 posteriors of this
    process's rows (trusted rows: their trusted labels) and their transition matrix.

    Candidates: (k = 0) the heads' prior p as today; for every k > 0 of ``neighbour_ks``, every sharpening
    power t of ``neighbour_powers`` and every vote of ``neighbour_votes``: s_n = sharpen_t(normalise(self_n +
    sum_{j in N_k(n)} w_nj e_j)), with ``posterior`` votes e_j = q0_j and self_n = p_n, ``labels`` votes
    e_j = one-hot of j's given label (trusted rows: trusted label) and self_n = uniform. Each candidate gets its
    own EM transition T (:func:`label_posterior`) and two scores: the log-likelihood of the untrusted rows'
    given labels, sum_n log sum_y s_n(y) T[y, noisy_n], and of the trusted rows' labels,
    sum_m log s_m(y_m) T[y_m, noisy_m], where a trusted row's s_m is built exactly as an untrusted row's (from
    its neighbours and its own given label, never its trusted one; its heads' prior pm is held out). The
    neighbourhood candidates compete on the sum of both (every row's label is evidence; a neighbourhood prior
    leaves the row's own label out, so neither term flatters it). The heads' prior cannot be scored on the
    untrusted rows (the heads were fitted to those rows' labels, so their likelihood is flattered), so it
    meets the best neighbourhood candidate on the trusted rows alone and is kept when it scores higher there.
    Scores within ``_SCORE_TIE`` of each other are ties (the earlier candidate stays). Last, the argmax check: a
    likelihood weighs calibration as much as the argmax, so a sharpened vote can name the right class more often
    and still score lower (Fashion-MNIST, symmetric 90%: label votes k 300 power 8 are right on 84.5% of the
    trusted rows against 81.9% for the likelihood's choice, 0.834 vs 0.819 on the untrusted rows). Each trusted
    row's posterior (sm T[:, noisy_m], its trusted label unseen) is checked against its trusted label, and a
    candidate right on clearly more of them replaces the choice: paired, wins - losses > 2 sqrt(wins + losses)
    (a sign test; with a few dozen trusted rows it rarely fires). ``switched_from`` records the replaced choice.
    The gathered votes (N, C) are the only cross-process step; the scores are sums over processes, so every
    process picks the same candidate."""
    n, c = graph.n, q0.shape[1]
    kmax = graph.idx.shape[1]
    ks = sorted({min(k, kmax) for k in cfg.neighbour_ks if k > 0})
    m = int(meta_labels.numel())
    untrusted = torch.ones(prior.shape[0], dtype=torch.bool, device=prior.device)
    untrusted[meta_loc] = False
    sums, selfs = {}, {}
    for vote in cfg.neighbour_votes:
        if vote == "posterior":
            e, own, own_m = q0, prior, pm
        else:
            e = F.one_hot(noisy, c).to(q0.dtype)
            e[meta_loc] = F.one_hot(meta_loc_labels, c).to(q0.dtype)
            own = torch.full_like(prior, 1.0 / c)
            own_m = torch.full_like(pm, 1.0 / c)
        e_all = dist.gather_blocks(e.contiguous(), n)
        sums[vote] = (_neighbour_sums(e_all, graph.w, graph.idx, ks), _neighbour_sums(e_all, graph.mw, graph.midx, ks))
        selfs[vote] = (own, own_m)
        del e_all

    def score(s, sm, trans) -> tuple[float, float]:
        """(log-likelihood of the untrusted rows' given labels, of the trusted rows' labels), per row of N."""
        lik = (s[untrusted] * trans[:, noisy[untrusted]].T).sum(1)
        given = dist.sum_(torch.log(lik.clamp_min(1e-12)).sum().to(torch.float64).reshape(1))
        held = 0.0
        if m:
            rows = torch.arange(m, device=sm.device)
            held = float(torch.log((sm[rows, meta_labels] * trans[meta_labels, meta_noisy]).clamp_min(1e-12)).sum())
        return float(given[0]) / n, held / n

    def hits(sm, trans) -> torch.Tensor:
        """(M,) whether a trusted row's posterior (from its neighbours and its given label) names its trusted label."""
        if not m:
            return torch.zeros(0, dtype=torch.bool)
        return ((sm * trans[:, meta_noisy].T).argmax(1) == meta_labels).cpu()

    def posterior(vote, k, t):
        """A neighbourhood candidate's prior s (rows), its trusted rows' sm (M, C), posterior q and transition."""
        (local, trusted), (own, own_m) = sums[vote], selfs[vote]
        s = _sharpen(_normalise(local[k] + own), t)
        sm = _sharpen(_normalise(trusted[k] + own_m), t)
        return (s, sm, *label_posterior(s, noisy, meta_loc, meta_loc_labels, cfg.transition_prior, dist=dist))

    cands = ([("heads", 0, 1.0)] if 0 in cfg.neighbour_ks else []) + [
        (vote, k, t) for vote in cfg.neighbour_votes for k in ks for t in cfg.neighbour_powers]
    scores: dict[str, float] = {}
    trusted_scores: dict[str, float] = {}
    # name: (vote, k, t, trusted hits), in candidate order; a posterior is not kept (O(N C) each): the one picked
    # is computed again at the end (the same inputs give the same floats)
    found: dict[str, tuple] = {}
    best, heads = None, None
    for vote, k, t in cands:
        if k == 0:
            sm, trans, (sg, st) = pm, trans0, score(prior, pm, trans0)
        else:
            s, sm, _, trans = posterior(vote, k, t)
            sg, st = score(s, sm, trans)
        name = f"{vote} k={k} power={t:g}"
        scores[name], trusted_scores[name] = sg + st, st
        found[name] = (vote, k, t, hits(sm, trans))
        if k == 0:
            heads = (st, name)
        elif best is None or sg + st > best[0] + _SCORE_TIE:
            best = (sg + st, st, name)
    # the heads' readout (k = 0) against the best neighbourhood prior: on the trusted rows alone
    chosen = heads[1] if best is None or (heads is not None and heads[0] > best[1] + _SCORE_TIE) else best[2]
    # the likelihoods weigh calibration as much as the argmax (a sharpened vote can be right more often and still
    # score lower); the labels are argmaxes, so a candidate whose posterior names the trusted label on clearly more
    # trusted rows replaces the choice: paired on the same rows, wins - losses > z * sqrt(wins + losses) (a sign
    # test, z = _SWITCH_Z); of several such, the one right on the most trusted rows (ties: the earlier)
    switched = clearly_better({name: f[3] for name, f in found.items()}, chosen)
    vote, k, t, _ = found[switched or chosen]
    q = q0 if k == 0 else posterior(vote, k, t)[2]
    trusted_accuracy = {name: float(f[3].float().mean()) if m else None for name, f in found.items()}
    return q, {"neighbour_vote": vote, "neighbour_k": k, "neighbour_power": t, "log_likelihood": scores,
               "trusted_log_likelihood": trusted_scores, "trusted_accuracy": trusted_accuracy,
               "switched_from": chosen if switched else None, "neighbour_seconds": graph.seconds, "heads_soft": q0}


def _kl_uniform(mean_p: torch.Tensor) -> torch.Tensor:
    """KL(uniform || mean_p) for a (C,) probability vector."""
    c = mean_p.shape[0]
    return torch.sum((1.0 / c) * (math.log(1.0 / c) - torch.log(mean_p.clamp_min(1e-12))))


class _View:
    """State of one view: labels Y (parameters of IPC), their Adam optimiser, and the EAC head."""

    def __init__(self, x: torch.Tensor, xm: torch.Tensor, y0: torch.Tensor, cfg: DMLPConfig, gen: torch.Generator):
        n, d = x.shape
        c = y0.shape[1]
        self.x = x  # this process's rows
        self.xm = xm  # the trusted rows (every process holds all of them)
        self.y = y0.clone().requires_grad_(True)
        self.opt_y = torch.optim.Adam([self.y], lr=cfg.ipc_lr, betas=cfg.ipc_betas,
                                      weight_decay=cfg.ipc_weight_decay)
        self.head = torch.nn.Linear(d, c).to(x.device)
        with torch.no_grad():  # seeded init, independent of the global RNG
            bound = 1.0 / math.sqrt(d)
            self.head.weight.copy_(torch.rand(c, d, generator=gen, device="cpu").to(x.device) * 2 * bound - bound)
            self.head.bias.copy_(torch.rand(c, generator=gen, device="cpu").to(x.device) * 2 * bound - bound)
        self.opt_h = torch.optim.Adam(self.head.parameters(), lr=cfg.eac_lr, betas=cfg.eac_betas,
                                      weight_decay=cfg.eac_weight_decay)
        self.chol: dict[int, torch.Tensor] = {}  # Cholesky factors of the batches this process owns
        self.gram_done: set[int] = set()

    def logits(self, chunk: int = 65536) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.head(self.x[i:i + chunk]) for i in range(0, self.x.shape[0], chunk)])

    def temperature(self, meta_labels: torch.Tensor) -> float:
        """The head's temperature fitted on the trusted rows (identical on every process)."""
        with torch.no_grad():
            return fit_temperature(self.head(self.xm), meta_labels)


def _ipc_step(view: _View, b: int, loc: torch.Tensor, nb: int, ym: torch.Tensor, cfg: DMLPConfig,
              dist: Dist) -> float:
    """One IPC step on batch ``b``: loc = this process's rows of it (local indices), nb = its global size.

    W = G^-1 X_B^T Y_B with G = X_B^T X_B + ridge; the meta loss L depends on Y_B only through W, so
    dL/dY_B = X_B G^-1 dL/dW (G symmetric). G, X_B^T Y_B and dL/dW are sums over rows, all-reduced across
    processes; the Cholesky factor of G is kept by one process (batch b's owner, b mod P), which solves and
    broadcasts the (d, C) results, so each process holds 1/P of the factors; each process then updates its own
    rows. Returns the loss (identical on every process)."""
    owner = b % dist.world_size
    xb = view.x[loc]
    if b not in view.gram_done:
        gram = dist.sum_(xb.T @ xb)
        view.gram_done.add(b)
        if dist.rank == owner:
            view.chol[b] = _factorise(gram, cfg.ridge)
        del gram
    with torch.no_grad():
        xty = dist.sum_(xb.T @ view.y[loc])
        w = torch.cholesky_solve(xty, view.chol[b]) if dist.rank == owner else torch.empty_like(xty)
        dist.broadcast_(w, owner)
    w.requires_grad_(True)  # (d, C)
    zm = view.xm @ w
    meta = F.cross_entropy(zm, ym) + torch.sum((zm - F.one_hot(ym, zm.shape[1]).to(zm.dtype)) ** 2)
    local = meta / dist.world_size  # replicated on every process: its gradient is summed P times below
    total = float(meta.detach())
    if cfg.ipc_balance_weight:
        kl = cfg.ipc_balance_weight * _kl_uniform(_global_mean(F.softmax(xb @ w, dim=1), nb, dist))
        local = local + kl
        total += float(kl.detach())
    (grad_w,) = torch.autograd.grad(local, w)
    with torch.no_grad():
        grad_w = dist.sum_(grad_w)
        v = torch.cholesky_solve(grad_w, view.chol[b]) if dist.rank == owner else torch.empty_like(grad_w)
        dist.broadcast_(v, owner)
        grad_y = torch.zeros_like(view.y)
        grad_y[loc] = xb @ v
    view.y.grad = grad_y
    view.opt_y.step()
    return total


def _factorise(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """Cholesky factor of gram + ridge * tr(gram)/d * I. A singular gram (ridge 0 with d >= batch size, or
    duplicate rows) gets the smallest relative ridge that factorises, as a pseudo-inverse would pick the
    minimum-norm solution."""
    if not bool(torch.isfinite(gram).all()) or float(torch.trace(gram)) <= 0:
        raise UserError("the purifier got features whose Gram matrix X^T X is zero or not finite (all-zero or "
                        "overflowing feature rows); clean or rescale the features")
    lam = ridge * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    chol, info = torch.linalg.cholesky_ex(gram + lam * eye)
    jitter = 1e-6
    while int(info) != 0:
        if jitter > 1.0:
            raise UserError("the purifier could not factorise the Gram matrix X^T X of a batch of features (it is "
                            "singular or not finite even with a ridge): the features are likely constant, all zero or "
                            "have duplicated/constant columns; drop such columns or standardise the features")
        chol, info = torch.linalg.cholesky_ex(gram + (lam + jitter * torch.trace(gram) / gram.shape[0]) * eye)
        jitter *= 10
    return chol


def _global_mean(p: torch.Tensor, n: int, dist: Dist) -> torch.Tensor:
    """mean over all processes' rows of p (local rows (B_local, C), n rows in all), differentiable with
    respect to this process's rows only: summing the gradients over the processes gives the full one."""
    s = p.sum(dim=0)
    if dist.world_size == 1:
        return s / n
    total = dist.sum_(s.detach().clone())
    return (s + (total - s.detach())) / n


def _inputs_digest(noisy, meta_idx, meta_labels, heads: list) -> str:
    """A short hash of the labels, the trusted set and the first rows of each view: a checkpoint of other
    inputs must not be resumed."""
    h = hashlib.sha256()
    for a in (noisy, meta_idx, meta_labels, *heads):
        arr = np.ascontiguousarray(np.asarray(a))
        h.update(str(arr.dtype).encode() + str(arr.shape).encode() + arr.tobytes())
    return h.hexdigest()[:16]


def _save_purify_checkpoint(path: str, state: dict) -> None:
    from dmlp_plugin.atomic import atomic_path  # noqa: PLC0415

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # temp file + rename: a kill leaves the previous epoch's file
        torch.save(state, tmp)


def _load_purify_checkpoint(path: str, identity: dict) -> dict | None:
    """The saved state, or None when there is none, it is unreadable (warning) or it is of other inputs."""
    if not Path(path).exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated or foreign: start over, never run its code
        warnings.warn(f"purifier checkpoint {path} is unreadable ({type(e).__name__}); starting over",
                      RuntimeWarning, stacklevel=3)
        return None
    if not isinstance(saved, dict) or saved.get("identity") != identity:
        return None
    return saved


def _local_rows(idx: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Local indices of the global row indices idx that fall in [lo, hi), in idx's order."""
    return idx[(idx >= lo) & (idx < hi)] - lo


def _eac_pass(view: _View, idx: torch.Tensor, cfg: DMLPConfig, gen: torch.Generator, lo: int, hi: int,
              dist: Dist) -> float:
    """One pass of the EAC head over the global rows idx in a random order (the same on every process), in
    mini-batches of ``eac_batch_size`` global rows; each process computes the loss terms of its own rows and
    the head's gradients are all-reduced, so the head stays identical on every process."""
    order = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
    params = list(view.head.parameters())
    total, steps = 0.0, 0
    for start in range(0, order.numel(), cfg.eac_batch_size):
        mb = order[start:start + cfg.eac_batch_size]
        nmb = mb.numel()
        loc = _local_rows(mb, lo, hi)
        with torch.no_grad():
            t = view.y[loc].argmax(dim=1)
        logits = view.head(view.x[loc])
        if cfg.eac_double_softmax:
            # the released script: the head's output is softmax(z), and the cross-entropy applies log-softmax
            # to it again; the confidence penalty sees softmax(softmax(z)), the balance term a third softmax
            out = F.softmax(logits, dim=1)
            loss = F.cross_entropy(out, t, reduction="sum") / nmb
            p = F.softmax(out, dim=1)
        else:
            p = F.softmax(logits, dim=1)
            loss = F.cross_entropy(logits, t, reduction="sum") / nmb
        if cfg.eac_conf_weight:
            loss = loss + cfg.eac_conf_weight * torch.sum(p * torch.log(p.clamp_min(1e-12))) / nmb
        local_value = loss.detach()
        kl = torch.zeros(())
        if cfg.eac_balance_weight:
            pb = F.softmax(p, dim=1) if cfg.eac_double_softmax else p
            kl = cfg.eac_balance_weight * _kl_uniform(_global_mean(pb, nmb, dist))
            loss = loss + kl
        view.opt_h.zero_grad(set_to_none=True)
        loss.backward()
        if dist.world_size > 1:  # one all-reduce: every gradient and the rows' loss terms
            flat = torch.cat([g.grad.reshape(-1) for g in params] + [local_value.reshape(1)])
            dist.sum_(flat)
            offset = 0
            for g in params:
                g.grad.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            local_value = flat[-1]
        view.opt_h.step()
        total += float(local_value) + float(kl.detach())
        steps += 1
    return total / max(steps, 1)


def purify(views: list[np.ndarray] | list[torch.Tensor], noisy: np.ndarray, meta_idx: np.ndarray,
           meta_labels: np.ndarray, num_classes: int, cfg: DMLPConfig = DMLPConfig(),
           truth: np.ndarray | None = None, device: str | torch.device = "cpu", progress: bool = True,
           on_epoch: Callable[[int, dict], None] | None = None, dist: Dist | None = None,
           checkpoint: str | None = None) -> PurifyResult:
    """Purify ``noisy`` labels of N samples.

    views: ``cfg.num_views`` feature matrices (N, d_v), rows L2-normalised (a single matrix is reused
        for every view, as the authors' script does). A ``np.memmap`` is read only where needed: under
        several processes each one copies only its block of rows and the trusted rows.
    noisy: (N,) int noisy labels. meta_idx: (M,) indices of trusted samples, meta_labels: (M,) their
        trusted labels (the meta rows are not purified; they keep these labels).
    truth: optional (N,) true labels, used only to log label accuracy per epoch (never to decide).
    dist: the processes to shard the rows over (default: those of the launcher, see
        :mod:`dmlp_plugin.distributed`; one process without one). Every process returns the full result.
    checkpoint: a file path (each process adds ``.rank<r>`` under several). After every epoch the state (label
        matrices, heads, both optimisers, the random generator, the history) is written there atomically;
        a later call with the same inputs and settings resumes after the last saved epoch and returns the
        same result as an uninterrupted run. A file from other inputs is ignored (and replaced).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    dist = current(device.type) if dist is None else dist
    gen = torch.Generator().manual_seed(cfg.seed)
    if len(views) == 1 and cfg.num_views > 1:
        views = list(views) * cfg.num_views
    views = views[: cfg.num_views]
    n = int(views[0].shape[0])
    lo, hi = dist.block(n)
    meta_np = np.asarray(meta_idx, dtype=np.int64)

    def rows(v, sel):
        return torch.as_tensor(_rows(v, sel)).to(device)

    xs = [rows(v, slice(lo, hi)) for v in views]
    xms = [rows(v, meta_np) for v in views]
    noisy_all = torch.as_tensor(np.asarray(noisy), dtype=torch.long)
    noisy_t = noisy_all[lo:hi].to(device)
    meta_idx_t = torch.as_tensor(meta_np, dtype=torch.long)
    meta_lab_t = torch.as_tensor(np.asarray(meta_labels), dtype=torch.long)
    is_meta = torch.zeros(n, dtype=torch.bool)
    is_meta[meta_idx_t] = True
    train_idx = torch.nonzero(~is_meta).squeeze(1)  # global
    perm = train_idx[torch.randperm(train_idx.numel(), generator=gen)]
    n_batches = max(1, math.ceil(perm.numel() / cfg.batch_size))
    batches = [perm[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(n_batches)]
    local_batches = [_local_rows(b, lo, hi).to(device) for b in batches]
    # this process's rows: the untrusted ones, and the trusted ones with their labels (local indices)
    train_loc = torch.nonzero(~is_meta[lo:hi]).squeeze(1).to(device)
    in_block = (meta_idx_t >= lo) & (meta_idx_t < hi)
    meta_loc = (meta_idx_t[in_block] - lo).to(device)
    meta_loc_lab = meta_lab_t[in_block].to(device)
    meta_lab_t = meta_lab_t.to(device)

    y0 = F.one_hot(noisy_t, num_classes).float()
    y0[meta_loc] = F.one_hot(meta_loc_lab, num_classes).float()
    state = [_View(x, xm, y0, cfg, gen) for x, xm in zip(xs, xms)]
    truth_t = None if truth is None else torch.as_tensor(np.asarray(truth), dtype=torch.long)[lo:hi].to(device)
    n_train = int(train_idx.numel())

    def accuracy(soft_or_y: torch.Tensor) -> float:
        hits = (soft_or_y[train_loc].argmax(1) == truth_t[train_loc]).sum().to(torch.float64)
        return float(dist.sum_(hits.reshape(1))[0]) / max(n_train, 1)

    # EAC trains in mini-batches over each batch; small data sets get several passes per epoch so the
    # head sees at least eac_min_steps updates an epoch (the script's one pass assumes 49,000 samples)
    steps_per_pass = sum(math.ceil(b.numel() / cfg.eac_batch_size) for b in batches)
    passes = max(1, math.ceil(cfg.eac_min_steps / steps_per_pass))

    history: list[dict] = []
    start = 0
    ckpt_path, identity = None, None
    if checkpoint is not None:
        ckpt_path = str(checkpoint) + (f".rank{dist.rank}" if dist.world_size > 1 else "")
        identity = {"format": 1, "config": json.dumps(asdict(cfg), sort_keys=True, default=str), "n": n,
                    "classes": int(num_classes), "world_size": dist.world_size, "rank": dist.rank,
                    "inputs": _inputs_digest(noisy, meta_np, meta_labels, [v[: min(n, 64)] for v in views])}
        saved = _load_purify_checkpoint(ckpt_path, identity)
        if saved is not None:
            with torch.no_grad():
                for v, sv in zip(state, saved["views"]):
                    v.y.copy_(sv["y"].to(device))
                    v.head.load_state_dict(sv["head"])
            for v, sv in zip(state, saved["views"]):
                v.opt_y.load_state_dict(sv["opt_y"])
                v.opt_h.load_state_dict(sv["opt_h"])
            gen.set_state(saved["generator"])
            history = list(saved["history"])
            start = int(saved["epoch"])
            if dist.is_main:
                print(f"resuming the purifier after epoch {start} of {cfg.epochs} from {ckpt_path}", file=sys.stderr)
    soft, readout_info = None, {}  # the readout of the last epoch run, when it was computed for the history
    # the neighbour readout's graph (searched once; rebuilt identically after a resume)
    graph = None
    if cfg.readout == "posterior" and cfg.use_eac:
        graph = _neighbour_graph(views, cfg, lo, hi, meta_np, device)
    meta_noisy = noisy_all[meta_idx_t].to(device)
    bar = tqdm(range(start, cfg.epochs), desc="dmlp purify", unit="epoch",
               disable=not (progress and dist.is_main), leave=False, initial=start, total=cfg.epochs)
    for epoch in bar:
        if cfg.eac_lr_decay_epoch is not None and epoch == cfg.eac_lr_decay_epoch + 1:
            # the script's schedule: lr x0.1 once epoch > 3
            for v in state:
                for g in v.opt_h.param_groups:
                    g["lr"] = cfg.eac_lr * 0.1
        ipc_loss, eac_loss = 0.0, 0.0
        # the released script's timing: in epochs T+1, 2T+1, ... (its `i % T == 0 and i != 0`, counting from 0)
        # each batch's labels are exchanged right after that batch's EAC training, by the heads as they are then
        batch_exchange = (cfg.use_eac and cfg.eac_exchange == "batch" and cfg.eac_period > 0 and epoch > 0
                          and epoch % cfg.eac_period == 0)
        for b, (idx, loc) in enumerate(zip(batches, local_batches)):
            for v in state:
                if cfg.use_ipc:
                    ipc_loss += _ipc_step(v, b, loc, idx.numel(), meta_lab_t, cfg, dist) / (len(batches) * len(state))
                if cfg.use_eac:
                    for _ in range(passes):
                        eac_loss += _eac_pass(v, idx, cfg, gen, lo, hi, dist) / (len(batches) * len(state) * passes)
            if batch_exchange:
                with torch.no_grad():
                    others = [F.softmax(src.head(src.x[loc]), dim=1) for src in state[1:] + state[:1]]
                    for v, other in zip(state, others):
                        v.y[loc] = (1 - cfg.eac_mix) * v.y[loc] + cfg.eac_mix * other
        exchanged = batch_exchange
        if cfg.use_eac and cfg.eac_exchange == "epoch" and cfg.eac_period > 0 and (epoch + 1) % cfg.eac_period == 0:
            with torch.no_grad():
                others = []
                for i in range(len(state)):
                    src = state[(i + 1) % len(state)]
                    z = src.logits()
                    if cfg.eac_target == "posterior":
                        # the trusted rows are held out from EAC training: calibrate the head on them
                        other = F.softmax(z / src.temperature(meta_lab_t), dim=1)
                        other, _ = label_posterior(other, noisy_t, meta_loc, meta_loc_lab, cfg.transition_prior,
                                                   dist=dist)
                    else:
                        other = F.softmax(z, dim=1)
                    others.append(other)
                for v, other in zip(state, others):
                    v.y[train_loc] = (1 - cfg.eac_mix) * v.y[train_loc] + cfg.eac_mix * other[train_loc]
            exchanged = True
        rec = {"epoch": epoch + 1, "ipc_loss": ipc_loss, "eac_loss": eac_loss, "exchanged": exchanged}
        if truth_t is not None:
            with torch.no_grad():
                for i, v in enumerate(state):
                    rec[f"label_accuracy_view{i + 1}"] = accuracy(v.y)
                # the neighbour readout (~30 EM runs) only once, at the last epoch; earlier epochs log the heads'
                last = epoch == cfg.epochs - 1
                soft, readout_info = _readout(state, cfg, noisy_t, meta_loc, meta_loc_lab, meta_lab_t, dist,
                                              graph if last else None, meta_noisy)
                rec["label_accuracy"] = accuracy(soft)
                if "neighbour_k" in readout_info:
                    rec["label_accuracy_heads"] = accuracy(readout_info.pop("heads_soft"))
                    rec["neighbour_vote"] = readout_info["neighbour_vote"]
                    rec["neighbour_k"] = readout_info["neighbour_k"]
                    rec["neighbour_power"] = readout_info["neighbour_power"]
            bar.set_postfix(acc=f"{rec['label_accuracy']:.3f}")
        history.append(rec)
        if ckpt_path is not None:
            _save_purify_checkpoint(ckpt_path, {
                "identity": identity, "epoch": epoch + 1, "history": history, "generator": gen.get_state(),
                "views": [{"y": v.y.detach().cpu(), "head": v.head.state_dict(), "opt_y": v.opt_y.state_dict(),
                           "opt_h": v.opt_h.state_dict()} for v in state]})
        if on_epoch is not None:
            on_epoch(epoch, rec)

    with torch.no_grad():
        if soft is None:  # no true labels to log (or nothing left to run after a resume)
            soft, readout_info = _readout(state, cfg, noisy_t, meta_loc, meta_loc_lab, meta_lab_t, dist, graph,
                                          meta_noisy)
        readout_info.pop("heads_soft", None)
        soft = dist.gather_blocks(soft.contiguous(), n)
        conf, hard = soft.max(dim=1)
    return PurifyResult(soft=soft.cpu().numpy().astype(np.float32), hard=hard.cpu().numpy().astype(np.int64),
                        confidence=conf.cpu().numpy().astype(np.float32), history=history, info=readout_info,
                        seconds=time.perf_counter() - t0)
