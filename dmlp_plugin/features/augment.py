"""Batched, tensor-level SimCLR augmentations (Chen et al. 2020, "A Simple Framework for Contrastive
Learning of Visual Representations", section 3 and appendix A).

Every op works on a whole batch ``x`` float (N, C, H, W) with values in [0, 1] on any device; there is no
per-image PIL loop (on a 2-core CPU a Python loop over images costs more than the network). All random
draws come from an explicit CPU ``torch.Generator`` (a handful of numbers per image), then move to the
data's device: the same seed gives the same augmentations on the CPU and on CUDA, and the global RNG is
never touched.

Ops (SimCLR's CIFAR recipe, without Gaussian blur, which the paper drops for 32x32 images):

- random resized crop (area fraction in ``[crop_scale_min, 1]``, aspect ratio in [3/4, 4/3]) and an
  optional horizontal flip, both as one affine map applied by ``affine_grid``/``grid_sample``;
- colour jitter with probability ``jitter_p``: brightness and contrast (any channel count) and saturation
  (3-channel only), in a random order per batch;
- random grayscale with probability ``gray_p`` (3-channel only; a 1-channel image is already gray).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as torchvision's rgb_to_grayscale


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float32) * (hi - lo) + lo


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 1, H, W) luminance (the mean of C channels unless C == 3)."""
    if x.shape[1] == 3:
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, size: int | None = None,
                        scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        hflip: bool = True) -> torch.Tensor:
    """Crop a random box of each image (area fraction uniform in ``scale``, log-uniform aspect ``ratio``)
    and resize it to ``size`` x ``size`` (default: the input size) bilinearly; with ``hflip`` each crop is
    mirrored left-right with probability 1/2.

    x: float (N, C, H, W). Returns float (N, C, size, size) on x's device.
    """
    n, c, h, w = x.shape
    size = int(size or h)
    area = _uniform(n, scale[0], scale[1], gen)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen)
    aspect = torch.exp(log_r)
    # Box sides as fractions of the image sides; clamp rather than resample (torchvision retries 10 times
    # and then falls back to a centre crop): with area <= 1 and aspect in [3/4, 4/3] a side exceeds 1 only
    # slightly, and clamping keeps one random draw per image (vectorised, reproducible).
    bw = torch.sqrt(area * aspect).clamp(max=1.0)
    bh = torch.sqrt(area / aspect).clamp(max=1.0)
    # Box centres in grid_sample's [-1, 1] coordinates: the box stays inside the image.
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - bw)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - bh)
    flip = torch.rand(n, generator=gen) < 0.5  # drawn even without hflip: later draws do not shift
    sx = torch.where(flip, -bw, bw) if hflip else bw  # a negative x-scale mirrors the sampled box
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = bh
    theta[:, 1, 2] = cy
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, gen: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, p: float = 0.8) -> torch.Tensor:
    """With probability ``p`` per image, scale brightness, contrast and (3 channels only) saturation by
    factors uniform in [1 - s, 1 + s], in a random order (one order per batch). Hue is not jittered:
    SimCLR's hue shift needs an HSV round trip and adds little on small images.

    x: float (N, C, H, W) in [0, 1]. Returns the same shape, clamped to [0, 1].
    """
    n = x.shape[0]
    apply = torch.rand(n, generator=gen) < p
    factors = {name: _uniform(n, max(0.0, 1 - s), 1 + s, gen).to(device=x.device, dtype=x.dtype).view(n, 1, 1, 1)
               for name, s in (("b", brightness), ("c", contrast), ("s", saturation))}
    order = torch.randperm(3, generator=gen).tolist()
    out = x
    for i in order:
        if i == 0:
            out = out * factors["b"]
        elif i == 1:
            mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * factors["c"] + mean
        elif out.shape[1] == 3:
            g = _gray(out)
            out = (out - g) * factors["s"] + g
        out = out.clamp(0.0, 1.0)
    # Images not picked keep their exact values (not a rounding-perturbed copy).
    return torch.where(apply.to(x.device).view(n, 1, 1, 1), out, x)


def random_grayscale(x: torch.Tensor, gen: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Replace each 3-channel image by its luminance (kept 3-channel) with probability ``p``; a no-op for
    other channel counts (the generator is still advanced, so the draws that follow do not shift)."""
    n = x.shape[0]
    pick = (torch.rand(n, generator=gen) < p).to(x.device).view(n, 1, 1, 1)
    if x.shape[1] != 3:
        return x
    return torch.where(pick, _gray(x).expand_as(x), x)


def simclr_view(x: torch.Tensor, gen: torch.Generator, size: int | None = None,
                crop_scale_min: float = 0.2, hflip: bool = True, jitter: float = 0.4,
                jitter_p: float = 0.8, gray_p: float = 0.2) -> torch.Tensor:
    """One SimCLR view of a batch: crop+flip, colour jitter, grayscale.

    x: float (N, C, H, W) in [0, 1], on any device. gen: a CPU ``torch.Generator`` (its state advances).
    Returns float (N, C, size, size) in [0, 1] on x's device. ``jitter=0`` or ``jitter_p=0`` turns colour
    jitter off; ``hflip=False`` keeps the orientation (digits and text are not mirror-symmetric).
    """
    if x.dim() != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    out = random_resized_crop(x, gen, size=size, scale=(crop_scale_min, 1.0), hflip=hflip)
    out = color_jitter(out, gen, brightness=jitter, contrast=jitter, saturation=jitter, p=jitter_p)
    return random_grayscale(out, gen, p=gray_p)
