"""DivideMix: learning with noisy labels as semi-supervised learning (Li, Socher, Hoi, ICLR 2020;
official code read at LiJunnan1992/DivideMix, Train_cifar.py / dataloader_cifar.py; written anew here).

Two networks. After a warm-up with cross-entropy on all labels (plus a negative-entropy confidence
penalty for asymmetric noise), every epoch each network computes the per-sample CE of the given labels in
eval mode; the losses are min-max normalised and a two-component Gaussian mixture is fitted to them; the
posterior of the low-mean component is the clean probability w (at 90% noise the fit uses the mean of the
last 5 epochs' normalised losses). Co-divide: each network is trained on the OTHER network's division
(labelled: w > p_threshold, unlabelled: the rest). Per mini-batch (B labelled + B unlabelled samples,
each augmented twice): label co-refinement p = w*y + (1-w)*mean softmax of the trained net over the two
augmentations, sharpened with T; label co-guessing q = sharpened mean softmax of both nets over both
augmentations of the unlabelled images; MixMatch with l ~ Beta(alpha, alpha), l = max(l, 1-l), one
permutation for inputs and targets, one forward pass; loss = soft CE (labelled) + ramp * lambda_u * MSE
(unlabelled) + sum_c pi_c log(pi_c / mean prediction_c) with pi uniform, ramp = clip((epoch + it/iters -
warm_up) / 16, 0, 1). Test prediction: argmax of the sum of both networks' logits.

Official CIFAR-10 hyperparameters: two PreAct ResNet-18s (here: timm ``resnet18`` with a CIFAR stem, i.e.
a standard post-activation ResNet-18 whose first convolution has stride 1 and no max-pool), SGD lr 0.02,
momentum 0.9, weight decay 5e-4, batch 64 (warm-up batch 128), lr / 10 from epoch 150, 300 epochs (the
official loop runs epochs 0..300, i.e. 301), warm-up 10 epochs (30 for CIFAR-100), T 0.5, alpha 4,
random crop (pad 4) + horizontal flip, GMM max_iter 10, tol 1e-2, reg_covar 5e-4. lambda_u / p_threshold
follow the paper's per-setting table (:func:`paper_settings`; the code's argparse defaults 25 / 0.5 are NOT
the paper's): CIFAR-10 sym 20% 0/0.5, 50% 25/0.5, 80% 25/0.5, 90% 50/0.6, asym 40% 0/0.5; CIFAR-100 sym
20% 25/0.5, 50% 150/0.5, 80% 150/0.5, 90% 150/0.6. The table is keyed by the noise rate: leaving lambda_u /
p_threshold as None uses ``data.noise_rate``, read as the nominal rate or as the measured wrong fraction,
whichever is nearer a tabulated setting (:func:`paper_entry`); with known noise that is an oracle fact,
and the run's info says so.

Deviations from the official code (each deliberate): the number of epochs is ``epochs`` (not epochs + 1);
every random draw comes from seeded per-epoch streams (common.py), so a resumed run is bitwise the run
that was not interrupted; loss buffers are sized by the data (the official hard-codes 50,000); the
unlabelled loader is restarted by creating a new seeded pass (the official ``iterator.next()`` fails on
current PyTorch); an empty unlabelled set trains on the labelled part alone and an empty labelled set
skips that network's step for the epoch (the official code crashes on both); constant losses (nothing to
divide) give w = 1 for every sample (the official min-max normalisation divides by zero); a batch of one
image (train-mode batch norm cannot normalise it) is skipped in the warm-up and guessed together with its
second augmentation in the DivideMix phase. The "small" preset shortens the lambda_u ramp to 4 epochs
(official 16 of 300) to fit its 15-epoch budget.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from baselines.common import (LoopState, RunResult, TrainData, base_info, batch_inputs, check_common,
                              check_true_labels, config_from_preset, cross_entropy, data_tensors, derive_seed,
                              evaluate, finish, generator, label_precision, make_accelerator, model_spec, make_classifier,
                              make_eval_loader, make_loader, make_sgd, mean_across, numpy_rng, predict,
                              progress_bar, run_meta, save_checkpoint, set_lr, step_lr, try_resume)
from dmlp_plugin.errors import UserError

NOISE_KINDS = ("symmetric", "asymmetric")

# The paper's lambda_u / p_threshold per setting (DivideMix, Sec. 4.1 and its appendix), keyed by the
# nominal noise rate in DivideMix's convention (symmetric: the new label may be the true class).
PAPER_TABLE = {
    ("cifar10", "symmetric"): {0.2: (0.0, 0.5), 0.5: (25.0, 0.5), 0.8: (25.0, 0.5), 0.9: (50.0, 0.6)},
    ("cifar10", "asymmetric"): {0.4: (0.0, 0.5)},
    ("cifar100", "symmetric"): {0.2: (25.0, 0.5), 0.5: (150.0, 0.5), 0.8: (150.0, 0.5), 0.9: (150.0, 0.6)},
}
CURVE_KEYS = ("epoch", "test_accuracy", "train_loss", "lr", "phase", "lambda_u_ramped", "labelled_fraction_net1",
              "labelled_fraction_net2", "auc_net1", "auc_net2", "precision_net1", "precision_net2")
# At 90% noise the official code fits the GMM to the mean of the last 5 epochs' losses.
HISTORY_RATE, HISTORY_LENGTH = 0.9, 5

# ----------------------------------------------------------------------------------------- pure pieces


def paper_entry(noise_kind: str, noise_rate: float, num_classes: int) -> dict:
    """The paper's setting nearest to (noise_kind, noise_rate, num_classes): which table (CIFAR-10 for up to
    31 classes, CIFAR-100 above: nearest on a log scale), which tabulated rate, lambda_u and p_threshold.

    The table is keyed by the NOMINAL rate r of DivideMix's symmetric convention, under which only
    r * (1 - 1/C) of the labels end up wrong (90% -> 81% on CIFAR-10). noise_rate may be either reading
    (the brief's nominal rate, or the measured wrong fraction that ``dmlp bench`` passes): the setting whose
    nominal or expected measured rate is nearest wins, so 0.9 and 0.81 both pick the 90% row, 0.8 and 0.72
    the 80% row."""
    if noise_kind not in NOISE_KINDS:
        raise UserError(f"noise_kind={noise_kind!r}: choose one of {', '.join(NOISE_KINDS)} (class-dependent "
                        f"noise such as pairflip or human labels is closest to 'asymmetric')")
    if noise_rate is None or not 0.0 <= float(noise_rate) < 1.0:
        raise UserError(f"noise_rate={noise_rate!r}: the paper's settings are keyed by a noise rate in [0, 1); "
                        f"give the data's noise rate or set lambda_u and p_threshold explicitly")
    table = "cifar10" if int(num_classes) <= 31 else "cifar100"
    rows = PAPER_TABLE.get((table, noise_kind))
    if rows is None:
        raise UserError(f"the DivideMix paper has no {noise_kind} setting for {table} ({num_classes} classes); "
                        f"set lambda_u and p_threshold explicitly")
    x, keep = float(noise_rate), 1.0 - 1.0 / int(num_classes)

    def distance(r):
        nominal, measured = abs(x - r), abs(x - r * keep) if noise_kind == "symmetric" else float("inf")
        return min(nominal, measured), r

    rate = min(rows, key=distance)
    lambda_u, p_threshold = rows[rate]
    reading = ("nominal" if noise_kind != "symmetric" or abs(x - rate) <= abs(x - rate * keep)
               else f"measured wrong fraction (nominal x (1 - 1/C) = {rate * keep:.3f})")
    return {"table": table, "noise_kind": noise_kind, "tabulated_rate": rate, "matched_as": reading,
            "lambda_u": lambda_u, "p_threshold": p_threshold}


def paper_settings(noise_kind: str, noise_rate: float, num_classes: int) -> tuple[float, float]:
    """(lambda_u, p_threshold) of the paper's setting nearest to the given noise (see :func:`paper_entry`).
    noise_rate is the nominal rate in DivideMix's convention (what the paper's table is keyed by)."""
    e = paper_entry(noise_kind, noise_rate, num_classes)
    return e["lambda_u"], e["p_threshold"]


def minmax_normalise(losses) -> np.ndarray:
    """(x - min) / (max - min) as float64; all zeros when the losses are constant."""
    x = np.asarray(losses, dtype=np.float64).reshape(-1)
    span = float(x.max() - x.min()) if x.size else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def gmm_clean_probability(losses, seed: int, normalise: bool = True) -> np.ndarray:
    """(N,) clean probabilities: the losses, min-max normalised (unless ``normalise=False``: already
    normalised / averaged), fitted by GaussianMixture(n_components=2, max_iter=10, tol=1e-2,
    reg_covar=5e-4, random_state from ``seed``); the posterior of the component with the lower mean.
    Constant losses (no split to find) give 1 for every sample."""
    from sklearn.exceptions import ConvergenceWarning  # noqa: PLC0415
    from sklearn.mixture import GaussianMixture  # noqa: PLC0415

    x = minmax_normalise(losses) if normalise else np.asarray(losses, dtype=np.float64).reshape(-1)
    if x.size < 2 or float(x.max() - x.min()) <= 0:
        return np.ones(x.size, dtype=np.float64)
    gmm = GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4,
                          random_state=int(derive_seed(seed, "gmm") % (2 ** 32)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=10 is the recipe
        gmm.fit(x[:, None])
        post = gmm.predict_proba(x[:, None])
    return post[:, int(np.argmin(gmm.means_.reshape(-1)))].astype(np.float64)


def co_divide(prob1: np.ndarray, prob2: np.ndarray, p_threshold: float) -> list[dict]:
    """The division each network trains on: net 1 gets net 2's (labelled = prob2 > p_threshold, w =
    prob2), net 2 gets net 1's. Returns [division for net 1, division for net 2], each a dict with
    ``labelled`` / ``unlabelled`` index arrays, ``prob`` (the clean probabilities used as w) and
    ``from_net`` (1-based index of the network that produced them)."""
    out = []
    for k, (prob, source) in enumerate(((prob2, 2), (prob1, 1))):
        prob = np.asarray(prob, dtype=np.float64)
        mask = prob > p_threshold
        out.append({"net": k + 1, "from_net": source, "prob": prob,
                    "labelled": np.flatnonzero(mask), "unlabelled": np.flatnonzero(~mask)})
    return out


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """Temperature sharpening of distributions (rows): p^(1/T) / sum_c p_c^(1/T)."""
    q = p.pow(1.0 / T)
    return q / q.sum(dim=1, keepdim=True)


def co_refine(labels: torch.Tensor, w: torch.Tensor, mean_pred: torch.Tensor) -> torch.Tensor:
    """Label co-refinement (before sharpening): w*y + (1-w)*mean_pred. labels: (B, C) one-hot rows or soft
    label distributions; w: (B,) or (B, 1) clean probabilities from the PEER network's GMM; mean_pred:
    (B, C) the trained network's softmax averaged over the two augmentations."""
    w = w.reshape(-1, 1).to(mean_pred.dtype)
    return w * labels.to(mean_pred.dtype) + (1.0 - w) * mean_pred


def co_guess(probs: Sequence[torch.Tensor], T: float) -> torch.Tensor:
    """Label co-guessing: the mean of the given softmax outputs (both nets x both augmentations),
    sharpened with temperature T."""
    return sharpen(torch.stack(list(probs)).mean(0), T)


def mixmatch(inputs: torch.Tensor, targets: torch.Tensor, l: float, perm: torch.Tensor):
    """MixMatch's mixup: l' = max(l, 1-l) (the mix stays closer to the first sample), then
    (l' x + (1-l') x[perm], l' t + (1-l') t[perm]) with ONE permutation for inputs and targets."""
    l = max(float(l), 1.0 - float(l))
    perm = perm.to(inputs.device)
    return l * inputs + (1.0 - l) * inputs[perm], l * targets + (1.0 - l) * targets[perm.to(targets.device)]


def linear_rampup(current: float, warm_up: float, rampup_length: float = 16) -> float:
    """clip((current - warm_up) / rampup_length, 0, 1): the factor multiplying lambda_u (the official
    function returns it already multiplied by lambda_u). current = epoch + batch_index / iterations."""
    return float(np.clip((current - warm_up) / rampup_length, 0.0, 1.0))


def uniform_prior_penalty(logits: torch.Tensor) -> torch.Tensor:
    """sum_c pi_c log(pi_c / mean_b softmax(z_b)_c) with pi uniform (keeps the mean prediction spread)."""
    mean_pred = torch.softmax(logits.float(), dim=1).mean(0)
    prior = torch.full_like(mean_pred, 1.0 / mean_pred.numel())
    return torch.sum(prior * torch.log(prior / mean_pred))


def neg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """mean_b sum_c p log p: the warm-up confidence penalty for asymmetric noise (minimising it keeps
    predictions from becoming over-confident on the noisy labels)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return torch.mean(torch.sum(logp.exp() * logp, dim=1))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-mean_b sum_c t log softmax(z) for distribution targets (the labelled MixMatch loss)."""
    return -torch.mean(torch.sum(torch.log_softmax(logits.float(), dim=1) * targets, dim=1))


def clean_auc(prob: np.ndarray, clean: np.ndarray) -> float | None:
    """ROC AUC of clean probabilities against the truly clean samples; None when only one kind exists."""
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    clean = np.asarray(clean, dtype=bool)
    if clean.all() or not clean.any():
        return None
    return float(roc_auc_score(clean, prob))


# ----------------------------------------------------------------------------------------------- config

PRESETS = {
    "cifar10": dict(backbone="resnet18", cifar_stem=True, image_size=None, epochs=300, warm_up=10, batch_size=64,
                    warmup_batch_size=128, lr=0.02, momentum=0.9, weight_decay=5e-4, milestones=(150,), gamma=0.1,
                    lambda_u=None, p_threshold=None, temperature=0.5, mix_alpha=4.0, rampup_length=16.0,
                    loss_history=None, noise_kind="symmetric", warmup_penalty=None, augment=True, crop_pad=4,
                    hflip=True, mixed_precision="auto"),
    "cifar100": dict(backbone="resnet18", cifar_stem=True, image_size=None, epochs=300, warm_up=30, batch_size=64,
                     warmup_batch_size=128, lr=0.02, momentum=0.9, weight_decay=5e-4, milestones=(150,),
                     gamma=0.1, lambda_u=None, p_threshold=None, temperature=0.5, mix_alpha=4.0,
                     rampup_length=16.0, loss_history=None, noise_kind="symmetric", warmup_penalty=None,
                     augment=True, crop_pad=4, hflip=True, mixed_precision="auto"),
    # scikit-learn digits (8x8 grey, 1,437 training images) on a 2-core CPU, tuned against CE's "small"
    # preset (same backbone, image size, lr, crop). Last-epoch test accuracy, seeds 0 / 1, DivideMix-convention
    # symmetric noise (torch 1 thread, ~1 min at 50%, ~1.5 min at 5% where the labelled set is largest):
    #   5%: 0.981 / 0.981 (CE 0.986 / 0.994); 50%: 0.981 / 0.969 (CE 0.931 / 0.883);
    #   80%: 0.917 / 0.928 (CE 0.664 / 0.722). epochs=18, milestones=(14,) gave 0.950 / 0.950 at 80% but
    #   ~105 s at 5%.
    "small": dict(backbone="test_resnet", cifar_stem=False, image_size=16, epochs=15, warm_up=6, batch_size=64,
                  warmup_batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, milestones=(12,), gamma=0.1,
                  lambda_u=None, p_threshold=None, temperature=0.5, mix_alpha=4.0, rampup_length=4.0,
                  loss_history=None, noise_kind="symmetric", warmup_penalty=None, augment=True, crop_pad=2,
                  hflip=False, mixed_precision="auto"),
}


@dataclass(frozen=True)
class DivideMix:
    """DivideMix. Fields are the hyperparameters; defaults = PRESETS["cifar10"].

    lambda_u / p_threshold: None = the paper's table at ``data.noise_rate`` (:func:`paper_settings`).
    loss_history: epochs of normalised losses averaged before the GMM fit; None = 5 at (nominal) 90% noise,
    else 1 (the official rule). noise_kind: "symmetric" or "asymmetric" (picks the table row and, with
    warmup_penalty None, switches on the warm-up negative-entropy penalty for asymmetric noise).
    rampup_length: epochs over which lambda_u ramps up after the warm-up (official 16).
    """

    backbone: str = "resnet18"
    cifar_stem: bool = True
    image_size: int | None = None
    epochs: int = 300
    warm_up: int = 10
    batch_size: int = 64
    warmup_batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (150,)
    gamma: float = 0.1
    lambda_u: float | None = None
    p_threshold: float | None = None
    temperature: float = 0.5
    mix_alpha: float = 4.0
    rampup_length: float = 16.0
    loss_history: int | None = None
    noise_kind: str = "symmetric"
    warmup_penalty: bool | None = None
    augment: bool = True
    crop_pad: int = 4
    hflip: bool = True
    mixed_precision: str = "auto"

    def __post_init__(self):
        check_common(self)
        name = type(self).__name__

        def bad(field_name, value, fix):
            raise UserError(f"{name}.{field_name}={value!r}: {fix}")

        if isinstance(self.warm_up, bool) or not isinstance(self.warm_up, int) or self.warm_up < 0:
            bad("warm_up", self.warm_up, "give the number of CE warm-up epochs, an integer >= 0")
        if (isinstance(self.warmup_batch_size, bool) or not isinstance(self.warmup_batch_size, int)
                or self.warmup_batch_size < 1):
            bad("warmup_batch_size", self.warmup_batch_size, "give a positive integer (official: 2 x batch_size)")
        if self.momentum < 0 or self.momentum >= 1:
            bad("momentum", self.momentum, "give a value in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, "give a value >= 0")
        if not all(isinstance(m, int) and m >= 0 for m in self.milestones):
            bad("milestones", self.milestones, "give epoch numbers (integers >= 0), e.g. (150,)")
        if not 0 < self.gamma <= 1:
            bad("gamma", self.gamma, "give the lr decay factor in (0, 1]")
        if self.lambda_u is not None and (not math.isfinite(self.lambda_u) or self.lambda_u < 0):
            bad("lambda_u", self.lambda_u, "give a weight >= 0, or None for the paper's table")
        if self.p_threshold is not None and not 0 < self.p_threshold < 1:
            bad("p_threshold", self.p_threshold, "give a clean-probability threshold in (0, 1), or None for "
                                                  "the paper's table")
        if not 0 < self.temperature <= 1:
            bad("temperature", self.temperature, "give a sharpening temperature in (0, 1] (official 0.5)")
        if not self.mix_alpha > 0:
            bad("mix_alpha", self.mix_alpha, "give a Beta parameter > 0 (official 4)")
        if not self.rampup_length > 0:
            bad("rampup_length", self.rampup_length, "give a positive number of epochs (official 16)")
        if self.loss_history is not None and (isinstance(self.loss_history, bool)
                                              or not isinstance(self.loss_history, int) or self.loss_history < 1):
            bad("loss_history", self.loss_history, "give a number of epochs >= 1, or None for the official rule")
        if self.noise_kind not in NOISE_KINDS:
            bad("noise_kind", self.noise_kind, f"choose one of {', '.join(NOISE_KINDS)}")
        if self.warmup_penalty not in (None, True, False):
            bad("warmup_penalty", self.warmup_penalty, "give true, false or None (on for asymmetric noise)")
        if isinstance(self.crop_pad, bool) or not isinstance(self.crop_pad, int) or self.crop_pad < 0:
            bad("crop_pad", self.crop_pad, "give a padding in pixels, an integer >= 0")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DivideMix":
        return config_from_preset(cls, PRESETS, name, **overrides)

    def settings(self, data: TrainData) -> dict:
        """lambda_u, p_threshold, loss_history and warm-up penalty for ``data``, with where each came from."""
        need_table = self.lambda_u is None or self.p_threshold is None
        entry = None
        if data.noise_rate is None:
            if need_table:
                raise UserError("DivideMix: lambda_u / p_threshold are None (the paper's table, keyed by the noise "
                                "rate) but data.noise_rate is None; give the noise rate or set lambda_u and "
                                "p_threshold")
        else:
            try:
                entry = paper_entry(self.noise_kind, data.noise_rate, data.num_classes)
            except UserError:
                if need_table:
                    raise
        table_src = None if entry is None else (
            f"paper table ({entry['table']}, {entry['noise_kind']} {entry['tabulated_rate']:.0%} row; "
            f"data.noise_rate={data.noise_rate} read as the {entry['matched_as']})")
        out = {"lambda_u": float(self.lambda_u if self.lambda_u is not None else entry["lambda_u"]),
               "lambda_u_source": "config" if self.lambda_u is not None else table_src,
               "p_threshold": float(self.p_threshold if self.p_threshold is not None else entry["p_threshold"]),
               "p_threshold_source": "config" if self.p_threshold is not None else table_src}
        if self.loss_history is not None:
            out["loss_history"], out["loss_history_source"] = self.loss_history, "config"
        elif entry is None:
            out["loss_history"], out["loss_history_source"] = 1, "official rule; no paper setting known, no averaging"
        else:
            at_90 = entry["noise_kind"] == "symmetric" and entry["tabulated_rate"] == HISTORY_RATE
            out["loss_history"] = HISTORY_LENGTH if at_90 else 1
            out["loss_history_source"] = f"official rule (5-epoch loss average at 90% noise): {table_src}"
        uses_rate = need_table or (self.loss_history is None and entry is not None)
        out["oracle_note"] = (
            f"the paper's settings are keyed by the (nominal, DivideMix-convention) noise rate; "
            f"data.noise_rate={data.noise_rate} (source: {data.noise_rate_source}) was used to pick them"
            + (" - with the true noise rate this is an oracle fact in the noisy arm"
               if data.noise_rate_source is None or str(data.noise_rate_source).startswith("known") else "")
            if uses_rate and data.noise_rate is not None else "no noise-rate-keyed setting was used")
        penalty = self.warmup_penalty if self.warmup_penalty is not None else self.noise_kind == "asymmetric"
        out["warmup_penalty"] = bool(penalty)
        out["warmup_penalty_source"] = "config" if self.warmup_penalty is not None else f"noise_kind={self.noise_kind}"
        return out

    def run(self, data: TrainData, device: str | None = None, seed: int = 0, progress: bool = True,
            checkpoint_dir=None, true_labels=None) -> RunResult:
        """Train two networks with DivideMix on ``data.train_labels`` (hard or soft) and return the last
        epoch's test accuracy of their summed logits.

        Curve rows: epoch, test_accuracy, train_loss, lr, phase ("warmup" / "dividemix"), lambda_u_ramped
        (lambda_u x ramp at the epoch's last step) and, per network k, labelled_fraction_netk: the share of
        the training set in the labelled part of the division net k trained on (made by the OTHER net's GMM).
        true_labels (diagnostics only, never used for training) adds auc_netk (ROC AUC of the clean
        probabilities net k trained with against the truly clean samples) and precision_netk (the fraction of
        right labels in its labelled set); None in warm-up epochs."""
        from accelerate.utils import set_seed  # noqa: PLC0415

        truth = check_true_labels(true_labels, data)
        settings = self.settings(data)
        accelerator = make_accelerator(device, self.mixed_precision, model_spec(self, data))
        set_seed(seed)
        t = data_tensors(data)
        n = len(data.train_images)
        label_matrix = torch.from_numpy(data.label_matrix())
        hard = data.hard_labels()
        clean = None if truth is None else hard == truth
        nets = [make_classifier(self.backbone, data.in_chans, data.num_classes, self.cifar_stem) for _ in range(2)]
        opts = [make_sgd(m, self.lr, self.momentum, self.weight_decay) for m in nets]
        net1, net2, opt1, opt2 = accelerator.prepare(*nets, *opts)
        nets, opts = [net1, net2], [opt1, opt2]
        history = settings["loss_history"]
        state = LoopState(loss_history=torch.zeros(2, history, n, dtype=torch.float64),
                          loss_count=torch.zeros(2, dtype=torch.long))
        accelerator.register_for_checkpointing(state)
        meta = run_meta("dividemix", self, seed, data, accelerator)
        resumed_at = state.epoch if try_resume(accelerator, checkpoint_dir, meta) else None
        warm_loaders = [make_loader(accelerator, t["train_images"], t["train_targets"], self.warmup_batch_size,
                                    seed=seed, stream=f"warmup-net{k + 1}") for k in range(2)]
        train_eval_loader = make_eval_loader(accelerator, t["train_images"], t["train_targets"])
        test_loader = make_eval_loader(accelerator, t["test_images"], t["test_labels"])

        for epoch in range(state.epoch, self.epochs):
            t0 = time.perf_counter()
            lr = step_lr(self.lr, epoch, self.milestones, self.gamma)
            for opt in opts:
                set_lr(opt, lr)
            row: dict = {"epoch": epoch + 1}
            if epoch < self.warm_up:
                total, count = 0.0, 0
                for k in range(2):
                    s, c = warmup_epoch(accelerator, self, nets[k], opts[k], warm_loaders[k], seed=seed, epoch=epoch,
                                        net_index=k, penalty=settings["warmup_penalty"], progress=progress)
                    total, count = total + s, count + c
                row.update(phase="warmup", train_loss=mean_across(accelerator, total, count))
                for k in range(2):
                    row.update({f"labelled_fraction_net{k + 1}": None, f"auc_net{k + 1}": None,
                                f"precision_net{k + 1}": None})
                row["lambda_u_ramped"] = 0.0
            else:
                probs = []
                for k in range(2):
                    logits = predict(accelerator, nets[k], train_eval_loader, self.image_size)
                    loss = cross_entropy(logits, t["train_targets"], reduction="none").double()
                    slot = int(state.tensors["loss_count"][k]) % history
                    state.tensors["loss_history"][k, slot] = torch.from_numpy(minmax_normalise(loss.numpy()))
                    state.tensors["loss_count"][k] += 1
                    filled = min(int(state.tensors["loss_count"][k]), history)
                    fit_on = state.tensors["loss_history"][k, :filled].mean(0).numpy()
                    probs.append(gmm_clean_probability(fit_on, derive_seed(seed, "gmm", epoch, k), normalise=False))
                divisions = co_divide(probs[0], probs[1], settings["p_threshold"])
                total, count, lamb = 0.0, 0, 0.0
                for k in range(2):
                    div = divisions[k]
                    s, c, lamb = semi_supervised_epoch(
                        accelerator, self, nets[k], nets[1 - k], opts[k], t["train_images"], label_matrix,
                        div["labelled"], div["unlabelled"], torch.from_numpy(div["prob"]).float(), seed=seed,
                        epoch=epoch, net_index=k, lambda_u=settings["lambda_u"], progress=progress)
                    total, count = total + s, count + c
                    row[f"labelled_fraction_net{k + 1}"] = float(len(div["labelled"]) / n)
                    row[f"auc_net{k + 1}"] = None if clean is None else clean_auc(div["prob"], clean)
                    row[f"precision_net{k + 1}"] = label_precision(div["labelled"], hard, truth)
                row.update(phase="dividemix", train_loss=mean_across(accelerator, total, count),
                           lambda_u_ramped=float(lamb))
            acc = evaluate(accelerator, nets, test_loader, t["test_labels"], self.image_size)
            row.update(test_accuracy=acc, lr=lr)
            state.curve.append({key: row[key] for key in CURVE_KEYS})
            state.seconds += time.perf_counter() - t0
            state.epoch = epoch + 1
            save_checkpoint(accelerator, checkpoint_dir, meta)

        info = base_info("dividemix", self, data, seed, accelerator)
        info.update({k: v for k, v in settings.items()})
        info["resumed_at_epoch"] = resumed_at
        info["dividemix_epochs"] = max(0, self.epochs - self.warm_up)  # 0: warm-up (CE) only
        info["backbone_note"] = ("the paper uses PreAct ResNet-18; the cifar presets use timm resnet18 with a "
                                 "CIFAR stem (stride-1 first conv, no max-pool)")
        info["test_rule"] = "argmax of the sum of both networks' logits"
        return finish(accelerator, state, info)


# ------------------------------------------------------------------------------------------ loop pieces


def warmup_epoch(accelerator, cfg: DivideMix, net, optimizer, loader, *, seed: int, epoch: int, net_index: int,
                 penalty: bool, progress: bool) -> tuple[float, int]:
    """One CE epoch on all (noisy) labels for one network (+ negative-entropy penalty when ``penalty``).
    Returns (sum of per-batch losses x batch size, samples) of this process."""
    loader.set_epoch(epoch)
    gen = generator(seed, "warmup-augment", epoch, net_index, accelerator.process_index) if cfg.augment else None
    net.train()
    total, count = torch.zeros((), device=accelerator.device), 0
    for images, targets, idx in progress_bar(loader, accelerator, progress,
                                             f"dividemix warm-up net{net_index + 1} {epoch + 1}/{cfg.epochs}"):
        x = batch_inputs(images, cfg.image_size, gen, cfg.crop_pad, cfg.hflip)
        if len(idx) < 2:  # a last batch of one image: train-mode batch norm cannot normalise it; skip it
            continue
        logits = net(x)
        loss = cross_entropy(logits, targets)
        if penalty:
            loss = loss + neg_entropy(logits)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        total += loss.detach() * len(idx)
        count += len(idx)
    return float(total), count


def _unlabelled_batches(accelerator, images, targets, indices, batch_size, *, seed, stream, epoch):
    """Endless unlabelled batches: pass p of the epoch is a fresh seeded shuffle (stream ``stream-p``)."""
    p = 0
    while True:
        loader = make_loader(accelerator, images, targets, batch_size, seed=seed, stream=f"{stream}-pass{p}",
                             indices=indices)
        loader.set_epoch(epoch)
        yield from loader
        p += 1


def _pair_softmax(net, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(net(a)), softmax(net(b)) with ``net`` in train mode: two forwards as in the official code;
    one forward of both when a batch holds a single image (train-mode batch norm needs two)."""
    if len(a) >= 2:
        return torch.softmax(net(a).float(), 1), torch.softmax(net(b).float(), 1)
    out = torch.softmax(net(torch.cat([a, b])).float(), 1)
    return out[: len(a)], out[len(a):]


def semi_supervised_epoch(accelerator, cfg: DivideMix, net, peer, optimizer, images: torch.Tensor,
                          label_matrix: torch.Tensor, labelled: np.ndarray, unlabelled: np.ndarray,
                          prob: torch.Tensor, *, seed: int, epoch: int, net_index: int, lambda_u: float,
                          progress: bool) -> tuple[float, int, float]:
    """One DivideMix epoch for ``net`` on the division made by ``peer``'s GMM (labelled / unlabelled
    indices, clean probabilities ``prob`` (N,)). The number of steps is that of one pass over the labelled
    set; the unlabelled set is cycled. Returns (loss sum, labelled samples, last ramped lambda_u)."""
    dev = accelerator.device
    k = net_index + 1
    total, count, lamb = torch.zeros((), device=dev), 0, 0.0
    if len(labelled) == 0:
        return 0.0, 0, 0.0
    lab_loader = make_loader(accelerator, images, label_matrix, cfg.batch_size, seed=seed,
                             stream=f"labelled-net{k}", indices=labelled)
    lab_loader.set_epoch(epoch)
    unl = (_unlabelled_batches(accelerator, images, label_matrix, unlabelled, cfg.batch_size, seed=seed,
                               stream=f"unlabelled-net{k}", epoch=epoch) if len(unlabelled) else None)
    gen = generator(seed, "augment", epoch, k, accelerator.process_index) if cfg.augment else None
    rng = numpy_rng(seed, "mixmatch", epoch, k, accelerator.process_index)
    # the official ramp's iterations per epoch (one process: labelled // batch + 1; here per global batch)
    num_iter = len(labelled) // (cfg.batch_size * accelerator.num_processes) + 1
    prob = prob.float()

    def aug(x):
        return batch_inputs(x, cfg.image_size, gen, cfg.crop_pad, cfg.hflip)

    net.train()
    peer.eval()  # the peer only guesses labels (official: fixed, eval mode)
    for b, (xs, ys, idx) in enumerate(progress_bar(lab_loader, accelerator, progress,
                                                   f"dividemix net{k} {epoch + 1}/{cfg.epochs}")):
        bs = len(idx)
        x1, x2 = aug(xs), aug(xs)
        w = prob[idx.cpu()].to(dev)
        with torch.no_grad():
            p1, p2 = _pair_softmax(net, x1, x2)
            px = (p1 + p2) / 2
            tx = sharpen(co_refine(ys.float(), w, px), cfg.temperature)
            parts, targets = [x1, x2], [tx, tx]
            if unl is not None:
                us, _, _ = next(unl)
                u1, u2 = aug(us), aug(us)
                nu = len(us)
                peer_out = torch.softmax(peer(torch.cat([u1, u2])).float(), 1)  # eval mode: batching is exact
                tu = co_guess([*_pair_softmax(net, u1, u2), peer_out[:nu], peer_out[nu:]], cfg.temperature)
                parts += [u1, u2]
                targets += [tu, tu]
        all_inputs, all_targets = torch.cat(parts), torch.cat(targets)
        l = float(rng.beta(cfg.mix_alpha, cfg.mix_alpha))
        perm = torch.from_numpy(rng.permutation(all_inputs.shape[0]))
        mixed_x, mixed_t = mixmatch(all_inputs, all_targets, l, perm)
        logits = net(mixed_x).float()
        lx = soft_cross_entropy(logits[: 2 * bs], mixed_t[: 2 * bs])
        lamb = lambda_u * linear_rampup(epoch + b / num_iter, cfg.warm_up, cfg.rampup_length)
        loss = lx + uniform_prior_penalty(logits)
        if unl is not None:
            lu = torch.mean((torch.softmax(logits[2 * bs:], 1) - mixed_t[2 * bs:]) ** 2)
            loss = loss + lamb * lu
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        total += loss.detach() * bs
        count += bs
    peer.train()
    return float(total), count, float(lamb)
