"""Speed and memory of the DMLP purifier at CIFAR scale on this machine.

Purifies synthetic clustered features (50,000 x 512, 10 classes, symmetric noise 80%, 1,000 trusted
samples = 2%) once with our default settings (two views: the features and their random-ReLU view, as
``dmlp purify`` builds them) and once with the authors' settings (100 epochs, 7,000-sample batches, the same
file as both views). Each run happens in a fresh subprocess so its peak RSS is its own.

    python benchmarks/purify_speed.py [--n 50000] [--d 512] [--threads 2] [--skip-authors]

Prints a table; the last line is a JSON object with ``seconds`` and ``peak_rss_mib`` (default settings),
``rss_beyond_features_mib`` and the same for the authors' settings under ``authors``.
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

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _one(setting: str, n: int, d: int, threads: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.synthetic import clustered_features, symmetric_noise
    from dmlp_plugin.pipeline import random_relu_view
    from dmlp_plugin.purifier.dmlp import DMLPConfig, purify

    torch.set_num_threads(threads)
    x, y = clustered_features(n, d, 10, spread=1.2, seed=0, modes_per_class=2)
    noisy = symmetric_noise(y, 0.8, 10, seed=1)
    meta = np.sort(np.random.default_rng(2).choice(n, 1000, replace=False))
    if setting == "default":
        cfg = DMLPConfig()
        views = [x, random_relu_view(x, 2048, 0)]
    else:
        cfg = DMLPConfig.authors()
        views = [x, x]
    rss_features = _rss_mib()
    t0 = time.perf_counter()
    res = purify(views, noisy, meta, y[meta], 10, cfg, progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rest = np.setdiff1d(np.arange(n), meta)
    return {"setting": setting, "n": n, "d": d, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "views_dims": [int(v.shape[1]) for v in views], "seconds": round(seconds, 2),
            "peak_rss_mib": round(peak, 1), "rss_with_features_mib": round(rss_features, 1),
            "rss_beyond_features_mib": round(peak - rss_features, 1),
            "label_accuracy_before": round(float(np.mean(noisy[rest] == y[rest])), 4),
            "label_accuracy_after": round(float(np.mean(res.hard[rest] == y[rest])), 4),
            "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-authors", action="store_true")
    ap.add_argument("--one", choices=["default", "authors"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.n, args.d, args.threads)))
        return
    rows = []
    for setting in ["default"] + ([] if args.skip_authors else ["authors"]):
        out = subprocess.run([sys.executable, __file__, "--one", setting, "--n", str(args.n), "--d", str(args.d),
                              "--threads", str(args.threads)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode != 0:
            sys.exit(f"{setting} run failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'setting':<9} {'epochs':>6} {'batch':>6} {'views':>11} {'seconds':>8} {'peak MiB':>9} "
          f"{'beyond feats':>12} {'acc before':>10} {'acc after':>9}")
    for r in rows:
        print(f"{r['setting']:<9} {r['epochs']:>6} {r['batch_size']:>6} {str(r['views_dims']):>11} {r['seconds']:>8.1f} "
              f"{r['peak_rss_mib']:>9.0f} {r['rss_beyond_features_mib']:>12.0f} {r['label_accuracy_before']:>10.4f} "
              f"{r['label_accuracy_after']:>9.4f}")
    summary = dict(rows[0])
    if len(rows) > 1:
        summary["authors"] = rows[1]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
