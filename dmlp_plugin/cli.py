"""The ``dmlp`` command (also ``python -m dmlp_plugin``). Parses argv, validates, calls the pipeline.

Bad input ends with a one-line ``error: ...`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading

from dmlp_plugin import __version__
from dmlp_plugin.errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage too)
        raise UserError(f"{message}; see `{self.prog} --help`")


class _Ui:
    """Where a command's words go. Default: result lines on stdout. ``-q``: none (errors and warnings still on
    stderr). ``-v``: detail lines too. ``--json``: exactly one JSON object on stdout, everything else (result
    lines unless -q, progress bars, anything a library prints) on stderr."""

    def __init__(self, args):
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False))
        self.verbose = bool(getattr(args, "verbose", False))
        self._stdout = sys.stdout

    @property
    def progress(self) -> bool:
        return not self.quiet

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr if self.json else sys.stdout)

    def detail(self, line: str) -> None:
        if self.verbose:
            self.say(line)

    def session(self):
        """While a command runs under --json, whatever is printed to stdout goes to stderr."""
        return contextlib.redirect_stdout(sys.stderr) if self.json else contextlib.nullcontext()

    def emit(self, obj: dict | None) -> None:
        if self.json and obj is not None:  # (None: a launcher's other processes, which say nothing)
            print(json.dumps(obj, default=_json_default), file=self._stdout, flush=True)


def _json_default(obj):
    """numpy scalars and arrays, paths: what metrics and records hold besides plain JSON."""
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _common() -> argparse.ArgumentParser:
    """The output options every subcommand takes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (for scripts); messages and progress go to stderr")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress bars, no result lines (errors only)")
    loud.add_argument("-v", "--verbose", action="store_true", help="more detail (timings per stage, per class)")
    return p


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dmlp", description="Purify noisy labels with DMLP and benchmark noisy-label methods.",
                epilog="Every command takes --json (one JSON object on stdout), -q and -v; "
                       "`dmlp COMMAND --help` shows its options.")
    p.add_argument("--version", action="version", version=f"dmlp_plugin {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = _common()
    _add_purify(sub, common)
    _add_bench(sub, common)
    _add_export(sub, common)
    reg = sub.add_parser("registry", help="list registered datasets, noise models, preprocessors and methods")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="ACTION", parser_class=_Parser)
    lst = reg_sub.add_parser("list", parents=[common], help="show every registered component with its source")
    lst.add_argument("kind", nargs="?", help="only this kind (datasets, noise, preprocessors, methods)")
    sub.add_parser("env", parents=[common], help="versions, devices, faiss backend, threads and data sets found here",
                   description="Show what this machine gives a run (paste it into a bug report): python and package "
                               "versions, faiss and its search backend, CUDA devices, threads, the data sets found.")
    return p


def _add_purify(sub, common) -> None:
    pur = sub.add_parser("purify", parents=[common],
                         help="purify the labels of a data set (writes labels.npz, metrics.json, report.md)",
                         description="Run data + noise -> features -> purifier on a YAML config and write "
                                     "DIR/labels.npz, DIR/metrics.json, DIR/report.md and plots. Under "
                                     "`torchrun` or `accelerate launch` the purifier's rows are sharded over the "
                                     "processes and process 0 writes DIR (see the README).")
    pur.add_argument("config", help="YAML config, e.g. configs/purify-digits.yaml")
    pur.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    pur.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set noise.rate=0.8 (repeatable; values parsed as YAML)")
    pur.add_argument("--threads", metavar="N",
                     help="CPU threads for torch and faiss: auto (default: the CPUs this process may use, shared "
                          "among a launch's processes) or a count; same as --set threads=N")
    pur.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_bench(sub, common) -> None:
    ben = sub.add_parser("bench", parents=[common],
                         help="A/B benchmark: each method on noisy and on purified labels (resumable)",
                         description="Run the grid {noise settings} x {seeds} x {methods} x {noisy, purified} of a "
                                     "YAML config and write DIR/results.json, DIR/results.csv, DIR/report.md and "
                                     "plots. Finished runs are skipped and a killed run resumes when the same "
                                     "command is run again. Under `torchrun` or `accelerate launch` purification "
                                     "is sharded and every method trains data-parallel. To train on labels "
                                     "`dmlp purify` wrote earlier instead of purifying: --set "
                                     "'purified_labels=runs/p-{noise}-s{seed}/labels.npz' (see the README).")
    ben.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    ben.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")
    ben.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set seeds=[0] (repeatable; values parsed as YAML)")
    ben.add_argument("--threads", metavar="N",
                     help="CPU threads for torch and faiss: auto (default: the CPUs this process may use, shared "
                          "among a launch's processes) or a count; same as --set threads=N")
    ben.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_export(sub, common) -> None:
    from dmlp_plugin.export import FORMATS, LABELS  # noqa: PLC0415

    exp = sub.add_parser("export", parents=[common], help="write labels.npz for the official code of DivideMix, "
                                                          "ELR, cleanlab, or as CSV",
                         description="Write the labels of a labels artifact (DIR/labels.npz of `dmlp purify`) in "
                                     "another code's format, one label per training sample in the data set's "
                                     "training order (the order dmlp loads; CIFAR: data_batch_1..5, the order of "
                                     "torchvision's CIFAR train set and of DivideMix). dividemix: the JSON list "
                                     "DivideMix reads as --data_path/<r>_<noise_mode>.json (e.g. 0.8_sym.json; "
                                     "give --out its --data_path folder); elr: labels.npy (int64); cleanlab: "
                                     "labels.npy (the given labels) + pred_probs.npy (DMLP's soft labels) in the "
                                     "folder --out; csv: index,label,confidence rows.")
    exp.add_argument("labels_file", metavar="LABELS.npz", help="a labels artifact, e.g. runs/purify/labels.npz")
    exp.add_argument("--format", required=True, choices=FORMATS, metavar="FORMAT",
                     help=f"one of {', '.join(FORMATS)}")
    exp.add_argument("--out", required=True, metavar="PATH",
                     help="a folder (gets the format's file name) or a file of the format's suffix")
    exp.add_argument("--labels", choices=LABELS, default=None,
                     help="purified (the hard labels; default) or noisy (the given labels with the trusted ones put "
                          "in; default for cleanlab, whose labels are the given ones)")
    exp.add_argument("--rate", type=float, default=None, help="dividemix: its --r for the file name (default: the "
                                                             "artifact's noise rate)")
    exp.add_argument("--mode", default=None, help="dividemix: its --noise_mode for the file name (default: sym or "
                                                  "asym from the artifact's noise kind)")


def _overrides(args) -> list[str]:
    """--set KEY=VALUE items, with --threads N as the last one (``threads=N``, checked as the config's)."""
    threads = getattr(args, "threads", None)
    return list(args.overrides) + ([f"threads={threads}"] if threads is not None else [])


def _check_launcher_precision(cfg) -> None:
    """Before any work: the config's explicit precision settings against the launcher's explicit mixed
    precision (``accelerate launch --mixed_precision``; see :func:`dmlp_plugin.hardware.launcher_precision_for`),
    so that a clash is one line now, not an error after hours of an earlier stage."""
    from dmlp_plugin.hardware import launcher_precision_for  # noqa: PLC0415

    if cfg.features.source == "ssl" and not getattr(cfg, "purified_labels", None):
        launcher_precision_for(str((cfg.features.ssl or {}).get("amp", "auto")), "features.ssl.amp")
    for i, m in enumerate(getattr(cfg, "methods", [])):
        launcher_precision_for(str((m.params or {}).get("mixed_precision", "auto")),
                               f"methods[{i}].params.mixed_precision")


def _cmd_purify(args, ui: _Ui) -> tuple[int, dict]:
    from dmlp_plugin.config import load_config  # noqa: PLC0415
    from dmlp_plugin.distributed import launcher_rank  # noqa: PLC0415
    from dmlp_plugin.pipeline import purify_run  # noqa: PLC0415

    cfg, raw = load_config(args.config, _overrides(args))
    _check_launcher_precision(cfg)
    metrics = purify_run(cfg, args.out, raw=raw, progress=ui.progress and not args.no_progress)
    if launcher_rank() != 0:  # under a launcher, process 0 speaks for all
        return 0, None
    for line in _purify_lines(metrics):
        ui.say(line)
    if ui.verbose:
        for line in _purify_details(metrics, args.out):
            ui.detail(line)
    ui.say(purify_summary(metrics, cfg.noise.rate, args.out))
    labels = os.path.join(args.out, "labels.npz")
    return 0, {"ok": True, "command": "purify", "out": args.out, "labels": labels,
               "summary": _purify_summary_dict(metrics, cfg.noise.rate), "metrics": metrics}


def _purify_lines(metrics: dict) -> list[str]:
    """The label accuracies (when the truth is known), the estimate without true labels, auto's choice."""
    from dmlp_plugin.report import auto_line, comparison_setting, comparisons, preprocessor_label  # noqa: PLC0415

    lines = []
    sec = metrics["seconds"]
    if "label_accuracy_after" in metrics:
        parts = [f"noisy {metrics['label_accuracy_before']:.4f}",
                 f"{preprocessor_label(metrics)} {metrics['label_accuracy_after']:.4f} ({sec.get('purify', 0):.1f} s)"]
        for name, e in comparisons(metrics):
            if e.get("label_accuracy_after") is None:
                parts.append(f"{name} {e.get('status', 'n/a')}")
                continue
            setting = comparison_setting(name, e).split(";")[0] if name == "knn_vote" else ""
            parts.append(f"{name} {e['label_accuracy_after']:.4f} ({setting + ', ' if setting else ''}"
                         f"{e.get('seconds', 0):.1f} s)")
        lines.append("label accuracy: " + ", ".join(parts) + f"; total {sec.get('total', 0):.1f} s")
    est = metrics.get("estimated_accuracy")
    if est:
        first = next(iter(est.values()))
        lines.append(f"estimated without true labels ({first['folds']}-fold over the {first['scored']} trusted, "
                     f"{round(100 * first['level'])}% interval): "
                     + ", ".join(f"{k} {e['estimate']:.4f} [{e['low']:.3f}, {e['high']:.3f}]" for k, e in est.items())
                     + f"; {sec.get('estimate', 0):.1f} s")
    if metrics.get("auto"):
        lines.append(auto_line(metrics))
    return lines


def _purify_details(metrics: dict, out: str) -> list[str]:
    """-v: seconds per stage and, when the truth is known, label accuracy per class before and after."""
    from dmlp_plugin.artifacts import load_labels  # noqa: PLC0415
    from dmlp_plugin.report import per_class_accuracy  # noqa: PLC0415

    lines = ["seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["seconds"].items())]
    art = load_labels(os.path.join(out, "labels.npz"))
    if art.true_labels is not None:
        rows = per_class_accuracy(art)
        lines.append("label accuracy per class, untrusted samples (before -> after): " + ", ".join(
            f"{r['class']} {r['before']:.3f}->{r['after']:.3f}" for r in rows if r["samples"]))
    return lines


def _purify_summary_dict(metrics: dict, requested_rate) -> dict:
    n = metrics["noise"]
    return {"num_samples": metrics["num_samples"], "noise_kind": n["kind"],
            "noise_rate_requested": None if n["kind"] in ("human", "none") else requested_rate,
            "noise_rate_measured": n["flip_rate"], "trusted": metrics["trusted"]["size"],
            "label_accuracy_before": metrics.get("label_accuracy_before"),
            "label_accuracy_after": metrics.get("label_accuracy_after"),
            "seconds": metrics["seconds"].get("total"), "world_size": metrics.get("world_size", 1)}


def purify_summary(metrics: dict, requested_rate, out: str) -> str:
    """The run in one line: noise rate requested and measured, trusted size, seconds, where the labels went."""
    s = _purify_summary_dict(metrics, requested_rate)
    asked = " (labels from a file)" if s["noise_kind"] == "human" else "" if s["noise_rate_requested"] is None else \
        f" requested {s['noise_rate_requested']:g}"
    world = s["world_size"]
    return (f"{s['num_samples']} samples, noise {s['noise_kind']}{asked}, measured flip rate {s['noise_rate_measured']:.4f}; "
            f"{s['trusted']} trusted; {s['seconds'] or 0:.1f} s; wrote {os.path.join(out, 'labels.npz')}, "
            f"metrics.json, report.md" + (f" ({world} processes)" if world > 1 else ""))


def _cmd_bench(args, ui: _Ui) -> tuple[int, dict]:
    from dmlp_plugin.bench import bench_run  # noqa: PLC0415
    from dmlp_plugin.bench_report import summarise, text_table  # noqa: PLC0415
    from dmlp_plugin.config import BenchConfig, load_config  # noqa: PLC0415
    from dmlp_plugin.distributed import launcher_rank  # noqa: PLC0415

    cfg, raw = load_config(args.config, _overrides(args), schema=BenchConfig)
    _check_launcher_precision(cfg)
    records = bench_run(cfg, args.out, raw=raw, progress=ui.progress and not args.no_progress)
    if launcher_rank() != 0:  # under a launcher, process 0 speaks for all
        return 0, None
    rows = summarise(records)
    for line in text_table(rows, verbose=ui.verbose):
        ui.say(line)
    ui.say(f"{len(records)} runs; wrote {os.path.join(args.out, 'report.md')}, results.json, results.csv and plots")
    return 0, {"ok": True, "command": "bench", "out": args.out, "report": os.path.join(args.out, "report.md"),
               "runs": len(records), "summary": rows}


def _cmd_registry(args, ui: _Ui) -> tuple[int, dict]:
    from dmlp_plugin.registry import KINDS, load_registry  # noqa: PLC0415

    if args.registry_command != "list":
        raise UserError("registry needs an action: `dmlp registry list`")
    reg = load_registry()
    kinds = KINDS if not args.kind else (args.kind,)
    found = {}
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        ui.say(f"{kind}:")
        entries = reg.entries(kind)
        if not entries:
            ui.say("  (none)")
        for e in entries:
            src = "" if e.source == "registry.yaml" and not ui.verbose else f"  [{e.source}]"
            ui.say(f"  {e.name:<14} {e.summary}{src}" + (f"  ({e.target})" if ui.verbose else ""))
        found[kind] = [{"name": e.name, "summary": e.summary, "source": e.source, "target": e.target}
                       for e in entries]
    return 0, {"ok": True, "command": "registry list", "components": found}


def _cmd_export(args, ui: _Ui) -> tuple[int, dict]:
    from dmlp_plugin.export import export_labels  # noqa: PLC0415

    rec = export_labels(args.labels_file, args.format, args.out, labels=args.labels, rate=args.rate, mode=args.mode)
    for w in rec["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    ui.say(f"wrote {', '.join(rec['files'])}: {rec['num_samples']} {rec['labels']} labels "
           f"({rec['num_classes']} classes) in the data set's training order")
    if rec.get("note"):
        ui.say(rec["note"])
    ui.detail(f"order: {rec['order']}")
    return 0, {"ok": True, "command": "export", **rec}


def _cmd_env(args, ui: _Ui) -> tuple[int, dict]:
    from dmlp_plugin.envinfo import environment, environment_lines  # noqa: PLC0415

    env = environment()
    for line in environment_lines(env):
        ui.say(line)
    return 0, {"ok": True, "command": "env", **env}


_COMMANDS = {"purify": _cmd_purify, "bench": _cmd_bench, "registry": _cmd_registry, "export": _cmd_export,
             "env": _cmd_env}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it ends as Ctrl-C does: staging and temporary files
    removed, one line, exit 143 (128 + 15)."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up ends it at once
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never wait on the model hub
    # OpenMP threads that wait by sleeping, not spinning (read when torch loads, below): beside other jobs on a
    # 2-core machine a digits purification on 2 spinning threads ran > 180 s instead of ~20 s
    # (benchmarks/results/threads.md); an OMP_WAIT_POLICY of the user's own is kept
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ui = None
    in_main = threading.current_thread() is threading.main_thread()  # (signals can be caught only there)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command is None:  # bare `dmlp`: the help, as `git` and argparse's --help give it
            parser.print_help()
            return 0
        ui = _Ui(args)
        if args.command != "env":  # (env reports; it must run anywhere)
            from dmlp_plugin.distributed import check_launch  # noqa: PLC0415

            check_launch()  # a launch whose process count this run does not see: one line, before any work
        with ui.session():
            code, obj = _COMMANDS[args.command](args, ui)
        ui.emit(obj)
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        if ui is not None or "--json" in (sys.argv[1:] if argv is None else argv):  # --json: still one object
            (ui or _Ui(argparse.Namespace(json=True))).emit({"ok": False, "error": str(e)})
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    except SystemExit as e:
        if ui is None:  # argparse's own exits (--help, --version)
            raise
        msg = (f"something dmlp imported called sys.exit({e.code!r}) while `dmlp {args.command}` ran (a plugin, "
               f"at import?), so the command did not finish; the output folder was left as it was; fix or "
               f"uninstall that package (`dmlp registry list` shows where each component comes from)")
        print(f"error: {msg}", file=sys.stderr)
        ui.emit({"ok": False, "error": msg})
        return EXIT_USAGE
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if os.environ.get("WORLD_SIZE", "1") != "1":  # under a launcher: leave the process group cleanly
            from dmlp_plugin.distributed import shutdown  # noqa: PLC0415

            shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
