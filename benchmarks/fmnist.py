"""Fashion-MNIST at the papers' scale: 60,000 real training images, the official 10,000 test images.

Needs the official IDX files: `apt-get install dataset-fashion-mnist` (they go to
/usr/share/datasets/fashion-mnist/). Three parts, each resumable (finished cells are skipped, a killed cell
reruns; SimCLR and the purifier resume from their checkpoints in the feature cache):

    python benchmarks/fmnist.py purify [--seeds 0 1 2] [--only symmetric-80 ...]   # (a) label accuracy
    python benchmarks/fmnist.py ab                                                  # (b) the A/B training grid
    python benchmarks/fmnist.py report                                              # -> benchmarks/results/fmnist.md

(a) For each noise setting (symmetric 20/50/80/90%, pairflip 45%, instance 40%) and seed, `configs/fmnist-purify.yaml`
with 1,000 trusted labels (100 per class): the label accuracy on the 59,000 untrusted training rows of the noisy
labels, trusted_only, knn_vote at its best k and views, cleanlab relabel and dmlp, all through the stage function
`dmlp purify` runs (`pipeline.purify_labels`), on one set of SimCLR features (seed 0) + raw pixels. Each cell runs
in one process (the data, the features and the knn comparison's neighbour lists are loaded or searched once);
peak RSS is the whole benchmark's. The accuracy estimate without true labels (5-fold CV over the trusted subset)
runs for the seeds in --estimate-seeds (default 0), beside the true accuracy.
(b) `dmlp bench configs/fmnist-bench.yaml --out runs/fmnist-ab`: ce, coteaching, elr, elr_plus, dividemix on the
noisy and on the purified labels at symmetric 50% and 80% and instance 40%, last-epoch test accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PURIFY_CONFIG = ROOT / "configs" / "fmnist-purify.yaml"
BENCH_CONFIG = ROOT / "configs" / "fmnist-bench.yaml"
SETTINGS = [("symmetric", 0.2), ("symmetric", 0.5), ("symmetric", 0.8), ("symmetric", 0.9), ("pairflip", 0.45),
            ("instance", 0.4)]
COLUMNS = ["noisy", "trusted_only", "knn_vote", "cleanlab", "dmlp"]
RESULTS = ROOT / "benchmarks" / "results"


def tag(kind: str, rate: float) -> str:
    return f"{kind}-{round(rate * 100)}"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_LOADED: dict = {}


def _data_and_views(cfg, built, device):
    """The data set and feature views, loaded once per process (every cell shares them, and the knn
    comparison's neighbour lists are then searched once: see dmlp_plugin.checks.knn.search)."""
    from dmlp_plugin.pipeline import load_data, make_views

    if not _LOADED:
        t = time.perf_counter()
        _LOADED["data"] = load_data(cfg)
        _LOADED["t_data"] = time.perf_counter() - t
        t = time.perf_counter()
        _LOADED["views"] = make_views(cfg, _LOADED["data"], device, built, progress=True)
        _LOADED["t_feat"] = time.perf_counter() - t
    return _LOADED["data"], _LOADED["views"], _LOADED["t_data"], _LOADED["t_feat"]


def run_cell(kind: str, rate: float, seed: int, out: Path, threads: int, overrides: list[str]) -> dict:
    """One (noise, seed) purification with every comparison, as `dmlp purify` computes it."""
    import torch

    from dmlp_plugin.atomic import write_json
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import purify_labels, resolve_device, validate

    torch.set_num_threads(threads)
    sets = [f"noise.kind={kind}", f"noise.rate={rate}", f"seed={seed}", "features.ssl.seed=0", *overrides]
    cfg, raw = load_config(str(PURIFY_CONFIG), sets)
    t0 = time.perf_counter()
    built = validate(cfg)
    device = resolve_device(cfg.device)
    data, views, t_data, t_feat = _data_and_views(cfg, built, device)
    rss_features = _peak_rss_mib()
    p = purify_labels(cfg, data, views, built, device, progress=False, raw=raw,
                      timings={"data": t_data, "features": t_feat})
    m = p.metrics
    row = {"noise": tag(kind, rate), "kind": kind, "rate": rate, "seed": seed, "threads": threads,
           "flip_rate": m["noise"]["flip_rate"], "trusted": m["trusted"]["size"],
           "noisy": m["label_accuracy_before"], "dmlp": m["label_accuracy_after"],
           "seconds": m["seconds"], "wall_seconds": time.perf_counter() - t0,
           "peak_rss_mib": _peak_rss_mib(), "peak_rss_after_features_mib": rss_features,
           "features": {k: v for k, v in m["features"].items() if k not in ("loss_history",)},
           "comparisons": {}, "estimated_accuracy": m.get("estimated_accuracy"),
           "dmlp_readout": m.get("preprocessor_info")}
    for name in COLUMNS[1:-1]:
        entry = m.get(name)
        if isinstance(entry, dict):
            row[name] = entry.get("label_accuracy_after")
            row["comparisons"][name] = {k: v for k, v in entry.items() if k not in ("by_k", "by_views_k")}
        else:
            row[name] = None
    write_json(out / "purify" / f"{row['noise']}-s{seed}.json", row)
    return row


def cmd_purify(args) -> None:
    out = Path(args.out)
    # seed-major: every noise setting of a seed before the next seed, so a partial run has whole seeds
    todo = [(k, r, s) for s in args.seeds for k, r in SETTINGS if not args.only or tag(k, r) in args.only]
    t_all = time.perf_counter()
    for i, (kind, rate, seed) in enumerate(todo, 1):
        done = out / "purify" / f"{tag(kind, rate)}-s{seed}.json"
        if done.exists():
            print(f"[{i}/{len(todo)}] {done.name}: done before, skipped", flush=True)
            continue
        t = time.perf_counter()
        extra = ["checks.estimate_compare=false"] if seed in args.estimate_seeds else ["checks.estimate_folds=0"]
        row = run_cell(kind, rate, seed, out, args.threads, [*extra, *args.overrides])
        spent = time.perf_counter() - t_all
        eta = spent / i * (len(todo) - i)
        print(f"[{i}/{len(todo)}] {tag(kind, rate)} s{seed}: noisy {row['noisy']:.4f} "
              + " ".join(f"{c} {row[c]:.4f}" for c in COLUMNS[1:] if row.get(c) is not None)
              + f" ({time.perf_counter() - t:.0f} s, peak {row['peak_rss_mib']:.0f} MiB; ETA {eta / 60:.0f} min)",
              flush=True)
    cmd_report(args)


def cmd_cell(args) -> None:
    run_cell(args.kind, args.rate, args.seed, Path(args.out), args.threads, args.overrides)


def cmd_ab(args) -> None:
    cmd = [sys.executable, "-m", "dmlp_plugin", "bench", str(BENCH_CONFIG), "--out", args.ab_out,
           *sum((["--set", s] for s in args.overrides), [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env)
    print(f"dmlp bench: exit {res.returncode} after {(time.perf_counter() - t) / 60:.1f} min", flush=True)
    if res.returncode == 0:
        cmd_report(args)
    sys.exit(res.returncode)


def _mean_std(vals):
    import numpy as np

    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals))


def _purify_table(out: Path) -> tuple[list[str], dict]:
    rows = [json.loads(p.read_text()) for p in sorted((out / "purify").glob("*.json"))]
    if not rows:
        return [], {}
    by = {}
    for r in rows:
        by.setdefault(r["noise"], []).append(r)
    lines = ["| noise | flip rate | seeds | " + " | ".join(COLUMNS) + " | dmlp >= every column, every seed? | "
             "dmlp estimated without truth (90% interval, seed 0) | dmlp s | peak RSS MiB |",
             "|---" * (len(COLUMNS) + 7) + "|"]
    summary = {}
    for kind, rate in SETTINGS:
        group = sorted(by.get(tag(kind, rate), []), key=lambda r: r["seed"])
        if not group:
            continue
        cells = []
        for c in COLUMNS:
            m, s = _mean_std(r.get(c) for r in group)
            cells.append("n/a" if m is None else f"{m:.4f} ± {s:.4f}")
        wins = [all(r["dmlp"] >= r[c] for c in COLUMNS[:-1] if r.get(c) is not None) for r in group]
        short = [f"s{r['seed']}: " + ", ".join(f"{c} {r[c]:.4f}" for c in COLUMNS[:-1]
                                             if r.get(c) is not None and r[c] > r["dmlp"])
                 for r, w in zip(group, wins) if not w]
        dmlp_s, _ = _mean_std(r["seconds"].get("purify") for r in group)
        peak = max(r["peak_rss_mib"] for r in group)
        flip, _ = _mean_std(r["flip_rate"] for r in group)
        est = next((r["estimated_accuracy"]["dmlp"] for r in group if (r.get("estimated_accuracy") or {}).get("dmlp")),
                   None)
        est_txt = "n/a" if est is None else f"{est['estimate']:.4f} [{est['low']:.4f}, {est['high']:.4f}]"
        lines.append(f"| {tag(kind, rate)} | {flip:.3f} | {','.join(str(r['seed']) for r in group)} | "
                     + " | ".join(cells) + f" | {'yes' if all(wins) else 'NO (' + '; '.join(short) + ')'} | "
                     f"{est_txt} | {dmlp_s:.1f} | {peak:.0f} |")
        summary[tag(kind, rate)] = {"rows": group, "dmlp_best_every_seed": all(wins)}
    return lines, summary


def _rel(path) -> str:
    """A path as the report shows it: relative to the repository when inside it (no machine's absolute paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def _partial_ab(ab_out: Path) -> list[str]:
    """The finished runs of a grid still under way (their result.json files), as a table: noise x method, the
    noisy and purified arms' last-epoch test accuracy and seconds."""
    import yaml

    done = {}
    for path in sorted((ab_out / "runs").glob("*/result.json")):
        r = json.loads(path.read_text())
        done[(r["noise_tag"], r["method_label"], r["labels"])] = r
    if not done:
        return []
    cfg = yaml.safe_load(BENCH_CONFIG.read_text())
    methods = [m.get("label", m["name"]) for m in cfg["methods"]]
    noises = [f"{n['kind']}-{round(n['rate'] * 100)}" for n in cfg["noise"]]
    total = len(methods) * len(noises) * len(cfg["arms"]) * len(cfg["seeds"])
    lines = [f"PARTIAL: {len(done)} of {total} runs finished (the grid resumes with the same command; seed "
             f"{cfg['seeds'][0]}). Last-epoch test accuracy on the official 10,000 test images (seconds of the run):", "",
             "| noise | method | noisy labels | purified labels | purified - noisy |", "|---|---|---|---|---|"]

    def cell(r):
        return "not run yet" if r is None else f"{r['test_accuracy']:.4f} ({r['seconds']:.0f} s)"

    for nz in noises:
        for m in methods:
            a, b = done.get((nz, m, "noisy")), done.get((nz, m, "purified"))
            if a is None and b is None:
                continue
            diff = f"{(b['test_accuracy'] - a['test_accuracy']) * 100:+.2f}" if a and b else "n/a"
            lines.append(f"| {nz} | {m} | {cell(a)} | {cell(b)} | {diff} |")
    return lines


def _ab_table(ab_out: Path) -> list[str]:
    report = ab_out / "report.md"
    if not report.exists():
        return _partial_ab(ab_out) or [f"(not run yet: `python benchmarks/fmnist.py ab` writes {_rel(ab_out)}/report.md)"]
    text = report.read_text().splitlines()
    return text


def cmd_report(args) -> None:
    from dmlp_plugin.atomic import write_json, write_text

    out = Path(args.out)
    lines, summary = _purify_table(out)
    feats = next(iter(summary.values()))["rows"][0]["features"] if summary else {}
    quality = feats.get("quality") or {}
    md = ["# Fashion-MNIST benchmark", "",
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; written "
          f"{time.strftime('%Y-%m-%d %H:%M')}. Data: the official Fashion-MNIST IDX files (Debian "
          f"`dataset-fashion-mnist`), 60,000 training images purified, the official 10,000 test images.", "",
          "## (a) Label accuracy on the untrusted training rows", "",
          "`python benchmarks/fmnist.py purify` (`configs/fmnist-purify.yaml`; 1,000 trusted labels, 100 per class, "
          "true labels; mean ± std over seeds; accuracy on the 59,000 rows outside the trusted subset). Every column "
          "sees the same features (SimCLR view + raw-pixel view), noisy labels and trusted labels; knn_vote's k and "
          "views are picked with the true labels (flatters it).", ""]
    md += lines or ["(not run yet)"]
    if summary:
        r0 = next(iter(summary.values()))["rows"][0]
        md += ["", f"Features: view 1 {feats.get('backbone')} SimCLR at {feats.get('image_size')} px, "
               f"{feats.get('epochs')} epochs ({feats.get('seconds', 0) / 60:.0f} min on this machine), dim "
               f"{feats.get('dims')}; view 2 {feats.get('view2', {}).get('source')}."]
        if quality:
            md += [f"Feature quality ({quality.get('metric')}): SSL {quality['ssl']:.4f}, raw pixels "
                   f"{quality['raw_pixels']:.4f}."]
        comps = r0.get("comparisons", {})
        md += ["", "Comparison settings of one cell (" + r0["noise"] + ", seed " + str(r0["seed"]) + "): "
               + "; ".join(f"{k}: " + json.dumps({a: b for a, b in v.items() if a != 'label_accuracy_after'},
                                                  default=str) for k, v in comps.items())]
    md += ["", "## (b) A/B training grid", "", "`python benchmarks/fmnist.py ab` = `dmlp bench configs/fmnist-bench.yaml "
           f"--out {_rel(args.ab_out)}`", ""] + _ab_table(Path(args.ab_out))
    for extra in ("fmnist_notes.md", "fmnist_published.md"):  # hand-written notes, then the published anchors
        if (RESULTS / extra).exists():
            md += ["", (RESULTS / extra).read_text().strip()]
    write_text(RESULTS / "fmnist.md", "\n".join(md) + "\n")
    write_json(RESULTS / "fmnist.json", {"purify": summary})
    print("\n".join(lines))
    print(f"wrote {RESULTS / 'fmnist.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("purify", "cell", "ab", "report"):
        p = sub.add_parser(name)
        p.add_argument("--out", default=str(ROOT / "runs" / "fmnist-bench"))
        p.add_argument("--ab-out", default=str(ROOT / "runs" / "fmnist-ab"))
        p.add_argument("--set", dest="overrides", action="append", default=[])
        p.add_argument("--threads", type=int, default=2)
        if name == "purify":
            p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
            p.add_argument("--only", nargs="*", default=None, help="noise tags, e.g. symmetric-80 instance-40")
            p.add_argument("--estimate-seeds", type=int, nargs="*", default=[0],
                           help="seeds whose cells also estimate the accuracy without true labels (K more runs)")
        if name == "cell":
            p.add_argument("--kind", required=True)
            p.add_argument("--rate", type=float, required=True)
            p.add_argument("--seed", type=int, required=True)
    args = ap.parse_args()
    {"purify": cmd_purify, "cell": cmd_cell, "ab": cmd_ab, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
