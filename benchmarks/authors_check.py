"""Our ``DMLPConfig.authors()`` side by side with the authors' released script, on the same inputs.

Cases (label accuracy on the untrusted rows):
- ``digits_sym80``: the SSL features of scikit-learn's digits (``configs/purify-digits.yaml``, cached in
  .dmlp_cache/), symmetric 80% noise, its trusted subset (3%, seed 0); the same features for both views, as
  the script loads one file twice;
- ``synth50`` / ``synth80``: 20,000 x 128 synthetic clusters (10 classes, 2 modes each, spread 1.2; the
  generator and set of ``benchmarks/synthetic.py`` / ``purify_speed.py``), symmetric 50% / 80% noise, 1,000
  trusted rows drawn at random (not class-balanced, as the script draws them);
- ``synth50_hard`` / ``synth80_hard``: the same with spread 2.5 (overlapping classes: a logistic regression on
  10,000 clean rows reaches 0.92 on the other 10,000), where the purifiers do not saturate.

    python benchmarks/authors_check.py --dump DIR            # write each case's inputs as .npy under DIR/<case>/
    python benchmarks/authors_check.py --inputs DIR [--seeds 0 1] [--cases ...]

``DIR/<case>/`` holds ``features.npy`` (N, d) float32, ``noisy.npy``, ``truth.npy`` (N,) int64,
``meta_idx.npy``, ``meta_labels.npy`` (M,) int64. The released script (not part of this repository; run it
patched to read these files) is compared when its labels are there: ``DIR/<case>/ref_labels*.npy`` (N,)
(its final labels: argmax of the two views' label matrices averaged) and ``ref_eac*.npy`` (its EAC heads'
ensemble); ``--ref NAME`` picks another file name pattern. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("digits_sym80", "synth50", "synth80", "synth50_hard", "synth80_hard")


def dump(out: Path) -> None:
    """Write the inputs of every case under ``out``."""
    from benchmarks.synthetic import clustered_features, symmetric_noise
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data, make_noisy, make_views, select_trusted, validate

    def save(case: str, x, noisy, truth, meta_idx, meta_labels) -> None:
        d = out / case
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "features.npy", np.ascontiguousarray(x, dtype=np.float32))
        for name, a in (("noisy", noisy), ("truth", truth), ("meta_idx", meta_idx), ("meta_labels", meta_labels)):
            np.save(d / f"{name}.npy", np.asarray(a, dtype=np.int64))
        rest = np.setdiff1d(np.arange(len(truth)), meta_idx)
        print(f"{case}: N={len(truth)} d={x.shape[1]} trusted={len(meta_idx)} "
              f"noisy accuracy (untrusted)={np.mean(noisy[rest] == truth[rest]):.4f}")

    cfg0, _ = load_config(ROOT / "configs" / "purify-digits.yaml", [])
    cfg = dataclasses.replace(cfg0, device="cpu", noise=dataclasses.replace(cfg0.noise, kind="symmetric", rate=0.8))
    built = validate(cfg)
    data = load_data(cfg)
    truth, c = data.train.labels, data.train.num_classes
    views = make_views(cfg, data, "cpu", built, progress=False)
    noisy = make_noisy(cfg, data)[0].labels
    meta_idx, meta_labels = select_trusted(cfg, noisy, truth, c, views.arrays[0])
    save("digits_sym80", views.arrays[0], noisy, truth, meta_idx, meta_labels)

    for spread, tag in ((1.2, ""), (2.5, "_hard")):
        x, y = clustered_features(20000, 128, 10, spread=spread, seed=0, modes_per_class=2)
        meta = np.sort(np.random.default_rng(2).choice(len(y), 1000, replace=False))
        for rate in (0.5, 0.8):
            save(f"synth{round(rate * 100)}{tag}", x, symmetric_noise(y, rate, 10, seed=1), y, meta, y[meta])


def _ref_accuracy(d: Path, pattern: str, truth, rest) -> list[float]:
    """Accuracies of the reference's saved label files matching ``pattern`` (one per run/seed)."""
    return [float(np.mean(np.load(f)[rest] == truth[rest])) for f in sorted(glob.glob(str(d / pattern)))]


def run(inputs: Path, cases: list[str], seeds: list[int], ref: str, ref_eac: str) -> str:
    from dmlp_plugin.purifier.dmlp import DMLPConfig, purify

    lines = ["| case | N | noisy | released script: labels | released script: EAC heads | ours: authors() | "
             "difference (ours - script labels) | ours: seconds |", "|---" * 8 + "|"]
    for case in cases:
        d = inputs / case
        x = np.load(d / "features.npy")
        noisy, truth = np.load(d / "noisy.npy"), np.load(d / "truth.npy")
        meta_idx, meta_labels = np.load(d / "meta_idx.npy"), np.load(d / "meta_labels.npy")
        rest = np.setdiff1d(np.arange(len(truth)), meta_idx)
        c = int(max(truth.max(), noisy.max())) + 1
        ours, secs = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            res = purify([x, x], noisy, meta_idx, meta_labels, c, dataclasses.replace(DMLPConfig.authors(), seed=seed),
                         progress=False)
            secs.append(time.perf_counter() - t0)
            ours.append(float(np.mean(res.hard[rest] == truth[rest])))
            print(f"{case} seed {seed}: ours {ours[-1]:.4f} ({secs[-1]:.0f} s)", file=sys.stderr)
        refs, eacs = _ref_accuracy(d, ref, truth, rest), _ref_accuracy(d, ref_eac, truth, rest)

        def fmt(v: list[float]) -> str:
            if not v:
                return "-"
            return f"{np.mean(v):.4f}" + (f" ± {np.std(v):.4f} ({len(v)} runs)" if len(v) > 1 else "")

        diff = f"{np.mean(ours) - np.mean(refs):+.4f}" if refs else "-"
        noisy_acc = np.mean(noisy[rest] == truth[rest])
        lines.append(f"| {case} | {len(truth)} | {noisy_acc:.4f} | {fmt(refs)} | {fmt(eacs)} | {fmt(ours)} | {diff} | "
                     f"{np.mean(secs):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", type=Path, metavar="DIR", help="write the cases' inputs under DIR and stop")
    ap.add_argument("--inputs", type=Path, metavar="DIR", help="the dumped inputs (and the reference's labels)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--ref", default="ref_labels*.npy", help="file pattern of the reference's labels in DIR/<case>/")
    ap.add_argument("--ref-eac", default="ref_eac*.npy", help="file pattern of the reference's EAC-head labels")
    args = ap.parse_args()
    if args.dump:
        dump(args.dump)
        return
    if not args.inputs:
        ap.error("give --dump DIR or --inputs DIR")
    print(run(args.inputs, args.cases, args.seeds, args.ref, args.ref_eac))


if __name__ == "__main__":
    main()
