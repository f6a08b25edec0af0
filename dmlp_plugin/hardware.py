"""Which device and which precision to run on: decisions every stage makes the same way.

bfloat16 autocast is only worth it where the hardware computes in bfloat16. Measured with torch 2.14.1 on
two 2-core CPUs: on one with native bfloat16 (AVX-512 BF16 / AMX) bf16 autocast trained ~2.5x faster than
float32; on an AMD EPYC with AVX2 only (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` False) it ran
~25x SLOWER (resnet10t at 32x32: 270 img/s float32, 9 img/s bf16). So ``auto`` picks bf16 on a CPU only
when oneDNN reports bf16 support, and on CUDA when the GPU supports it.

On a CPU with native bfloat16 (Intel Xeon, torch 2.14.1, oneDNN) bf16 training of test_resnet, resnet10t
or resnet18 on 8x8 or 16x16 images gave NaN losses from the second step on: the weight gradient of a
strided convolution whose input is one pixel wide comes back as uninitialised memory. ``auto`` trains such
a model in float32 on the CPU (:func:`bf16_hazard_layers`); an explicit ``bf16`` for it is refused.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from dmlp_plugin.errors import UserError

MIXED_PRECISION_MODES = ("auto", "no", "bf16", "fp16")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (oneDNN's own test; False when it cannot tell)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str | None) -> str:
    """``auto``/None -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``/``cuda``/``cuda:N`` checked."""
    device = "auto" if device is None else str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but no CUDA device is available; use device: auto or cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"device {device!r} is not known; use auto, cpu or cuda[:N]")
    return device


def bf16_hazard_layers(model: nn.Module, in_chans: int, image_size: int) -> list[str]:
    """Names of the convolutions whose CPU bfloat16 weight gradient is wrong (see the module docstring):
    strided (stride > 1), not depthwise, kernel > 1, on an input 1 pixel wide or high. Found by one float32
    forward pass of a (2, in_chans, image_size, image_size) zero batch; the model is left unchanged."""
    found: list[str] = []

    def hook_for(name):
        def hook(module, inputs, output):
            h, w = inputs[0].shape[-2:]
            kh, kw = module.kernel_size
            sh, sw = module.stride
            depthwise = module.groups == module.in_channels and module.groups > 1
            if not depthwise and ((h == 1 and sh > 1 and kh > 1) or (w == 1 and sw > 1 and kw > 1)):
                found.append(name)
        return hook

    hooks = [m.register_forward_hook(hook_for(name)) for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, in_chans, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


def resolve_mixed_precision(mode: str, device_type: str, cpu_hazard: list[str] | None = None) -> str:
    """``auto`` -> ``bf16`` where the hardware runs it fast (see module docstring), else ``no``; fp16 is
    refused on the CPU (autocast has no CPU fp16 path worth using). ``cpu_hazard``: the model's layers from
    :func:`bf16_hazard_layers`; when non-empty, ``auto`` is float32 on the CPU and ``bf16`` is refused.
    Other modes are returned as given."""
    if mode not in MIXED_PRECISION_MODES:
        raise UserError(f"mixed_precision={mode!r} is not known; use one of {', '.join(MIXED_PRECISION_MODES)}")
    if mode == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() and not cpu_hazard else "no"
    if mode == "fp16" and device_type == "cpu":
        raise UserError("mixed_precision=fp16 needs a GPU; use auto, bf16 or no on the CPU")
    if mode == "bf16" and device_type == "cpu" and cpu_hazard:
        raise UserError(f"mixed_precision=bf16 on the CPU: layer {cpu_hazard[0]!r} is a strided convolution on a "
                        f"1-pixel input, whose bfloat16 gradient this torch build gets wrong (NaN losses); use "
                        f"mixed_precision: auto or no, or a larger image_size")
    return mode
