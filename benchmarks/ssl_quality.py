"""How good are the SimCLR features? Train stage 1 on scikit-learn digits (no labels), then score the
frozen features with the TRUE labels: 10-NN (cosine) and a linear probe (logistic regression), both by
stratified 5-fold cross-validation. Raw standardised pixels are the reference.

    .venv/bin/python benchmarks/ssl_quality.py                       # the whole sweep (~20 min, 2 cores)
    .venv/bin/python benchmarks/ssl_quality.py --only default,raw     # some rows
    .venv/bin/python benchmarks/ssl_quality.py --set epochs=5 --only default   # override every row
    .venv/bin/python benchmarks/ssl_quality.py --list

Prints a Markdown table (setting, SSL seconds, final loss, kNN acc, linear acc); ``--json PATH`` also saves
the rows. Runs with 2 torch threads unless --threads says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> overrides of SimCLRConfig (the defaults are the "default" row).
SETTINGS: dict[str, dict] = {
    "default": {},
    "noflip": {"hflip": False},
    "test_resnet": {"backbone": "test_resnet"},
    "lcnet_050": {"backbone": "lcnet_050"},
    "ep20": {"epochs": 20},
    "ep60": {"epochs": 60},
    "crop0.08": {"crop_scale_min": 0.08},
    "crop0.4": {"crop_scale_min": 0.4},
    "crop0.6": {"crop_scale_min": 0.6},
    "t0.2": {"temperature": 0.2},
    "t0.1": {"temperature": 0.1},
    "bs128": {"batch_size": 128},
    "bs512": {"batch_size": 512},
    "lr1e-3": {"lr": 1e-3},
    "lr4e-3": {"lr": 4e-3},
    "sgd": {"optimizer": "sgd", "lr": 0.3},
    "nojitter": {"jitter": 0.0},
    "fp32": {"amp": "no"},
    "crop0.4+t0.2": {"crop_scale_min": 0.4, "temperature": 0.2},
    "crop0.4+t0.2+ep60": {"crop_scale_min": 0.4, "temperature": 0.2, "epochs": 60},
    "16px+crop0.4+t0.2+ep60": {"image_size": 16, "crop_scale_min": 0.4, "temperature": 0.2, "epochs": 60},
}


def load_digits_uint8():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.data * 255 / 16).astype(np.uint8).reshape(-1, 8, 8, 1)
    return images, d.target.astype(np.int64)


def score(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(10-NN accuracy, linear-probe accuracy), stratified 5-fold CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    knn = KNeighborsClassifier(10, metric="cosine")
    lin = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    return (float(cross_val_score(knn, features, labels, cv=cv).mean()),
            float(cross_val_score(lin, features, labels, cv=cv).mean()))


def run_setting(images, labels, overrides: dict, common: dict) -> dict:
    from dmlp_plugin.features.extract import extract_features
    from dmlp_plugin.features.ssl import SimCLRConfig, train_simclr

    cfg = dataclasses.replace(SimCLRConfig(), **{**overrides, **common})
    t = time.perf_counter()
    model = train_simclr(images, cfg, device="cpu", progress=False)
    seconds = time.perf_counter() - t
    feats = extract_features(model, images, cfg.image_size, "cpu")
    knn, lin = score(feats, labels)
    return {"seconds": round(seconds, 1), "loss": round(model.simclr_losses[-1], 4), "knn": round(knn, 4),
            "linear": round(lin, 4), "dim": int(feats.shape[1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated setting names (and/or 'raw')")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override for every row (YAML value)")
    ap.add_argument("--subset", type=int, default=0, help="use the first N digits images only (0: all 1,437... "
                                                             "the 80%% train split of the demo)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = ap.parse_args(argv)
    if args.list:
        for k, v in SETTINGS.items():
            print(f"{k:14s} {v}")
        return 0

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    common = {}
    for item in args.set:
        k, v = item.split("=", 1)
        common[k] = yaml.safe_load(v)
    images, labels = load_digits_uint8()
    # The demo trains on a 1,437-image split (80%); use the same size so timings match the pipeline.
    n = args.subset or 1437
    rng = np.random.default_rng(0)
    idx = np.sort(rng.permutation(len(images))[:n])
    images, labels = images[idx], labels[idx]

    names = [s for s in args.only.split(",") if s] or ["raw", *SETTINGS]
    rows = []
    print(f"digits: {len(images)} images 8x8x1 -> 32x32; overrides for every row: {common or 'none'}")
    print("| setting | overrides | SSL s | final loss | 10-NN acc | linear acc |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        if name == "raw":
            x = images.reshape(len(images), -1).astype(np.float32)
            x = (x - x.mean(0)) / (x.std(0) + 1e-6)
            knn, lin = score(x, labels)
            row = {"setting": "raw pixels", "overrides": {}, "seconds": 0.0, "loss": None, "knn": round(knn, 4),
                   "linear": round(lin, 4)}
        else:
            if name not in SETTINGS:
                ap.error(f"unknown setting {name!r}; --list shows them")
            row = {"setting": name, "overrides": SETTINGS[name], **run_setting(images, labels, SETTINGS[name], common)}
        rows.append(row)
        loss = "-" if row["loss"] is None else f"{row['loss']:.3f}"
        print(f"| {row['setting']} | {json.dumps(row['overrides'])} | {row['seconds']:.1f} | {loss} | "
              f"{row['knn']:.3f} | {row['linear']:.3f} |", flush=True)
    if args.json:
        from dmlp_plugin.atomic import write_json

        write_json(args.json, {"common": common, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
