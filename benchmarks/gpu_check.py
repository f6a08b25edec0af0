"""The prepared GPU check: one short run on a lent CUDA machine writes ``benchmarks/results/gpu.md``.

Checks, each timed and each allowed to fail on its own (the table says which did and why):
1. DMLP purification at CIFAR scale on CUDA: 50,000 x 512 synthetic clustered features + a 2,048-d random-ReLU
   view, symmetric 80%, 1,000 trusted; labels compared with the same run on the CPU (hard labels equal?).
2. faiss search on the GPU (``faiss-gpu``): exact inner-product 10-NN of 50,000 x 512, recall against the torch
   exact search; skipped with a note when faiss has no GPU support installed.
2b. The ``ivf`` neighbour index (Clothing1M-size search) with its products on CUDA: 50-NN lists of 50,000
   rows against the same index on the CPU, and its recall against exact search.
3. One SimCLR epoch (resnet18, CIFAR stem, 32 px, batch 512) on 10,000 random images, bf16 autocast.
4. One CE training epoch (resnet18, CIFAR stem) on 10,000 random images, bf16 (accelerate).
5. bf16: ``torch.cuda.is_bf16_supported()`` and a bf16 matmul against float32.

    python benchmarks/gpu_check.py            # on the GPU machine (``device`` tool); ~3-5 minutes
    python benchmarks/gpu_check.py --small    # the same code path on a CPU with small sizes (a dry run)

Writes benchmarks/results/gpu.md (and .json) atomically; prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _timed(fn):
    t = time.perf_counter()
    try:
        out = fn()
        return {"ok": True, "seconds": round(time.perf_counter() - t, 2), **(out or {})}
    except Exception as e:  # noqa: BLE001 - every check reports its own failure
        return {"ok": False, "seconds": round(time.perf_counter() - t, 2), "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(limit=3)}


def check_purify(device: str, n: int, d: int) -> dict:
    import numpy as np
    import torch

    from benchmarks.synthetic import clustered_features, symmetric_noise
    from dmlp_plugin.pipeline import random_relu_view
    from dmlp_plugin.purifier.dmlp import DMLPConfig, purify

    x, y = clustered_features(n, d, 10, spread=1.2, seed=0, modes_per_class=2)
    noisy = symmetric_noise(y, 0.8, 10, seed=1)
    meta = np.sort(np.random.default_rng(2).choice(n, min(1000, n // 10), replace=False))
    views = [x, random_relu_view(x, 2048, 0)]
    cfg = DMLPConfig()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = purify(views, noisy, meta, y[meta], 10, cfg, device=device, progress=False)
    gpu_s = time.perf_counter() - t
    rest = np.setdiff1d(np.arange(n), meta)
    out = {"n": n, "d": d, "device_seconds": round(gpu_s, 2),
           "label_accuracy": round(float(np.mean(res.hard[rest] == y[rest])), 4)}
    if device == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        t = time.perf_counter()
        cpu = purify(views, noisy, meta, y[meta], 10, cfg, device="cpu", progress=False)
        out["cpu_seconds"] = round(time.perf_counter() - t, 2)
        out["hard_labels_equal_cpu"] = round(float(np.mean(cpu.hard == res.hard)), 5)
    return out


def check_faiss(n: int, d: int) -> dict:
    import numpy as np

    from dmlp_plugin.checks import knn

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    backend = knn.backend_name()
    t = time.perf_counter()
    _, idx = knn.search(x, 10)
    s = time.perf_counter() - t
    m = min(2000, n)
    # reference neighbours of the first m rows against the whole set
    _, ref = knn.search(x, 10, queries=x[:m], exclude_self=False, backend="torch")
    ref = ref[:, 1:]
    got = idx[:m, :9]
    recall = float(np.mean([len(set(a) & set(b)) / 9 for a, b in zip(got, ref)]))
    return {"backend": backend, "search_seconds": round(s, 2), "recall_vs_torch": round(recall, 4),
            "note": "" if backend == "faiss-gpu" else "faiss-gpu not installed or no GPU: CPU backend measured"}


def check_ivf(device: str, n: int, d: int) -> dict:
    """The ``ivf`` neighbour index (dmlp_plugin.checks.index) with its products on ``device``: the 50-NN lists of
    every row on the GPU against the same index on the CPU (identical cells: same k-means), and its recall."""
    import numpy as np

    from dmlp_plugin.checks import index as ix

    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, 16)).astype(np.float32)
    x = np.tanh(z @ rng.standard_normal((16, d)).astype(np.float32))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    settings = ix.IndexSettings(kind="ivf", recall_sample=1000)
    out = {}
    for dev in dict.fromkeys([device, "cpu"]):
        t = time.perf_counter()
        built = ix.build_cells(lambda sel: x[sel], n, d, settings, device=dev)
        sims, ids = ix.whole_search(built, 50)
        out[dev] = (ids, time.perf_counter() - t, built.record)
    ids, seconds, record = out[device]
    same = float(np.mean(ids == out["cpu"][0]))
    return {"device": device, "seconds_build_and_search": round(seconds, 2),
            "seconds_cpu": round(out["cpu"][1], 2), "recall_at_10": record.get("recall_at_10"),
            "lists_equal_to_cpu": round(same, 5), "nlist": record["nlist"], "nprobe": record["nprobe"]}


def check_simclr(device: str, n: int, size: int, backbone: str) -> dict:
    import numpy as np

    from dmlp_plugin.features.ssl import SimCLRConfig, train_simclr

    imgs = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    cfg = SimCLRConfig(backbone=backbone, cifar_stem=True, image_size=size, epochs=1, batch_size=min(512, n),
                       amp="bf16" if device == "cuda" else "auto")
    t = time.perf_counter()
    model = train_simclr(imgs, cfg, device=device, progress=False)
    s = time.perf_counter() - t
    return {"images": n, "epoch_seconds": round(s, 2), "images_per_second": round(n / s, 1),
            "final_loss": round(float(model.simclr_losses[-1]), 4), "amp": cfg.amp}


def check_train(device: str, n: int, size: int, backbone: str) -> dict:
    import numpy as np

    from baselines.ce import CE
    from baselines.common import TrainData

    rng = np.random.default_rng(0)
    data = TrainData(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n),
                     rng.integers(0, 256, (1000, size, size, 3), dtype=np.uint8), rng.integers(0, 10, 1000), 10)
    trainer = CE.from_preset("cifar10", backbone=backbone, epochs=1, milestones=(5,),
                             mixed_precision="bf16" if device == "cuda" else "auto")
    t = time.perf_counter()
    res = trainer.run(data, device=device, seed=0, progress=False)
    s = time.perf_counter() - t
    return {"images": n, "epoch_seconds": round(s, 2), "images_per_second": round(n / s, 1),
            "test_accuracy": round(float(res.test_accuracy), 4)}


def check_bf16(device: str) -> dict:
    import torch

    if device != "cuda":
        return {"bf16_supported": False, "note": "no CUDA device"}
    a = torch.randn(1024, 1024, device="cuda")
    b = torch.randn(1024, 1024, device="cuda")
    ref = a @ b
    got = (a.bfloat16() @ b.bfloat16()).float()
    rel = float((got - ref).norm() / ref.norm())
    return {"bf16_supported": bool(torch.cuda.is_bf16_supported()), "relative_error_vs_fp32": round(rel, 5)}


def main() -> None:
    import torch

    from dmlp_plugin.atomic import write_json, write_text
    from dmlp_plugin.pipeline import versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small sizes (a dry run of the code path, e.g. on a CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, d, imgs = (3000, 64, 512) if args.small else (50000, 512, 10000)
    backbone = "test_resnet" if args.small else "resnet18"
    checks = {
        "purify": lambda: check_purify(device, n, d),
        "faiss": lambda: check_faiss(n, d),
        "ivf_index": lambda: check_ivf(device, n, d),
        "simclr_epoch": lambda: check_simclr(device, imgs, 32, backbone),
        "train_epoch": lambda: check_train(device, imgs, 32, backbone),
        "bf16": lambda: check_bf16(device),
    }
    results = {}
    for name, fn in checks.items():
        results[name] = _timed(fn)
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'trace'})}", flush=True)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    lines = ["# GPU check", "", f"`python benchmarks/gpu_check.py{' --small' if args.small else ''}` on {time.strftime('%Y-%m-%d')}: "
             f"device {device} ({gpu}), {platform.processor() or platform.machine()}; versions "
             f"{json.dumps(versions())}.", "", "| check | ok | seconds | details |", "|---|---|---|---|"]
    for name, r in results.items():
        details = {k: v for k, v in r.items() if k not in ("ok", "seconds", "trace")}
        lines.append(f"| {name} | {'yes' if r['ok'] else 'NO'} | {r['seconds']} | {json.dumps(details)} |")
    out = Path(args.out)
    write_text(out, "\n".join(lines) + "\n")
    write_json(out.with_suffix(".json"), {"device": device, "gpu": gpu, "small": args.small, "results": results})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
