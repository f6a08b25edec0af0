"""``accelerate launch`` as it really behaves (accelerate 1.x): a launch that asks for 2 processes but starts one
(``--cpu --num_processes 2``, ``num_processes: 2`` in a ``--config_file`` or in the default config under
``$HF_HOME``) is a one-line error, a multi-GPU launch runs 2 processes (also without a GPU), and the launcher's
``--mixed_precision`` is taken for ``auto`` and refused in one line when the config says otherwise."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmlp_plugin.distributed import accelerate_launch_args, check_launch, launch_request
from dmlp_plugin.errors import UserError
from dmlp_plugin.hardware import launcher_mixed_precision, launcher_precision_for, resolve_mixed_precision

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CPU2 = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\nnum_machines: 1\n"
GPU2 = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: 1\n"
PURIFY = ["-m", "dmlp_plugin", "purify", str(ROOT / "configs" / "purify-digits.yaml"), "--no-progress",
          "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 5}", "--set", "checks.estimate_folds=0"]


def test_launch_request_reads_flags_config_files_and_the_default_config(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf")}
    for argv in (["/venv/bin/python", "/venv/bin/accelerate", "launch"], ["accelerate-launch"],
                 ["python", "-m", "accelerate.commands.launch"]):
        assert accelerate_launch_args([*argv, "--cpu", "x.py"]) == ["--cpu", "x.py"]
    assert accelerate_launch_args(["python", "-m", "torch.distributed.run", "x.py"]) is None
    assert launch_request(["python", "train.py", "launch"], env) is None

    flag = launch_request(["accelerate", "launch", "--cpu", "--num-processes=2", "-m", "dmlp_plugin", "purify"], env)
    assert (flag["num_processes"], flag["num_processes_from"], flag["mixed_precision"]) == (2, "--num_processes 2", None)

    (tmp_path / "f.yaml").write_text(CPU2 + "mixed_precision: bf16\n")
    conf = launch_request(["accelerate", "launch", "--config_file", "f.yaml", "x.py"], env, cwd=str(tmp_path))
    assert conf["num_processes"] == 2 and conf["num_processes_from"] == f"num_processes: 2 in {tmp_path / 'f.yaml'}"
    assert conf["mixed_precision"] == "bf16"
    both = launch_request(["accelerate", "launch", "--config_file", "f.yaml", "--num_processes", "1", "x.py"], env,
                          cwd=str(tmp_path))
    assert both["num_processes"] == 1  # the flag wins, as in accelerate

    assert launch_request(["accelerate", "launch", "x.py"], env)["num_processes"] is None  # nothing asked
    (tmp_path / "hf" / "accelerate").mkdir(parents=True)
    (tmp_path / "hf" / "accelerate" / "default_config.yaml").write_text(CPU2)
    default = launch_request(["accelerate", "launch", "x.py"], env)
    assert default["num_processes"] == 2 and "default_config.yaml" in default["num_processes_from"]
    assert launch_request(["accelerate", "launch", "--cpu", "x.py"], env)["num_processes"] is None  # (as accelerate)


def test_check_launch_refuses_a_count_the_run_does_not_see():
    asked = {"num_processes": 2, "num_processes_from": "--num_processes 2"}
    with pytest.raises(UserError, match=r"^accelerate launch asked for 2 processes \(--num_processes 2\) but started "
                                        r"ONE process: .*--multi_gpu --num_processes 2.*nproc_per_node 2") as e:
        check_launch(asked, env={})
    assert "\n" not in str(e.value)
    check_launch(asked, env={"WORLD_SIZE": "2"})
    check_launch({"num_processes": 1, "num_processes_from": "--num_processes 1"}, env={})
    check_launch({"num_processes": None}, env={})
    with pytest.raises(UserError, match=r"asked for 4 processes .* but started 2 \(WORLD_SIZE=2\)"):
        check_launch({"num_processes": 4, "num_processes_from": "--num_processes 4"}, env={"WORLD_SIZE": "2"})
    with pytest.raises(UserError, match=r"one of 2 started by MPI \(OMPI_COMM_WORLD_SIZE=2\) without WORLD_SIZE"):
        check_launch({}, env={"OMPI_COMM_WORLD_SIZE": "2"})


def test_launcher_mixed_precision_is_taken_for_auto_and_a_clash_is_refused(monkeypatch):
    bf16 = {"mixed_precision": "bf16", "mixed_precision_from": "--mixed_precision bf16"}
    env = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    assert launcher_mixed_precision(env, bf16) == ("bf16", "--mixed_precision bf16")
    # accelerate exports `no` when it was told nothing: that is its default, not a request
    assert launcher_mixed_precision({"ACCELERATE_MIXED_PRECISION": "no"}, {"mixed_precision": None}) is None
    assert launcher_mixed_precision(env, {}) == ("bf16", "ACCELERATE_MIXED_PRECISION=bf16")  # no accelerate parent
    assert launcher_precision_for("auto", "features.ssl.amp", env, bf16) == "bf16"
    assert launcher_precision_for("bf16", "features.ssl.amp", env, bf16) == "bf16"
    assert launcher_precision_for("no", "features.ssl.amp", {}, {"mixed_precision": None}) == "no"
    with pytest.raises(UserError, match=r"^features.ssl.amp=no clashes with the launcher's mixed precision bf16 "
                                        r"\(--mixed_precision bf16\); make them agree: set features.ssl.amp to auto"):
        launcher_precision_for("no", "features.ssl.amp", env, bf16)
    with pytest.raises(UserError, match=r"mixed precision 'fp8' .* launch with --mixed_precision bf16, fp16 or no"):
        launcher_precision_for("auto", "x", {"ACCELERATE_MIXED_PRECISION": "fp8"}, {})
    # what a method's accelerator gets (baselines.common.make_accelerator resolves through this)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resolve_mixed_precision("auto", "cpu") == "no"
    with pytest.raises(UserError, match=r"mixed_precision=bf16 clashes with the launcher's mixed precision no"):
        resolve_mixed_precision("bf16", "cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UserError, match=r"the launcher's mixed precision fp16 \(mixed_precision=auto\) needs a GPU"):
        resolve_mixed_precision("auto", "cpu")


def _accelerate(args, tmp_path, extra_env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "HF_HOME": str(tmp_path / "hf"), **(extra_env or {})}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return subprocess.run([ACCELERATE, "launch", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("form", ["flag", "config_file", "default_config"])
def test_accelerate_launch_of_two_that_starts_one_process_is_one_line(form, tmp_path):
    (tmp_path / "cpu2.yaml").write_text(CPU2)
    (tmp_path / "hf" / "accelerate").mkdir(parents=True)
    if form == "default_config":
        (tmp_path / "hf" / "accelerate" / "default_config.yaml").write_text(CPU2)
    launch = {"flag": ["--cpu", "--num_processes", "2"], "config_file": ["--config_file", "cpu2.yaml"],
              "default_config": []}[form]
    r = _accelerate([*launch, *PURIFY, "--out", "out"], tmp_path)
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(ours) == 1, r.stderr[-3000:]
    source = {"flag": "--num_processes 2", "config_file": "cpu2.yaml", "default_config": "default_config.yaml"}[form]
    assert "accelerate launch asked for 2 processes" in ours[0] and source in ours[0] and "started ONE" in ours[0]
    assert "exit status 2" in r.stderr and "dmlp_plugin/" not in r.stderr  # (accelerate's own traceback, not ours)
    assert not (tmp_path / "out").exists()


def test_accelerate_launch_multi_gpu_config_runs_two_processes(tmp_path):
    (tmp_path / "gpu2.yaml").write_text(GPU2 + "mixed_precision: 'no'\n")
    r = _accelerate(["--config_file", "gpu2.yaml", *PURIFY, "--out", "out"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1 and "(2 processes)" in r.stdout


def test_accelerate_launch_mixed_precision_clash_is_one_line(tmp_path):
    r = _accelerate(["--cpu", "--num_processes", "1", "--mixed_precision", "bf16", *PURIFY[:-6], "--out", "out",
                     "--set", "features.ssl={backbone: test_resnet, image_size: 16, epochs: 1, amp: 'no'}"], tmp_path)
    ours = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(ours) == 1, r.stderr[-3000:]
    assert ours[0] == ("error: features.ssl.amp=no clashes with the launcher's mixed precision bf16 (--mixed_precision "
                       "bf16); make them agree: set features.ssl.amp to auto (it then takes the launcher's) or bf16, or "
                       "launch with --mixed_precision no")
    assert not (tmp_path / "out").exists()
