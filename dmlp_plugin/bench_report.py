"""The A/B report of ``dmlp bench``: ``report.md`` with the results table, and plots (accuracy per arm,
A/B deltas, test-accuracy curves). Pairs runs by (noise setting, method, seed): a delta is always
purified minus noisy of the same seed, the same trusted labels and the same budget."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from dmlp_plugin.atomic import write_text
from dmlp_plugin.report import _plt, save_figure

ARM_COLORS = {"noisy": "tab:gray", "purified": "tab:blue", "purified_soft": "tab:cyan"}


def _order(values):
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def summarise(records: list[dict]) -> list[dict]:
    """One row per (noise setting, method, arm): mean and std of the last-epoch test accuracy over seeds,
    and the paired delta against the noisy arm of the same seeds."""
    by = defaultdict(dict)
    for r in records:
        by[(r["noise_tag"], r["method_label"], r["labels"])][r["seed"]] = r
    rows = []
    for (tag, method, arm), runs in by.items():
        acc = np.array([runs[s]["test_accuracy"] for s in sorted(runs)])
        noisy = by.get((tag, method, "noisy"), {})
        paired = [runs[s]["test_accuracy"] - noisy[s]["test_accuracy"] for s in sorted(runs) if s in noisy]
        label_acc = [runs[s]["label_accuracy"] for s in runs if runs[s].get("label_accuracy") is not None]
        rows.append({
            "noise_tag": tag, "method": method, "labels": arm, "seeds": sorted(runs), "n": len(runs),
            "test_accuracy_mean": float(acc.mean()), "test_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "delta_mean": float(np.mean(paired)) if arm != "noisy" and paired else None,
            "delta_std": float(np.std(paired, ddof=1)) if arm != "noisy" and len(paired) > 1 else None,
            "label_accuracy_mean": float(np.mean(label_acc)) if label_acc else None,
            "seconds_mean": float(np.mean([runs[s]["seconds"] for s in runs])),
        })
    return rows


def _pct(x, std=None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _signed(x, std=None) -> str:
    if x is None:
        return ""
    return f"{100 * x:+.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def plot_arms(rows: list[dict], path: Path) -> None:
    """Grouped bars: test accuracy per method and arm, one panel per noise setting. The y-axis starts at 0
    (a cut axis exaggerates gaps); each bar carries its value; error bars (std over seeds) only where a row has
    two seeds or more."""
    plt = _plt()
    tags = _order(r["noise_tag"] for r in rows)
    width_in = max(5.5, 1.4 * len(_order(r["method"] for r in rows)) + 2)
    fig, axes = plt.subplots(1, len(tags), figsize=(width_in * len(tags) ** 0.5 + 1, 4.0), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        sub = [r for r in rows if r["noise_tag"] == tag]
        methods, arms = _order(r["method"] for r in sub), _order(r["labels"] for r in sub)
        width = 0.8 / len(arms)
        for j, arm in enumerate(arms):
            ys = [next((r for r in sub if r["method"] == m and r["labels"] == arm), None) for m in methods]
            xs = np.arange(len(methods)) + (j - (len(arms) - 1) / 2) * width
            vals = [100 * y["test_accuracy_mean"] if y else 0 for y in ys]
            errs = [100 * y["test_accuracy_std"] if y and y["n"] > 1 else 0 for y in ys]
            bars = ax.bar(xs, vals, width, yerr=errs if any(errs) else None, capsize=3, label=arm,
                          color=ARM_COLORS.get(arm))
            ax.bar_label(bars, labels=[f"{v:.1f}" if y else "" for v, y in zip(vals, ys)], fontsize=7, padding=2)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=20, fontsize=8)
        ax.set_ylim(0, 105)
        seeds = sorted({r["n"] for r in sub})
        ax.set_title(f"noise {tag} ({'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}"
                     f"{', bars: ± std' if max(seeds) > 1 else ''})", fontsize=10)
        ax.set_ylabel("test accuracy, last epoch (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Test accuracy per method: noisy vs purified training labels", fontsize=11)
    save_figure(fig, path)


def plot_deltas(rows: list[dict], path: Path) -> bool:
    """Bars of the paired A/B delta (purified minus noisy, percentage points) per method."""
    sub = [r for r in rows if r["delta_mean"] is not None]
    if not sub:
        return False
    plt = _plt()
    labels = [f"{r['method']}\n{r['labels']}\n{r['noise_tag']}" for r in sub]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(sub) + 1.5), 3.8))
    vals = [100 * r["delta_mean"] for r in sub]
    errs = [100 * (r["delta_std"] or 0) for r in sub]
    bars = ax.bar(range(len(sub)), vals, yerr=errs if any(errs) else None, capsize=3,
                  color=["tab:green" if v >= 0 else "tab:red" for v in vals])
    ax.bar_label(bars, labels=[f"{v:+.1f}" for v in vals], fontsize=7, padding=2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(sub)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("purified - noisy (points of test accuracy)")
    ax.set_title("A/B: what purifying the labels first changes")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return True


def plot_curves(records: list[dict], path: Path) -> None:
    """Test accuracy per epoch of every run: one panel per (noise setting, method), a line per arm and seed."""
    plt = _plt()
    panels = _order((r["noise_tag"], r["method_label"]) for r in records)
    cols = min(4, len(panels))
    nrows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (tag, method) in zip(axes.flat, panels):
        runs = [r for r in records if r["noise_tag"] == tag and r["method_label"] == method]
        seeds = _order(r["seed"] for r in runs)
        for r in runs:
            ep = [c["epoch"] for c in r["curve"]]
            ax.plot(ep, [100 * c["test_accuracy"] for c in r["curve"]], color=ARM_COLORS.get(r["labels"]),
                    ls=styles[seeds.index(r["seed"]) % len(styles)], lw=1.2,
                    label=f"{r['labels']} s{r['seed']}")
        ax.set_title(f"{method} ({tag})", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("test acc (%)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


def text_table(rows: list[dict], verbose: bool = False) -> list[str]:
    """The results as an aligned text table for the terminal (``verbose``: label accuracy and seconds too)."""
    head = ["noise", "method", "labels", "test acc (%)", "delta"] + (["label acc", "s/run"] if verbose else [])
    body = []
    for r in rows:
        acc = f"{100 * r['test_accuracy_mean']:.2f}" + (f" ± {100 * r['test_accuracy_std']:.2f}" if r["n"] > 1 else "")
        cells = [r["noise_tag"], r["method"], r["labels"], acc, _signed(r["delta_mean"])]
        if verbose:
            cells += [_pct(r["label_accuracy_mean"]), f"{r['seconds_mean']:.1f}"]
        body.append(cells)
    return aligned([head, *body], numeric_from=3)


def aligned(table: list[list[str]], numeric_from: int) -> list[str]:
    """Rows of cells as text lines with aligned columns: text left-aligned, columns from ``numeric_from`` on
    (numbers) right-aligned."""
    widths = [max(len(c) for c in col) for col in zip(*table)]
    return ["  ".join(c.rjust(w) if i >= numeric_from else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            .rstrip() for row in table]


def _artifact_of(folder: Path, name: str, given: str | None) -> Path:
    """Where the labels artifact of purification cell ``name`` (``<noise tag>-s<seed>``) lies."""
    if not given:
        return folder / "purify" / name / "labels.npz"
    tag, _, seed = name.rpartition("-s")
    return Path(given.replace("{noise}", tag).replace("{seed}", seed))


def transition_section(folder: Path, purifications: dict, given: str | None, class_names=()) -> list[str]:
    """Transition matrices before and after purification for the first seed of each noise setting (from the
    cells' labels artifacts; cells whose artifact is gone or has no true labels are skipped)."""
    from dmlp_plugin.artifacts import load_labels  # noqa: PLC0415
    from dmlp_plugin.errors import UserError  # noqa: PLC0415
    from dmlp_plugin.report import plot_transitions  # noqa: PLC0415

    lines, done = [], set()
    for name in purifications:
        tag = name.rpartition("-s")[0]
        if tag in done:
            continue
        try:
            art = load_labels(_artifact_of(folder, name, given))
        except UserError:
            continue
        if art.true_labels is None:
            continue
        done.add(tag)
        png = f"transition_{tag}.png"
        plot_transitions(art.true_labels, art.noisy, art.hard, art.num_classes, folder / png, class_names,
                         f"Noise transition before and after purification: {name}")
        lines += [f"![transition matrices, {name}]({png})", ""]
    return ["## Noise transition matrices, before and after purification", ""] + lines if lines else []


def _comparison_cell(entry: dict | None) -> str:
    """A comparison's label accuracy (%), or why there is none (``not installed: pip install ...``)."""
    if not entry:
        return "n/a"
    if entry.get("label_accuracy_after") is None and entry.get("status"):
        return str(entry["status"])
    return _pct(entry.get("label_accuracy_after"))


def _purification_lines(purifications: dict) -> list[str]:
    """The report's purification table: every cell's label accuracies, knn_vote's setting and the seconds."""
    lines = ["## Purification", "",
             "Label accuracy on the untrusted training samples (%). knn_vote: the best (k, views) of its grid, "
             "chosen with the true labels (flatters it); cleanlab: 5-fold logistic regression + "
             "`find_label_issues`, flagged rows relabelled. Seconds: the purifier, then all comparisons.", "",
             "| noise, seed | noisy labels | purified | knn_vote | knn k, views | trusted_only | cleanlab | "
             "purify s | comparisons s |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name, m in purifications.items():
        knn = m.get("knn_vote") or {}
        where = f"{knn['k']}, {knn['views']}" if "k" in knn and "views" in knn else (
            f"{knn['best_k']}, 1" if "best_k" in knn else "")  # best_k: metrics written before the views sweep
        sec = m.get("seconds", {})
        lines.append(f"| {name} | {_pct(m.get('label_accuracy_before'))} | {_pct(m.get('label_accuracy_after'))} | "
                     f"{_pct(knn.get('label_accuracy_after'))} | {where} | "
                     f"{_pct((m.get('trusted_only') or {}).get('label_accuracy_after'))} | "
                     f"{_comparison_cell(m.get('cleanlab'))} | {sec.get('purify', 0):.1f} | "
                     f"{sum(v for k, v in sec.items() if k.startswith('compare_')):.1f} |")
    lines.append("")
    return lines


def write_bench_report(folder: Path, records: list[dict], purifications: dict, summary: dict) -> None:
    folder = Path(folder)
    rows = summarise(records)
    tr = summary["trusted"]
    sizes = sorted({r["trusted_size"] for r in records})
    pre = summary["preprocessor"]
    lines = [
        "# A/B benchmark: does purifying the labels first help?", "",
        f"- data: `{summary['dataset']}`, {summary['n_train']} training / {summary['n_test']} test samples, "
        f"{summary['num_classes']} classes; seeds {summary['seeds']}; device {summary['device']}",
        (f"- features: {summary['features'].get('source')} (dims {summary['features'].get('dims')}), made once "
         f"without labels in {summary['feature_seconds']:.0f} s" if not pre.get("given") else
         f"- purified labels: given (`{pre['given']}`, made earlier by `dmlp purify` on features "
         f"{summary['features'].get('source')}, dims {summary['features'].get('dims')}); nothing purified here"),
        f"- preprocessor: `{pre['name']}` {pre['params'] or ''}",
        f"- trusted labels: M = {', '.join(map(str, sizes))} per run (source `{tr['source']}`), spent by BOTH "
        f"arms: **noisy** = the noisy labels with those M samples' labels replaced by their trusted labels; "
        f"**purified** = the preprocessor's hard labels" + (
            "; **purified_soft** = its soft label distributions" if "purified_soft" in summary["arms"] else "")
        + ". Same seed, data split, backbone and epoch budget in every pair.",
        "- test accuracy: LAST epoch on the held-out test split (never the best epoch seen).",
        f"- noise rate given to methods that need one (Co-teaching's forget rate, DivideMix's settings): "
        + ("the measured fraction of wrong training labels of each arm (an oracle fact, as the official codes "
           "assume)" if summary["noise_rate"] == "known" else "none (set in each method's params)"),
        f"- config hash `{summary['config_hash']}`; versions: "
        + ", ".join(f"{k} {v}" for k, v in summary["versions"].items() if v),
        "", "## Results", "",
        "Test accuracy in %, mean ± std over seeds; Δ = purified minus noisy, paired by seed (points).", "",
        "| noise | method | labels | label acc (train) | test acc | Δ vs noisy | seconds/run |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['noise_tag']} | {r['method']} | {r['labels']} | {_pct(r['label_accuracy_mean'])} | "
                     f"{_pct(r['test_accuracy_mean'], r['test_accuracy_std'] if r['n'] > 1 else None)} | "
                     f"{_signed(r['delta_mean'], r['delta_std'])} | {r['seconds_mean']:.1f} |")
    lines.append("")
    plot_arms(rows, folder / "ab_accuracy.png")
    lines += ["![test accuracy per arm](ab_accuracy.png)", ""]
    if plot_deltas(rows, folder / "ab_deltas.png"):
        lines += ["![A/B deltas](ab_deltas.png)", ""]
    plot_curves(records, folder / "curves.png")
    lines += ["## Training curves", "", "![test accuracy per epoch](curves.png)", ""]
    if purifications:
        lines += _purification_lines(purifications)
        lines += transition_section(folder, purifications, pre.get("given"))
    labels_at = (f"`{pre['given']}` (the given purified labels of each cell)" if pre.get("given") else
                 "`purify/<noise>-s<seed>/labels.npz` (the purified labels of each cell)")
    lines += [f"Files: `results.json` / `results.csv` (one row per run), `purification.json`, {labels_at}, "
              "`runs/<run>/result.json` (curve and details).", ""]
    write_text(folder / "report.md", "\n".join(lines))
