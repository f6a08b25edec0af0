"""Stage 1: SimCLR self-supervised pre-training of a timm backbone (no labels are used).

SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"): each image gives two random augmentations (``augment.simclr_view``); backbone + a small
projection MLP map them to ``z``; the NT-Xent loss pulls the two views of an image together and pushes the
other 2B-2 views of the batch away. The projection head is thrown away afterwards: the pooled backbone
output is the feature (the paper shows it transfers better than ``z``). Labels never enter, so label noise
cannot hurt the features (the premise of DMLP, Tu et al. CVPR 2023).

Determinism: model initialisation runs under ``torch.random.fork_rng`` with the config's seed (the caller's
global RNG is untouched), and each epoch draws its data order and augmentations from its own
``torch.Generator`` seeded by (seed, epoch). So a run is reproducible on the CPU, and a run resumed from a
checkpoint after epoch e continues exactly as the uninterrupted run (no RNG state has to be carried).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from dmlp_plugin.atomic import atomic_path
from dmlp_plugin.distributed import Dist, current
from dmlp_plugin.errors import UserError
from dmlp_plugin.features.augment import simclr_view
from dmlp_plugin.features.backbone import check_backbone_name, create_backbone
from dmlp_plugin.hardware import bf16_hazard_layers, cpu_has_fast_bf16, launcher_precision_for

CHECKPOINT_FORMAT = 1
_AMP_MODES = ("auto", "bf16", "fp16", "no")
_OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class SimCLRConfig:
    """SimCLR settings (config section ``features.ssl``); every field is part of the feature cache key.

    backbone: any timm model name (``pretrained=False``). image_size: images are resized to this square
    size. cifar_stem: stride-1 first conv and no stem max-pool (the paper's CIFAR ResNet; ~16x the compute
    of the standard stem on 32x32 inputs). epochs, batch_size: B images -> 2B views per step; the last
    incomplete batch of an epoch is dropped (the order is reshuffled every epoch). optimizer: ``adamw`` or
    ``sgd`` (momentum 0.9, nesterov); lr: peak learning rate after ``warmup_epochs`` of linear warm-up,
    then cosine decay to 0; weight_decay applies to weights, not to biases and norm parameters.
    temperature: NT-Xent temperature tau. proj_hidden, proj_dim: the projection MLP
    (Linear-BN-ReLU-Linear). crop_scale_min: the smallest crop area fraction; hflip: random horizontal
    flips (turn off for digits or text); jitter: brightness/contrast/saturation strength, applied with
    probability 0.8; gray_p: random-grayscale probability (3-channel images only). amp: ``auto``
    (bfloat16 autocast on CUDA when the GPU supports it, and on a CPU with native bfloat16, ~2.5x
    faster there, unless the model hits a CPU bfloat16 bug, see ``dmlp_plugin.hardware.bf16_hazard_layers``; float32 on other CPUs,
    where bf16 is ~25x slower: see ``dmlp_plugin.hardware``), ``bf16`` (always), ``fp16`` (float16 autocast
    with a gradient scaler; GPU only) or ``no`` (float32). Under ``accelerate launch --mixed_precision X``
    (flag or accelerate config) ``auto`` means X and another explicit value is refused
    (``dmlp_plugin.hardware.launcher_precision_for``).
    seed: initialisation, data order and augmentations.
    """

    backbone: str = "resnet10t"
    image_size: int = 32
    cifar_stem: bool = False
    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    temperature: float = 0.5
    proj_hidden: int = 512
    proj_dim: int = 128
    crop_scale_min: float = 0.2
    hflip: bool = True
    jitter: float = 0.4
    gray_p: float = 0.2
    amp: str = "auto"
    seed: int = 0

    def __post_init__(self):
        def bad(key: str, why: str):
            raise UserError(f"features.ssl.{key}={getattr(self, key)!r} {why}")

        for key in ("image_size", "epochs", "batch_size", "proj_hidden", "proj_dim"):
            if getattr(self, key) < 1:
                bad(key, "must be a positive integer")
        if self.image_size < 8:
            bad("image_size", "is too small for a CNN; use 32 or more")
        if self.batch_size < 2:
            bad("batch_size", "must be at least 2 (NT-Xent needs other images as negatives)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be a positive number, e.g. 2e-3")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad("weight_decay", "must be >= 0")
        if self.warmup_epochs < 0:
            bad("warmup_epochs", "must be >= 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            bad("temperature", "must be a positive number, e.g. 0.5")
        if not 0 < self.crop_scale_min <= 1:
            bad("crop_scale_min", "must be in (0, 1], e.g. 0.2")
        if not 0 <= self.jitter < 1:
            bad("jitter", "must be in [0, 1), e.g. 0.4 (0 turns colour jitter off)")
        if not 0 <= self.gray_p <= 1:
            bad("gray_p", "must be a probability in [0, 1]")
        if self.amp not in _AMP_MODES:
            bad("amp", f"is not known; use one of {', '.join(_AMP_MODES)}")
        if self.optimizer not in _OPTIMIZERS:
            bad("optimizer", f"is not known; use one of {', '.join(_OPTIMIZERS)}")
        if self.seed < 0:
            bad("seed", "must be >= 0")
        try:
            check_backbone_name(self.backbone)
        except UserError as e:
            raise UserError(f"features.ssl.backbone: {e}") from None

    def to_json(self) -> str:
        """The settings as sorted JSON (the identity used by cache keys and checkpoints)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# loss


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy; SimCLR eq. 1), averaged over all 2B anchors.

    z1, z2: (B, D) projections of the two views (row i of z1 and row i of z2 come from the same image);
    they are L2-normalised here. For anchor i the positive is its other view and the 2B-2 views of other
    images are negatives: loss_i = -log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t)), s = cosine similarity.
    Computed in float32 (also under autocast). Pure: no state, symmetric in (z1, z2). Returns a scalar.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"expected two (B, D) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = (z @ z.T) / temperature
    # An anchor is never its own negative: mask the diagonal out of the softmax.
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(b, device=z.device)
    targets = torch.cat([idx + b, idx])
    return F.cross_entropy(sim, targets)


# ---------------------------------------------------------------------------------------------------------
# model and training


class _SimCLRNet(nn.Module):
    def __init__(self, backbone: nn.Module, feat_dim: int, hidden: int, out: int):
        super().__init__()
        self.backbone = backbone
        # SimCLR v2's head: the BN makes the projection insensitive to the backbone's feature scale.
        self.head = nn.Sequential(nn.Linear(feat_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _build(cfg: SimCLRConfig, in_chans: int) -> tuple[_SimCLRNet, bool]:
    """The network (backbone + projection head) and whether it has a bf16 hazard (see ``dmlp_plugin.hardware.bf16_hazard_layers``)."""
    # Initialise under a forked RNG: reproducible from cfg.seed without re-seeding the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = create_backbone(cfg.backbone, in_chans=in_chans, num_classes=0, cifar_stem=cfg.cifar_stem)
        hazard = bf16_hazard_layers(backbone, in_chans, cfg.image_size)
        backbone.eval()
        with torch.no_grad():  # the pooled output size (timm's num_features is not it for every model)
            feat_dim = int(backbone(torch.zeros(2, in_chans, cfg.image_size, cfg.image_size)).shape[1])
        net = _SimCLRNet(backbone, feat_dim, cfg.proj_hidden, cfg.proj_dim)
    return net, bool(hazard)


def with_launcher_amp(cfg: SimCLRConfig) -> SimCLRConfig:
    """``cfg`` with ``amp`` set as the launcher asks (``accelerate launch --mixed_precision``): ``auto`` takes the
    launcher's explicit precision, an explicit ``amp`` that differs from it is a one-line error; unchanged
    without a launcher request. The features' cache key is made from the result."""
    amp = launcher_precision_for(cfg.amp, "features.ssl.amp")
    return cfg if amp == cfg.amp else dataclasses.replace(cfg, amp=amp)


def _amp_enabled(cfg: SimCLRConfig, device: torch.device, hazard: bool = False) -> bool:
    """Whether SimCLR trains under autocast (:func:`_amp_dtype` is not float32)."""
    return _amp_dtype(cfg, device, hazard) is not None


def _amp_dtype(cfg: SimCLRConfig, device: torch.device, hazard: bool = False) -> torch.dtype | None:
    """The autocast dtype of ``cfg.amp`` on ``device`` (None: float32)."""
    if cfg.amp == "no":
        return None
    if cfg.amp == "fp16":
        if device.type != "cuda":
            raise UserError(f"features.ssl.amp=fp16 needs a GPU (the device is {device.type}); use auto, bf16 or "
                            f"no on the CPU (and no launcher --mixed_precision fp16)")
        return torch.float16
    if device.type == "cpu":
        if hazard and cfg.amp == "bf16":
            warnings.warn(f"features.ssl.amp=bf16: {cfg.backbone} at image_size {cfg.image_size} has a strided "
                          f"convolution on a 1-pixel input, whose CPU bfloat16 gradient is wrong in this torch "
                          f"build; use amp=auto (float32 here) or a larger image_size", RuntimeWarning, stacklevel=3)
        return torch.bfloat16 if cfg.amp == "bf16" or (not hazard and cpu_has_fast_bf16()) else None
    return torch.bfloat16 if cfg.amp == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()) else None


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _make_optimizer(cfg: SimCLRConfig, net: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-d tensors): decaying BN scales only hurts.
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _data_hash(images: np.ndarray) -> str:
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()[:16]


def _load_checkpoint(path: str, identity: dict, device: torch.device) -> dict | None:
    """The checkpoint's contents, or None (with a warning) when it is unreadable or from another run."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: start over, never crash
        warnings.warn(f"SimCLR checkpoint {path} is unreadable ({type(e).__name__}: {e}); starting over",
                      RuntimeWarning, stacklevel=3)
        return None
    if not isinstance(state, dict) or state.get("identity") != identity:
        warnings.warn(f"SimCLR checkpoint {path} belongs to other settings or data; starting over",
                      RuntimeWarning, stacklevel=3)
        return None
    return state


def train_simclr(images: np.ndarray, cfg: SimCLRConfig, device: str | torch.device = "cpu",
                 progress: bool = True, checkpoint: str | os.PathLike | None = None,
                 on_epoch_end: Callable[[int, float], None] | None = None, dist: Dist | None = None,
                 on_step: Callable[[], None] | None = None) -> nn.Module:
    """Train a backbone with SimCLR on ``images`` (uint8 (N, H, W, C), C in {1, 3}; no labels).

    Returns the backbone (projection head dropped) in eval mode on ``device``; its attribute
    ``simclr_losses`` holds the mean loss of every epoch, ``simclr_seconds`` the training time (a resumed run
    adds the time of the runs before it). ``progress`` shows a tqdm bar with the running
    loss. ``checkpoint``: a path; after every epoch model, optimiser and epoch are saved there atomically,
    and a later call with the same path, settings and images resumes after the last saved epoch (a file
    from other settings or an unreadable one is ignored with a warning). ``on_epoch_end(epoch, loss)`` is
    called after each epoch (0-based) once its checkpoint is written, ``on_step()`` after every step.
    ``cfg.amp`` is taken as the launcher asks (:func:`with_launcher_amp`).

    Under several processes (``dist``; default: those of the launcher) training is data-parallel: every
    process draws the same batch order and augmentations, embeds its contiguous 1/P of each batch, the
    embeddings are all-gathered so NT-Xent sees the whole batch (all negatives), and the gradients are
    averaged by DDP (accelerate's ``prepare``). BatchNorm statistics are per process. The batch size is
    rounded down to a multiple of P. Process 0 writes the checkpoint; every process resumes from it. (Its
    features then depend on P; ``dmlp_plugin.features.cache.get_features`` trains in one process instead, so that
    every process count gives the same features.)
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise UserError(f"SimCLR needs uint8 images shaped (N, H, W, C) with C 1 or 3, got "
                        f"{images.dtype} {images.shape}")
    n = int(images.shape[0])
    if n < 2:
        raise UserError(f"SimCLR needs at least 2 images, got {n}")
    device = torch.device(device)
    cfg = with_launcher_amp(cfg)
    dist = current(device.type) if dist is None else dist
    bs = min(cfg.batch_size, n)
    bs -= bs % dist.world_size
    if bs < dist.world_size:
        raise UserError(f"SimCLR batch of {min(cfg.batch_size, n)} images cannot be split over "
                        f"{dist.world_size} processes; use fewer processes or a larger features.ssl.batch_size")
    steps = n // bs
    total_steps = steps * cfg.epochs
    warmup_steps = min(steps * cfg.warmup_epochs, total_steps // 2)

    net, hazard = _build(cfg, int(images.shape[-1]))
    net = net.to(device)
    opt = _make_optimizer(cfg, net)
    plain = net  # the module whose weights are saved and returned (DDP wraps it under several processes)
    losses: list[float] = []
    start = 0
    identity = None
    saved_scaler = None  # the fp16 gradient scaler's state in a checkpoint resumed from
    t0, spent = time.perf_counter(), 0.0  # spent: training seconds of the runs a resume continues
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        identity = {"format": CHECKPOINT_FORMAT, "config": cfg.to_json(), "data": _data_hash(images)}
        dist.barrier()  # process 0 may have just written it
        state = _load_checkpoint(checkpoint, identity, device) if os.path.exists(checkpoint) else None
        if state is not None:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["epoch"])
            losses = [float(v) for v in state["losses"]]
            spent = float(state.get("seconds", 0.0))
            saved_scaler = state.get("scaler")
            if dist.is_main:
                print(f"resuming SimCLR after epoch {start} of {cfg.epochs} from {checkpoint}", file=sys.stderr)

    # uint8 (N, C, H, W) on the device; each batch is converted to float only when used (CIFAR-size
    # data stays 4x smaller than a float copy).
    data = torch.as_tensor(images).permute(0, 3, 1, 2).contiguous().to(device)
    amp_dtype = _amp_dtype(cfg, device, hazard)
    # fp16 needs its gradients scaled (bf16 and float32 do not: then the scaler passes everything through)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if saved_scaler and scaler.is_enabled():
        scaler.load_state_dict(saved_scaler)
    if dist.world_size > 1:
        from accelerate import Accelerator  # noqa: PLC0415 - only under a launcher

        from dmlp_plugin.distributed import check_world_size  # noqa: PLC0415

        accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")  # autocast is ours, below
        check_world_size(accelerator.num_processes)
        net, opt = accelerator.prepare(net, opt)
    lo, hi = dist.block(bs)
    aug = dict(size=cfg.image_size, crop_scale_min=cfg.crop_scale_min, hflip=cfg.hflip, jitter=cfg.jitter,
               jitter_p=0.8 if cfg.jitter > 0 else 0.0, gray_p=cfg.gray_p)

    bar = tqdm(total=total_steps, initial=start * steps, desc="simclr", unit="batch",
               disable=not (progress and dist.is_main), leave=False, dynamic_ncols=True)
    net.train()
    try:
        for epoch in range(start, cfg.epochs):
            gen = _epoch_generator(cfg.seed, epoch)
            order = torch.randperm(n, generator=gen).to(device)
            bar.set_description(f"simclr epoch {epoch + 1}/{cfg.epochs}")
            total = 0.0
            for s in range(steps):
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(epoch * steps + s, warmup_steps, total_steps)
                x = data[order[s * bs:(s + 1) * bs]].float().div_(255.0)
                v1 = simclr_view(x, gen, **aug)
                v2 = simclr_view(x, gen, **aug)
                if dist.world_size > 1:  # the same augmented batch everywhere; each process embeds its part
                    v1, v2 = v1[lo:hi], v2[lo:hi]
                views = torch.cat([v1, v2]).sub_(0.5).div_(0.5)  # the normalisation of backbone.to_input
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.bfloat16,
                                    enabled=amp_dtype is not None):
                    z = net(views)
                z1, z2 = z.float().chunk(2)
                if dist.world_size > 1:
                    z1, z2 = _gather_keep_grad(z1, dist), _gather_keep_grad(z2, dist)
                loss = nt_xent(z1, z2, cfg.temperature)
                opt.zero_grad(set_to_none=True)
                # DDP averages the P processes' gradients; each holds the gradient through its own rows only,
                # so scaling by P makes the average the gradient of the whole-batch loss
                scaler.scale(loss * dist.world_size).backward()
                scaler.step(opt)
                scaler.update()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise UserError(f"SimCLR loss became {value} in epoch {epoch + 1}; lower features.ssl.lr "
                                    f"(now {cfg.lr}) or set features.ssl.amp=no")
                total += value
                bar.update(1)
                bar.set_postfix(loss=f"{total / (s + 1):.4f}")
                if on_step is not None:
                    on_step()
            losses.append(total / steps)
            if checkpoint is not None and dist.is_main:
                state = {"identity": identity, "epoch": epoch + 1, "losses": list(losses),
                         "seconds": spent + time.perf_counter() - t0,
                         "model": plain.state_dict(), "optimizer": opt.state_dict(),
                         **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {})}
                with atomic_path(checkpoint) as tmp:  # temp file + os.replace: a kill leaves the old one
                    torch.save(state, tmp)
            if on_epoch_end is not None:
                on_epoch_end(epoch, losses[-1])
    finally:
        bar.close()

    backbone = plain.backbone.eval()
    backbone.simclr_losses = losses
    backbone.simclr_seconds = spent + time.perf_counter() - t0  # over every run, when resumed
    return backbone


def _gather_keep_grad(z: torch.Tensor, dist: Dist) -> torch.Tensor:
    """All processes' rows of z in process order (equal row counts), differentiable through this process's
    own rows only (the others are constants here; their processes hold their gradients)."""
    parts = [torch.empty_like(z) for _ in range(dist.world_size)]
    torch.distributed.all_gather(parts, z.detach().contiguous())
    parts[dist.rank] = z
    return torch.cat(parts)
