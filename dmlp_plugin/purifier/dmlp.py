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

Output (``readout``): ``labels`` is the paper's: the views' label matrices averaged (each row clipped at 0
and normalised). ``posterior`` (our default) reads the labels out of the views' EAC heads instead, each
calibrated by a temperature fitted on the trusted rows (which EAC never trains on), averaged, and combined
with the given label's likelihood under a noise transition matrix estimated by EM:
q_n(y) ∝ p_n(y) T[y, noisy_n]. At low noise T is sharp, so a given label is kept unless the heads are sure
it is wrong (the label-matrix readout lost to a kNN vote at 20% noise on digits: 0.969 vs 0.976); at high
noise T is flat and the heads decide. hard = argmax, confidence = max probability; trusted rows keep their
trusted labels. ``eac_target: posterior`` uses the same posterior as the exchanged labels (an option; the
paper's exchange uses the other head's prediction).

Memory beyond the features: O(n_batches * d^2 + N * C) (label matrices, Adam moments, Cholesky factors);
per-batch temporaries are O(B * d) for the gathered rows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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
    eac_period: int = 5
    eac_mix: float = 1.0
    eac_target: str = "prediction"
    readout: str = "posterior"
    transition_prior: float = 1.0
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
        if self.readout not in ("posterior", "labels"):
            bad("readout", "must be 'posterior' (ours) or 'labels' (the paper: the label matrices averaged)")
        if self.eac_period < 0:
            bad("eac_period", "must be >= 0 (0 turns the cross-view exchange off)")
        if not (self.use_ipc or self.use_eac):
            raise UserError("preprocessor.params: use_ipc and use_eac are both false; nothing would purify")
        if self.use_eac and self.eac_period > self.epochs:
            # the defect of the authors' script: an exchange that never fires leaves the labels as IPC made them
            raise UserError(f"preprocessor.params: eac_period={self.eac_period} > epochs={self.epochs}, so the "
                            f"cross-view exchange would never fire; set epochs >= eac_period (or eac_period: 0 to "
                            f"turn it off on purpose)")
        if self.eac_lr_decay_epoch is not None and self.eac_lr_decay_epoch < 0:
            bad("eac_lr_decay_epoch", "must be >= 0 or null")

    @staticmethod
    def authors() -> "DMLPConfig":
        """Settings of the authors' script (100 epochs, 7,000-sample batches, T = 20, balance 2200), with
        its exchange made to fire (their own condition never does)."""
        return DMLPConfig(epochs=100, batch_size=7000, eac_period=20, eac_balance_weight=2200.0,
                          ridge=0.0, eac_mix=1.0, eac_lr_decay_epoch=3, eac_min_steps=1)

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
                    prior: float = 1.0, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior of the true label given a classifier's prediction and the given (noisy) label.

    q_n(y) ∝ pred_n(y) * T[y, noisy_n], where T[i, j] = P(given label j | true class i) is estimated by EM
    (Dawid-Skene style, ``iters`` rounds): E-step q as above, with the trusted rows fixed to their trusted
    labels; M-step T[i, j] ∝ sum_n q_n(i) [noisy_n = j] + prior / C (``prior`` pseudo-counts spread
    uniformly over each row: smoothing for rare classes), rows normalised. Low noise gives a
    sharp T (keep the given label unless the classifier is sure), high noise a flat T (follow the
    classifier); asymmetric noise gets its own T. pred: (N, C) rows on the simplex; noisy: (N,) int64.
    Returns q (N, C) and T (C, C)."""
    n, c = pred.shape
    onehot = F.one_hot(noisy, c).to(pred.dtype)  # (N, C)
    q = pred.clone()
    trans = None
    for _ in range(iters):
        q[meta_idx] = F.one_hot(meta_labels, c).to(pred.dtype)
        counts = q.T @ onehot + prior / c  # (C, C): expected count of (true i, given j)
        trans = counts / counts.sum(dim=1, keepdim=True)
        q = pred * trans[:, noisy].T
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
    q[meta_idx] = F.one_hot(meta_labels, c).to(pred.dtype)
    return q, trans


def _readout(state: list, cfg: "DMLPConfig", noisy: torch.Tensor, meta_idx: torch.Tensor,
             meta_labels: torch.Tensor) -> torch.Tensor:
    """The purified label distributions (N, C). ``labels``: the views' label matrices averaged (the
    paper). ``posterior``: the views' EAC heads, each calibrated on the trusted rows, averaged as a prior
    and combined with the given label's likelihood under the EM-estimated noise transition
    (:func:`label_posterior`). Trusted rows get their trusted labels either way."""
    c = state[0].y.shape[1]
    if cfg.readout == "posterior" and cfg.use_eac:
        prior = sum(F.softmax(z / fit_temperature(z[meta_idx], meta_labels), dim=1)
                    for z in (v.logits() for v in state)) / len(state)
        soft, _ = label_posterior(prior, noisy, meta_idx, meta_labels, cfg.transition_prior)
    else:
        soft = sum(_to_simplex(v.y.detach()) for v in state) / len(state)
    soft[meta_idx] = F.one_hot(meta_labels, c).to(soft.dtype)
    return soft


def _kl_uniform(mean_p: torch.Tensor) -> torch.Tensor:
    """KL(uniform || mean_p) for a (C,) probability vector."""
    c = mean_p.shape[0]
    return torch.sum((1.0 / c) * (math.log(1.0 / c) - torch.log(mean_p.clamp_min(1e-12))))


class _View:
    """State of one view: labels Y (parameters of IPC), their Adam optimiser, and the EAC head."""

    def __init__(self, x: torch.Tensor, y0: torch.Tensor, cfg: DMLPConfig, gen: torch.Generator):
        n, d = x.shape
        c = y0.shape[1]
        self.x = x
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
        self.chol: dict[int, torch.Tensor] = {}

    def logits(self, chunk: int = 65536) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.head(self.x[i:i + chunk]) for i in range(0, self.x.shape[0], chunk)])

    def predict(self, chunk: int = 65536) -> torch.Tensor:
        return F.softmax(self.logits(chunk), dim=1)


def _ipc_step(view: _View, b: int, idx: torch.Tensor, xm: torch.Tensor, ym: torch.Tensor,
              cfg: DMLPConfig) -> float:
    xb = view.x[idx]
    if b not in view.chol:
        gram = xb.T @ xb
        lam = cfg.ridge * torch.trace(gram) / gram.shape[0]
        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        chol, info = torch.linalg.cholesky_ex(gram + lam * eye)
        jitter = 1e-6
        while int(info) != 0:
            # singular (ridge 0 with d >= batch size, or duplicate rows): the smallest relative ridge
            # that factorises, as a pseudo-inverse would pick the minimum-norm solution
            if jitter > 1.0:
                raise RuntimeError("the Gram matrix of a batch could not be factorised; check the features")
            chol, info = torch.linalg.cholesky_ex(gram + (lam + jitter * torch.trace(gram) / gram.shape[0]) * eye)
            jitter *= 10
        view.chol[b] = chol
    view.opt_y.zero_grad(set_to_none=True)
    yb = view.y[idx]
    w = torch.cholesky_solve(xb.T @ yb, view.chol[b])  # (d, C)
    zm = xm @ w
    loss = F.cross_entropy(zm, ym) + torch.sum((zm - F.one_hot(ym, zm.shape[1]).to(zm.dtype)) ** 2)
    if cfg.ipc_balance_weight:
        loss = loss + cfg.ipc_balance_weight * _kl_uniform(F.softmax(xb @ w, dim=1).mean(0))
    loss.backward()
    view.opt_y.step()
    return float(loss.detach())


def _eac_pass(view: _View, idx: torch.Tensor, cfg: DMLPConfig, gen: torch.Generator) -> float:
    order = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
    total, steps = 0.0, 0
    for start in range(0, order.numel(), cfg.eac_batch_size):
        mb = order[start:start + cfg.eac_batch_size]
        with torch.no_grad():
            t = view.y[mb].argmax(dim=1)
        logits = view.head(view.x[mb])
        p = F.softmax(logits, dim=1)
        loss = F.cross_entropy(logits, t)
        if cfg.eac_conf_weight:
            loss = loss + cfg.eac_conf_weight * torch.mean(torch.sum(p * torch.log(p.clamp_min(1e-12)), dim=1))
        if cfg.eac_balance_weight:
            loss = loss + cfg.eac_balance_weight * _kl_uniform(p.mean(0))
        view.opt_h.zero_grad(set_to_none=True)
        loss.backward()
        view.opt_h.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


def purify(views: list[np.ndarray] | list[torch.Tensor], noisy: np.ndarray, meta_idx: np.ndarray,
           meta_labels: np.ndarray, num_classes: int, cfg: DMLPConfig = DMLPConfig(),
           truth: np.ndarray | None = None, device: str | torch.device = "cpu", progress: bool = True,
           on_epoch: Callable[[int, dict], None] | None = None) -> PurifyResult:
    """Purify ``noisy`` labels of N samples.

    views: ``cfg.num_views`` feature matrices (N, d_v), rows L2-normalised (a single matrix is reused
        for every view, as the authors' script does).
    noisy: (N,) int noisy labels. meta_idx: (M,) indices of trusted samples, meta_labels: (M,) their
        trusted labels (the meta rows are not purified; they keep these labels).
    truth: optional (N,) true labels, used only to log label accuracy per epoch (never to decide).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    if len(views) == 1 and cfg.num_views > 1:
        views = list(views) * cfg.num_views
    views = views[: cfg.num_views]
    xs = [torch.as_tensor(np.asarray(v, dtype=np.float32) if not torch.is_tensor(v) else v,
                          dtype=torch.float32).to(device) for v in views]
    n = xs[0].shape[0]
    noisy_t = torch.as_tensor(np.asarray(noisy), dtype=torch.long, device=device)
    meta_idx_t = torch.as_tensor(np.asarray(meta_idx), dtype=torch.long, device=device)
    meta_lab_t = torch.as_tensor(np.asarray(meta_labels), dtype=torch.long, device=device)
    is_meta = torch.zeros(n, dtype=torch.bool, device=device)
    is_meta[meta_idx_t] = True
    train_idx = torch.nonzero(~is_meta).squeeze(1)
    perm = train_idx[torch.randperm(train_idx.numel(), generator=gen).to(device)]
    n_batches = max(1, math.ceil(perm.numel() / cfg.batch_size))
    batches = [perm[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(n_batches)]

    y0 = F.one_hot(noisy_t, num_classes).float()
    y0[meta_idx_t] = F.one_hot(meta_lab_t, num_classes).float()
    state = [_View(x, y0, cfg, gen) for x in xs]
    truth_t = None if truth is None else torch.as_tensor(np.asarray(truth), dtype=torch.long, device=device)

    # EAC trains in mini-batches over each batch; small data sets get several passes per epoch so the
    # head sees at least eac_min_steps updates an epoch (the script's one pass assumes 49,000 samples)
    steps_per_pass = sum(math.ceil(b.numel() / cfg.eac_batch_size) for b in batches)
    passes = max(1, math.ceil(cfg.eac_min_steps / steps_per_pass))

    history: list[dict] = []
    bar = tqdm(range(cfg.epochs), desc="dmlp purify", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        if cfg.eac_lr_decay_epoch is not None and epoch == cfg.eac_lr_decay_epoch + 1:
            # the script's schedule: lr x0.1 once epoch > 3
            for v in state:
                for g in v.opt_h.param_groups:
                    g["lr"] = cfg.eac_lr * 0.1
        ipc_loss, eac_loss = 0.0, 0.0
        for b, idx in enumerate(batches):
            for v in state:
                if cfg.use_ipc:
                    ipc_loss += _ipc_step(v, b, idx, v.x[meta_idx_t], meta_lab_t, cfg) / (len(batches) * len(state))
                if cfg.use_eac:
                    for _ in range(passes):
                        eac_loss += _eac_pass(v, idx, cfg, gen) / (len(batches) * len(state) * passes)
        exchanged = False
        if cfg.use_eac and cfg.eac_period > 0 and (epoch + 1) % cfg.eac_period == 0:
            logits = [v.logits() for v in state]
            with torch.no_grad():
                for i, v in enumerate(state):
                    z = logits[(i + 1) % len(state)]
                    if cfg.eac_target == "posterior":
                        # the trusted rows are held out from EAC training: calibrate the head on them
                        other = F.softmax(z / fit_temperature(z[meta_idx_t], meta_lab_t), dim=1)
                        other, trans = label_posterior(other, noisy_t, meta_idx_t, meta_lab_t, cfg.transition_prior)
                    else:
                        other = F.softmax(z, dim=1)
                    mixed = (1 - cfg.eac_mix) * v.y[train_idx] + cfg.eac_mix * other[train_idx]
                    v.y[train_idx] = mixed
            exchanged = True
        rec = {"epoch": epoch + 1, "ipc_loss": ipc_loss, "eac_loss": eac_loss, "exchanged": exchanged}
        if truth_t is not None:
            with torch.no_grad():
                for i, v in enumerate(state):
                    rec[f"label_accuracy_view{i + 1}"] = float((v.y[train_idx].argmax(1) == truth_t[train_idx]).float().mean())
                soft = _readout(state, cfg, noisy_t, meta_idx_t, meta_lab_t)
                rec["label_accuracy"] = float((soft[train_idx].argmax(1) == truth_t[train_idx]).float().mean())
            bar.set_postfix(acc=f"{rec['label_accuracy']:.3f}")
        history.append(rec)
        if on_epoch is not None:
            on_epoch(epoch, rec)

    with torch.no_grad():
        soft = _readout(state, cfg, noisy_t, meta_idx_t, meta_lab_t)
        conf, hard = soft.max(dim=1)
    return PurifyResult(soft=soft.cpu().numpy().astype(np.float32), hard=hard.cpu().numpy().astype(np.int64),
                        confidence=conf.cpu().numpy().astype(np.float32), history=history,
                        seconds=time.perf_counter() - t0)
