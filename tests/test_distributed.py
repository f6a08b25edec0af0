"""Several processes (torchrun / accelerate launch, gloo on the CPU): the purifier shards its rows and
all-reduces its sufficient statistics, so 2 processes give the labels 1 process gives; a plain
``Accelerator()``, which miscounts the processes on a CPU, is refused; a 2-process training run killed with
SIGKILL resumes to the uninterrupted result."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"


def _launch(args, tmp_path, nproc=2, timeout=300, extra_env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_purify_like_one(tmp_path):
    sys.path.insert(0, str(WORKERS))
    from dist_purify import CFG, problem

    from dmlp_plugin.purifier.dmlp import purify

    out = str(tmp_path / "two.npz")
    r = _launch([str(WORKERS / "dist_purify.py"), out], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    two = np.load(out)
    info = json.loads(Path(out + ".json").read_text())
    assert info["world_size"] == 2
    x, y, noisy, meta = problem()
    one = purify([x], noisy, meta, y[meta], 10, CFG, truth=y, progress=False)
    np.testing.assert_array_equal(two["hard"], one.hard)
    np.testing.assert_allclose(two["soft"], one.soft, atol=1e-4)
    assert info["history"]["label_accuracy"] == pytest.approx(one.history[-1]["label_accuracy"], abs=1e-3)
    assert np.mean(one.hard == y) > 0.75  # it purified (80% noise in)


def test_purify_command_under_torchrun(tmp_path):
    from dmlp_plugin.cli import main

    args = ["purify", str(ROOT / "configs" / "purify-digits.yaml"), "--no-progress",
            "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 10}", "--set", "checks.estimate_folds=0",
            "--set", f"features.cache_dir={tmp_path / 'cache'}"]
    r = _launch(["-m", "dmlp_plugin", *args[:2], "--out", str(tmp_path / "two"), *args[2:]], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1 and "(2 processes)" in r.stdout  # process 0 speaks and writes
    assert main([*args[:2], "--out", str(tmp_path / "one"), *args[2:]]) == 0
    one, two = np.load(tmp_path / "one" / "labels.npz"), np.load(tmp_path / "two" / "labels.npz")
    np.testing.assert_array_equal(one["hard"], two["hard"])
    np.testing.assert_allclose(one["soft"], two["soft"], atol=1e-4)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["label_accuracy_after"] == pytest.approx(m2["label_accuracy_after"], abs=1e-9)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_plain_accelerator_on_cpu_is_refused(tmp_path):
    r = _launch([str(WORKERS / "plain_accelerator.py")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GUARD MISSED" not in r.stdout
    assert r.stdout.count("refused: a plain Accelerator() reports 1 process(es) but the launcher started 2") == 2


def test_world_size_guard_in_one_process(monkeypatch):
    from dmlp_plugin.distributed import Dist, check_world_size, current
    from dmlp_plugin.errors import UserError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert current() == Dist()
    check_world_size(1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UserError, match="reports 1 process.*started 4.*cpu=True"):
        check_world_size(1)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="WORLD_SIZE='two'"):
        current()
    d = Dist(rank=1, world_size=3)
    assert [d.block(10, r) for r in range(3)] == [(0, 3), (3, 6), (6, 10)] and d.block(10) == (3, 6)


def test_bench_under_torchrun(tmp_path):
    # the whole A/B grid on 2 processes: sharded purification, data-parallel training, process 0 writes;
    # a second launch reuses every finished run
    config = tmp_path / "bench.yaml"
    config.write_text("""
seeds: [0]
dataset: {name: digits}
noise: [{kind: symmetric, rate: 0.5}]
trusted: {source: clean_sample, size: 0.03}
features: {source: raw}
preprocessor: {name: dmlp, params: {epochs: 10}}
arms: [noisy, purified]
methods: [{name: ce, params: {epochs: 2}}]
""")
    cmd = ["-m", "dmlp_plugin", "bench", str(config), "--out", str(tmp_path / "b"), "--no-progress"]
    first = _launch(cmd, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("wrote ") == 1
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [(r["method"], r["labels"]) for r in results] == [("ce", "noisy"), ("ce", "purified")]
    assert all(r["info"]["num_processes"] == 2 and 0 <= r["test_accuracy"] <= 1 for r in results)
    purification = json.loads((tmp_path / "b" / "purification.json").read_text())
    assert purification["symmetric-50-s0"]["world_size"] == 2
    assert (tmp_path / "b" / "report.md").is_file()
    stamp = (tmp_path / "b" / "runs").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "b" / "runs").iterdir())
    again = _launch(cmd, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "results.json").read_text()) == results  # reused, not retrained
    assert sorted(p.name for p in (tmp_path / "b" / "runs").iterdir()) == stamp[1]


@pytest.mark.parametrize("method", ["ce", "elr"])
def test_killed_two_process_training_resumes_to_the_uninterrupted_result(method, tmp_path):
    # both processes are SIGKILLed right after epoch 2's checkpoint; the same command then resumes from it
    # (accelerate load_state: models, optimisers, RNG, loop state) and ends where an uninterrupted run ends
    worker = str(WORKERS / "dist_train.py")
    env_kill = {"KILL_AFTER_EPOCH": "2"}
    killed = _launch([worker, method, "4", str(tmp_path / "ck"), str(tmp_path / "a.json")], tmp_path,
                     extra_env=env_kill)
    assert killed.returncode != 0 and not (tmp_path / "a.json").exists()
    assert (tmp_path / "ck" / "state").is_dir()
    resumed = _launch([worker, method, "4", str(tmp_path / "ck"), str(tmp_path / "a.json")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _launch([worker, method, "4", str(tmp_path / "ck2"), str(tmp_path / "b.json")], tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["info"]["resumed_at_epoch"] == 2 and b["info"]["resumed_at_epoch"] is None
    assert a["info"]["num_processes"] == 2
    assert [c["epoch"] for c in a["curve"]] == [1, 2, 3, 4]
    assert [c["test_accuracy"] for c in a["curve"]] == [c["test_accuracy"] for c in b["curve"]]
    assert [c["train_loss"] for c in a["curve"]] == [c["train_loss"] for c in b["curve"]]


def _simclr_args(tmp_path, name):
    return ["purify", str(ROOT / "configs" / "purify-digits.yaml"), "--out", str(tmp_path / name), "--no-progress",
            "--set", f"features.cache_dir={tmp_path / ('cache_' + name)}",
            "--set", "features.ssl={backbone: test_resnet, image_size: 16, epochs: 3, batch_size: 128, hflip: false}",
            "--set", "preprocessor.params={epochs: 5}", "--set", "checks.estimate_folds=0"]


def test_simclr_features_under_torchrun_and_a_kill_9_resumes(tmp_path):
    # stage 1 under 2 processes: process 0 trains SimCLR as one process would and caches the features, the
    # other waits and gets them; so the same command on 1 process makes the same file, bit for bit, and the
    # same hard labels
    r = _launch(["-m", "dmlp_plugin", *_simclr_args(tmp_path, "o")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    caches = sorted(p.name for p in (tmp_path / "cache_o").iterdir())
    assert [c for c in caches if c.endswith(".npz")] and not [c for c in caches if c.endswith(".pt")]
    sidecar = next((tmp_path / "cache_o").glob("features-*.json"))
    prov = json.loads(sidecar.read_text())
    assert prov["world_size"] == 1 and len(prov["loss_history"]) == 3 and prov["quality"]
    assert all(np.isfinite(prov["loss_history"]))
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["label_accuracy_after"] > metrics["label_accuracy_before"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    solo = subprocess.run([sys.executable, "-m", "dmlp_plugin", *_simclr_args(tmp_path, "s")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert solo.returncode == 0, solo.stderr[-3000:]
    one, two = (next((tmp_path / f"cache_{n}").glob("features-*.npz")) for n in ("s", "o"))
    assert one.name == two.name  # the same cache key under 1 and 2 processes
    f1, f2 = np.load(one), np.load(two)
    assert all(f1[v].tobytes() == f2[v].tobytes() for v in ("plain", "hflip", "test_plain"))
    assert json.loads(next((tmp_path / "cache_s").glob("features-*.json")).read_text())["quality"] == prov["quality"]
    l1, l2 = np.load(tmp_path / "s" / "labels.npz"), np.load(tmp_path / "o" / "labels.npz")
    np.testing.assert_array_equal(l1["hard"], l2["hard"])
    np.testing.assert_allclose(l1["soft"], l2["soft"], atol=1e-4)

    # both processes SIGKILLed once SimCLR's epoch-1 checkpoint is on disk; the same launch resumes at epoch 2
    # and ends with the uninterrupted run's features and labels, bit for bit
    killed = _launch([str(WORKERS / "kill_cli.py"), *_simclr_args(tmp_path, "k")], tmp_path,
                     extra_env={"KILL_AT": "ssl:1"})
    assert killed.returncode != 0 and not (tmp_path / "k").exists()
    assert list((tmp_path / "cache_k").glob("ssl-*.pt"))
    # the same launch again, killed this time once the purifier's epoch-2 checkpoints (one per process) exist
    second = _launch([str(WORKERS / "kill_cli.py"), *_simclr_args(tmp_path, "k")], tmp_path,
                     extra_env={"KILL_AT": "purify:2"})
    assert second.returncode != 0 and not (tmp_path / "k").exists()
    assert second.stderr.count("resuming SimCLR after epoch 1 of 3") == 1  # process 0 says it
    assert len(list((tmp_path / "cache_k").glob("purify-*.pt.rank*"))) == 2
    again = _launch(["-m", "dmlp_plugin", *_simclr_args(tmp_path, "k")], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("resuming the purifier after epoch 2 of 5") == 1
    assert not list((tmp_path / "cache_k").glob("*.pt*"))
    a = np.load(next((tmp_path / "cache_o").glob("features-*.npz")))
    b = np.load(next((tmp_path / "cache_k").glob("features-*.npz")))
    assert a["plain"].tobytes() == b["plain"].tobytes()
    la, lb = np.load(tmp_path / "o" / "labels.npz"), np.load(tmp_path / "k" / "labels.npz")
    assert la["soft"].tobytes() == lb["soft"].tobytes()


def test_data_parallel_nt_xent_gradient_equals_the_whole_batch_one(tmp_path):
    r = _launch([str(WORKERS / "dist_ntxent.py")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = [float(v) for v in re.findall(r"max grad diff (\S+) of", r.stdout)]  # lines may interleave
    assert len(diffs) == 2 and max(diffs) < 1e-6
