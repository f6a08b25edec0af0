"""Co-teaching (Han et al., "Co-teaching: Robust Training of Deep Neural Networks with Extremely Noisy
Labels", NeurIPS 2018; official code read at github.com/bhanML/Co-teaching, main.py and loss.py).

Two networks are trained side by side on the same mini-batches. In each mini-batch each network ranks the
samples by its OWN per-sample cross-entropy and keeps the ``num_remember = int((1 - R(t)) * B)`` smallest;
the PEER network is then updated on that selection (net 1 learns from net 2's small-loss samples and vice
versa). The forget rate R(t) ramps from 0 to tau over the first ``num_gradual`` epochs and then stays at
tau; tau is the noise rate, which the official code assumes known (here: ``forget_rate`` when given, else
``data.noise_rate``, and ``info["forget_rate_source"]`` says which). Soft labels (N, C) are ranked and
trained with the per-sample cross-entropy against the distribution.

Official CIFAR-10 settings: Adam lr 0.001 (betas 0.9, 0.999), batch 128, 200 epochs, from epoch 80 the lr
decays linearly towards 0 (``lr * (200 - e) / 120``) and Adam's beta1 drops from 0.9 to 0.1; forget rate
= noise rate, num_gradual (T_k) 10, exponent (c) 1; a 9-layer CNN; no data augmentation; drop_last
training batches. Test accuracy is reported per network; we report network 1's (both are in the curve).

Deviations from the official code (and why):
- Backbone: timm ``resnet18`` with a CIFAR stem (``cifar_stem=True``), the backbone every method in our
  benchmark shares; we do not ship their 9-layer CNN.
- Loss: the mean cross-entropy over the kept samples. The official loss divides that mean by
  num_remember a second time (normalised twice); Adam is nearly invariant to that scale, but we do not
  copy the defect.
- Epochs: ours count 0..epochs-1 and every one trains, with R = schedule[e] and lr = plan[e]. The
  official loop spends its epoch 0 on evaluating the random weights and trains epochs 1..199 only, so it
  never trains with R = 0 and runs one epoch fewer.
- Exponent c: R(e) = tau * min(e / (T_k - 1), 1) ** c, the paper's T^c ramp reaching tau at epoch
  T_k - 1 (as the official ``linspace(0, ., T_k)`` does). The official code ramps to tau ** c and then
  jumps to tau, which only agrees for c = 1 (the default, so the default schedule is identical).
- ``num_remember`` is at least 1, so a tiny batch never yields an empty selection (a NaN loss); for the
  batch sizes used this never binds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines.common import (LoopState, RunResult, TrainData, base_info, batch_inputs, check_common,
                              check_true_labels, config_from_preset, data_tensors, evaluate, finish, generator,
                              make_accelerator, model_spec, make_adam, make_classifier, make_eval_loader, make_loader,
                              mean_across, progress_bar, run_meta, save_checkpoint, set_lr, try_resume)
from dmlp_plugin.errors import UserError

# ------------------------------------------------------------------------------------------- mechanism


def forget_rate_schedule(epoch: int, tau: float, num_gradual: int, exponent: float = 1.0) -> float:
    """R(epoch) for 0-based ``epoch``: ``tau * min(epoch / (num_gradual - 1), 1) ** exponent``, i.e. a
    ramp from 0 at epoch 0 to tau at epoch ``num_gradual - 1`` (linear for exponent 1, the official
    ``linspace(0, tau, num_gradual)``), then tau. ``num_gradual <= 1`` gives tau from the start."""
    if num_gradual <= 1:
        return float(tau)
    return float(tau) * min(max(epoch, 0) / (num_gradual - 1), 1.0) ** float(exponent)


def num_remember(batch_size: int, forget_rate: float) -> int:
    """Samples each network keeps from a batch of ``batch_size``: ``int((1 - R) * B)``, at least 1."""
    return max(1, int((1.0 - forget_rate) * batch_size))


def per_sample_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) float32 cross-entropy against hard labels (B,) or distributions (B, C)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def small_loss_selection(loss_a: torch.Tensor, loss_b: torch.Tensor,
                         forget_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross update's selections: ``(idx_for_b, idx_for_a)``.

    ``idx_for_b`` = the ``num_remember`` samples with the smallest ``loss_a`` (network A's own ranking),
    on which the PEER network B is updated; ``idx_for_a`` likewise from ``loss_b``. Ties are broken by
    position (a stable sort), so the selection is deterministic."""
    if loss_a.shape != loss_b.shape or loss_a.ndim != 1:
        raise ValueError(f"need two (B,) loss vectors, got {tuple(loss_a.shape)} and {tuple(loss_b.shape)}")
    k = num_remember(loss_a.shape[0], forget_rate)
    idx_for_b = torch.argsort(loss_a.detach(), stable=True)[:k]
    idx_for_a = torch.argsort(loss_b.detach(), stable=True)[:k]
    return idx_for_b, idx_for_a


def coteaching_losses(loss1: torch.Tensor, loss2: torch.Tensor, forget_rate: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cross update of one batch from both networks' per-sample losses (B,):
    ``(update1, update2, idx_for_1, idx_for_2)``. Network 1's loss ``update1`` is the mean of ``loss1``
    over ``idx_for_1``, the samples NETWORK 2 ranked smallest by its own loss; ``update2`` likewise over
    network 1's selection. A plain mean over the kept samples (the official code divides by
    num_remember twice)."""
    idx_for_2, idx_for_1 = small_loss_selection(loss1, loss2, forget_rate)
    return loss1[idx_for_1].mean(), loss2[idx_for_2].mean(), idx_for_1, idx_for_2


def adam_plan(epoch: int, lr: float, epochs: int, decay_start: int, beta1: float,
              beta1_decayed: float) -> tuple[float, float]:
    """(lr, beta1) of ``epoch``: (lr, beta1) before ``decay_start``; from it on the lr falls linearly,
    ``lr * (epochs - epoch) / (epochs - decay_start)``, and beta1 is ``beta1_decayed`` (official plan)."""
    if epoch < decay_start or epochs <= decay_start:
        return float(lr), float(beta1)
    return float(lr) * (epochs - epoch) / (epochs - decay_start), float(beta1_decayed)


def forget_rate_source(forget_rate: float | None, data: TrainData) -> tuple[float, str]:
    """tau and where it came from: the config's forget_rate ("given"), else data.noise_rate ("known noise
    rate" when measured against the true labels, else the data's own description)."""
    if forget_rate is not None:
        return float(forget_rate), "given"
    if data.noise_rate is None:
        raise UserError("Co-teaching needs a forget rate but forget_rate is None and data.noise_rate is None; "
                        "set CoTeaching(forget_rate=...) (e.g. an estimated noise rate) or give TrainData.noise_rate")
    src = (data.noise_rate_source or "unspecified").strip()
    if src == "known":
        return float(data.noise_rate), "known noise rate"
    if src.startswith("estimated"):
        return float(data.noise_rate), f"estimated noise rate ({src})"
    return float(data.noise_rate), f"noise rate from the data ({src})"


# ----------------------------------------------------------------------------------------------- config

PRESETS = {
    # the official CIFAR-10 optimiser, schedule and forget-rate ramp, on our shared backbone (see docstring)
    "cifar10": dict(backbone="resnet18", cifar_stem=True, image_size=None, epochs=200, batch_size=128, lr=0.001,
                    beta1=0.9, beta1_decayed=0.1, beta2=0.999, epoch_decay_start=80, weight_decay=0.0,
                    forget_rate=None, num_gradual=10, exponent=1.0, augment=False, crop_pad=0, hflip=False,
                    mixed_precision="auto"),
    # scikit-learn digits (8x8 grey, 1,437 training images) on a 2-core CPU
    "small": dict(backbone="test_resnet", cifar_stem=False, image_size=16, epochs=20, batch_size=64, lr=0.003,
                  beta1=0.9, beta1_decayed=0.1, beta2=0.999, epoch_decay_start=10, weight_decay=0.0,
                  forget_rate=None, num_gradual=5, exponent=1.0, augment=True, crop_pad=2, hflip=False,
                  mixed_precision="auto"),
}


@dataclass(frozen=True)
class CoTeaching:
    """Co-teaching. Fields are the hyperparameters; defaults = PRESETS["cifar10"]. forget_rate: tau, or
    None to use ``data.noise_rate`` (the official choice: the noise rate, assumed known)."""

    backbone: str = "resnet18"
    cifar_stem: bool = True
    image_size: int | None = None
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.001
    beta1: float = 0.9
    beta1_decayed: float = 0.1
    beta2: float = 0.999
    epoch_decay_start: int = 80
    weight_decay: float = 0.0
    forget_rate: float | None = None
    num_gradual: int = 10
    exponent: float = 1.0
    augment: bool = False
    crop_pad: int = 0
    hflip: bool = False
    mixed_precision: str = "auto"

    def __post_init__(self):
        check_common(self)
        name = type(self).__name__
        if self.forget_rate is not None and not (isinstance(self.forget_rate, (int, float))
                                                 and 0.0 <= self.forget_rate < 1.0):
            raise UserError(f"{name}.forget_rate={self.forget_rate!r}: give a fraction in [0, 1) or None "
                            f"(None uses data.noise_rate)")
        if not isinstance(self.num_gradual, int) or self.num_gradual < 1:
            raise UserError(f"{name}.num_gradual={self.num_gradual!r}: give the ramp length in epochs, an "
                            f"integer >= 1 (official 10)")
        if not (isinstance(self.exponent, (int, float)) and math.isfinite(self.exponent) and self.exponent > 0):
            raise UserError(f"{name}.exponent={self.exponent!r}: give a positive number (1 = linear ramp)")
        if not isinstance(self.epoch_decay_start, int) or self.epoch_decay_start < 0:
            raise UserError(f"{name}.epoch_decay_start={self.epoch_decay_start!r}: give a non-negative integer "
                            f"epoch (>= epochs means no decay)")
        for field_name in ("beta1", "beta1_decayed", "beta2"):
            v = getattr(self, field_name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise UserError(f"{name}.{field_name}={v!r}: give an Adam beta in [0, 1)")
        if self.weight_decay < 0:
            raise UserError(f"{name}.weight_decay={self.weight_decay}: give a value >= 0")
        if not isinstance(self.crop_pad, int) or self.crop_pad < 0:
            raise UserError(f"{name}.crop_pad={self.crop_pad!r}: give a non-negative integer (0 = no crop)")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CoTeaching":
        return config_from_preset(cls, PRESETS, name, **overrides)

    def run(self, data: TrainData, device: str | None = None, seed: int = 0, progress: bool = True,
            checkpoint_dir=None, true_labels=None) -> RunResult:
        """Train two networks with the cross update and return network 1's last-epoch test accuracy.
        true_labels: diagnostics only (label precision of the kept samples), never used for training."""
        from accelerate.utils import set_seed  # noqa: PLC0415

        tau, tau_source = forget_rate_source(self.forget_rate, data)
        truth = check_true_labels(true_labels, data)
        accelerator = make_accelerator(device, self.mixed_precision, model_spec(self, data))
        set_seed(seed)
        t = data_tensors(data)
        model1 = make_classifier(self.backbone, data.in_chans, data.num_classes, self.cifar_stem)
        model2 = make_classifier(self.backbone, data.in_chans, data.num_classes, self.cifar_stem)
        opt1 = make_adam(model1, self.lr, (self.beta1, self.beta2), self.weight_decay)
        opt2 = make_adam(model2, self.lr, (self.beta1, self.beta2), self.weight_decay)
        model1, model2, opt1, opt2 = accelerator.prepare(model1, model2, opt1, opt2)
        state = LoopState()
        accelerator.register_for_checkpointing(state)
        meta = run_meta("coteaching", self, seed, data, accelerator)
        resumed_at = state.epoch if try_resume(accelerator, checkpoint_dir, meta) else None
        train_loader = make_loader(accelerator, t["train_images"], t["train_targets"], self.batch_size,
                                   seed=seed, stream="train", drop_last=True)
        test_loader = make_eval_loader(accelerator, t["test_images"], t["test_labels"])
        # a sample's given label is right when its (hard) label equals the truth; diagnostics only
        clean = (None if truth is None
                 else torch.from_numpy(data.hard_labels() == truth).to(accelerator.device))

        for epoch in range(state.epoch, self.epochs):
            t0 = time.perf_counter()
            lr, beta1 = adam_plan(epoch, self.lr, self.epochs, self.epoch_decay_start, self.beta1,
                                  self.beta1_decayed)
            set_lr(opt1, lr, (beta1, self.beta2))
            set_lr(opt2, lr, (beta1, self.beta2))
            rate = forget_rate_schedule(epoch, tau, self.num_gradual, self.exponent)
            train_loader.set_epoch(epoch)
            gen = generator(seed, "augment", epoch, accelerator.process_index) if self.augment else None
            model1.train()
            model2.train()
            zero = torch.zeros((), device=accelerator.device)
            loss_sum, kept, seen, clean_kept = zero.clone(), 0, 0, zero.clone()
            for images, targets, idx in progress_bar(train_loader, accelerator, progress,
                                                     f"coteaching {epoch + 1}/{self.epochs}"):
                x = batch_inputs(images, self.image_size, gen, self.crop_pad, self.hflip)
                loss1 = per_sample_ce(model1(x), targets)
                loss2 = per_sample_ce(model2(x), targets)
                # net 1 learns from net 2's small-loss samples and net 2 from net 1's
                update1, update2, idx_for_1, idx_for_2 = coteaching_losses(loss1, loss2, rate)
                opt1.zero_grad(set_to_none=True)
                opt2.zero_grad(set_to_none=True)
                accelerator.backward(update1 + update2)  # the networks share no parameters
                opt1.step()
                opt2.step()
                k = len(idx_for_1)
                loss_sum += (update1.detach() + update2.detach()) * k
                kept += 2 * k
                seen += 2 * len(idx)
                if clean is not None:
                    clean_kept += clean[idx[idx_for_1]].sum() + clean[idx[idx_for_2]].sum()
            acc1 = evaluate(accelerator, model1, test_loader, t["test_labels"], self.image_size)
            acc2 = evaluate(accelerator, model2, test_loader, t["test_labels"], self.image_size)
            row = {"epoch": epoch + 1, "test_accuracy": acc1, "test_accuracy_net2": acc2,
                   "train_loss": mean_across(accelerator, float(loss_sum), kept), "lr": lr, "beta1": beta1,
                   "forget_rate": rate, "kept_fraction": mean_across(accelerator, float(kept), seen)}
            if clean is not None:
                row["label_precision"] = mean_across(accelerator, float(clean_kept), kept)
            state.curve.append(row)
            state.seconds += time.perf_counter() - t0
            state.epoch = epoch + 1
            save_checkpoint(accelerator, checkpoint_dir, meta)

        info = base_info("coteaching", self, data, seed, accelerator)
        info.update({"resumed_at_epoch": resumed_at, "forget_rate": tau, "forget_rate_source": tau_source,
                     "test_accuracy_reported": "network 1 (network 2 in the curve as test_accuracy_net2)",
                     "test_accuracy_net2": float(state.curve[-1]["test_accuracy_net2"]) if state.curve else None})
        return finish(accelerator, state, info)
