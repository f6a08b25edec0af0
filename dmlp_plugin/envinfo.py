"""``dmlp env``: what this machine gives a run (package versions, devices, faiss backend, threads, data sets),
as ``accelerate env`` does for accelerate. Reading it changes nothing and downloads nothing."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
from pathlib import Path

# the import name and the distribution whose version is shown (None: not installed)
PACKAGES = (("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"), ("faiss", None),
            ("accelerate", "accelerate"), ("numpy", "numpy"), ("sklearn", "scikit-learn"),
            ("cleanlab", "cleanlab"), ("mlxtend", "mlxtend"))
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu13", "faiss-gpu-cu13-cuvs")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _faiss() -> dict:
    """faiss's version, the distribution that installed it and the backend a search would use."""
    dist = next(((d, v) for d in FAISS_DISTRIBUTIONS if (v := _dist_version(d))), (None, None))
    try:
        from dmlp_plugin.checks.knn import backend_name  # noqa: PLC0415

        backend = backend_name()
    except ImportError:
        backend = "torch"
    return {"version": dist[1], "distribution": dist[0], "backend": backend}


def package_versions() -> dict:
    """{name: version or None} for python, dmlp_plugin and the packages a run uses (from package metadata, so
    nothing heavy is imported for it); ``faiss`` is a dict with its distribution and search backend."""
    from dmlp_plugin import __version__  # noqa: PLC0415

    out: dict = {"python": platform.python_version(), "dmlp_plugin": __version__}
    for name, dist in PACKAGES:
        out[name] = _faiss() if name == "faiss" else _dist_version(dist)
    return out


def devices() -> dict:
    """The CPU, and every CUDA device torch sees (name, memory)."""
    import torch  # noqa: PLC0415

    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            cuda.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1)})
    return {"cpu": platform.processor() or platform.machine(), "cuda": cuda,
            "cuda_runtime": torch.version.cuda, "default": "cuda" if cuda else "cpu"}


def threads() -> dict:
    """Intra-op threads torch starts with, the CPUs this process may use (affinity, cgroup quota) and what
    ``threads: auto`` would choose here (see :func:`dmlp_plugin.hardware.auto_threads`)."""
    import torch  # noqa: PLC0415

    from dmlp_plugin.hardware import _load_average, auto_threads, cgroup_cpu_limit, usable_cpus  # noqa: PLC0415

    usable, how = usable_cpus()
    auto, why = auto_threads()
    load = _load_average()
    return {"torch_threads": torch.get_num_threads(), "usable_cpus": usable, "usable_cpus_source": how,
            "cgroup_cpu_quota": cgroup_cpu_limit(), "cpu_count": os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "auto": auto, "auto_source": why,
            "load_average_1min": None if load is None else round(load, 2)}


def datasets() -> dict:
    """The data sets usable here without a download: {name: where, or None when absent}."""
    from dmlp_plugin.data.datasets import FASHION_MNIST_FILES, FASHION_MNIST_ROOT, _idx_path, _mnist5k_path  # noqa: PLC0415

    fm = Path(FASHION_MNIST_ROOT)
    fm_ok = all(_idx_path(fm, n.removesuffix(".gz")) is not None for n in FASHION_MNIST_FILES)
    mnist5k = _mnist5k_path()
    return {"digits": "embedded (scikit-learn)", "mnist5k": str(mnist5k) if mnist5k else None,
            "fashion_mnist": str(fm) if fm_ok else None}


def environment() -> dict:
    """Everything ``dmlp env`` shows, JSON-able."""
    return {"packages": package_versions(), "devices": devices(), "threads": threads(), "datasets": datasets()}


def environment_lines(env: dict) -> list[str]:
    """``dmlp env`` as text, one fact per line."""
    pk = env["packages"]
    fa = pk["faiss"]
    lines = [f"{k}: {v or 'not installed'}" for k, v in pk.items() if k != "faiss"]
    lines.append(f"faiss: {fa['version'] or 'not installed'}"
                 + (f" ({fa['distribution']})" if fa["distribution"] else "") + f", search backend {fa['backend']}")
    dv = env["devices"]
    gpus = ", ".join(f"cuda:{d['index']} {d['name']} ({d['memory_gib']} GiB)" for d in dv["cuda"]) or "none"
    built = f" (torch built for CUDA {dv['cuda_runtime']})" if dv["cuda_runtime"] else " (torch built without CUDA)"
    lines += [f"devices: cpu ({dv['cpu']}); CUDA: {gpus}{built}; device auto -> {dv['default']}"]
    th = env["threads"]
    quota = "none" if th["cgroup_cpu_quota"] is None else f"{th['cgroup_cpu_quota']:g} CPUs"
    load = "" if th["load_average_1min"] is None else f", load average {th['load_average_1min']:.1f}"
    lines += [f"threads: torch {th['torch_threads']} at start, auto -> {th['auto']} ({th['auto_source']}); "
              f"usable CPUs {th['usable_cpus']} of {th['cpu_count']} (cgroup quota {quota}), "
              f"OMP_NUM_THREADS {th['OMP_NUM_THREADS'] or 'unset'}{load}"]
    lines += [f"data set {k}: {v or 'not found'}" for k, v in env["datasets"].items()]
    return lines
