"""How much better do the labels get? DMLP against the comparisons a user sees, on SSL, pixel and tabular features.

Cases (label accuracy on the untrusted training samples; trusted subset: 3% of the training set,
class-balanced, true labels, at least 2 per class):

- ``digits``: configs/purify-digits.yaml as it is (view 1: SimCLR features, view 2: raw pixels), noise
  symmetric 20/50/80/90% and asymmetric 40%;
- ``mnist5k_ssl``: the 4,000 mnist5k training images (28x28) with configs/purify-digits.yaml's SimCLR recipe at
  28 px (view 1: SimCLR features, view 2: raw pixels), noise symmetric 40% and pairflip 40%;
- ``mnist5k_raw``: the same images as raw L2-normalised pixels, brought as an own ``.npy``
  (``features.source: npy``, view 2 ``random_relu``), the same noise;
- ``breast_cancer`` and ``wine``: scikit-learn's tables, standardised, as own ``.npy`` files with a labels-only
  data set (``dataset.name: npy``, ``dataset.params: {labels: y.npy}``, view 2 ``random_relu``), the same noise.

Every row runs :func:`dmlp_plugin.pipeline.purify_labels`, so the comparisons are the ones ``dmlp purify``
reports: the noisy labels, ``trusted_only``, ``knn_vote`` at its best k AND view set (chosen with the true
labels, which flatters it), ``cleanlab``, and ``dmlp`` with its defaults. The table marks the rows where dmlp
is below the best comparison and by how much. The readout ablation re-reads the SAME trained purifier (no
retraining: the benchmark wraps ``dmlp._readout`` to keep the final state) with the neighbour readout off
(``neighbour_ks: [0]``, the readout before it existed), with one kind of neighbour vote, and without
sharpening. ``--ablation`` adds the older digits ablation (IPC/EAC alone, one view, ridge, paper's readout,
authors' settings; each retrains).

    python benchmarks/purify_quality.py [--cases digits mnist5k_ssl mnist5k_raw breast_cancer wine] [--seeds 0 1 2]
                                        [--ablation] [--out benchmarks/results/purify_quality]
    python benchmarks/purify_quality.py --report benchmarks/results/purify_quality   # re-render the .md

Features are computed once (SSL features are cached in .dmlp_cache/, the .npy cases are written to
.dmlp_cache/purify_quality/). The label-accuracy estimate without true labels (``checks.estimate_folds``, K
more runs of everything) is turned off: it is no comparison. Prints Markdown; ``--out PREFIX`` also writes
PREFIX.md and PREFIX.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIGITS_SETTINGS = [("symmetric", 0.2), ("symmetric", 0.5), ("symmetric", 0.8), ("symmetric", 0.9),
                   ("asymmetric", 0.4)]
OWN_SETTINGS = [("symmetric", 0.4), ("pairflip", 0.4)]
CASES = ("digits", "mnist5k_ssl", "mnist5k_raw", "breast_cancer", "wine")
COMPARISONS = ["noisy", "trusted_only", "knn_vote", "cleanlab"]
AUTO_FOLDS = 5  # `preprocessor: auto` estimates every candidate by 5-fold CV over the trusted subset
# dmlp on digits before the neighbour readout (benchmarks/results/purify_quality.md of 2026-11-25)
DIGITS_BEFORE = {"symmetric 0.2": 0.9835, "symmetric 0.5": 0.9771, "symmetric 0.8": 0.9573, "symmetric 0.9": 0.9489,
                 "asymmetric 0.4": 0.9959}
READOUT_ABLATIONS = {
    "heads only (neighbour_ks [0]: the readout before)": {"neighbour_ks": (0,)},
    "posterior votes only": {"neighbour_votes": ("posterior",)},
    "label votes only": {"neighbour_votes": ("labels",)},
    "no sharpening (neighbour_powers [1])": {"neighbour_powers": (1.0,)},
}


def _own_case(name: str, cache: Path) -> dict:
    """The raw config of an own-features case; writes its .npy files into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    common = {"seed": 0, "device": "cpu", "noise": {"kind": "symmetric", "rate": 0.4},
              "preprocessor": {"name": "dmlp", "params": {"epochs": 60}},
              "checks": {"k": 10, "compare": ["knn_vote", "trusted_only", "cleanlab"], "estimate_folds": 0}}
    if name == "mnist5k_raw":
        from dmlp_plugin.data.datasets import load_mnist5k

        train = load_mnist5k().train
        x = train.images.reshape(len(train), -1).astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        np.save(cache / "mnist5k_raw_pixels.npy", x)
        n, c = len(train), train.num_classes
        return {**common, "dataset": {"name": "mnist5k"},
                "trusted": {"source": "clean_sample", "size": max(round(0.03 * n), 2 * c), "balanced": True},
                "features": {"source": "npy", "path": str(cache / "mnist5k_raw_pixels.npy"),
                             "second_view": "random_relu"}}
    from sklearn.datasets import load_breast_cancer, load_wine
    from sklearn.preprocessing import StandardScaler

    bunch = {"breast_cancer": load_breast_cancer, "wine": load_wine}[name]()
    x = StandardScaler().fit_transform(bunch.data).astype(np.float32)
    y = bunch.target.astype(np.int64)
    np.save(cache / f"{name}_x.npy", x)
    np.save(cache / f"{name}_y.npy", y)
    n, c = len(y), int(y.max()) + 1
    return {**common, "dataset": {"name": "npy", "params": {"labels": str(cache / f"{name}_y.npy")}},
            "trusted": {"source": "clean_sample", "size": max(round(0.03 * n), 2 * c), "balanced": True},
            "features": {"source": "npy", "path": str(cache / f"{name}_x.npy"), "second_view": "random_relu"}}


class _KeepReadout:
    """Wraps ``dmlp._readout`` while a purifier runs and keeps the arguments of its last neighbour readout (the
    final state), so readout variants can be scored on the same trained purifier."""

    def __init__(self):
        from dmlp_plugin.purifier import dmlp as D

        self.D, self.orig, self.args = D, D._readout, None

    def __enter__(self):
        def spy(*args, **kw):
            if self.args is None and (args[7:8] or [kw.get("graph")])[0] is not None:
                self.args = args  # the first purifier run (the one scored)
            return self.orig(*args, **kw)

        self.D._readout = spy
        return self

    def __exit__(self, *exc):
        self.D._readout = self.orig

    def accuracy(self, over: dict, truth, rest, meta_idx, meta_labels) -> float | None:
        if self.args is None:
            return None
        state, cfg, *rest_args = self.args
        import torch

        with torch.no_grad():
            soft, _ = self.orig(state, dataclasses.replace(cfg, **over), *rest_args)
        hard = soft.argmax(1).cpu().numpy()
        hard[meta_idx] = meta_labels
        return float(np.mean(hard[rest] == truth[rest]))


def run_case(case: str, seeds: list[int], device: str, log, auto: bool = True) -> dict:
    from dmlp_plugin.config import PreprocessorConfig, PurifyConfig, from_mapping, load_config
    from dmlp_plugin.pipeline import load_data, make_views, purify_labels, validate

    if case == "digits":
        cfg0, _ = load_config(ROOT / "configs" / "purify-digits.yaml", ["checks.estimate_folds=0"])
        settings = DIGITS_SETTINGS
    elif case == "mnist5k_ssl":
        cfg0, _ = load_config(ROOT / "configs" / "purify-digits.yaml", [
            "checks.estimate_folds=0", "dataset.name=mnist5k", "features.ssl.image_size=28", "checks.vote_ks=auto"])
        settings = OWN_SETTINGS
    else:
        cfg0 = from_mapping(PurifyConfig, _own_case(case, ROOT / ".dmlp_cache" / "purify_quality"))
        settings = OWN_SETTINGS
    built = validate(cfg0)
    data = load_data(cfg0)
    truth = data.train.labels
    out = {"settings": {}, "n": int(len(truth)), "classes": int(data.train.num_classes)}
    for kind, rate in settings:
        per_seed = []
        for seed in seeds:
            cfg = dataclasses.replace(cfg0, seed=seed, noise=dataclasses.replace(cfg0.noise, kind=kind, rate=rate))
            views = make_views(cfg, data, device, built, progress=False)
            out["features"] = views.provenance
            run_cfg, run_built = cfg, built
            if auto:  # one run: auto runs dmlp (the incumbent, first: the readout spy keeps its run) and the others
                run_cfg = dataclasses.replace(
                    cfg, preprocessor=PreprocessorConfig("auto", {"dmlp": dict(cfg.preprocessor.params)}),
                    checks=dataclasses.replace(cfg.checks, estimate_folds=AUTO_FOLDS))
                run_built = validate(run_cfg)
            with _KeepReadout() as keep:
                p = purify_labels(run_cfg, data, views, run_built, device, progress=False)
            m = p.metrics
            meta_idx, meta_labels = p.artifact.meta_indices, p.artifact.meta_labels
            rest = np.setdiff1d(np.arange(len(truth)), meta_idx)
            knn = m["knn_vote"]
            dm = p.result.candidates["dmlp"][1] if auto else p.result
            info = dm.info
            row = {"noisy": m["label_accuracy_before"], "trusted_only": m["trusted_only"]["label_accuracy_after"],
                   "knn_vote": knn["label_accuracy_after"], "knn_vote_setting": f"k {knn['k']}, views {knn['views']}",
                   "cleanlab": m["cleanlab"]["label_accuracy_after"],
                   "dmlp": float(np.mean(dm.hard[rest] == truth[rest])),
                   "dmlp_seconds": (m["auto"]["candidates"]["dmlp"]["seconds"]["run"] if auto
                                    else m["seconds"]["purify"]), "trusted": int(meta_idx.size),
                   "readout": {k: info.get(k) for k in ("neighbour_vote", "neighbour_k", "neighbour_power")},
                   "ablation": {name: keep.accuracy(over, truth, rest, meta_idx, meta_labels)
                                for name, over in READOUT_ABLATIONS.items()}}
            if auto:
                row["auto"] = m["label_accuracy_after"]
                row["auto_chose"] = m["auto"]["chosen"]
                row["auto_seconds"] = m["seconds"]["purify"] + m["seconds"].get("estimate", 0.0)
            per_seed.append(row)
            log(f"  {case} {kind} {rate} seed {seed}: dmlp {row['dmlp']:.4f} knn {row['knn_vote']:.4f} "
                f"cleanlab {row['cleanlab']:.4f} readout {row['readout']} ({row['dmlp_seconds']:.1f} s)"
                + (f"; auto {row['auto']:.4f} chose {row['auto_chose']} ({row['auto_seconds']:.1f} s)" if auto else ""))
        cols = COMPARISONS + ["dmlp", "dmlp_seconds"] + (["auto", "auto_seconds"] if auto else [])
        mean = {k: float(np.mean([r[k] for r in per_seed])) for k in cols}
        std = {k: float(np.std([r[k] for r in per_seed])) for k in cols}
        best = max(COMPARISONS, key=lambda k: mean[k])
        abl = {name: float(np.mean([r["ablation"][name] for r in per_seed])) for name in READOUT_ABLATIONS}
        out["settings"][f"{kind} {rate}"] = {
            "mean": mean, "std": std, "best_comparison": best, "margin": mean["dmlp"] - mean[best],
            "dmlp_best_every_seed": all(r["dmlp"] >= max(r[k] for k in COMPARISONS) for r in per_seed),
            "ablation": abl, "per_seed": per_seed}
        if auto:
            out["settings"][f"{kind} {rate}"]["auto_margin"] = mean["auto"] - max(mean[k] for k in COMPARISONS + ["dmlp"])
    return out


def legacy_ablation(seeds: list[int], device: str) -> dict:
    """The older digits ablation (each variant retrains): {variant: {setting: mean accuracy}}."""
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data, make_noisy, make_views, select_trusted, validate
    from dmlp_plugin.purifier import dmlp as D

    cfg0, _ = load_config(ROOT / "configs" / "purify-digits.yaml", [])
    built = validate(cfg0)
    data = load_data(cfg0)
    truth, c = data.train.labels, data.train.num_classes
    views = make_views(cfg0, data, device, built, progress=False)
    base = D.DMLPConfig(**{f.name: getattr(built["preprocessor"], f.name) for f in dataclasses.fields(D.DMLPConfig)})
    variants = {
        "both (default)": (base, None), "IPC only": (dataclasses.replace(base, use_eac=False), None),
        "EAC only": (dataclasses.replace(base, use_ipc=False), None),
        "one view (same features twice)": (base, "same"), "ridge 0": (dataclasses.replace(base, ridge=0.0), None),
        "paper's readout (label matrices)": (dataclasses.replace(base, readout="labels"), None),
        "posterior as exchange target": (dataclasses.replace(base, eac_target="posterior"), None),
        "authors' released algorithm (doubled softmax, its exchange timing and readout)": (D.DMLPConfig.authors(),
                                                                                          "same")}
    out = {name: {} for name in variants}
    for kind, rate in [("symmetric", 0.5), ("symmetric", 0.8)]:
        accs = {name: [] for name in variants}
        for seed in seeds:
            cfg = dataclasses.replace(cfg0, seed=seed, noise=dataclasses.replace(cfg0.noise, kind=kind, rate=rate))
            noisy = make_noisy(cfg, data)[0].labels
            meta_idx, meta_labels = select_trusted(cfg, noisy, truth, c, views.arrays[0])
            rest = np.setdiff1d(np.arange(len(noisy)), meta_idx)
            for name, (variant, vw) in variants.items():
                arrays = [views.arrays[0], views.arrays[0]] if vw == "same" else views.arrays
                res = D.purify(arrays, noisy, meta_idx, meta_labels, c, dataclasses.replace(variant, seed=seed),
                               device=device, progress=False)
                accs[name].append(float(np.mean(res.hard[rest] == truth[rest])))
        for name in variants:
            out[name][f"{kind} {rate}"] = float(np.mean(accs[name]))
    return out


def markdown(results: dict, command: str) -> str:
    lines = [f"# benchmarks/purify_quality.py: DMLP against the comparisons of `dmlp purify`", "",
             f"Command: `{command}` ({results['date']}, {results['machine']}; seeds {results['seeds']}). Label "
             f"accuracy on the untrusted training samples, mean ± std over the seeds; trusted subset 3% of the "
             f"training set, class-balanced, >= 2 per class, true labels. knn_vote: its best k AND view set per "
             f"seed, chosen with the true labels (flatters it); cleanlab: confident learning on out-of-fold "
             f"logistic regression of the views concatenated. margin: dmlp minus the best comparison (means).", ""]
    for case, res in results["cases"].items():
        feats = res.get("features", {})
        path = feats.get("path")
        where = f" `{Path(path).relative_to(ROOT) if Path(path).is_relative_to(ROOT) else path}`" if path else ""
        lines.append(f"- **{case}** ({res['n']} training rows, {res['classes']} classes): features "
                     f"{feats.get('source')}{where}, dims {feats.get('dims')}; view 2: "
                     f"{feats.get('view2', {}).get('source')}")
    has_auto = all("auto_margin" in r for res in results["cases"].values() for r in res["settings"].values())
    lines += ["", "| data | noise | trusted | noisy | trusted_only | knn_vote (best k, views) | cleanlab | dmlp "
              "| margin | dmlp readout picks (vote, k, power) | dmlp s |"
              + (" auto (picks) | auto - best | auto s |" if has_auto else ""), "|---" * (14 if has_auto else 11) + "|"]
    margins, auto_margins = [], []
    for case, res in results["cases"].items():
        for setting, r in res["settings"].items():
            m, s = r["mean"], r["std"]
            knn_set = "; ".join(sorted({p["knn_vote_setting"] for p in r["per_seed"]}))
            picks = "; ".join(f"{p['readout']['neighbour_vote']} {p['readout']['neighbour_k']} "
                              f"{p['readout']['neighbour_power']:g}" for p in r["per_seed"])
            margin = r["margin"]
            margins.append((case, setting, margin, r["best_comparison"]))
            flag = "" if margin >= 0 else " **LOSES**"
            lines.append(f"| {case} | {setting} | {r['per_seed'][0]['trusted']} | "
                         + " | ".join(f"{m[k]:.4f}±{s[k]:.4f}" for k in ("noisy", "trusted_only")) + " | "
                         + f"{m['knn_vote']:.4f}±{s['knn_vote']:.4f} ({knn_set}) | "
                         + f"{m['cleanlab']:.4f}±{s['cleanlab']:.4f} | "
                         + f"{m['dmlp']:.4f}±{s['dmlp']:.4f} | {margin * 100:+.2f}{flag} | {picks} | "
                         + f"{m['dmlp_seconds']:.1f} |"
                         + (f" {m['auto']:.4f}±{s['auto']:.4f} ({', '.join(p['auto_chose'] for p in r['per_seed'])}) | "
                            f"{r['auto_margin'] * 100:+.2f} | {m['auto_seconds']:.1f} |" if has_auto else ""))
            if has_auto:
                auto_margins.append((case, setting, r["auto_margin"]))
    won = sum(mg >= 0 for _, _, mg, _ in margins)
    worst = min(margins, key=lambda t: t[2])
    lines += ["", f"dmlp >= every comparison in {won} of {len(margins)} rows ({100 * won / len(margins):.0f}%); "
              f"worst margin {worst[2] * 100:+.2f} points ({worst[0]} {worst[1]}, best comparison {worst[3]})."]
    losers = [f"{c} {s} ({mg * 100:+.2f} vs {b})" for c, s, mg, b in margins if mg < 0]
    lines.append("Rows dmlp loses: " + (", ".join(losers) if losers else "none") + ".")
    if has_auto:
        worst_a = min(auto_margins, key=lambda t: t[2])
        within = sum(mg >= -0.005 for _, _, mg in auto_margins)
        lines.append(f"auto (`preprocessor: auto`, {AUTO_FOLDS}-fold estimate, no true labels) within 0.5 points of the "
                     f"best column (dmlp included) in {within} of {len(auto_margins)} rows; worst {worst_a[2] * 100:+.2f} "
                     f"points ({worst_a[0]} {worst_a[1]}).")
    if "digits" in results["cases"]:
        d = results["cases"]["digits"]["settings"]
        lines += ["", "Digits (SSL) against the figures before the neighbour readout (same config): " + ", ".join(
            f"{k} {DIGITS_BEFORE[k]:.4f} -> {d[k]['mean']['dmlp']:.4f}" for k in d if k in DIGITS_BEFORE) + "."]
    lines += ["", "Readout ablation: the same trained purifier read out without (parts of) the neighbour readout "
              "(no retraining).", "",
              "| data | noise | dmlp (default) | " + " | ".join(READOUT_ABLATIONS) + " |",
              "|---" * (3 + len(READOUT_ABLATIONS)) + "|"]
    for case, res in results["cases"].items():
        for setting, r in res["settings"].items():
            lines.append(f"| {case} | {setting} | {r['mean']['dmlp']:.4f} | "
                         + " | ".join(f"{r['ablation'][k]:.4f}" for k in READOUT_ABLATIONS) + " |")
    if results.get("legacy_ablation"):
        la = results["legacy_ablation"]
        keys = list(next(iter(la.values())))
        lines += ["", "Digits ablation (each variant retrains; the neighbour readout is on wherever the readout is the "
                  "heads' posterior, i.e. not for IPC only, the paper's readout and the authors' algorithm):", "",
                  "| ablation | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{v[k]:.4f}" for k in keys) + " |" for name, v in la.items()]
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    import os

    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablation", action="store_true", help="also the older digits ablation (retrains each variant)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    ap.add_argument("--report", metavar="PREFIX", help="only re-render PREFIX.md from PREFIX.json (no runs)")
    ap.add_argument("--no-auto", action="store_true", help="skip the `preprocessor: auto` column (5x cheaper)")
    ap.add_argument("--resume", action="store_true", help="keep the cases PREFIX.json already holds (written after "
                                                          "every case), run the others")
    args = ap.parse_args()
    if args.report:
        results = json.loads(Path(args.report + ".json").read_text())
        Path(args.report + ".md").write_text(markdown(results, results["command"]))
        return
    torch.set_num_threads(args.threads)
    device = "cpu"
    t0 = time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    results = {"date": datetime.date.today().isoformat(), "seeds": args.seeds, "threads": args.threads,
               "machine": f"{_cpu()}, {torch.get_num_threads()} thread(s)", "cases": {}}
    from dmlp_plugin.atomic import write_json

    done = {}
    if args.resume and args.out and Path(args.out + ".json").exists():
        done = json.loads(Path(args.out + ".json").read_text()).get("cases", {})
    for case in args.cases:
        if case in done:
            log(f"{case}: in {args.out}.json already, kept")
            results["cases"][case] = done[case]
            continue
        log(f"{case} ...")
        results["cases"][case] = run_case(case, args.seeds, device, log, auto=not args.no_auto)
        if args.out:
            write_json(Path(args.out + ".json"), {**results, "partial": True})
    if args.ablation:
        log("digits ablation ...")
        results["legacy_ablation"] = legacy_ablation(args.seeds, device)
    results["seconds"] = time.perf_counter() - t0
    command = "OMP_NUM_THREADS=1 python benchmarks/purify_quality.py " + " ".join(sys.argv[1:])
    results["command"] = command.strip()
    md = markdown(results, command.strip())
    print(md)
    if args.out:
        from dmlp_plugin.atomic import write_text

        write_text(Path(args.out + ".md"), md)
        write_json(Path(args.out + ".json"), results)


if __name__ == "__main__":
    main()
