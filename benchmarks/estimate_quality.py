"""Is the label-accuracy estimate without true labels any good? Estimated vs true accuracy where truth is known.

For each data set / noise setting / seed, runs the purify stage (`pipeline.purify_labels`, as `dmlp purify` does)
with `checks.estimate_folds` folds and compares, for dmlp and every comparison, the estimate (K-fold CV over the
trusted subset, class-weighted) with the true accuracy on the untrusted rows: the error and whether the 90%
interval covers the truth. Rows of benchmarks/fmnist.py (its seed-0 cells carry estimates) are added when
their JSON files exist.

    python benchmarks/estimate_quality.py [--seeds 0 1] [--folds 5] [--fmnist runs/fmnist-bench]

Prints a Markdown table and writes benchmarks/results/estimate_quality.md (+ .json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = [  # (name, config, overrides)
    ("digits SSL", "configs/purify-digits.yaml", []),
    ("mnist5k raw", "configs/purify-digits.yaml", ["dataset.name=mnist5k", "features.source=raw",
                                                   "features.second_view=random_relu"]),
]
SETTINGS = [("symmetric", 0.5), ("symmetric", 0.8), ("pairflip", 0.4), ("instance", 0.4)]


def rows_of(metrics: dict, case: str, noise: str, seed: int) -> list[dict]:
    out = []
    for name, e in (metrics.get("estimated_accuracy") or {}).items():
        true = metrics.get("label_accuracy_after") if name == metrics["preprocessor"] else \
            (metrics.get(name) or {}).get("label_accuracy_after")
        if true is None:
            continue
        out.append({"case": case, "noise": noise, "seed": seed, "corrector": name, "trusted": e["scored"],
                    "true": true, "estimate": e["estimate"], "low": e["low"], "high": e["high"],
                    "covered": e["low"] <= true <= e["high"], "error": e["estimate"] - true})
    return out


def main() -> None:
    import numpy as np
    import torch

    from dmlp_plugin.atomic import write_json, write_text
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data, make_views, purify_labels, resolve_device, validate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fmnist", default=str(ROOT / "runs" / "fmnist-bench"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for case, config, sets in CASES:
        cfg0, _ = load_config(str(ROOT / config), [*sets, f"checks.estimate_folds={args.folds}"])
        built = validate(cfg0)
        device = resolve_device(cfg0.device)
        data = load_data(cfg0)
        views = make_views(cfg0, data, device, built, progress=False)
        for kind, rate in SETTINGS:
            for seed in args.seeds:
                cfg = dataclasses.replace(cfg0, seed=seed, noise=dataclasses.replace(cfg0.noise, kind=kind, rate=rate))
                t = time.perf_counter()
                m = purify_labels(cfg, data, views, built, device, progress=False).metrics
                new = rows_of(m, case, f"{kind}-{round(rate * 100)}", seed)
                rows += new
                print(f"{case} {kind} {rate} s{seed} ({time.perf_counter() - t:.0f} s): "
                      + ", ".join(f"{r['corrector']} {r['estimate']:.3f} vs {r['true']:.3f}" for r in new), flush=True)
    for p in sorted((Path(args.fmnist) / "purify").glob("*.json")):
        cell = json.loads(p.read_text())
        est = cell.get("estimated_accuracy") or {}
        for name, e in est.items():
            true = cell.get(name)
            if true is None:
                continue
            rows.append({"case": "fmnist SSL+raw", "noise": cell["noise"], "seed": cell["seed"], "corrector": name,
                         "trusted": e["scored"], "true": true, "estimate": e["estimate"], "low": e["low"],
                         "high": e["high"], "covered": e["low"] <= true <= e["high"], "error": e["estimate"] - true})
    lines = ["| case | noise | seed | corrector | trusted | true | estimated | 90% interval | covered |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['noise']} | {r['seed']} | {r['corrector']} | {r['trusted']} | {r['true']:.4f} | "
                     f"{r['estimate']:.4f} | {r['low']:.4f} .. {r['high']:.4f} | {'yes' if r['covered'] else 'no'} |")
    big = [r for r in rows if r["trusted"] >= 500]
    summary = {
        "rows": len(rows), "coverage": float(np.mean([r["covered"] for r in rows])) if rows else None,
        "mean_abs_error": float(np.mean([abs(r["error"]) for r in rows])) if rows else None,
        "mean_error": float(np.mean([r["error"] for r in rows])) if rows else None,
        "rows_500_trusted": len(big),
        "mean_abs_error_500_trusted": float(np.mean([abs(r["error"]) for r in big])) if big else None,
    }
    md = ["# Label accuracy estimated without true labels vs the truth", "",
          f"`python benchmarks/estimate_quality.py --seeds {' '.join(map(str, args.seeds))} --folds {args.folds}` "
          f"({time.strftime('%Y-%m-%d')}): {args.folds}-fold CV over the trusted subset, class-weighted by the "
          f"purified labels' class shares; accuracy on the untrusted rows.", "",
          f"Coverage of the 90% interval: {summary['coverage']:.2f} over {summary['rows']} rows; mean |error| "
          f"{summary['mean_abs_error']:.4f} (mean signed error {summary['mean_error']:+.4f}: negative = pessimistic); "
          f"rows with >= 500 trusted: {summary['rows_500_trusted']}"
          + (f", mean |error| {summary['mean_abs_error_500_trusted']:.4f}" if big else "") + ".", ""] + lines
    write_text(ROOT / "benchmarks" / "results" / "estimate_quality.md", "\n".join(md) + "\n")
    write_json(ROOT / "benchmarks" / "results" / "estimate_quality.json", {"summary": summary, "rows": rows})
    print("\n".join(md))


if __name__ == "__main__":
    main()
