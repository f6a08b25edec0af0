"""Is the label-accuracy estimate without true labels any good? Estimated vs true accuracy where truth is known.

For each data set / noise setting / seed, runs the purify stage (`pipeline.purify_labels`, as `dmlp purify` does)
with `checks.estimate_folds` folds and compares, for dmlp and every comparison, the estimate (K-fold CV over the
trusted subset, class-weighted) with the true accuracy on the untrusted rows: the error and whether the 90%
interval covers the truth. Rows of benchmarks/fmnist.py (its seed-0 cells carry estimates) are added when
their JSON files exist.

    python benchmarks/estimate_quality.py [--seeds 0 1] [--folds 5] [--fmnist runs/fmnist-bench] [--cases digits]

Prints a Markdown table and writes benchmarks/results/estimate_quality.md (+ .json). Resumable: each finished
(case, noise, seed) cell is kept in runs/estimate_quality/ and skipped when the command is given again; delete
that folder (or pass --fresh) after changing the estimator.
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

CELLS = ROOT / "runs" / "estimate_quality"
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
                    "folds": e.get("folds"), "effective_size": e.get("effective_size"),
                    "true": true, "estimate": e["estimate"], "low": e["low"], "high": e["high"],
                    "covered": e["low"] <= true <= e["high"], "error": e["estimate"] - true})
    return out


def _cell(case: str, kind: str, rate: float, seed: int) -> Path:
    return CELLS / f"{case.split()[0]}-{kind}-{round(rate * 100)}-s{seed}.json"


def run_cases(args) -> None:
    """Run every (case, noise, seed) cell of ``args.cases`` not finished yet; each kept in runs/estimate_quality/."""
    from dmlp_plugin.atomic import write_json
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data, make_views, purify_labels, resolve_device, validate

    CELLS.mkdir(parents=True, exist_ok=True)
    for case, config, sets in CASES:
        todo = [(k, r, s) for k, r in SETTINGS for s in args.seeds if not _cell(case, k, r, s).exists()]
        if case.split()[0] not in args.cases or not todo:
            continue
        cfg0, _ = load_config(str(ROOT / config), [*sets, f"checks.estimate_folds={args.folds}"])
        built = validate(cfg0)
        device = resolve_device(cfg0.device)
        data = load_data(cfg0)
        views = make_views(cfg0, data, device, built, progress=False)
        for kind, rate, seed in todo:
            cfg = dataclasses.replace(cfg0, seed=seed, noise=dataclasses.replace(cfg0.noise, kind=kind, rate=rate))
            t = time.perf_counter()
            m = purify_labels(cfg, data, views, built, device, progress=False).metrics
            new = rows_of(m, case, f"{kind}-{round(rate * 100)}", seed)
            write_json(_cell(case, kind, rate, seed), {"rows": new, "seconds": time.perf_counter() - t})
            print(f"{case} {kind} {rate} s{seed} ({time.perf_counter() - t:.0f} s): "
                  + ", ".join(f"{r['corrector']} {r['estimate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] vs "
                              f"{r['true']:.3f}" for r in new), flush=True)


def finished_rows(seeds, fmnist: Path) -> list[dict]:
    """Every finished cell's rows, then the Fashion-MNIST cells' (their estimates as benchmarks/fmnist.py stored them)."""
    rows = []
    for case, _, _ in CASES:
        for kind, rate in SETTINGS:
            for seed in seeds:
                if _cell(case, kind, rate, seed).exists():
                    rows += json.loads(_cell(case, kind, rate, seed).read_text())["rows"]
    for p in sorted((fmnist / "purify").glob("*.json")):
        cell = json.loads(p.read_text())
        for name, e in (cell.get("estimated_accuracy") or {}).items():
            true = cell.get(name)
            if true is None:
                continue
            rows.append({"case": "fmnist SSL+raw", "noise": cell["noise"], "seed": cell["seed"], "corrector": name,
                         "trusted": e["scored"], "folds": e.get("folds"), "true": true, "estimate": e["estimate"],
                         "low": e["low"], "high": e["high"], "covered": e["low"] <= true <= e["high"],
                         "error": e["estimate"] - true, "stored": True})
    return rows


def summarise(rows: list[dict]) -> dict:
    import numpy as np

    big = [r for r in rows if r["trusted"] >= 500]
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    return {
        "rows": len(rows), "coverage": float(np.mean([r["covered"] for r in rows])) if rows else None,
        "mean_abs_error": float(np.mean([abs(r["error"]) for r in rows])) if rows else None,
        "mean_error": float(np.mean([r["error"] for r in rows])) if rows else None,
        "rows_500_trusted": len(big),
        "mean_abs_error_500_trusted": float(np.mean([abs(r["error"]) for r in big])) if big else None,
        "by_case": {k: {"rows": len(v), "coverage": float(np.mean([r["covered"] for r in v])),
                        "mean_error": float(np.mean([r["error"] for r in v]))} for k, v in by_case.items()},
    }


def markdown(rows: list[dict], summary: dict, args) -> list[str]:
    stored = any(r.get("stored") for r in rows)
    md = ["# Label accuracy estimated without true labels vs the truth", "",
          f"`python benchmarks/estimate_quality.py --seeds {' '.join(map(str, args.seeds))} --folds {args.folds}` "
          f"({time.strftime('%Y-%m-%d')}): {args.folds}-fold CV over the trusted subset (the fold count "
          f"`estimate.fold_count` deals every class evenly: 4 folds for 4 a class, 6 for 12), class-weighted by the "
          f"purified labels' class shares, Jeffreys interval at the effective sample size; accuracy on the "
          f"untrusted rows.", ""]
    if stored:
        md += ["Fashion-MNIST rows: the estimates `benchmarks/fmnist.py purify` stored (runs of 2026-12-01, 5 folds "
               "of 100 a class, the fold count unchanged) with the interval of that day (summed per-class Jeffreys "
               "posteriors); at 100 a class it sits about 0.3 points below today's (synthetic check, max 0.5).", ""]
    md += [f"Coverage of the 90% interval: {summary['coverage']:.2f} over {summary['rows']} rows; mean |error| "
           f"{summary['mean_abs_error']:.4f} (mean signed error {summary['mean_error']:+.4f}: negative = "
           f"pessimistic); rows with >= 500 trusted: {summary['rows_500_trusted']}"
           + (f", mean |error| {summary['mean_abs_error_500_trusted']:.4f}" if summary["rows_500_trusted"] else "")
           + ".", "", "| case | rows | coverage | mean signed error |", "|---|---|---|---|"]
    md += [f"| {k} | {v['rows']} | {v['coverage']:.2f} | {v['mean_error']:+.4f} |" for k, v in summary["by_case"].items()]
    md += ["", "| case | noise | seed | corrector | trusted | folds | true | estimated | 90% interval | covered |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['case']} | {r['noise']} | {r['seed']} | {r['corrector']} | {r['trusted']} | {r.get('folds') or '-'} | "
           f"{r['true']:.4f} | {r['estimate']:.4f} | {r['low']:.4f} .. {r['high']:.4f} | "
           f"{'yes' if r['covered'] else 'no'} |" for r in rows]
    return md


def main() -> None:
    import torch

    from dmlp_plugin.atomic import write_json, write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fmnist", default=str(ROOT / "runs" / "fmnist-bench"))
    ap.add_argument("--cases", nargs="+", default=[c[0].split()[0] for c in CASES],
                    help="run only these cases (first word of the name: digits, mnist5k); the table shows every "
                         "finished cell")
    ap.add_argument("--fresh", action="store_true", help="forget the finished cells of runs/estimate_quality/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fresh:
        for p in CELLS.glob("*.json"):
            p.unlink()
    run_cases(args)
    rows = finished_rows(args.seeds, Path(args.fmnist))
    summary = summarise(rows)
    md = markdown(rows, summary, args)
    write_text(ROOT / "benchmarks" / "results" / "estimate_quality.md", "\n".join(md) + "\n")
    write_json(ROOT / "benchmarks" / "results" / "estimate_quality.json", {"summary": summary, "rows": rows})
    print("\n".join(md))


if __name__ == "__main__":
    main()
