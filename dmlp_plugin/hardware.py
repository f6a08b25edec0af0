"""Which device and which precision to run on: decisions every stage makes the same way.

bfloat16 autocast is only worth it where the hardware computes in bfloat16. Measured with torch 2.14.1 on
two 2-core CPUs: on one with native bfloat16 (AVX-512 BF16 / AMX) bf16 autocast trained ~2.5x faster than
float32; on an AMD EPYC with AVX2 only (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` False) it ran
~25x SLOWER (resnet10t at 32x32: 270 img/s float32, 9 img/s bf16). So ``auto`` picks bf16 on a CPU only
when oneDNN reports bf16 support, and on CUDA when the GPU supports it.
"""

from __future__ import annotations

from functools import lru_cache

import torch

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


def resolve_mixed_precision(mode: str, device_type: str) -> str:
    """``auto`` -> ``bf16`` where the hardware runs it fast (see module docstring), else ``no``; fp16 is
    refused on the CPU (autocast has no CPU fp16 path worth using). Other modes are returned as given."""
    if mode not in MIXED_PRECISION_MODES:
        raise UserError(f"mixed_precision={mode!r} is not known; use one of {', '.join(MIXED_PRECISION_MODES)}")
    if mode == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "no"
    if mode == "fp16" and device_type == "cpu":
        raise UserError("mixed_precision=fp16 needs a GPU; use auto, bf16 or no on the CPU")
    return mode
