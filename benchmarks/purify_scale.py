"""Clothing1M size on this machine: the whole ``dmlp purify`` (neighbour checks + DMLP + the kNN comparison)
on N x 512 synthetic features, N = 100k ... 1M, 14 classes, symmetric 40% noise (Clothing1M's estimated
rate), 2% trusted, the features memory-mapped from a .npy file (a user's own features: features.source npy,
second_view same, as the authors' script). Each run is a fresh ``dmlp purify`` subprocess (under torchrun for 2
processes); its metrics.json gives the seconds and peak memory of each stage (data, features, checks,
purify, compare) and the recall of each approximate neighbour index against exact search.

    python benchmarks/purify_scale.py [--sizes 1000000 250000 500000] [--exact-at 100000] [--two-at 100000]
        [--dir runs/purify_scale] [--recall-sample 10000] [--report]

The features are synthetic (``benchmarks.synthetic.latent_features`` with ``DATA``): 14 classes x 4 blobs x 40
tight clusters in a 32-d latent space through a random ReLU layer to 512-d, 10% of the true labels drawn at
random (overlapping classes; kNN vote ~0.90 at 100k rows). ``--exact-at N`` also runs N rows with the IVF index forced and with exact search (the approximate index's
kNN-vote accuracy against exact search's, and the per-row cost that 1M is compared with); ``--two-at N`` runs
N rows on 2 processes (torchrun, IVF) and compares its hard labels with the 1-process IVF run's. Resumable: each (N, processes, kind) run is kept in
``--dir``/cells/ and skipped when done. Writes benchmarks/results/purify_scale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
# the generator's settings (benchmarks.synthetic.latent_features): 14 classes x 4 blobs x 40 tight clusters in 32
# latent dimensions, 10% of true labels drawn at random (overlapping classes): kNN on these labels ~0.90
DATA = {"micro": 40, "micro_spread": 0.5, "purity": 0.9}


def prepare(n: int, folder: Path) -> tuple[Path, Path]:
    from benchmarks.synthetic import latent_features

    x_path, y_path = folder / f"x-{n}-m40.npy", folder / f"y-{n}-m40.npy"
    if not y_path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        y = latent_features(folder / f"x-{n}-m40.partial.npy", n, 512, 14, seed=0, **DATA)
        os.replace(folder / f"x-{n}-m40.partial.npy", x_path)
        np.save(y_path, y)
    return x_path, y_path


def config(n: int, x_path: Path, y_path: Path, folder: Path, kind: str, recall_sample: int) -> Path:
    index = {"recall_sample": recall_sample, **({} if kind == "auto" else {"kind": kind})}
    text = f"""seed: 0
threads: auto
dataset: {{name: npy, params: {{labels: {y_path}}}}}
noise: {{kind: symmetric, rate: 0.4, include_true_class: true}}
trusted: {{source: clean_sample, size: 0.02}}
features: {{source: npy, path: {x_path}, second_view: same, cache_dir: {folder / 'cache'}}}
preprocessor: {{name: dmlp, params: {{epochs: 10}}}}
checks: {{k: 10, compare: [knn_vote], estimate_folds: 0, index: {json.dumps(index)}}}
"""
    p = folder / f"config-{n}-{kind}.yaml"
    p.write_text(text)
    return p


def run_cell(n: int, procs: int, kind: str, folder: Path, recall_sample: int) -> dict:
    cell = folder / "cells" / f"n{n}-p{procs}-{kind}.json"
    if cell.exists():
        return json.loads(cell.read_text())
    x_path, y_path = prepare(n, folder)
    cfg = config(n, x_path, y_path, folder, kind, recall_sample)
    out = folder / f"out-n{n}-p{procs}-{kind}"
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={procs}"]
    cmd = ["/usr/bin/time", "-f", "TIME %e %M", *launcher, "-m", "dmlp_plugin", "purify", str(cfg),
           "--out", str(out), "--no-progress", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("OMP_NUM_THREADS", None)  # threads: auto (2 for one process, 1 each for two)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"n={n} procs={procs} kind={kind} failed:\n{r.stderr[-3000:]}")
    tline = [line for line in r.stderr.splitlines() if line.startswith("TIME ")][-1].split()
    m = json.loads((out / "metrics.json").read_text())
    res = {"n": n, "processes": procs, "kind": kind, "wall_s": round(wall, 1), "max_rss_mib": int(tline[2]) // 1024,
           "feature_file_mib": round(x_path.stat().st_size / 2**20), "seconds": m["seconds"],
           "peak_rss_mib": m.get("peak_rss_mib"), "neighbour_index": m["neighbour_index"],
           "label_accuracy_before": m["label_accuracy_before"], "label_accuracy_after": m["label_accuracy_after"],
           "knn_vote": {k: m["knn_vote"][k] for k in ("label_accuracy_after", "k", "views", "search_seconds")},
           "hard_sha1": __import__("hashlib").sha1(np.load(out / "labels.npz")["hard"].tobytes()).hexdigest()}
    cell.parent.mkdir(parents=True, exist_ok=True)
    cell.write_text(json.dumps(res, indent=1))
    return res


def report(cells: list[dict]) -> str:
    lines = [f"# benchmarks/purify_scale.py ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores)", "",
             "Synthetic N x 512 features (latent 32-d blobs of tight clusters through a random ReLU layer), 14 classes, symmetric 40% "
             "noise, 2% trusted, features memory-mapped; `dmlp purify` with DMLP (10 epochs), checks.compare "
             "[knn_vote] (k grid auto, up to 400), no accuracy estimate (estimate_folds 0). Peak RSS: the "
             "largest process's (GNU time); 'beyond mapped' = the stage's high-water mark minus its file pages.", "",
             "| N | procs | search | wall s | data+features s | checks s | purify s | kNN comparison s | peak RSS MiB | "
             "peak beyond mapped MiB (purify / compare) | recall@10 | DMLP acc | kNN acc | s per 1k rows | "
             "hard labels = 1 process |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    one = {(c["n"], c["kind"]): c["hard_sha1"] for c in cells if c["processes"] == 1}
    for c in cells:
        same = "-" if c["processes"] == 1 or (c["n"], c["kind"]) not in one else \
            ("yes" if one[(c["n"], c["kind"])] == c["hard_sha1"] else "NO")
        s, p = c["seconds"], c.get("peak_rss_mib") or {}
        recalls = [r.get("recall_at_10") for r in c["neighbour_index"]["indexes"] if not r.get("reused")]
        rec = ", ".join(f"{v:.3f}" for v in recalls if v is not None) or "exact"
        kind = c["neighbour_index"]["kind"]
        beyond = " / ".join(str((p.get(k) or {}).get("beyond_mapped_mib", "-")) for k in ("purify", "compare"))
        lines.append(f"| {c['n']:,} | {c['processes']} | {kind} | {c['wall_s']:.0f} | "
                     f"{s.get('data', 0) + s.get('features', 0):.0f} | {s.get('checks', 0):.0f} | {s['purify']:.0f} | "
                     f"{s.get('compare_knn_vote', 0):.0f} | {c['max_rss_mib']:,} | {beyond} | {rec} | "
                     f"{c['label_accuracy_after']:.4f} | {c['knn_vote']['label_accuracy_after']:.4f} "
                     f"(k {c['knn_vote']['k']}) | {1000 * c['wall_s'] / c['n']:.2f} | {same} |")
    return "\n".join(lines + ["", NOTES]) + "\n"


NOTES = """## Reading the table (measured 2026-12-02, AMD EPYC, 2 cores, nothing else running unless said)

- **1,000,000 x 512: 1,332 s** for the whole `dmlp purify` (target 30 min: met), 8,749 MiB peak beyond the
  mapped features in the kNN comparison and 7,128 in the purifier (target 12 GB: met; 11,110 MiB with the
  features' pages). The approximate indexes' recall@10 against exact search on 10,000 queries: 0.9996 (DMLP's
  readout, 128-d) and 0.9999 (the kNN vote, 512-d) (target 0.95: met, on THIS generator, see below).
- **Time per row at 1M is 1.60x that at 100k (IVF forced there): the 1.5x target FAILS.** The cells grow as
  sqrt(N) (nlist auto = 2 sqrt(N)), so each query's candidates (nprobe x cell size) grow too: 2,500 at 100k,
  7,100 at 1M; the top-k over them dominates. Next: a constant cell size (nlist ~ N / 250; the quantizer's
  O(N nlist d) assignment is then quadratic but small, ~30 s at 1M).
- At 100k the IVF index costs the kNN vote 0.20 points (0.9052 vs 0.9072 exact) and DMLP 0.21 (0.9022 vs
  0.9043): target 0.5 points, met. 2 processes (torchrun, each 1 thread) give the same hard labels as one.
  The 0.868 recall at 100k is the trusted-separability check's own index over 2,000 trusted rows (IVF forced
  on a tiny set; under `auto` it is exact).
- The generator matters. These rows are tight clusters (40 per blob, like photos of one product); on blobs
  WITHOUT that structure (32-d Gaussian blobs, std 1.2, no micro-clusters) the same index at 1M x 512 reached
  recall@10 0.71 (nprobe 16), 0.86 (32), 0.89 (48), with the k = 400 search taking ~7 / 10 / 13 min (one core
  busy elsewhere). Real features sit between: Fashion-MNIST's 60,000 rows (nlist 490), SimCLR 96-d: recall@10
  0.899 / 0.965 / 0.991 at nprobe 8 / 16 / 32; raw pixels 784-d: 0.883 / 0.955 / 0.985. The recall of every run
  is in its metrics.json (`neighbour_index`), so a user sees when to raise `checks.index.nprobe`.
- Why batched by cell, not faiss's IndexIVFFlat search: measured at 1M x 512 (nlist 4000, nprobe 16), faiss
  scans ~4.4 GFLOP/s per query batch here (memory-bound), ~15 min for 1M queries; one matrix product per cell
  runs at BLAS speed. faiss supplies the k-means and the exact searches.
- Not measured yet: 2 processes at 250k-1M; the GPU path (the cell products on CUDA; `benchmarks/gpu_check.py`
  checks it when a GPU is lent); the default `second_view: random_relu` (2,048-d) at 1M: not run; its estimate
  (views concatenated 10 GB + their index 10 GB + lists 4.8 GB) is over this machine's memory, so
  `check_memory` would refuse it before the purifier, but only after the 8 GB view is made.
- The 100k exact and 100k 2-process rows ran while the test suite used one core: their seconds are upper bounds.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[1_000_000, 250_000, 500_000])
    ap.add_argument("--exact-at", type=int, nargs="*", default=[100_000])
    ap.add_argument("--two-at", type=int, nargs="*", default=[100_000], help="also 2 processes (torchrun), ivf")
    ap.add_argument("--dir", default=str(ROOT / "runs" / "purify_scale"))
    ap.add_argument("--recall-sample", type=int, default=10_000)
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the cells done")
    a = ap.parse_args()
    folder = Path(a.dir)
    plan = [(n, 1, "auto") for n in a.sizes]
    plan += [(n, 1, kind) for n in a.exact_at for kind in ("ivf", "exact")]
    plan += [(n, 2, "ivf") for n in a.two_at]
    plan = sorted(set(plan), key=plan.index)
    cells = []
    for n, p, kind in plan:
        cell = folder / "cells" / f"n{n}-p{p}-{kind}.json"
        if a.report and not cell.exists():
            continue
        print(f"n={n:,} processes={p} search={kind} ...", flush=True)
        cells.append(run_cell(n, p, kind, folder, a.recall_sample))
        print(json.dumps({k: cells[-1][k] for k in ("wall_s", "max_rss_mib", "label_accuracy_after")}), flush=True)
    text = report(cells)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "purify_scale.md").write_text(text)
    (RESULTS / "purify_scale.json").write_text(json.dumps(cells, indent=1))
    print(text)


if __name__ == "__main__":
    main()
