"""kill -9 through the command line, as a user meets it: `dmlp purify` SIGKILLed during SimCLR training, then
(rerun) during purification; `dmlp bench` SIGKILLed during a baseline's training. Rerunning the same command
resumes from the last checkpoint and writes what an uninterrupted run writes, bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KILLER = ROOT / "tests" / "workers" / "kill_cli.py"
SSL = "features.ssl={backbone: test_resnet, image_size: 16, epochs: 4, batch_size: 128, hflip: false}"


def _dmlp(*args: str, kill_at: str | None = None):
    """`dmlp ARGS` in a fresh process (one thread); with ``kill_at`` it SIGKILLs itself there (kill_cli.py)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    prog = [str(KILLER)] if kill_at else ["-m", "dmlp_plugin"]
    if kill_at:
        env["KILL_AT"] = kill_at
    return subprocess.run([sys.executable, *prog, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)


def _purify(out: Path, cache: Path, kill_at: str | None = None):
    return _dmlp("purify", str(ROOT / "configs" / "purify-digits.yaml"), "--out", str(out), "--no-progress",
                 "--set", f"features.cache_dir={cache}", "--set", SSL, "--set", "preprocessor.params={epochs: 12}",
                 "--set", "checks.estimate_folds=0",
                 "--set", "noise.rate=0.6", "--set", "seed=3", kill_at=kill_at)


def test_kill_9_during_ssl_and_purification_then_rerun_equals_an_uninterrupted_run(tmp_path):
    straight = _purify(tmp_path / "a", tmp_path / "cache_a")
    assert straight.returncode == 0, straight.stderr[-3000:]

    out, cache = tmp_path / "b", tmp_path / "cache_b"
    first = _purify(out, cache, kill_at="ssl:2")  # dies once SimCLR's epoch-2 checkpoint is on disk
    assert first.returncode == -9, first.stderr[-3000:]
    # only the checkpoint, and the killed run's lock (its pid is dead: the rerun takes it over)
    assert not out.exists() and sorted(p.suffix for p in cache.glob("ssl-*")) == [".lock", ".pt"]

    second = _purify(out, cache, kill_at="purify:5")  # same command: SimCLR resumes, then the purifier dies
    assert second.returncode == -9, second.stderr[-3000:]
    assert "resuming SimCLR after epoch 2 of 4" in second.stderr
    assert not out.exists() and list(cache.glob("purify-*.pt"))

    third = _purify(out, cache)  # same command again: features are cached, the purifier resumes
    assert third.returncode == 0, third.stderr[-3000:]
    assert "resuming the purifier after epoch 5 of 12" in third.stderr
    assert "resuming SimCLR" not in third.stderr
    assert not list(cache.glob("*.pt"))  # every checkpoint is removed once the outputs are written
    assert not list(cache.glob("*.lock"))  # and every lock, the dead runs' taken over

    a, b = np.load(tmp_path / "a" / "labels.npz"), np.load(out / "labels.npz")
    assert a.files == b.files
    for key in a.files:
        if key != "provenance_json":
            assert a[key].tobytes() == b[key].tobytes(), key

    def provenance(z, cache):  # the same, but for where the cache is and how long SimCLR took
        p = json.loads(str(z["provenance_json"]).replace(str(cache), "CACHE"))
        assert p["features"].pop("seconds") >= 0
        return p

    assert provenance(a, tmp_path / "cache_a") == provenance(b, cache)
    fa, fb = sorted((tmp_path / "cache_a").glob("features-*.npz")), sorted(cache.glob("features-*.npz"))
    assert [f.name for f in fa] == [f.name for f in fb]
    for x, y in zip(fa, fb):
        za, zb = np.load(x), np.load(y)
        assert za.files == zb.files and "plain" in za.files
        for k in za.files:
            if k != "provenance":  # it holds the seconds taken
                assert za[k].tobytes() == zb[k].tobytes(), k


def _bench(out: Path, kill_at: str | None = None):
    return _dmlp("bench", str(ROOT / "configs" / "demo.yaml"), "--out", str(out), "--no-progress",
                 "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 10}", "--set", "seeds=[0]",
                 "--set", "checks.estimate_folds=0",
                 "--set", "arms=[purified]", "--set", "methods=[{name: elr, params: {epochs: 4}}]", kill_at=kill_at)


def test_kill_9_during_bench_training_then_rerun_equals_an_uninterrupted_run(tmp_path):
    straight = _bench(tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _bench(tmp_path / "b", kill_at="train:2")  # dies once ELR's epoch-2 checkpoint is on disk
    assert killed.returncode == -9, killed.stderr[-3000:]
    run = "symmetric-80-s0-elr-purified"
    assert not (tmp_path / "b" / "runs" / run / "result.json").exists()
    assert (tmp_path / "b" / "runs" / run / "checkpoint").is_dir()
    again = _bench(tmp_path / "b")
    assert again.returncode == 0, again.stderr[-3000:]
    a = json.loads((tmp_path / "a" / "runs" / run / "result.json").read_text())
    b = json.loads((tmp_path / "b" / "runs" / run / "result.json").read_text())
    assert a["info"]["resumed_at_epoch"] is None and b["info"]["resumed_at_epoch"] == 2
    assert a["curve"] == b["curve"] and a["test_accuracy"] == b["test_accuracy"]
    assert not (tmp_path / "b" / "runs" / run / "checkpoint").exists()
