"""The ``dmlp`` command (also ``python -m dmlp_plugin``). Parses argv, validates, calls the pipeline.

Bad input ends with a one-line ``error: ...`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from dmlp_plugin import __version__
from dmlp_plugin.errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage too)
        raise UserError(f"{message}; see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dmlp", description="Purify noisy labels with DMLP and benchmark noisy-label methods.")
    p.add_argument("--version", action="version", version=f"dmlp_plugin {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    pur = sub.add_parser("purify", help="purify the labels of a data set (writes labels.npz, metrics.json, report.md)",
                         description="Run data + noise -> features -> purifier on a YAML config and write "
                                     "DIR/labels.npz, DIR/metrics.json, DIR/report.md and plots. Under "
                                     "`torchrun` or `accelerate launch` the purifier's rows are sharded over the "
                                     "processes and process 0 writes DIR (see the README).")
    pur.add_argument("config", help="YAML config, e.g. configs/purify-digits.yaml")
    pur.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files in it are replaced)")
    pur.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set noise.rate=0.8 (repeatable; values parsed as YAML)")
    pur.add_argument("--no-progress", action="store_true", help="hide progress bars")

    ben = sub.add_parser("bench", help="A/B benchmark: each method on noisy and on purified labels (resumable)",
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
    ben.add_argument("--no-progress", action="store_true", help="hide progress bars")

    reg = sub.add_parser("registry", help="list registered datasets, noise models, preprocessors and methods")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="ACTION", parser_class=_Parser)
    lst = reg_sub.add_parser("list", help="show every registered component with its source")
    lst.add_argument("kind", nargs="?", help="only this kind (datasets, noise, preprocessors, methods)")
    return p


def _cmd_purify(args) -> int:
    from dmlp_plugin.config import load_config  # noqa: PLC0415
    from dmlp_plugin.distributed import launcher_rank  # noqa: PLC0415
    from dmlp_plugin.pipeline import purify_run  # noqa: PLC0415

    cfg, raw = load_config(args.config, args.overrides)
    metrics = purify_run(cfg, args.out, raw=raw, progress=not args.no_progress)
    if launcher_rank() != 0:  # under a launcher, process 0 speaks for all
        return 0
    if "label_accuracy_after" in metrics:
        from dmlp_plugin.report import comparison_setting, comparisons, preprocessor_label  # noqa: PLC0415

        sec = metrics["seconds"]
        parts = [f"noisy {metrics['label_accuracy_before']:.4f}",
                 f"{preprocessor_label(metrics)} {metrics['label_accuracy_after']:.4f} ({sec.get('purify', 0):.1f} s)"]
        for name, e in comparisons(metrics):
            if e.get("label_accuracy_after") is None:
                parts.append(f"{name} {e.get('status', 'n/a')}")
                continue
            setting = comparison_setting(name, e).split(";")[0] if name == "knn_vote" else ""
            parts.append(f"{name} {e['label_accuracy_after']:.4f} ({setting + ', ' if setting else ''}"
                         f"{e.get('seconds', 0):.1f} s)")
        print("label accuracy: " + ", ".join(parts) + f"; total {sec.get('total', 0):.1f} s")
    est = metrics.get("estimated_accuracy")
    if est:
        first = next(iter(est.values()))
        print(f"estimated without true labels ({first['folds']}-fold over the {first['scored']} trusted, "
              f"{round(100 * first['level'])}% interval): "
              + ", ".join(f"{k} {e['estimate']:.4f} [{e['low']:.3f}, {e['high']:.3f}]" for k, e in est.items())
              + f"; {metrics['seconds'].get('estimate', 0):.1f} s")
    if metrics.get("auto"):
        from dmlp_plugin.report import auto_line  # noqa: PLC0415

        print(auto_line(metrics))
    world = metrics.get("world_size", 1)
    print(f"wrote {os.path.join(args.out, 'labels.npz')}, metrics.json, report.md"
          + (f" ({world} processes)" if world > 1 else ""))
    return 0


def _cmd_bench(args) -> int:
    from dmlp_plugin.bench import bench_run  # noqa: PLC0415
    from dmlp_plugin.bench_report import summarise  # noqa: PLC0415
    from dmlp_plugin.config import BenchConfig, load_config  # noqa: PLC0415
    from dmlp_plugin.distributed import launcher_rank  # noqa: PLC0415

    cfg, raw = load_config(args.config, args.overrides, schema=BenchConfig)
    records = bench_run(cfg, args.out, raw=raw, progress=not args.no_progress)
    if launcher_rank() != 0:  # under a launcher, process 0 speaks for all
        return 0
    print(f"{'noise':<14} {'method':<12} {'labels':<14} {'test acc':>16} {'delta':>14}")
    for r in summarise(records):
        std = f" ± {100 * r['test_accuracy_std']:.2f}" if r["n"] > 1 else ""
        delta = "" if r["delta_mean"] is None else f"{100 * r['delta_mean']:+.2f}"
        print(f"{r['noise_tag']:<14} {r['method']:<12} {r['labels']:<14} {100 * r['test_accuracy_mean']:>9.2f}{std:<7} "
              f"{delta:>14}")
    print(f"wrote {os.path.join(args.out, 'report.md')}, results.json, results.csv and plots")
    return 0


def _cmd_registry(args) -> int:
    from dmlp_plugin.registry import KINDS, load_registry  # noqa: PLC0415

    if args.registry_command != "list":
        raise UserError("registry needs an action: `dmlp registry list`")
    reg = load_registry()
    kinds = KINDS if not args.kind else (args.kind,)
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        print(f"{kind}:")
        entries = reg.entries(kind)
        if not entries:
            print("  (none)")
        for e in entries:
            src = "" if e.source == "registry.yaml" else f"  [{e.source}]"
            print(f"  {e.name:<14} {e.summary}{src}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm must never wait on the model hub
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        if args.command == "purify":
            return _cmd_purify(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "registry":
            return _cmd_registry(args)
        parser.print_help()
        return EXIT_USAGE
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if os.environ.get("WORLD_SIZE", "1") != "1":  # under a launcher: leave the process group cleanly
            from dmlp_plugin.distributed import shutdown  # noqa: PLC0415

            shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
