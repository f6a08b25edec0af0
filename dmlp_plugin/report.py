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


def plot_label_accuracy(history: list[dict], metrics: dict, path: Path) -> bool:
    if not history or "label_accuracy" not in history[0]:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["label_accuracy"] for h in history], label="purified (views averaged)", lw=2)
    for key in sorted(k for k in history[0] if k.startswith("label_accuracy_view")):
        ax.plot(ep, [h[key] for h in history], lw=1, alpha=0.7, label=key.replace("label_accuracy_", ""))
    ref = [("noisy labels", metrics.get("label_accuracy_before"), "gray")]
    for name, color in (("knn_vote", "tab:red"), ("trusted_only", "tab:green")):
        if name in metrics:
            ref.append((f"{name}", metrics[name]["label_accuracy_after"], color))
    for name, y, color in ref:
        if y is not None:
            ax.axhline(y, ls="--", color=color, lw=1, label=f"{name} ({y:.3f})")
    for h in history:
        if h.get("exchanged"):
            ax.axvline(h["epoch"], color="k", alpha=0.08)
    ax.set_xlabel("purifier epoch (faint lines: cross-view exchange)")
    ax.set_ylabel("label accuracy (untrusted samples)")
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return True


def plot_transitions(truth, noisy, purified, num_classes: int, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, labels, title in ((axes[0], noisy, "noisy labels"), (axes[1], purified, "purified labels")):
        t = transition_matrix(truth, labels, num_classes)
        im = ax.imshow(t, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{title}: P(label | true class)")
        ax.set_xlabel("given label")
        ax.set_ylabel("true class")
        if num_classes <= 20:
            ax.set_xticks(range(num_classes))
            ax.set_yticks(range(num_classes))
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8)
    save_figure(fig, path)


def plot_confidence(confidence, correct, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(0, 1, 26)
    ax.hist(confidence[correct], bins=bins, alpha=0.7, label="purified label right")
    ax.hist(confidence[~correct], bins=bins, alpha=0.7, label="purified label wrong")
    ax.set_xlabel("confidence (max of the soft label)")
    ax.set_ylabel("samples")
    ax.legend()
    save_figure(fig, path)


def write_purify_report(folder: Path, metrics: dict, result, art, class_names=()) -> None:
    folder = Path(folder)
    lines = [f"# Label purification: {metrics['dataset']}", ""]
    n = metrics
    lines += [
        f"- preprocessor: `{n['preprocessor']}`, seed {n['seed']}, device {n['device']}, world size {n['world_size']}",
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
        lines += ["## Label accuracy", "", f"Measured on {metrics['evaluated_on']}.", "",
                  "| labels | accuracy |", "|---|---|",
                  f"| noisy (before) | {metrics['label_accuracy_before']:.4f} |",
                  f"| **{metrics['preprocessor']}** (after) | **{metrics['label_accuracy_after']:.4f}** |"]
        for name in ("knn_vote", "trusted_only", "identity", "dmlp"):
            if name in metrics and isinstance(metrics[name], dict):
                extra = f" (best k = {metrics[name]['best_k']})" if "best_k" in metrics[name] else ""
                lines.append(f"| {name}{extra} | {metrics[name]['label_accuracy_after']:.4f} |")
        lines += ["", f"Fixed {metrics['fixed']} wrong labels, broke {metrics['broken']} right ones.", ""]
        if plot_label_accuracy(result.history, metrics, folder / "label_accuracy.png"):
            lines += ["![label accuracy over purifier epochs](label_accuracy.png)", ""]
        truth = art.true_labels
        plot_transitions(truth, art.noisy, art.hard, art.num_classes, folder / "transition_matrix.png")
        lines += ["## Noise transition matrix, before and after", "", "![transition matrices](transition_matrix.png)", ""]
        rest = np.ones(len(art.hard), bool)
        rest[art.meta_indices] = False
        plot_confidence(art.confidence[rest], (art.hard == truth)[rest], folder / "confidence.png")
        lines += ["## Confidence of purified labels", "", "![confidence](confidence.png)", ""]
    else:
        lines += ["True labels are unknown here, so no accuracy is reported.", "",
                  f"Mean confidence {_fmt(metrics['mean_confidence'])}, mean neighbour agreement "
                  f"{_fmt(metrics['mean_neighbour_agreement'])}.", ""]
    lines += ["## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in metrics["seconds"].items()]
    lines += ["", "Files: `labels.npz` (hard, soft, confidence, neighbour_agreement, noisy, meta_indices, "
              "meta_labels, fingerprint), `metrics.json`, `history.json`, `config.yaml`.", ""]
    write_text(folder / "report.md", "\n".join(lines))
