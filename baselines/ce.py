"""CE: plain cross-entropy training on the given labels (the "naive retraining" baseline). Soft labels
(N, C) are trained against as distributions: loss = -sum_c q_c log softmax(z)_c.

Defaults: the CIFAR-10 optimiser and schedule of DivideMix's recipe (Li et al., ICLR 2020), so that CE and
the noise-robust methods differ only in the method: ResNet-18 with a CIFAR stem, SGD lr 0.02, momentum 0.9,
weight decay 5e-4, batch 128, 300 epochs, lr / 10 from epoch 150, random crop (pad 4) + horizontal flip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from baselines.common import (LoopState, RunResult, TrainData, base_info, batch_inputs, check_common,
                              check_true_labels, config_from_preset, cross_entropy, data_tensors, evaluate,
                              finish, generator, make_accelerator, model_spec, make_classifier, make_eval_loader,
                              make_loader, make_sgd, mean_across, progress_bar, run_meta, save_checkpoint,
                              set_lr, step_lr, try_resume)


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; targets (B,) int64 labels or (B, C) distributions (used as given, not argmax)."""
    return cross_entropy(logits, targets)


PRESETS = {
    "cifar10": dict(backbone="resnet18", cifar_stem=True, image_size=None, epochs=300, batch_size=128, lr=0.02,
                    momentum=0.9, weight_decay=5e-4, milestones=(150,), gamma=0.1, augment=True, crop_pad=4,
                    hflip=True, mixed_precision="auto"),
    # scikit-learn digits (8x8 grey, 1,437 training images) on a 2-core CPU: configs/baselines-digits.yaml
    "small": dict(backbone="test_resnet", cifar_stem=False, image_size=16, epochs=30, batch_size=64, lr=0.05,
                  momentum=0.9, weight_decay=5e-4, milestones=(20,), gamma=0.1, augment=True, crop_pad=2,
                  hflip=False, mixed_precision="auto"),
}


@dataclass(frozen=True)
class CE:
    """Cross-entropy training. Fields are the hyperparameters; defaults = PRESETS["cifar10"]."""

    backbone: str = "resnet18"
    cifar_stem: bool = True
    image_size: int | None = None
    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = (150,)
    gamma: float = 0.1
    augment: bool = True
    crop_pad: int = 4
    hflip: bool = True
    mixed_precision: str = "auto"

    def __post_init__(self):
        check_common(self)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CE":
        return config_from_preset(cls, PRESETS, name, **overrides)

    def run(self, data: TrainData, device: str | None = None, seed: int = 0, progress: bool = True,
            checkpoint_dir=None, true_labels=None) -> RunResult:
        """Train on ``data.train_labels`` and return the last epoch's test accuracy. true_labels: unused
        by training (accepted for a uniform interface)."""
        from accelerate.utils import set_seed  # noqa: PLC0415

        check_true_labels(true_labels, data)
        accelerator = make_accelerator(device, self.mixed_precision, model_spec(self, data))
        set_seed(seed)
        t = data_tensors(data)
        model = make_classifier(self.backbone, data.in_chans, data.num_classes, self.cifar_stem)
        optimizer = make_sgd(model, self.lr, self.momentum, self.weight_decay)
        model, optimizer = accelerator.prepare(model, optimizer)
        state = LoopState()
        accelerator.register_for_checkpointing(state)
        meta = run_meta("ce", self, seed, data, accelerator)
        resumed_at = state.epoch if try_resume(accelerator, checkpoint_dir, meta) else None
        train_loader = make_loader(accelerator, t["train_images"], t["train_targets"], self.batch_size,
                                   seed=seed, stream="train")
        test_loader = make_eval_loader(accelerator, t["test_images"], t["test_labels"])

        for epoch in range(state.epoch, self.epochs):
            t0 = time.perf_counter()
            lr = step_lr(self.lr, epoch, self.milestones, self.gamma)
            set_lr(optimizer, lr)
            train_loader.set_epoch(epoch)
            gen = generator(seed, "augment", epoch, accelerator.process_index) if self.augment else None
            model.train()
            total = torch.zeros((), device=accelerator.device)
            count = 0
            for images, targets, idx in progress_bar(train_loader, accelerator, progress,
                                                     f"ce {epoch + 1}/{self.epochs}"):
                x = batch_inputs(images, self.image_size, gen, self.crop_pad, self.hflip)
                loss = ce_loss(model(x), targets)
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                optimizer.step()
                total += loss.detach() * len(idx)
                count += len(idx)
            acc = evaluate(accelerator, model, test_loader, t["test_labels"], self.image_size)
            state.curve.append({"epoch": epoch + 1, "test_accuracy": acc,
                                "train_loss": mean_across(accelerator, float(total), count), "lr": lr})
            state.seconds += time.perf_counter() - t0
            state.epoch = epoch + 1
            save_checkpoint(accelerator, checkpoint_dir, meta)

        info = base_info("ce", self, data, seed, accelerator)
        info["resumed_at_epoch"] = resumed_at
        return finish(accelerator, state, info)
