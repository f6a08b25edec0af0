"""What every baseline trainer shares: the data it takes (:class:`TrainData`), the result it gives
(:class:`RunResult`), and the helpers its training loop is written with (functions, not a Runner class;
each method's ``run`` writes out its own loop in the style of the accelerate examples).

Randomness. Nothing here touches the global RNGs. Every random choice in a loop (shuffle order, crop
offsets, flips, mixup coefficients, GMM initialisation) comes from a generator seeded by
``derive_seed(seed, epoch, stream, ...)``, so epoch ``e`` draws the same numbers whether the run got there
uninterrupted or resumed from a checkpoint, and a CUDA run shuffles and crops like a CPU run. Only the
initial weights come from the global RNG, seeded once by ``accelerate.utils.set_seed`` in each ``run``.

Batches. :class:`IndexedLoader` yields ``(uint8 images (B, H, W, C), targets, sample index (B,))`` on the
accelerator's device; images are turned into network input and augmented in one batched call
(:func:`batch_inputs`). Targets are ``(B,)`` int64 hard labels or ``(B, C)`` float32 distributions. With N
processes each step gives every process its own slice of one global batch (as accelerate's prepared
loaders do), padded by wrapping around so all processes take the same number of equal-sized steps; per
sample state is therefore gathered by index after each step (:func:`gather_rows`), duplicates are harmless.
Evaluation goes through a DataLoader prepared by the accelerator, so ``gather_for_metrics`` drops the
padding.

Checkpoints. ``checkpoint_dir/state`` is written by ``accelerator.save_state`` after every epoch (models,
optimisers, RNG states, and every object given to ``register_for_checkpointing``: a :class:`LoopState`
with the epoch counter, the curve and per-sample tensors; EMA models), beside ``meta.json`` that names the
method, config, seed and data fingerprint. A new state is written to ``state.new`` and swapped in by
renames, so a run killed at any moment resumes from the last complete epoch. Learning rates are pure
functions of the epoch (no scheduler state to save).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmlp_plugin.atomic import write_json
from dmlp_plugin.distributed import check_world_size
from dmlp_plugin.errors import UserError
from dmlp_plugin.features.backbone import create_backbone, to_input
from dmlp_plugin.hardware import (MIXED_PRECISION_MODES, bf16_hazard_layers, cpu_has_fast_bf16, resolve_device,
                                  resolve_mixed_precision)

# ----------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class TrainData:
    """One training problem.

    train_images: uint8 (N, H, W, C), C in {1, 3}. train_labels: (N,) int64 hard labels, or (N, C) float32
    rows on the simplex (purified soft labels). test_images: uint8 (M, H, W, C); test_labels: (M,) int64
    true labels. noise_rate: the fraction of wrong training labels, for methods that need it (Co-teaching's
    forget rate, DivideMix's settings table), or None when unknown; noise_rate_source says where it came
    from ("known": measured against the true labels, "estimated: <how>", "assumed").
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    noise_rate: float | None = None
    noise_rate_source: str | None = None

    def __post_init__(self):
        c = self.num_classes
        if not isinstance(c, (int, np.integer)) or c < 2:
            raise UserError(f"num_classes={c!r}: give the number of classes, an integer >= 2")
        for name in ("train_images", "test_images"):
            x = getattr(self, name)
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
                shape = getattr(x, "shape", None)
                dtype = getattr(x, "dtype", type(x).__name__)
                raise UserError(f"{name} is {dtype} of shape {shape}; give uint8 (N, H, W, C) with C in {{1, 3}} "
                                f"(grey images: images[..., None])")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise UserError(f"train images are {self.train_images.shape[1:]} but test images "
                            f"{self.test_images.shape[1:]}; give both splits at one size")
        y = np.asarray(self.train_labels)
        n = len(self.train_images)
        if y.ndim == 1:
            if not np.issubdtype(y.dtype, np.integer) or y.shape[0] != n or (n and (y.min() < 0 or y.max() >= c)):
                raise UserError(f"train_labels: need {n} integer labels in [0, {c}) (got {y.dtype} {y.shape})")
        elif y.ndim == 2:
            if y.shape != (n, c) or not np.issubdtype(y.dtype, np.floating):
                raise UserError(f"soft train_labels must be float ({n}, {c}), got {y.dtype} {y.shape}")
            if not np.all(np.isfinite(y)) or y.min() < -1e-6 or np.abs(y.sum(1) - 1).max() > 1e-3:
                raise UserError("soft train_labels: each row must be a probability distribution "
                                "(non-negative, summing to 1); normalise with y / y.sum(1, keepdims=True)")
        else:
            raise UserError(f"train_labels has shape {y.shape}; give (N,) hard or (N, C) soft labels")
        t = np.asarray(self.test_labels)
        if (t.ndim != 1 or t.shape[0] != len(self.test_images) or not np.issubdtype(t.dtype, np.integer)
                or (len(t) and (t.min() < 0 or t.max() >= c))):
            raise UserError(f"test_labels: need {len(self.test_images)} integer labels in [0, {c})")
        if n < 2 or len(t) < 1:
            raise UserError(f"need at least 2 training and 1 test images (got {n} and {len(t)})")
        if self.noise_rate is not None and not 0.0 <= float(self.noise_rate) < 1.0:
            raise UserError(f"noise_rate={self.noise_rate}: give the fraction of wrong labels in [0, 1), or None")

    @property
    def soft(self) -> bool:
        return np.asarray(self.train_labels).ndim == 2

    @property
    def in_chans(self) -> int:
        return int(self.train_images.shape[-1])

    def hard_labels(self) -> np.ndarray:
        """(N,) int64: the labels, or the argmax of the soft labels."""
        y = np.asarray(self.train_labels)
        return (y.argmax(1) if y.ndim == 2 else y).astype(np.int64)

    def label_matrix(self) -> np.ndarray:
        """(N, C) float32: the soft labels, or one-hot rows of the hard labels."""
        y = np.asarray(self.train_labels)
        if y.ndim == 2:
            return y.astype(np.float32)
        return np.eye(self.num_classes, dtype=np.float32)[y]

    def fingerprint(self) -> str:
        """sha256 over shapes, pixels and labels of both splits (checkpoints refuse other data)."""
        h = hashlib.sha256()
        for a in (self.train_images, np.asarray(self.train_labels), self.test_images, np.asarray(self.test_labels)):
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


@dataclass
class RunResult:
    """test_accuracy: LAST epoch's test accuracy in [0, 1] (never the best epoch's). curve: one dict per
    epoch (epoch, test_accuracy, train_loss, lr, method-specific numbers). seconds: training time summed
    over resumed parts. info: JSON-able details (method, config, seed, device, label kind, noise rate...)."""

    test_accuracy: float
    curve: list = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- configs


def config_from_preset(cls, presets: dict, name: str, **overrides):
    """``cls(**presets[name], **overrides)``; unknown preset or field names are a UserError."""
    if name not in presets:
        raise UserError(f"unknown preset {name!r} for {cls.__name__}; choose one of {sorted(presets)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    params = {**presets[name], **overrides}
    bad = sorted(set(params) - fields)
    if bad:
        raise UserError(f"{cls.__name__} has no field(s) {bad}; valid fields: {sorted(fields)}")
    return cls(**params)


def check_common(cfg) -> None:
    """Validate the fields every method config has (called from each config's __post_init__)."""
    for name in ("epochs", "batch_size"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise UserError(f"{type(cfg).__name__}.{name}={v!r}: give a positive integer")
    if cfg.lr <= 0:
        raise UserError(f"{type(cfg).__name__}.lr={cfg.lr}: give a positive learning rate")
    if cfg.image_size is not None and cfg.image_size < 4:
        raise UserError(f"{type(cfg).__name__}.image_size={cfg.image_size}: give None (native) or >= 4")
    if cfg.mixed_precision not in MIXED_PRECISION_MODES:
        raise UserError(f"{type(cfg).__name__}.mixed_precision={cfg.mixed_precision!r}: choose one of "
                        f"{', '.join(MIXED_PRECISION_MODES)}")


# ------------------------------------------------------------------------------------------- accelerator


def make_accelerator(device: str | None = None, mixed_precision: str = "auto", model: tuple | None = None):
    """``Accelerator(cpu=..., mixed_precision=...)``. device: None/"auto" (CUDA when available), "cpu", "cuda"
    (torch's current GPU; under a launch, each process's own) or "cuda:N" (GPU N, made torch's current device,
    which accelerate's single-process state then trains on), checked by
    :func:`dmlp_plugin.hardware.resolve_device` as every stage checks it. mixed_precision ``auto`` is bf16
    where the hardware runs it fast and float32 elsewhere (:mod:`dmlp_plugin.hardware`). model: (backbone,
    in_chans, input size, cifar_stem) of the network to train, checked for the CPU bfloat16 gradient bug
    (:func:`dmlp_plugin.hardware.bf16_hazard_layers`) when bf16 could be picked on the CPU. In a single
    process, a state left by an earlier run with other settings is reset (accelerate keeps one state per
    process)."""
    from accelerate import Accelerator  # noqa: PLC0415 - heavy import, used on demand
    from accelerate.state import AcceleratorState, PartialState  # noqa: PLC0415

    cpu = resolve_device(device) == "cpu"  # cuda:N: GPU N is now torch's current device
    hazard = None
    if cpu and model is not None and (mixed_precision == "bf16" or (mixed_precision == "auto" and cpu_has_fast_bf16())):
        backbone, in_chans, size, cifar_stem = model
        with torch.random.fork_rng(devices=[]):
            hazard = bf16_hazard_layers(make_classifier(backbone, in_chans, 2, cifar_stem), in_chans, size)
    mixed_precision = resolve_mixed_precision(mixed_precision, "cpu" if cpu else "cuda", hazard)
    shared = PartialState._shared_state
    if shared and shared.get("num_processes", 1) == 1:
        state = AcceleratorState._shared_state
        wrong_mp = bool(state) and state.get("_mixed_precision") != mixed_precision
        wrong_dev = shared.get("device") is not None and (shared["device"].type == "cpu") != cpu
        if wrong_dev:
            AcceleratorState._reset_state(reset_partial_state=True)
        elif wrong_mp:
            AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    check_world_size(accelerator.num_processes)  # the plain-Accelerator() trap, see dmlp_plugin.distributed
    return accelerator


# ------------------------------------------------------------------------------------------- randomness


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from ``seed`` and any keys (strings hashed stably), for independent streams."""
    words = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        words.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF)
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU torch.Generator seeded by :func:`derive_seed` (draw on the CPU, move results to the device)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


# --------------------------------------------------------------------------------------------------- data


class IndexedLoader:
    """Mini-batches ``(uint8 images (B, H, W, C), targets (B,) or (B, C), sample index (B,) int64)`` on
    ``device``, from images and targets held in memory.

    indices: the samples to draw from (default all). Each epoch (``set_epoch``) has its own order, seeded by
    ``(seed, stream, epoch)`` and identical in every process; process p of P takes the p-th slice of each
    global batch of ``batch_size * P`` samples. drop_last drops the incomplete last global batch;
    otherwise the order is padded by wrapping around so every process gets equal-sized batches.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int, *, device, seed: int,
                 stream: str, indices: torch.Tensor | np.ndarray | None = None, shuffle: bool = True,
                 drop_last: bool = False, num_processes: int = 1, process_index: int = 0):
        self.images, self.targets = images, targets
        n = images.shape[0]
        self.indices = (torch.arange(n) if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.long))
        self.batch_size, self.device, self.seed, self.stream = int(batch_size), device, seed, stream
        self.shuffle, self.drop_last = shuffle, drop_last
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _global_order(self) -> torch.Tensor:
        idx = self.indices
        if self.shuffle and len(idx) > 1:
            idx = idx[torch.randperm(len(idx), generator=generator(self.seed, self.stream, self.epoch))]
        gb = self.batch_size * self.num_processes
        if self.drop_last and len(idx) >= gb:
            return idx[: len(idx) // gb * gb]
        rem = (-len(idx)) % self.num_processes  # pad to a multiple of the process count
        if rem and len(idx):
            idx = torch.cat([idx, idx.repeat(math.ceil(rem / len(idx)))[:rem]])
        return idx

    def __len__(self) -> int:
        return math.ceil(self._count() / (self.batch_size * self.num_processes))

    def _count(self) -> int:
        n, gb, p = len(self.indices), self.batch_size * self.num_processes, self.num_processes
        if self.drop_last and n >= gb:
            return n // gb * gb
        return n + (-n) % p if n else 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._global_order()
        gb, p = self.batch_size * self.num_processes, self.num_processes
        for start in range(0, len(order), gb):
            chunk = order[start:start + gb]
            per = len(chunk) // p
            idx = chunk[self.process_index * per:(self.process_index + 1) * per]
            yield (self.images[idx].to(self.device, non_blocking=True),
                   self.targets[idx].to(self.device, non_blocking=True), idx.to(self.device))


def make_loader(accelerator, images: torch.Tensor, targets: torch.Tensor, batch_size: int, *, seed: int,
                stream: str, indices=None, shuffle: bool = True, drop_last: bool = False) -> IndexedLoader:
    """An :class:`IndexedLoader` sharded for ``accelerator``'s processes, on its device."""
    return IndexedLoader(images, targets, batch_size, device=accelerator.device, seed=seed, stream=stream,
                         indices=indices, shuffle=shuffle, drop_last=drop_last,
                         num_processes=accelerator.num_processes, process_index=accelerator.process_index)


class _ArrayDataset(torch.utils.data.Dataset):
    """(image, target, index) by index; ``__getitems__`` fetches a whole batch with one indexing op."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.targets[i], i

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.targets[idx], idx


def _keep_batch(batch):
    return batch


def make_eval_loader(accelerator, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 512):
    """A DataLoader in sample order, prepared by ``accelerator`` (so ``gather_for_metrics`` drops the
    padding of the last batch) yielding (uint8 images, targets, sample index) on its device."""
    loader = torch.utils.data.DataLoader(_ArrayDataset(images, targets), batch_size=batch_size, shuffle=False,
                                         collate_fn=_keep_batch)
    return accelerator.prepare_data_loader(loader)


def data_tensors(data: TrainData) -> dict[str, torch.Tensor]:
    """CPU tensors of the training and test split: images uint8, targets (hard (N,) int64 or soft (N, C))."""
    y = np.asarray(data.train_labels)
    targets = torch.from_numpy(y.astype(np.float32) if y.ndim == 2 else y.astype(np.int64))
    return {"train_images": torch.from_numpy(np.ascontiguousarray(data.train_images)), "train_targets": targets,
            "test_images": torch.from_numpy(np.ascontiguousarray(data.test_images)),
            "test_labels": torch.from_numpy(np.asarray(data.test_labels, dtype=np.int64))}


# ------------------------------------------------------------------------------------------ augmentation


def random_crop_flip(x: torch.Tensor, pad: int, hflip: bool, gen: torch.Generator,
                     fill: float = -1.0) -> torch.Tensor:
    """Batched standard augmentation of (B, C, S, S) inputs: pad each side by ``pad`` with ``fill`` (-1 is
    black after :func:`to_input`'s normalisation, like padding the image before normalising), crop back
    to S at a random offset per image, and flip left-right with probability 1/2 when ``hflip`` (not for
    digits or text). Random numbers are drawn from ``gen`` on the CPU."""
    b, _, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), value=fill)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if hflip:
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def batch_inputs(images: torch.Tensor, image_size: int | None, gen: torch.Generator | None = None,
                 pad: int = 0, hflip: bool = False) -> torch.Tensor:
    """uint8 (B, H, W, C) on the device -> normalised float (B, C, S, S), augmented when ``gen`` is given."""
    x = to_input(images, image_size, device=images.device)
    if gen is not None and (pad > 0 or hflip):
        x = random_crop_flip(x, pad, hflip, gen)
    return x


# ------------------------------------------------------------------------------------------------ models


def model_spec(cfg, data: TrainData) -> tuple[str, int, int, bool]:
    """(backbone, in_chans, input size, cifar_stem) of a trainer config on a data set, for
    :func:`make_accelerator`'s precision check."""
    size = cfg.image_size or int(data.train_images.shape[1])
    return cfg.backbone, data.in_chans, size, cfg.cifar_stem


def make_classifier(backbone: str, in_chans: int, num_classes: int, cifar_stem: bool) -> nn.Module:
    """A timm classifier (no pretrained weights), built by :func:`create_backbone`."""
    return create_backbone(backbone, in_chans=in_chans, num_classes=num_classes, cifar_stem=cifar_stem)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against hard labels (B,) int64 or distributions (B, C): -sum_c q_c log softmax(z)_c.
    Logits are cast to float32 (safe under bf16/fp16 autocast)."""
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def make_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_adam(model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              weight_decay: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


def step_lr(base: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """MultiStepLR as a function: base * gamma ** (number of milestones <= epoch); epochs count from 0."""
    return base * gamma ** sum(epoch >= m for m in milestones)


def cosine_restart_lr(base: float, epoch: int, t0: int, eta_min: float) -> float:
    """CosineAnnealingWarmRestarts(T_0=t0, T_mult=1) stepped once per epoch, as a function of the epoch."""
    t = epoch % t0
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * t / t0)) / 2


def set_lr(optimizer, lr: float, betas: tuple[float, float] | None = None) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if betas is not None:
            group["betas"] = betas


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(accelerator, models: nn.Module | Sequence[nn.Module], loader, image_size: int | None) -> torch.Tensor:
    """Sum of the models' logits (eval mode) for every sample of a loader from :func:`make_eval_loader`,
    gathered across processes: float32 (N, C) on the CPU in sample order. Models go back to train mode."""
    models = [models] if isinstance(models, nn.Module) else list(models)
    for m in models:
        m.eval()
    out, seen = None, None
    for images, _, idx in loader:
        x = batch_inputs(images, image_size)
        with accelerator.autocast():
            z = sum(m(x).float() for m in models)
        z, idx = accelerator.gather_for_metrics((z, idx))
        if out is None:
            n = len(loader.dataset)
            out = torch.zeros(n, z.shape[1])
            seen = torch.zeros(n, dtype=torch.bool)
        out[idx.cpu()] = z.float().cpu()
        seen[idx.cpu()] = True
    for m in models:
        m.train()
    assert seen is not None and bool(seen.all()), "every sample must be predicted once"
    return out


def evaluate(accelerator, models: nn.Module | Sequence[nn.Module], loader, labels: torch.Tensor,
             image_size: int | None) -> float:
    """Test accuracy of the argmax of the summed logits (DivideMix's and ELR+'s ensemble rule)."""
    pred = predict(accelerator, models, loader, image_size).argmax(1)
    return float((pred == labels.cpu()).float().mean())


def gather_rows(accelerator, idx: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All processes' (index, row) pairs of one step (equal batch sizes per process), for updating
    per-sample state held in full by every process."""
    if accelerator.num_processes == 1:
        return idx, rows
    return accelerator.gather(idx), accelerator.gather(rows.contiguous())


def mean_across(accelerator, total: float, count: float) -> float:
    """Mean of a per-process sum/count pair over all processes."""
    t = torch.tensor([total, count], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum") if accelerator.num_processes > 1 else t
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


# ------------------------------------------------------------------------------------------ checkpoints


class LoopState:
    """The loop's own state, checkpointed with the models: next epoch, curve, seconds so far, and named
    per-sample tensors (ELR targets, DivideMix loss history...). Registered with
    ``accelerator.register_for_checkpointing``."""

    def __init__(self, **tensors: torch.Tensor):
        self.epoch = 0
        self.curve: list[dict] = []
        self.seconds = 0.0
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self.extra: dict[str, Any] = {}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "curve": json.loads(json.dumps(self.curve)), "seconds": self.seconds,
                "tensors": {k: v.detach().cpu().clone() for k, v in self.tensors.items()},
                "extra": json.loads(json.dumps(self.extra))}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch = int(sd["epoch"])
        self.curve = list(sd["curve"])
        self.seconds = float(sd["seconds"])
        self.extra = dict(sd.get("extra", {}))
        for k, v in sd["tensors"].items():
            if k in self.tensors:
                self.tensors[k] = v.to(self.tensors[k].device, self.tensors[k].dtype)
            else:
                self.tensors[k] = v


def run_meta(method: str, config, seed: int, data: TrainData, accelerator) -> dict:
    """What a checkpoint must match to be resumed."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {"method": method, "config": json.loads(json.dumps(cfg, default=str)), "seed": int(seed),
            "data": data.fingerprint(), "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision}


def try_resume(accelerator, checkpoint_dir: str | os.PathLike | None, meta: dict) -> bool:
    """Load ``checkpoint_dir/state`` into the prepared objects when it exists; True if resumed. A
    checkpoint of another method/config/seed/data is a UserError (use another folder)."""
    if checkpoint_dir is None:
        return False
    root = Path(checkpoint_dir)
    state = root / "state"
    if not state.exists() and (root / "state.old").exists():  # killed between the two renames
        state = root / "state.old"
    if not state.exists():
        return False
    meta_path = root / "meta.json"
    saved = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if saved != meta:
        diff = sorted(k for k in set(meta) | set(saved or {}) if (saved or {}).get(k) != meta.get(k))
        raise UserError(f"checkpoint_dir {str(root)!r} holds a run that differs in {diff}; resume with the same "
                        f"settings or give an empty checkpoint_dir")
    _check_state_folder(state, root)
    accelerator.load_state(str(state))
    return True


def _check_state_folder(state: Path, root: Path) -> None:
    """Read every file of an accelerate state folder safely before accelerate does: safetensors headers, and
    every pickle with ``weights_only=True``. accelerate 1.15 loads the objects given to
    ``register_for_checkpointing`` with ``weights_only=False``, which would run any code a crafted file holds;
    our loop state is plain tensors, numbers and lists, so a file that needs more is refused, as is a truncated
    one."""
    from accelerate.utils.other import load as safe_load  # noqa: PLC0415 - weights_only=True + numpy RNG globals
    from safetensors import safe_open  # noqa: PLC0415

    for f in sorted(p for p in state.iterdir() if p.is_file()):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as z:
                    z.keys()
            elif f.suffix in (".pkl", ".bin", ".pt"):
                safe_load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, foreign or code-carrying: never load it
            raise UserError(f"checkpoint {str(root)!r} is damaged or not ours ({f.name}: {type(e).__name__}); "
                            f"delete that folder to start the run over") from None


def save_checkpoint(accelerator, checkpoint_dir: str | os.PathLike | None, meta: dict) -> None:
    """Write the accelerator state (models, optimisers, RNG, registered objects) for the epoch just done:
    to ``state.new``, then swapped in by renames (a kill leaves either the old or the new state)."""
    if checkpoint_dir is None:
        return
    root = Path(checkpoint_dir)
    new, cur, old = root / "state.new", root / "state", root / "state.old"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if new.exists():
            shutil.rmtree(new)
        write_json(root / "meta.json", meta)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(new))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cur.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(cur, old)
        os.replace(new, cur)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def progress_bar(iterable, accelerator, enabled: bool, desc: str, total: int | None = None):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not (enabled and accelerator.is_local_main_process))


def device_name(device) -> str:
    """``cuda:N`` of a CUDA device (plain ``cuda`` is torch's current GPU: its index is named), else str(device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def base_info(method: str, config, data: TrainData, seed: int, accelerator) -> dict:
    return {"method": method, "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
            "seed": int(seed), "device": device_name(accelerator.device), "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "labels": "soft" if data.soft else "hard",
            "n_train": int(len(data.train_images)), "n_test": int(len(data.test_images)),
            "num_classes": int(data.num_classes), "noise_rate": data.noise_rate,
            "noise_rate_source": data.noise_rate_source, "data_fingerprint": data.fingerprint(),
            "accuracy_reported": "last epoch"}


def label_precision(idx: np.ndarray, labels: np.ndarray, true_labels: np.ndarray | None) -> float | None:
    """Fraction of the given samples whose (hard) label is right; None without true labels (diagnostic)."""
    if true_labels is None or len(idx) == 0:
        return None
    return float(np.mean(labels[idx] == true_labels[idx]))


def check_true_labels(true_labels, data: TrainData) -> np.ndarray | None:
    if true_labels is None:
        return None
    t = np.asarray(true_labels)
    if t.shape != (len(data.train_images),) or not np.issubdtype(t.dtype, np.integer):
        raise UserError(f"true_labels: need {len(data.train_images)} integer labels (diagnostics only)")
    return t.astype(np.int64)

def finish(accelerator, state: LoopState, info: dict) -> RunResult:
    """The RunResult of a finished loop (last epoch's accuracy), releasing the accelerator's references."""
    if not state.curve:
        raise RuntimeError("the loop ran no epoch")
    result = RunResult(test_accuracy=float(state.curve[-1]["test_accuracy"]), curve=list(state.curve),
                       seconds=float(state.seconds), info=info)
    accelerator.free_memory()
    return result
