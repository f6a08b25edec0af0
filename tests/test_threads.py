"""threads: auto from affinity, cgroup quota and the launch's processes; bad values; the count used reaches torch
and metrics.json."""

import json
from pathlib import Path

import pytest
import torch

from dmlp_plugin import cli, hardware
from dmlp_plugin.envinfo import environment_lines, threads

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")
FAST = ["--set", "features.source=raw", "--set", "checks.estimate_folds=0", "--set", "checks.compare=[]",
        "--set", "preprocessor.params={epochs: 5}", "-q"]


def _cgroup(tmp_path, proc_line: str, files: dict) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for name in ("OMP_NUM_THREADS", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_cgroup_v2_quota_caps_the_affinity(tmp_path, eight_cpus):
    root, proc = _cgroup(tmp_path, "0::/", {"cpu.max": "150000 100000\n"})
    assert hardware.cgroup_cpu_limit(root, proc) == 1.5
    cpus, how = hardware.usable_cpus(root, proc)
    assert cpus == 2 and how == "cgroup quota 1.5 CPUs (affinity 8 CPUs)"
    assert hardware.auto_threads({}, root, proc) == (2, "cgroup quota 1.5 CPUs (affinity 8 CPUs) / 1 process")


def test_cgroup_v2_nested_takes_the_smallest_limit_and_max_is_none(tmp_path, eight_cpus):
    root, proc = _cgroup(tmp_path, "0::/a/b", {"a/b/cpu.max": "max 100000", "a/cpu.max": "300000 100000"})
    assert hardware.cgroup_cpu_limit(root, proc) == 3.0
    root, proc = _cgroup(tmp_path / "x", "0::/a", {"a/cpu.max": "max 100000", "cpu.max": "max 100000"})
    assert hardware.cgroup_cpu_limit(root, proc) is None
    assert hardware.usable_cpus(root, proc) == (8, "affinity 8 CPUs")


def test_cgroup_v1_quota(tmp_path, eight_cpus):
    root, proc = _cgroup(tmp_path, "4:cpu,cpuacct:/docker/abc",
                         {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "400000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"})
    assert hardware.cgroup_cpu_limit(root, proc) == 4.0
    assert hardware.auto_threads({"WORLD_SIZE": "2"}, root, proc)[0] == 2
    root, proc = _cgroup(tmp_path / "u", "4:cpu:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert hardware.cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_files_is_no_limit(tmp_path, eight_cpus):
    assert hardware.cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None
    assert hardware.auto_threads({}, tmp_path / "none", tmp_path / "missing") == (8, "affinity 8 CPUs / 1 process")


def test_auto_divides_by_the_launch_processes(tmp_path, eight_cpus):
    none = (tmp_path / "none", tmp_path / "missing")
    assert hardware.auto_threads({"WORLD_SIZE": "2"}, *none) == (4, "affinity 8 CPUs / 2 processes")
    # processes on this machine (LOCAL_WORLD_SIZE) before all of the launch's
    assert hardware.auto_threads({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, *none)[0] == 2
    assert hardware.auto_threads({"WORLD_SIZE": "16"}, *none)[0] == 1  # at least one
    assert hardware.auto_threads({"OMP_NUM_THREADS": "3", "WORLD_SIZE": "2"}, *none) == (3, "OMP_NUM_THREADS=3")
    assert hardware.auto_threads({"OMP_NUM_THREADS": "junk"}, *none)[0] == 8


def test_apply_auto_sets_torch_and_records_why(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(hardware, "cgroup_cpu_limit", lambda *a: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    info = hardware.apply_threads("auto", warn=False)
    assert torch.get_num_threads() == 1 and info["used"] == 1
    assert info["source"] == "affinity 2 CPUs / 2 processes"
    assert hardware.threads_info()["source"] == info["source"]
    torch.set_num_threads(2)  # changed behind dmlp's back: reported as torch's own count
    assert hardware.threads_info() == {"setting": None, "used": 2, "source": "torch's count (not set by dmlp)"}


def test_warning_when_threads_outnumber_cpus_or_the_machine_is_busy():
    assert "more than the 2 CPUs" in hardware.threads_warning(4, 2, 0.0)
    assert hardware.threads_warning(2, 2, 5.0) is None  # a busy machine is noted in metrics.json, not printed
    assert "--threads 1" in hardware.load_note(2, 2, 5.0)
    assert hardware.load_note(1, 2, 9.0) is None and hardware.load_note(2, 2, 0.5) is None


@pytest.mark.parametrize("command", ["purify", "bench"])
@pytest.mark.parametrize("value", ["0", "-1", "x", "2000"])
def test_bad_threads_is_one_line_exit_2(command, value, tmp_path, capsys):
    config = CONFIG if command == "purify" else str(ROOT / "configs" / "demo.yaml")
    assert cli.main([command, config, "--out", str(tmp_path / "o"), f"--threads={value}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: threads=") and "auto" in err[0], err
    assert not (tmp_path / "o").exists()


def test_bad_threads_in_the_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(Path(CONFIG).read_text() + "\nthreads: 0\n")
    assert cli.main(["purify", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: threads=0 is not a thread count")


def test_threads_reach_torch_and_metrics_json(tmp_path):
    want = 2 if torch.get_num_threads() == 1 else 1  # not the count the test started with
    out = tmp_path / "p"
    assert cli.main(["purify", CONFIG, "--out", str(out), "--threads", str(want), *FAST]) == 0
    assert torch.get_num_threads() == want
    m = json.loads((out / "metrics.json").read_text())
    assert m["threads"]["used"] == want and m["threads"]["setting"] == want
    assert m["threads"]["source"] == "threads setting"
    assert "threads: %d" % want in (out / "config.yaml").read_text()


def test_env_shows_the_auto_choice(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    th = threads()
    assert th["auto"] == 3 and th["auto_source"] == "OMP_NUM_THREADS=3"
    line = next(x for x in environment_lines({"packages": {"faiss": {"version": None, "distribution": None,
                                                                      "backend": "torch"}},
                                               "devices": {"cpu": "x", "cuda": [], "cuda_runtime": None,
                                                           "default": "cpu"},
                                               "threads": th, "datasets": {}}) if x.startswith("threads:"))
    assert f"threads: torch {torch.get_num_threads()} at start, auto -> 3 (OMP_NUM_THREADS=3); usable CPUs" in line
