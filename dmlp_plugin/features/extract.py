"""Frozen features of a trained backbone: pooled output, L2-normalised rows (what DMLP's stage 2 reads)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dmlp_plugin.features.backbone import to_input


def extract_features(model: nn.Module, images: np.ndarray, image_size: int | None,
                     device: str | torch.device = "cpu", flip: bool = False, batch_size: int = 512) -> np.ndarray:
    """Features of ``images`` (uint8 (N, H, W, C)) from ``model`` (a timm backbone with ``num_classes=0``).

    Images are resized to ``image_size`` and normalised as in training (``backbone.to_input``); with
    ``flip`` they are mirrored left-right first (a second view for DMLP). Runs in eval mode (BN running
    statistics) without gradients, in float32 (one pass: precision over speed), batch by batch so memory
    stays bounded; the model's train/eval mode is restored afterwards.

    Returns float32 (N, d), each row L2-normalised.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = to_input(images[i:i + batch_size], image_size, device)
                if flip:
                    x = torch.flip(x, dims=[3])
                f = model(x).float().flatten(1)
                out.append(F.normalize(f, dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        with torch.inference_mode():  # empty input: still report the feature width
            d = model.eval()(to_input(np.zeros((1, *np.shape(images)[1:]), np.uint8), image_size, device)).shape[1]
        model.train(was_training)
        return np.zeros((0, int(d)), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
