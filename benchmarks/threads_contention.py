"""How much slower do a purification and a training run get beside a competing CPU load, per thread setting?

Each measurement is a fresh ``dmlp`` process (so torch's thread pool starts clean):

- purify: ``dmlp purify configs/purify-digits.yaml`` on raw-pixel features (the SSL features' cache key holds
  the thread count, so SSL would retrain SimCLR for every setting; ``--ssl`` keeps them), no estimate, no
  comparisons: the seconds are the purifier's (``metrics.json`` ``seconds.purify``) and the whole run's.
- train: ``dmlp bench configs/demo.yaml`` reduced to one CE run of ``--epochs`` epochs on the noisy arm (seconds:
  the run's own, ``results.json``).

Thread settings: ``old`` (what the project did before ``threads`` existed: torch's own count, measured in a fresh
process without OMP_NUM_THREADS), ``auto`` and ``1``. Each alone and beside ``--load`` busy-loop processes
started (and stopped) here. Prints a Markdown table; ``--write`` also writes benchmarks/results/threads.md.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/threads_contention.py --write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "threads.md"
FAST_PURIFY = ["--set", "checks.estimate_folds=0", "--set", "checks.compare=[]"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def torch_default_threads() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=_env(),
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def _dmlp(args: list[str], timeout: float) -> tuple[dict | None, float]:
    """Run ``dmlp ARGS --json -q``: (its JSON object or None when it failed / timed out, wall seconds)."""
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "dmlp_plugin", *args, "--json", "-q"], env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t
    wall = time.perf_counter() - t
    if r.returncode != 0:
        print(f"  failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None, wall
    return json.loads(r.stdout), wall


def run_purify(threads: str, tmp: Path, ssl: bool, timeout: float) -> dict:
    extra = [] if ssl else ["--set", "features.source=raw"]
    obj, wall = _dmlp(["purify", "configs/purify-digits.yaml", "--out", str(tmp / "p"), "--threads", threads,
                       "--set", f"features.cache_dir={tmp / 'cache'}", *FAST_PURIFY, *extra], timeout)
    if obj is None:
        return {"seconds": None, "wall": wall}
    m = obj["metrics"]
    return {"seconds": m["seconds"].get("purify"), "total": m["seconds"].get("total"), "wall": wall,
            "threads": m["threads"]["used"], "accuracy": m.get("label_accuracy_after")}


def run_train(threads: str, tmp: Path, epochs: int, timeout: float) -> dict:
    args = ["bench", "configs/demo.yaml", "--out", str(tmp / "b"), "--threads", threads, "--set", "seeds=[0]",
            "--set", f"methods=[{{name: ce, params: {{epochs: {epochs}}}}}]", "--set", "arms=[noisy]",
            "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 5}",
            "--set", f"features.cache_dir={tmp / 'cache'}", *FAST_PURIFY]
    obj, wall = _dmlp(args, timeout)
    if obj is None:
        return {"seconds": None, "wall": wall}
    rec = json.loads((tmp / "b" / "results.json").read_text())[0]
    return {"seconds": rec["seconds"], "wall": wall, "threads": rec.get("threads")}


def start_load(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # only the processes started here, by their own handle
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def measure(workload: str, threads: str, load: int, args) -> dict:
    procs = start_load(load)
    try:
        time.sleep(1.0 if load else 0.0)  # let the busy loops take their cores
        before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="dmlp-threads-") as d:
            r = run_purify(threads, Path(d), args.ssl, args.timeout) if workload == "purify" else \
                run_train(threads, Path(d), args.epochs, args.timeout)
    finally:
        stop_load(procs)
    return {**r, "workload": workload, "setting": threads, "load": load, "load_average_before": round(before, 2)}


def _fmt(s) -> str:
    return "timed out" if s is None else f"{s:.1f}"


def table(rows: list[dict], timeout: float) -> list[str]:
    out = ["| workload | threads | used | alone (s) | beside load (s) | slowdown |", "|---|---|---:|---:|---:|---:|"]
    for (w, setting) in dict.fromkeys((r["workload"], r["setting"]) for r in rows):
        alone = next(r for r in rows if (r["workload"], r["setting"], r["load"]) == (w, setting, 0))
        busy = next(r for r in rows if (r["workload"], r["setting"]) == (w, setting) and r["load"] > 0)
        a, b = alone["seconds"], busy["seconds"]
        slow = f"{b / a:.1f}x" if a and b else (f"> {timeout / a:.0f}x" if a and b is None else "n/a")
        used = alone.get("threads") or busy.get("threads") or "?"
        out.append(f"| {w} | {setting} | {used} | {_fmt(a)} | {_fmt(b)} | {slow} |")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", type=int, default=2, help="busy-loop processes beside the run (default 2)")
    p.add_argument("--epochs", type=int, default=2, help="CE epochs of the training run (default 2)")
    p.add_argument("--settings", default="old,auto,1", help="thread settings to compare (default old,auto,1)")
    p.add_argument("--workloads", default="purify,train")
    p.add_argument("--ssl", action="store_true", help="purify on SSL features (slow: SimCLR per thread count)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a run counts as timed out")
    p.add_argument("--write", action="store_true", help=f"write {RESULT.relative_to(ROOT)}")
    args = p.parse_args(argv)
    old = str(torch_default_threads())
    rows = []
    for w in args.workloads.split(","):
        for s in args.settings.split(","):
            for load in (0, args.load):
                r = measure(w, old if s == "old" else s, load, args)
                r["setting"] = f"old ({old})" if s == "old" else s
                print(f"{w} threads={r['setting']} load={load}: {_fmt(r['seconds'])} s "
                      f"(load average before {r['load_average_before']})", flush=True)
                rows.append(r)
    lines = table(rows, args.timeout)
    print("\n".join(lines))
    if args.write:
        write_result(rows, lines, args, old)
    return 0


def write_result(rows, lines, args, old: str) -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    head = [
        "# Threads beside a competing CPU load", "",
        f"`{' '.join(['python', 'benchmarks/threads_contention.py', *sys.argv[1:]])}` on {platform.machine()} with "
        f"{cpus} usable CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        f"{time.strftime('%Y-%m-%d')}. `old` = torch's own thread count ({old} here), what runs used before the "
        f"`threads` setting; the load is {args.load} busy-loop processes. purify: the purifier's seconds "
        f"(digits, raw-pixel features, no estimate or comparisons); train: one CE run of {args.epochs} epochs "
        f"(demo config, noisy arm). Timeout {args.timeout:.0f} s per run.", ""]
    raw = ["", "Load average (1 min) before each run: " + ", ".join(
        f"{r['workload']}/{r['setting']}/load {r['load']}: {r['load_average_before']}" for r in rows), ""]
    RESULT.write_text("\n".join(head + lines + raw))


if __name__ == "__main__":
    sys.exit(main())
