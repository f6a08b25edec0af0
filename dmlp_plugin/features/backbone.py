"""timm backbones for small images (timm is the backbone registry; nothing is re-registered here).

``create_backbone`` builds any timm model by name with ``pretrained=False`` (no weight downloads) and, for
32x32 inputs, optionally a CIFAR-style stem: the first strided convolution gets stride 1 and a stem max-pool
is removed, so a 32x32 image is not reduced to 8x8 before the first stage (the paper's ResNet-18 setting;
~16x more compute on a CPU). ``to_input`` turns uint8 images (N, H, W, C) into normalised float tensors.
"""

from __future__ import annotations

import difflib

import numpy as np
import torch
from torch import nn

from dmlp_plugin.errors import UserError


def check_backbone_name(name: str) -> None:
    """UserError naming close matches when ``name`` is not a timm model."""
    import timm  # noqa: PLC0415 - heavy import, used on demand

    if not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise UserError(f"backbone {name!r} is not a timm model{hint}; list them with "
                        f"`python -c \"import timm; print(timm.list_models('resnet*'))\"`")


def _make_cifar_stem(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            module.stride = (1, 1)
            break
    if isinstance(getattr(model, "maxpool", None), nn.Module):
        model.maxpool = nn.Identity()


def create_backbone(name: str, in_chans: int = 3, num_classes: int = 0, cifar_stem: bool = False) -> nn.Module:
    """A timm model with ``pretrained=False``. ``num_classes=0`` gives a feature extractor whose output is
    the pooled ``num_features``-dim vector; ``num_classes=C`` gives a classifier."""
    import timm  # noqa: PLC0415

    check_backbone_name(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    if cifar_stem:
        _make_cifar_stem(model)
    return model


def to_input(images: np.ndarray | torch.Tensor, image_size: int | None = None,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, S, S) in roughly [-1, 1] (mean 0.5, std 0.5 per channel),
    bilinearly resized to ``image_size`` when given and different."""
    x = torch.as_tensor(images).to(device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.sub_(0.5).div_(0.5)
