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

import math
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from dmlp_plugin.config import check_threads
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
    """The one device vocabulary of every stage (configs' ``device``, ``purify_labels(device=)``, the trainers):
    ``auto``/None -> ``cuda`` when a GPU is visible, else ``cpu``; ``cpu``; ``cuda`` (torch's current GPU);
    ``cuda:N`` (GPU N of those torch sees, after CUDA_VISIBLE_DEVICES). ``cuda:N`` also makes GPU N torch's
    current device (``torch.cuda.set_device``), so what runs on plain ``cuda`` (accelerate's single-process
    state, the bench's trainers, a faiss GPU index on the current device) runs on GPU N too. Under a launch of
    several processes each process takes its own GPU (cuda:LOCAL_RANK), so ``cuda:N`` is refused there.
    Anything else, or a GPU that is not there: a one-line UserError."""
    device = "auto" if device is None else str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    index = device[5:] if device.startswith("cuda:") else None
    if device != "cuda" and not (index and index.isascii() and index.isdigit()):
        raise UserError(f"device {device!r} is not known; use auto, cpu, cuda or cuda:N (N the index of a GPU, "
                        f"e.g. cuda:0)")
    if not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but no CUDA device is available; use device: auto or cpu")
    if index is None:
        return device
    gpu, count = int(index), torch.cuda.device_count()
    if gpu >= count:
        raise UserError(f"device {device!r} names GPU {gpu} but torch sees {count} CUDA device"
                        f"{'s' if count != 1 else ''} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}); "
                        f"use one of those, cuda or auto")
    world = os.environ.get("WORLD_SIZE", "").strip()
    procs = max(launch_processes(), int(world) if world.isdigit() else 1)  # this machine's, or the whole launch's
    if procs > 1:
        raise UserError(f"device {device!r} names one GPU but this is a launch of {procs} processes, each on its own "
                        f"GPU (cuda:LOCAL_RANK); use device: cuda or auto")
    torch.cuda.set_device(gpu)
    return f"cuda:{gpu}"


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


LAUNCHER_PRECISIONS = ("no", "bf16", "fp16")  # of accelerate's (no, fp8, fp16, bf16), those dmlp runs


def launcher_mixed_precision(env=None, request: dict | None = None) -> tuple[str, str] | None:
    """The mixed precision the launcher was explicitly asked for, as (mode, where it was said), or None.

    ``accelerate launch`` exports ``ACCELERATE_MIXED_PRECISION`` always, ``no`` when neither ``--mixed_precision``
    nor its config says anything (with a warning that it defaulted); that default is not a request, so the
    launch's own command line decides (:func:`dmlp_plugin.distributed.parent_launch`). Without an accelerate
    parent (torchrun, a plain run) a ``ACCELERATE_MIXED_PRECISION`` in the environment is the user's request.
    ``request``: a :func:`dmlp_plugin.distributed.launch_request` (default: this process's launch)."""
    from dmlp_plugin.distributed import parent_launch  # noqa: PLC0415

    env = os.environ if env is None else env
    request = parent_launch() if request is None else request
    value = str(env.get("ACCELERATE_MIXED_PRECISION", "")).strip().lower()
    if request:
        if request.get("mixed_precision") is None:
            return None
        return value or request["mixed_precision"], request["mixed_precision_from"]
    return (value, f"ACCELERATE_MIXED_PRECISION={value}") if value else None


def launcher_precision_for(mode: str, what: str, env=None, request: dict | None = None) -> str:
    """A config's precision setting ``what`` (value ``mode``) with the launcher's explicit mixed precision
    (:func:`launcher_mixed_precision`): ``auto`` takes the launcher's; an explicit value that differs from it
    is refused in one line naming both; without a launcher request ``mode`` is returned as given."""
    launched = launcher_mixed_precision(env, request)
    if launched is None:
        return mode
    value, where = launched
    if value not in LAUNCHER_PRECISIONS:
        raise UserError(f"the launcher asks for mixed precision {value!r} ({where}); dmlp runs "
                        f"{', '.join(LAUNCHER_PRECISIONS)}: launch with --mixed_precision bf16, fp16 or no")
    if mode in ("auto", value):
        return value
    raise UserError(f"{what}={mode} clashes with the launcher's mixed precision {value} ({where}); make them "
                    f"agree: set {what} to auto (it then takes the launcher's) or {value}, or launch with "
                    f"--mixed_precision {mode}")


def resolve_mixed_precision(mode: str, device_type: str, cpu_hazard: list[str] | None = None,
                            what: str = "mixed_precision") -> str:
    """``auto`` -> the launcher's explicit mixed precision when it gave one (:func:`launcher_precision_for`;
    an explicit ``mode`` that clashes with it is refused), else ``bf16`` where the hardware runs it fast (see
    module docstring), else ``no``; fp16 is refused on the CPU (autocast has no CPU fp16 path worth using).
    ``cpu_hazard``: the model's layers from :func:`bf16_hazard_layers`; when non-empty, ``auto`` is float32 on
    the CPU and ``bf16`` is refused. Other modes are returned as given. ``what``: the setting's name in
    messages."""
    if mode not in MIXED_PRECISION_MODES:
        raise UserError(f"{what}={mode!r} is not known; use one of {', '.join(MIXED_PRECISION_MODES)}")
    given = mode
    mode = launcher_precision_for(mode, what)
    if mode == "auto":
        if device_type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() and not cpu_hazard else "no"
    said = f"{what}={mode}" if mode == given else f"the launcher's mixed precision {mode} ({what}={given})"
    if mode == "fp16" and device_type == "cpu":
        raise UserError(f"{said} needs a GPU; use auto, bf16 or no on the CPU")
    if mode == "bf16" and device_type == "cpu" and cpu_hazard:
        raise UserError(f"{said} on the CPU: layer {cpu_hazard[0]!r} is a strided convolution on a "
                        f"1-pixel input, whose bfloat16 gradient this torch build gets wrong (NaN losses); use "
                        f"{what}: auto or no (and no launcher --mixed_precision bf16), or a larger image_size")
    return mode


# ---------------------------------------------------------------------------------------------------------
# CPU threads
#
# torch's default intra-op thread count is the machine's cores, whatever share of them this process may use:
# in a container with a 2-CPU quota on a 64-core host it starts 64 OpenMP threads, and under a launch of P
# processes each one starts as many, P times too many. Oversubscribed OpenMP threads wait on each other at
# every parallel region, and a small model's step becomes many times slower. ``threads: auto`` takes the CPUs
# this process may use (affinity, cgroup quota) divided by the processes of the launch on this machine.
# It cannot see other users' load (the load average is host-wide in a container, and a thread count that
# followed it would change the features, hence the labels, from one run to the next); a run on a machine
# that is already busy gets a warning and the advice to pass --threads 1.

_APPLIED: dict | None = None  # what apply_threads chose last (recorded in metrics.json and bench results)


def _v2_limit(folder: Path) -> float | None:
    quota, period = (folder / "cpu.max").read_text().split()[:2]  # "max 100000" or "150000 100000"
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(folder: Path) -> float | None:
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    period = int((folder / "cpu.cfs_period_us").read_text())
    return None if quota <= 0 or period <= 0 else quota / period


def _cgroup_folders(root: Path, proc_cgroup: Path) -> list[tuple[Path, object]]:
    """(folder, reader) for this process's cgroup and each of its ancestors, v2 (``0::/path``) and v1 (the
    ``cpu`` controller's line); a container sees its own cgroup as ``/``."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, rel = parts[1], Path(parts[2].strip().lstrip("/"))
        if controllers == "":
            base, reader = root, _v2_limit
        elif "cpu" in controllers.split(","):
            base, reader = root / controllers, _v1_limit
        else:
            continue
        found += [(base / p, reader) for p in (rel, *rel.parents)]
    return found


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``; the smallest along the cgroup's ancestors), or None when none is set."""
    limits = []
    for folder, reader in _cgroup_folders(Path(root), Path(proc_cgroup)):
        try:
            value = reader(folder)
        except (OSError, ValueError, IndexError):
            continue
        if value is not None and value > 0:
            limits.append(value)
    return min(limits) if limits else None


def usable_cpus(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> tuple[int, str]:
    """(CPUs this process may use, how that was found): its affinity mask, capped by the cgroup quota
    (rounded up, as Java and Go do)."""
    try:
        cpus, how = len(os.sched_getaffinity(0)), "affinity"
    except (AttributeError, OSError):
        cpus, how = os.cpu_count() or 1, "cpu_count"
    text = f"{how} {cpus} CPUs"
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None and math.ceil(quota) < cpus:
        cpus, text = math.ceil(quota), f"cgroup quota {quota:g} CPUs ({text})"
    return max(1, cpus), text


def launch_processes(env=None) -> int:
    """Processes of this launch on this machine: LOCAL_WORLD_SIZE, else WORLD_SIZE (torchrun and accelerate
    set them), else 1."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = str(env.get(name, "")).strip()
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def auto_threads(env=None, root: str | Path = "/sys/fs/cgroup",
                 proc_cgroup: str | Path = "/proc/self/cgroup") -> tuple[int, str]:
    """``threads: auto`` -> (count, why). OMP_NUM_THREADS, when set to a positive integer, is the user's (or
    the launcher's) choice and wins; otherwise the usable CPUs divided by the launch's processes, at least 1."""
    env = os.environ if env is None else env
    omp = str(env.get("OMP_NUM_THREADS", "")).strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), f"OMP_NUM_THREADS={omp}"
    cpus, how = usable_cpus(root, proc_cgroup)
    procs = launch_processes(env)
    return max(1, cpus // procs), f"{how} / {procs} process{'es' if procs > 1 else ''}"


def resolve_threads(value) -> tuple[int, str]:
    """(count, why) of a ``threads`` setting."""
    check_threads(value)
    return auto_threads() if value == "auto" else (int(value), "threads setting")


def _set_interop(torch, n: int) -> int:
    """Inter-op threads to ``n`` where torch still allows it (only before its first parallel work, once per
    process); returns the count in effect."""
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # parallel work already started, or set before: keep what is there
            pass
    return torch.get_num_interop_threads()


def _set_faiss(n: int) -> int | None:
    """faiss's OpenMP threads to ``n`` when faiss is installed; returns the count, None without faiss."""
    try:
        import faiss  # noqa: PLC0415 - optional
    except ImportError:
        return None
    faiss.omp_set_num_threads(n)
    return n


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def threads_warning(n: int, cpus: int, load: float | None = None) -> str | None:
    """Why ``n`` threads will run slowly here (more threads than usable CPUs), or None. A busy machine (the
    load average at or above the CPUs) is not printed (it changes from second to second, and a warning line
    on every run of a shared machine is noise): :func:`load_note` goes into metrics.json instead."""
    if n > cpus:
        return (f"threads={n} is more than the {cpus} CPUs this process may use; threads that outnumber the CPUs "
                f"wait on each other (a run can be many times slower); use threads: auto or --threads {cpus}")
    return None


def load_note(n: int, cpus: int, load: float | None) -> str | None:
    """What metrics.json says when other jobs were busy on this process's CPUs as it started, or None."""
    if n > 1 and load is not None and load >= cpus:
        return (f"the load average was {load:.1f} with {cpus} CPUs usable: other jobs were busy on them, and "
                f"{n} threads wait on each other whenever one is descheduled (times are upper bounds); "
                f"--threads 1 avoids that")
    return None


def apply_threads(value="auto", warn: bool = True) -> dict:
    """Set the CPU thread count of this process (torch intra-op and, where still allowed, inter-op threads;
    faiss's OpenMP threads) from a ``threads`` setting; returns what was chosen and why (also kept for
    :func:`threads_info`). ``warn``: print a warning line when the count is likely to oversubscribe."""
    global _APPLIED
    import torch  # noqa: PLC0415

    n, source = resolve_threads(value)
    torch.set_num_threads(n)
    cpus, how = usable_cpus()
    load = _load_average()
    info = {"setting": value, "used": torch.get_num_threads(), "source": source, "usable_cpus": cpus,
            "usable_cpus_source": how, "interop": _set_interop(torch, n), "faiss": _set_faiss(n),
            "load_average_1min": None if load is None else round(load, 2),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    note = load_note(n, cpus, load)
    if note:
        info["note"] = note
    _APPLIED = info
    message = threads_warning(n, cpus, load)
    if warn and message:
        print(f"warning: {message}", file=sys.stderr)
    return dict(info)


def threads_info() -> dict:
    """The thread choice of :func:`apply_threads` in this process, or torch's own count when none was made."""
    import torch  # noqa: PLC0415

    if _APPLIED is not None and _APPLIED["used"] == torch.get_num_threads():
        return dict(_APPLIED)
    return {"setting": None, "used": torch.get_num_threads(), "source": "torch's count (not set by dmlp)"}
