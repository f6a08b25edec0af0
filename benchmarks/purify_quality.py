"""How much better do the labels get? DMLP against the honest baselines, on the embedded data.

For each noise setting (symmetric 20/50/80/90%, asymmetric 40%) and seed, with the trusted subset of the
config (3% of the training set, class-balanced, true labels), this compares the label accuracy on the
untrusted samples of: the noisy labels, ``trusted_only`` (a linear classifier fitted on the trusted subset
alone), ``knn_vote`` at its best k (chosen with the true labels, which flatters it) and ``dmlp``. Then an
ablation at 50% and 80% symmetric noise: IPC only, EAC only, both; one view (the authors' script: the same
features twice) vs two; ridge 0 vs our default; the paper's readout (label matrices) vs ours (posterior);
the posterior as the exchanged labels; the authors' settings.

    python benchmarks/purify_quality.py [--config configs/purify-digits.yaml] [--seeds 0 1 2]
                                        [--set features.source=raw ...] [--no-ablation]

Features are computed once (SSL features are cached in .dmlp_cache/). Prints Markdown tables; the last
line is a JSON object with every figure.
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
sys.path.insert(0, str(ROOT))

SETTINGS = [("symmetric", 0.2), ("symmetric", 0.5), ("symmetric", 0.8), ("symmetric", 0.9), ("asymmetric", 0.4)]
ABLATION_SETTINGS = [("symmetric", 0.5), ("symmetric", 0.8)]


def _ablations(base):
    return {
        "both (default)": base,
        "IPC only": dataclasses.replace(base, use_eac=False),
        "EAC only": dataclasses.replace(base, use_ipc=False),
        "one view (same features twice)": "one_view",
        "ridge 0": dataclasses.replace(base, ridge=0.0),
        "paper's readout (label matrices)": dataclasses.replace(base, readout="labels"),
        "posterior as exchange target": dataclasses.replace(base, eac_target="posterior"),
        "authors' settings": "authors",
    }


def main() -> None:
    import torch

    from dmlp_plugin import metrics as M
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import (build_component, load_data, make_noisy, make_views, resolve_device,
                                      run_preprocessor, select_trusted, validate)
    from dmlp_plugin.purifier.dmlp import DMLPConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "purify-digits.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg0, _ = load_config(args.config, args.overrides)
    built = validate(cfg0)
    device = resolve_device(cfg0.device)
    data = load_data(cfg0)
    c = data.train.num_classes
    truth = data.train.labels
    t = time.perf_counter()
    views = make_views(cfg0, data, device, built, progress=True)
    feature_seconds = time.perf_counter() - t
    base = built["preprocessor"]
    base_cfg = DMLPConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(DMLPConfig)})

    def evaluate(kind, rate, seed, ablation: bool):
        cfg = dataclasses.replace(cfg0, seed=seed, noise=dataclasses.replace(cfg0.noise, kind=kind, rate=rate))
        noisy = make_noisy(cfg, data)[0].labels
        meta_idx, meta_labels = select_trusted(cfg, noisy, truth, c, views.arrays[0])
        rest = np.setdiff1d(np.arange(len(noisy)), meta_idx)
        results["trusted_size"] = int(len(meta_idx))

        def acc(hard):
            return M.label_accuracy(hard[rest], truth[rest])

        def run(pre, vw=views):
            return run_preprocessor(pre, vw, noisy, meta_idx, meta_labels, c, truth, device, False, seed)

        row = {"noisy": acc(noisy)}
        row["trusted_only"] = acc(run(build_component("preprocessors", "trusted_only", {})).hard)
        row["knn_vote (best k)"] = max(acc(run(build_component("preprocessors", "knn_vote", {"k": k})).hard)
                                       for k in cfg.checks.vote_ks)
        if not ablation:
            t0 = time.perf_counter()
            row["dmlp"] = acc(run(base).hard)
            row["dmlp_seconds"] = time.perf_counter() - t0
            return row
        out = {}
        for name, variant in _ablations(base_cfg).items():
            from dmlp_plugin.purifier import dmlp as D

            vw = views
            if variant == "one_view":
                variant, vw = base_cfg, dataclasses.replace(views, arrays=[views.arrays[0], views.arrays[0]])
            elif variant == "authors":
                variant, vw = DMLPConfig.authors(), dataclasses.replace(views, arrays=[views.arrays[0], views.arrays[0]])
            res = D.purify(vw.arrays, noisy, meta_idx, meta_labels, c, dataclasses.replace(variant, seed=seed),
                           device=device, progress=False)
            out[name] = acc(res.hard)
        return out

    results = {"features": views.provenance, "feature_seconds": feature_seconds, "trusted_size": None,
               "dmlp_params": dataclasses.asdict(base_cfg), "main": {}, "ablation": {}}
    print(f"features: {views.provenance.get('source')} dims {views.provenance.get('dims')} "
          f"({feature_seconds:.0f} s); seeds {args.seeds}\n")
    cols = ["noisy", "trusted_only", "knn_vote (best k)", "dmlp"]
    print("| noise | " + " | ".join(cols) + " | dmlp >= all? | dmlp s |")
    print("|---" * (len(cols) + 3) + "|")
    for kind, rate in SETTINGS:
        rows = [evaluate(kind, rate, s, False) for s in args.seeds]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        std = {k: float(np.std([r[k] for r in rows])) for k in rows[0]}
        wins = all(r["dmlp"] >= max(r[k] for k in cols[:-1]) for r in rows)
        results["main"][f"{kind} {rate}"] = {"mean": mean, "std": std, "per_seed": rows, "dmlp_best_every_seed": wins}
        print(f"| {kind} {rate:.0%} | " + " | ".join(f"{mean[k]:.4f}±{std[k]:.4f}" for k in cols)
              + f" | {'yes' if wins else 'NO'} | {mean['dmlp_seconds']:.1f} |", flush=True)
    if not args.no_ablation:
        print()
        names = list(_ablations(base_cfg))
        print("| ablation | " + " | ".join(f"{k} {r:.0%}" for k, r in ABLATION_SETTINGS) + " |")
        print("|---" * (len(ABLATION_SETTINGS) + 1) + "|")
        per = {f"{k} {r}": [evaluate(k, r, s, True) for s in args.seeds] for k, r in ABLATION_SETTINGS}
        for name in names:
            vals = [float(np.mean([row[name] for row in per[key]])) for key in per]
            results["ablation"][name] = dict(zip(per, vals))
            print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + " |", flush=True)
    print(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
