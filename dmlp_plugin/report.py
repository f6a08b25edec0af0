"""Markdown reports and plots (matplotlib, Agg backend, files only)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dmlp_plugin.atomic import write_bytes, write_text
from dmlp_plugin.metrics import transition_matrix


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    write_bytes(path, buf.getvalue())


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


# the comparison preprocessors a purify run reports (checks.compare), in report order, with their line styles
COMPARISONS = ("knn_vote", "trusted_only", "cleanlab", "identity", "dmlp")
# (colours unlike the per-view curves', which take matplotlib's first colours: blue, orange, green)
_REF_STYLE = {"noisy labels": ("tab:gray", (0, (1, 1))), "knn_vote": ("tab:red", "--"),
              "trusted_only": ("tab:brown", ":"), "cleanlab": ("tab:purple", "-."),
              "identity": ("tab:pink", (0, (5, 1, 1, 1, 1, 1))), "dmlp": ("tab:olive", (0, (3, 2)))}


def comparisons(metrics: dict) -> list[tuple[str, dict]]:
    """The comparison entries of a metrics dict, [(name, entry)]: the known names in report order, then any
    other comparison (a third-party preprocessor) in the order it ran (its ``seconds.compare_<name>``)."""
    ran = [k[len("compare_"):] for k in metrics.get("seconds", {}) if k.startswith("compare_")]
    names = [k for k in COMPARISONS if k in metrics] + [k for k in ran if k not in COMPARISONS]
    return [(k, metrics[k]) for k in names if isinstance(metrics.get(k), dict)]


def comparison_setting(name: str, entry: dict) -> str:
    """What a comparison ran with, in words: k and views of knn_vote, folds of cleanlab, ... (or why it did not run)."""
    if entry.get("status"):
        return str(entry["status"])
    if name == "knn_vote" and "k" in entry:
        tried = (f"; best of k {min(entry['ks'])}..{max(entry['ks'])} x views {'/'.join(entry['view_sets'])}"
                 if entry.get("ks") and entry.get("view_sets") else "")
        return f"k {entry['k']}, views {entry['views']}{tried}"
    if name == "cleanlab" and "folds" in entry:
        l2 = f" (l2 {entry['l2']:g})" if isinstance(entry.get("l2"), (int, float)) else ""
        return (f"{entry['folds']}-fold logistic regression{l2}, views {entry.get('views')}, "
                f"{entry.get('flagged')} labels flagged and relabelled")
    if name == "trusted_only" and "trusted" in entry:
        return f"logistic regression on the {entry['trusted']} trusted rows, view {entry.get('views')}"
    skip = {"label_accuracy_after", "seconds", "note", "status"}
    return ", ".join(f"{k} {v}" for k, v in entry.items() if k not in skip and isinstance(v, (str, int, float)))


# markers of the reference lines, placed at staggered epochs: two baselines at one accuracy both stay visible
_REF_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _reference_lines(metrics: dict) -> list[tuple[str, str, float]]:
    """(name, legend label, accuracy) of the noisy labels and of every comparison that has one."""
    ref = [("noisy labels", "noisy labels", metrics.get("label_accuracy_before"))]
    ref += [(name, f"{name} ({comparison_setting(name, e).split(';')[0]})" if name == "knn_vote" else name,
             e.get("label_accuracy_after")) for name, e in comparisons(metrics)]
    return [(n, lab, y) for n, lab, y in ref if y is not None]


def plot_label_accuracy(history: list[dict], metrics: dict, path: Path) -> bool:
    if not history or "label_accuracy" not in history[0]:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["label_accuracy"] for h in history], label="purified (views averaged)", lw=2, zorder=5)
    for key in sorted(k for k in history[0] if k.startswith("label_accuracy_view")):
        ax.plot(ep, [h[key] for h in history], lw=1, alpha=0.7, label=key.replace("label_accuracy_", ""))
    # reference lines: each its own colour, dash pattern and marker; the markers sit at staggered epochs and
    # the lines get thinner in drawing order, so lines at one accuracy show both
    refs = _reference_lines(metrics)
    lo, hi = min(ep), max(ep)
    for i, (name, label, y) in enumerate(refs):
        color, ls = _REF_STYLE.get(name, (f"C{i + 3}", (0, (2, 1, 2, 3))))
        marks = lo + (hi - lo) * (np.arange(4) + (i + 0.5) / len(refs)) / 4 if hi > lo else np.array([lo])
        ax.plot([lo, hi], [y, y], ls=ls, color=color, lw=max(2.6 - 0.35 * i, 1.0), zorder=3 + 0.1 * i)
        ax.plot(marks, np.full(marks.shape, y), ls="none", marker=_REF_MARKERS[i % len(_REF_MARKERS)], ms=6,
                color=color, markeredgecolor="white", zorder=4, label=None)
        ax.plot([], [], ls=ls, color=color, marker=_REF_MARKERS[i % len(_REF_MARKERS)], label=f"{label}: {y:.3f}")
    for h in history:
        if h.get("exchanged"):
            ax.axvline(h["epoch"], color="k", alpha=0.08)
    ax.set_title(f"Label accuracy over purifier epochs: {metrics.get('dataset')}, {_noise_words(metrics)}",
                 fontsize=10)
    ax.set_xlabel("purifier epoch (faint lines: cross-view exchange)")
    ax.set_ylabel("label accuracy (untrusted samples)")
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: hides no line
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def _noise_words(metrics: dict) -> str:
    n = metrics.get("noise") or {}
    rate = n.get("rate")
    return f"{n.get('kind')} noise {100 * rate:.0f}%" if isinstance(rate, (int, float)) else f"{n.get('kind')} noise"


def _draw_matrix(ax, t: np.ndarray, title: str, names) -> object:
    """One transition matrix: readable ticks (class names when short) and each cell's value for <= 20 classes."""
    c = t.shape[0]
    im = ax.imshow(t, vmin=0, vmax=1, cmap="viridis")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("given label")
    ax.set_ylabel("true class")
    if c <= 20:
        ticks = [str(n)[:10] for n in names] if len(names) == c else [str(i) for i in range(c)]
        size = 9 if c <= 10 else 7
        slant = any(len(t) > 2 for t in ticks)
        ax.set_xticks(range(c))
        ax.set_xticklabels(ticks, fontsize=size, rotation=45 if slant else 0, ha="right" if slant else "center")
        ax.set_yticks(range(c))
        ax.set_yticklabels(ticks, fontsize=size)
        for i in range(c):
            for j in range(c):
                if t[i, j] >= 0.005:
                    ax.text(j, i, f"{t[i, j]:.2f}".lstrip("0") if t[i, j] < 1 else "1", ha="center", va="center",
                            fontsize=7 if c <= 10 else 5, color="black" if t[i, j] > 0.6 else "white")
    return im


def plot_transitions(truth, noisy, purified, num_classes: int, path: Path, class_names=(), title: str = "") -> None:
    plt = _plt()
    size = 5.2 if num_classes <= 10 else 6.5
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.2, size), layout="constrained")
    im = None
    for ax, labels, name in ((axes[0], noisy, "noisy labels"), (axes[1], purified, "purified labels")):
        t = transition_matrix(truth, labels, num_classes)
        im = _draw_matrix(ax, t, f"{name}: P(label | true class)", tuple(class_names))
    fig.colorbar(im, ax=axes, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def plot_confidence(confidence, correct, path: Path, title: str = "") -> None:
    """Histograms of the confidence of right and wrong purified labels, on a log count axis (the few wrong
    labels stay visible beside thousands of right ones)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    bins = np.linspace(0, 1, 26)
    right, wrong = confidence[correct], confidence[~correct]
    ax.hist(right, bins=bins, alpha=0.6, color="tab:blue", label=f"purified label right ({right.size})")
    ax.hist(wrong, bins=bins, alpha=0.6, color="tab:red", label=f"purified label wrong ({wrong.size})")
    ax.hist(wrong, bins=bins, histtype="step", color="tab:red", lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("confidence (max of the soft label)")
    ax.set_ylabel("samples (log scale)")
    ax.set_title(title or "Confidence of the purified labels (untrusted samples)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3, which="major")
    save_figure(fig, path)


def per_class_accuracy(art, class_names=()) -> list[dict]:
    """Label accuracy per true class on the untrusted samples, before (noisy) and after (purified):
    [{class, samples, before, after}] (before/after None for a class without untrusted samples)."""
    truth = art.true_labels
    rest = np.ones(len(art.hard), bool)
    rest[art.meta_indices] = False
    rows = []
    for c in range(art.num_classes):
        sel = rest & (truth == c)
        n = int(sel.sum())
        rows.append({"class": str(class_names[c]) if len(class_names) == art.num_classes else str(c), "samples": n,
                     "before": float(np.mean(art.noisy[sel] == c)) if n else None,
                     "after": float(np.mean(art.hard[sel] == c)) if n else None})
    return rows


def per_class_lines(rows: list[dict]) -> list[str]:
    """The report table of :func:`per_class_accuracy`."""
    lines = ["| class | untrusted samples | noisy (before) | purified (after) | change (points) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if not r["samples"]:
            lines.append(f"| {r['class']} | 0 | n/a | n/a | |")
            continue
        lines.append(f"| {r['class']} | {r['samples']} | {r['before']:.4f} | {r['after']:.4f} | "
                     f"{100 * (r['after'] - r['before']):+.1f} |")
    return lines + [""]


def plot_per_class(rows: list[dict], path: Path, title: str = "") -> None:
    """Grouped bars: label accuracy per true class, before and after purification."""
    plt = _plt()
    rows = [r for r in rows if r["samples"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 3.8))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["before"] for r in rows], 0.4, color="tab:gray", label="noisy (before)")
    ax.bar(x + 0.2, [r["after"] for r in rows], 0.4, color="tab:blue", label="purified (after)")
    slant = len(rows) > 20 or any(len(r["class"]) > 3 for r in rows)
    ax.set_xticks(x)
    ax.set_xticklabels([r["class"][:12] for r in rows], rotation=45 if slant else 0, ha="right" if slant else "center",
                       fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("label accuracy (untrusted samples)")
    ax.set_title(title or "Label accuracy per true class", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def _params(result) -> str:
    info = getattr(result, "info", None) or {}
    return ", ".join(f"{k} {v}" for k, v in info.items() if isinstance(v, (str, int)) and not isinstance(v, bool))


def _knn_table(entry: dict | None) -> list[str]:
    """knn_vote's label accuracy at every (views, k) it tried, the reported best in bold."""
    if not entry or not entry.get("by_views_k"):
        return []
    table = entry["by_views_k"]
    ks = list(next(iter(table.values())))
    lines = ["knn_vote label accuracy by views and k (one neighbour search per view set at the largest k; "
             f"{entry.get('note', '')}):", "",
             "| views | " + " | ".join(f"k {k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for which, row in table.items():
        cells = [(f"**{row[k]:.4f}**" if (which == entry["views"] and int(k) == entry["k"]) else f"{row[k]:.4f}")
                 for k in ks]
        lines.append(f"| {which} | " + " | ".join(cells) + " |")
    return lines + [""]


def preprocessor_label(metrics: dict) -> str:
    """The preprocessor's name as reports show it: ``auto (dmlp)`` names the candidate auto chose."""
    auto = metrics.get("auto")
    return f"{metrics['preprocessor']} ({auto['chosen']})" if isinstance(auto, dict) else str(metrics["preprocessor"])


def auto_line(metrics: dict) -> str | None:
    """One line: which candidate ``auto`` chose and why (None for another preprocessor)."""
    auto = metrics.get("auto")
    return f"auto {auto['reason']}" if isinstance(auto, dict) else None


def index_lines(info: dict | None) -> list[str]:
    """How the neighbours were searched: exact, or each approximate index with its measured recall."""
    if not info:
        return []
    built = [r for r in info.get("indexes", []) if not r.get("reused")]
    if not built:
        return ["", f"Neighbour search: exact (approximate from {info['settings']['threshold']:,} rows; "
                    f"`checks.index`)."]
    out = ["", "Neighbour search: approximate (`checks.index`); each index's recall against exact search:", "",
           "| index | rows x dims | setting | recall@10 (queries) | build s | recall check s |",
           "|---|---|---|---|---|---|"]
    for r in built:
        setting = (f"nlist {r['nlist']}, nprobe {r['nprobe']}" if r["kind"] == "ivf" else
                   f"M {r.get('hnsw_m')}, efSearch {r.get('ef_search')}")
        rec = r.get("recall_at_10")
        rec_text = "-" if rec is None else f"{rec:.4f} ({r['recall_queries']:,})"
        out.append(f"| {r['kind']} | {r['rows']:,} x {r['dims']} | {setting} | {rec_text} | "
                   f"{r['seconds_build']:.1f} | {r.get('seconds_recall', 0):.1f} |")
    return out


def auto_lines(metrics: dict) -> list[str]:
    """The report section of ``auto``: its rule, and each candidate's estimate, paired difference from the first
    candidate and seconds (and true accuracy when known, never used by the choice)."""
    auto = metrics.get("auto")
    if not isinstance(auto, dict):
        return []
    lines = ["## auto: which candidate and why", "", f"**{auto_line(metrics)}.**", "",
             f"Rule: {auto['rule']}. Estimates: {auto['folds']}-fold cross-validation over the trusted subset, "
             f"weights: {auto.get('weights', 'n/a')}; no true label is used.", "",
             "| candidate | estimated | interval | vs first (points, P better) | setting | true (when known) | "
             "seconds run + estimate |", "|---|---:|---|---|---|---:|---:|"]
    for name, e in auto["candidates"].items():
        est, v, s = e.get("estimate"), e.get("versus_incumbent"), e.get("setting")
        interval = f"{est['low']:.4f} .. {est['high']:.4f}" if est else "n/a"
        versus = f"{100 * v['difference']:+.1f}, {v['probability_better']:.3f}" if v else "(first)"
        setting = f"k {s['k']}, views {s['views']}" if s else ""
        shown = f"**{name}**" if name == auto["chosen"] else name
        lines.append(f"| {shown} | {_fmt(est['estimate']) if est else 'n/a'} | {interval} | {versus} | {setting} | "
                     f"{_fmt(e.get('label_accuracy_after'))} | {e['seconds']['run']:.1f} + "
                     f"{e['seconds']['estimate']:.1f} |")
    for name, why in auto.get("dropped", {}).items():
        lines.append(f"| {name} | dropped | {why} | | | | |")
    return lines + [""]


def estimate_lines(metrics: dict) -> list[str]:
    """The report section of the accuracy estimated without true labels (``metrics["estimated_accuracy"]``),
    with the true accuracy beside it when known."""
    est = metrics.get("estimated_accuracy")
    if not est:
        return []
    first = next(iter(est.values()))
    lines = ["## Label accuracy estimated without true labels", "",
             f"{first['method']}: each fold's trusted samples are purified as untrusted ones by a run that trusts "
             f"the other folds, and scored against their trusted labels; weights: {first['weights']}; "
             f"{round(100 * first['level'])}% interval (Jeffreys, at the weighted estimate's effective sample size). "
             f"Leans pessimistic (each run sees "
             f"{first['folds'] - 1}/{first['folds']} of the trusted labels); optimistic if the trusted samples were "
             f"picked for being easy (trusted.source knn_auto).", "",
             "| labels | estimated | interval | true (when known) |", "|---|---:|---|---:|"]
    ran = (metrics.get("auto") or {}).get("candidates", {})  # auto's candidates: their own true accuracy
    for name, e in est.items():
        true = metrics.get("label_accuracy_after") if name == metrics.get("preprocessor") else \
            ran[name].get("label_accuracy_after") if name in ran else \
            (metrics.get(name) or {}).get("label_accuracy_after") if isinstance(metrics.get(name), dict) else None
        lines.append(f"| {name} | {e['estimate']:.4f} | {e['low']:.4f} .. {e['high']:.4f} | {_fmt(true)} |")
    return lines + [""]


def _truth_sections(folder: Path, metrics: dict, art, class_names=()) -> list[str]:
    """Per-class accuracy (table and plot), transition matrices and confidence: the sections and plots that
    need the true labels."""
    truth = art.true_labels
    what = f"{metrics.get('dataset')}, {_noise_words(metrics)}"
    rows = per_class_accuracy(art, class_names)
    plot_per_class(rows, folder / "per_class_accuracy.png", f"Label accuracy per true class: {what}")
    lines = ["## Label accuracy per class, before and after", "",
             "On the untrusted samples of each true class: the fraction whose label is their true class.", ""]
    lines += per_class_lines(rows) + ["![label accuracy per class](per_class_accuracy.png)", ""]
    plot_transitions(truth, art.noisy, art.hard, art.num_classes, folder / "transition_matrix.png", class_names,
                     f"Noise transition, before and after purification: {what}")
    lines += ["## Noise transition matrix, before and after", "", "![transition matrices](transition_matrix.png)", ""]
    rest = np.ones(len(art.hard), bool)
    rest[art.meta_indices] = False
    plot_confidence(art.confidence[rest], (art.hard == truth)[rest], folder / "confidence.png",
                    f"Confidence of the purified labels (untrusted samples): {what}")
    return lines + ["## Confidence of purified labels", "", "![confidence](confidence.png)", ""]


def write_purify_report(folder: Path, metrics: dict, result, art, class_names=()) -> None:
    folder = Path(folder)
    lines = [f"# Label purification: {metrics['dataset']}", ""]
    n = metrics
    lines += [
        f"- preprocessor: `{n['preprocessor']}`, seed {n['seed']}, device {n['device']}, world size {n['world_size']}",
        *([f"- {auto_line(n)}"] if auto_line(n) else []),
        f"- samples: {n['num_samples']}, classes: {n['num_classes']}; trusted subset: {n['trusted']['size']} "
        f"({100 * n['trusted']['fraction']:.1f}%, source `{n['trusted']['source']}`)",
        f"- noise: `{n['noise']['kind']}`, requested rate {n['noise']['rate']}, measured flip rate "
        f"{_fmt(n['noise']['flip_rate'])}, true class may be drawn: {_fmt(n['noise']['include_true_class'])}",
        f"- features: {n['features'].get('source')} (dims {n['features'].get('dims')}); view 2: "
        f"{n['features'].get('view2', {}).get('source')}",
        f"- config hash `{n['config_hash']}`; versions: "
        + ", ".join(f"{k} {v}" for k, v in n["versions"].items() if v),
        "",
    ]
    if "label_accuracy_after" in metrics:
        lines += ["## Label accuracy", "",
                  f"Measured on {metrics['evaluated_on']}. Comparisons (`checks.compare`) see the same features "
                  f"and trusted labels; their seconds are in the timings below and in the total.", "",
                  "| labels | accuracy | setting | seconds |", "|---|---:|---|---:|",
                  f"| noisy (before) | {metrics['label_accuracy_before']:.4f} | given labels | |",
                  f"| **{preprocessor_label(metrics)}** (after) | **{metrics['label_accuracy_after']:.4f}** | "
                  f"{_params(result) or 'see config.yaml'} | {metrics['seconds'].get('purify', 0):.1f} |"]
        for name, e in comparisons(metrics):
            acc = e.get("label_accuracy_after")
            lines.append(f"| {name} | {'n/a' if acc is None else f'{acc:.4f}'} | {comparison_setting(name, e)} | "
                         f"{e.get('seconds', 0):.1f} |")
        lines += ["", f"Fixed {metrics['fixed']} wrong labels, broke {metrics['broken']} right ones.", ""]
        lines += _knn_table(metrics.get("knn_vote"))
        if plot_label_accuracy(result.history, metrics, folder / "label_accuracy.png"):
            lines += ["![label accuracy over purifier epochs](label_accuracy.png)", ""]
        lines += _truth_sections(folder, metrics, art, class_names)
    else:
        lines += ["True labels are unknown here, so no accuracy is reported.", "",
                  f"Mean confidence {_fmt(metrics['mean_confidence'])}, mean neighbour agreement "
                  f"{_fmt(metrics['mean_neighbour_agreement'])}.", ""]
    lines += auto_lines(metrics)
    lines += estimate_lines(metrics)
    lines += ["## Timings (s)", "", "| stage | seconds | peak memory MiB (beyond mapped files) |", "|---|---|---|"]
    peaks = metrics.get("peak_rss_mib") or {}
    for k, v in metrics["seconds"].items():
        p = peaks.get("compare" if k.startswith("compare_") else k) or {}
        mem = f"{p['peak_mib']:,} ({p['beyond_mapped_mib']:,})" if p.get("peak_mib") is not None else ""
        lines.append(f"| {k} | {v:.1f} | {mem} |")
    lines += index_lines(metrics.get("neighbour_index"))
    lines += ["", "Files: `labels.npz` (hard, soft, confidence, neighbour_agreement, noisy, meta_indices, "
              "meta_labels, fingerprint), `metrics.json`, `history.json`, `config.yaml`.", ""]
    write_text(folder / "report.md", "\n".join(lines))
