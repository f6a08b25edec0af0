"""The DMLP purifier on 1 and 2 processes (torchrun, gloo on the CPU): same labels? how long? how much memory?

Writes synthetic clustered features (N x 512, 10 classes, symmetric noise 80%, 1,000 trusted samples) and
their random-ReLU second view (N x 2048) to .npy files once; each process memory-maps them and copies only
its block of rows (plus the trusted rows), so memory per process is ~N/P. Default settings of DMLPConfig.
One process uses 2 threads, two processes 1 thread each (the same 2 cores).

    python benchmarks/purify_distributed.py [--sizes 50000 200000] [--procs 1 2] [--dir /tmp/dmlp-dist]

Prints a table (seconds, peak RSS per process, label accuracy, labels equal to the 1-process run); the last
line is a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _prepare(n: int, d: int, folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from benchmarks.synthetic import clustered_features, symmetric_noise
    from dmlp_plugin.pipeline import random_relu_view

    sub = folder / f"n{n}-d{d}"
    if (sub / "done").exists():
        return sub
    sub.mkdir(parents=True, exist_ok=True)
    x, y = clustered_features(n, d, 10, spread=1.2, seed=0, modes_per_class=2)
    np.save(sub / "x1.npy", x)
    np.save(sub / "x2.npy", random_relu_view(x, 2048, 0))
    np.save(sub / "y.npy", y)
    np.save(sub / "noisy.npy", symmetric_noise(y, 0.8, 10, seed=1))
    np.save(sub / "meta.npy", np.sort(np.random.default_rng(2).choice(n, 1000, replace=False)))
    (sub / "done").write_text("")
    return sub


def _worker(sub: Path, out: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from dmlp_plugin.distributed import current
    from dmlp_plugin.purifier.dmlp import DMLPConfig, purify

    dist = current("cpu")
    torch.set_num_threads(max(1, 2 // dist.world_size))
    views = [np.load(sub / "x1.npy", mmap_mode="r"), np.load(sub / "x2.npy", mmap_mode="r")]
    y, noisy, meta = (np.load(sub / f"{k}.npy") for k in ("y", "noisy", "meta"))
    t0 = time.perf_counter()
    res = purify(views, noisy, meta, y[meta], 10, DMLPConfig(), progress=False, dist=dist)
    seconds = time.perf_counter() - t0
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
    peaks = dist.gather_blocks(peak, dist.world_size) if dist.world_size > 1 else peak
    if dist.is_main:
        rest = np.setdiff1d(np.arange(len(y)), meta)
        np.save(out.with_suffix(".npy"), res.hard)
        out.write_text(json.dumps({"processes": dist.world_size, "n": len(y), "seconds": round(seconds, 2),
                                   "peak_rss_mib_per_process": [round(float(p), 1) for p in peaks],
                                   "label_accuracy_before": round(float(np.mean(noisy[rest] == y[rest])), 4),
                                   "label_accuracy_after": round(float(np.mean(res.hard[rest] == y[rest])), 4)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50000, 200000])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--dir", default="/tmp/dmlp-dist")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(Path(args.worker[0]), Path(args.worker[1]))
        return
    folder = Path(args.dir)
    rows = []
    print(f"{'N':>8} {'procs':>5} {'seconds':>8} {'peak RSS MiB/process':>22} {'acc before':>10} {'acc after':>9} "
          f"{'labels = 1 proc':>15}")
    for n in args.sizes:
        sub = _prepare(n, args.d, folder)
        base = None
        for p in args.procs:
            out = folder / f"n{n}-p{p}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // p)), "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={p}",
                   __file__, "--worker", str(sub), str(out)]
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{p} processes, N={n} failed:\n{r.stderr[-3000:]}")
            row = json.loads(out.read_text())
            row["wall_with_launch"] = round(time.perf_counter() - t, 1)
            hard = np.load(out.with_suffix(".npy"))
            base = hard if base is None else base
            row["labels_equal_to_first"] = float(np.mean(hard == base))
            rows.append(row)
            print(f"{n:>8} {p:>5} {row['seconds']:>8.1f} {str(row['peak_rss_mib_per_process']):>22} "
                  f"{row['label_accuracy_before']:>10.4f} {row['label_accuracy_after']:>9.4f} "
                  f"{row['labels_equal_to_first']:>15.4f}", flush=True)
    print(json.dumps({"runs": rows}))


if __name__ == "__main__":
    main()
