"""Seconds per training epoch of every bundled method on a data set, to size a benchmark grid before launching it.

Trains each method for ``--epochs`` epochs on ``--n`` training images (a class-balanced subset, symmetric 50% noise
as a stand-in) and reports seconds per epoch scaled to the full training split.

    python benchmarks/time_epochs.py --dataset fashion_mnist --n 6000 --image-size 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ["ce", "coteaching", "elr", "elr_plus", "dividemix"]


def main() -> None:
    import numpy as np
    import torch

    from baselines.common import TrainData
    from dmlp_plugin.data.noise import apply_noise
    from dmlp_plugin.registry import load_registry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="field=value for every method")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reg = load_registry()
    data = reg.get("datasets", args.dataset)()
    n_full = len(data.train)
    idx = np.sort(np.random.default_rng(0).choice(n_full, min(args.n, n_full), replace=False))
    x, y = data.train.images[idx], data.train.labels[idx]
    noisy = apply_noise(y, data.train.num_classes, kind="symmetric", rate=0.5, seed=0).labels
    td = TrainData(x, noisy, data.test.images[:1000], data.test.labels[:1000], data.train.num_classes,
                   noise_rate=float(np.mean(noisy != y)), noise_rate_source="known")
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.overrides)}
    rows = {}
    for name in args.methods:
        cls = reg.get("methods", name)
        over = {"epochs": args.epochs, "image_size": args.image_size, **extra}
        if name == "dividemix":
            over.setdefault("warm_up", 1)
            over.setdefault("milestones", [args.epochs + 10])
        elif "milestones" in {f for f in cls.__dataclass_fields__}:
            over.setdefault("milestones", [args.epochs + 10])
        trainer = cls.from_preset("small", **over)
        t = time.perf_counter()
        res = trainer.run(td, device="cpu", seed=0, progress=False, checkpoint_dir=None, true_labels=y)
        sec = time.perf_counter() - t
        per_epoch_full = sec / args.epochs * n_full / len(idx)
        rows[name] = {"seconds": sec, "per_epoch_full_split": per_epoch_full, "test_accuracy": res.test_accuracy}
        print(f"{name:<11} {sec:7.1f} s for {args.epochs} epochs on {len(idx)} -> {per_epoch_full:7.1f} s/epoch on "
              f"{n_full} (test acc {res.test_accuracy:.3f})", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
