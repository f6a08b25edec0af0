"""One device vocabulary end to end: ``auto``, ``cpu``, ``cuda`` and ``cuda:N``, checked by
:func:`dmlp_plugin.hardware.resolve_device` for every stage (configs, ``purify_labels(device=)``, the trainers).
``cuda:N`` makes GPU N torch's current device, so the stages that say plain ``cuda`` (accelerate's state, the
bench's trainers) land there too; a GPU that is not there is a one-line error.

On a CPU-only machine the GPUs are faked (``torch.cuda.is_available`` / ``device_count`` / ``set_device``) and
the tests follow the device string to the first stage that would touch the GPU; with real GPUs the last tests
put tensors on them."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dmlp_plugin.errors import UserError
from dmlp_plugin.hardware import resolve_device

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")
FAST = ["--no-progress", "--set", "features.source=raw", "--set", "checks.estimate_folds=0"]


class _Stop(Exception):
    """Raised by a stand-in stage once it has seen the device it was given."""


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees cuda:0 and cuda:1 (faked); ``set_device`` calls are recorded, nothing touches CUDA."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.append(int(i)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1] if current else 0)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return current


def _one_line(err: UserError) -> str:
    text = str(err)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:-1", "CUDA", "cuda:", "cuda:1.0", "cuda:1:2", "cuda0",
                                    "mps", " cpu", "cuda:²"])
def test_a_device_outside_the_vocabulary_is_refused_in_one_line(device, two_gpus):
    with pytest.raises(UserError) as e:
        resolve_device(device)
    assert _one_line(e.value) == (f"device {device!r} is not known; use auto, cpu, cuda or cuda:N (N the index of "
                                  f"a GPU, e.g. cuda:0)")
    assert two_gpus == []


def test_cpu_only_machine(no_gpu):
    assert resolve_device(None) == resolve_device("auto") == resolve_device("cpu") == "cpu"
    for device in ("cuda", "cuda:0", "cuda:7"):
        with pytest.raises(UserError, match=rf"device '{device}' requested but no CUDA device is available; use "
                                            rf"device: auto or cpu"):
            resolve_device(device)


def test_cuda_n_names_a_gpu_and_makes_it_current(two_gpus):
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
    assert two_gpus == []  # plain cuda leaves torch's current GPU as it is
    assert resolve_device("cuda:1") == "cuda:1"
    assert two_gpus == [1]
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cuda:01") == "cuda:1"
    assert two_gpus == [1, 0, 1]


def test_a_gpu_that_is_not_there_is_a_one_line_error(two_gpus):
    with pytest.raises(UserError) as e:
        resolve_device("cuda:7")
    assert _one_line(e.value) == ("device 'cuda:7' names GPU 7 but torch sees 2 CUDA devices (cuda:0..cuda:1); use "
                                  "one of those, cuda or auto")
    assert two_gpus == []


def test_one_gpu_is_named_as_such(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"names GPU 1 but torch sees 1 CUDA device \(cuda:0\); use one of those"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "2"}, {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4"},
                                 {"LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}])
def test_cuda_n_is_refused_under_a_launch_of_several_processes(two_gpus, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=r"device 'cuda:1' names one GPU but this is a launch of \d processes, each on "
                                        r"its own GPU \(cuda:LOCAL_RANK\); use device: cuda or auto"):
        resolve_device("cuda:1")
    assert resolve_device("cuda") == "cuda" and two_gpus == []


def test_the_config_is_refused_before_any_work(two_gpus, tmp_path, capsys):
    from dmlp_plugin.cli import main

    for command, config in (("purify", CONFIG), ("bench", str(ROOT / "configs" / "demo.yaml"))):
        out = tmp_path / command
        assert main([command, config, "--out", str(out), *FAST, "--set", "device=cuda:7"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: device 'cuda:7' names GPU 7 but torch sees 2"), err
        assert not out.exists()
    assert two_gpus == []


def _spy_on_stages(monkeypatch, module):
    """Record the device the process-group helper (``module.current``) and the features stage are handed;
    the features stage then stops the run (_Stop)."""
    from dmlp_plugin import pipeline

    seen = {}

    class _Dist:
        is_main, world_size = True, 1

    def current(device="cpu"):
        seen["dist"] = device
        return _Dist()

    def make_views(cfg, data, device, built, progress):
        seen["features"] = device
        raise _Stop

    monkeypatch.setattr(module, "current", current)
    monkeypatch.setattr(pipeline, "make_views", make_views)
    return seen


def test_purify_hands_cuda_n_to_its_stages(two_gpus, monkeypatch, tmp_path):
    """`dmlp purify` with device cuda:1: the process group helper and the features stage get 'cuda:1'."""
    from dmlp_plugin import distributed, pipeline
    from dmlp_plugin.config import load_config

    seen = _spy_on_stages(monkeypatch, distributed)
    cfg, raw = load_config(CONFIG, ["device=cuda:1", "features.source=raw"])
    with pytest.raises(_Stop):
        pipeline.purify_run(cfg, tmp_path / "out", raw, progress=False)
    assert seen == {"dist": "cuda:1", "features": "cuda:1"}
    assert two_gpus and set(two_gpus) == {1}  # torch's current GPU is 1 before any stage runs


def test_bench_hands_cuda_n_to_its_stages(two_gpus, monkeypatch, tmp_path):
    """`dmlp bench` with device cuda:1: features get 'cuda:1'; the trainers' plain 'cuda' is GPU 1."""
    from dmlp_plugin import bench
    from dmlp_plugin.config import BenchConfig, load_config

    seen = _spy_on_stages(monkeypatch, bench)
    cfg, raw = load_config(str(ROOT / "configs" / "demo.yaml"), ["device=cuda:1", "features.source=raw"],
                           schema=BenchConfig)
    with pytest.raises(_Stop):
        bench.bench_run(cfg, tmp_path / "out", raw, progress=False)
    assert seen == {"dist": "cuda:1", "features": "cuda:1"}
    assert two_gpus and set(two_gpus) == {1} and torch.cuda.current_device() == 1


def test_purify_labels_hands_cuda_n_to_the_preprocessor(two_gpus, monkeypatch):
    from dmlp_plugin import api, pipeline

    seen = []

    def run_preprocessor(pre, views, noisy, meta_idx, meta_labels, c, truth, device, *args, **kwargs):
        seen.append(device)
        raise _Stop

    monkeypatch.setattr(pipeline, "run_preprocessor", run_preprocessor)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), np.arange(60) % 3
    with pytest.raises(_Stop):
        api.purify_labels(x, y, np.arange(6), y[:6], method="knn_vote", device="cuda:1", estimate_folds=0)
    assert seen == ["cuda:1"] and two_gpus == [1]
    with pytest.raises(UserError, match=r"device 'cuda:7' names GPU 7 but torch sees 2 CUDA devices"):
        api.purify_labels(x, y, np.arange(6), y[:6], method="knn_vote", device="cuda:7", estimate_folds=0)
    assert seen == ["cuda:1"]


def test_trainers_take_cuda_n(two_gpus, monkeypatch):
    """The baselines' accelerator: cuda:N accepted (GPU N made current, accelerate's single-process state then
    trains there), cuda:7 refused with the same line as everywhere."""
    import accelerate
    from accelerate.state import AcceleratorState, PartialState

    from baselines.common import make_accelerator

    made = []

    class FakeAccelerator:
        num_processes = 1

        def __init__(self, cpu, mixed_precision):
            made.append((cpu, mixed_precision, torch.cuda.current_device()))

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    monkeypatch.setattr(PartialState, "_shared_state", {})
    monkeypatch.setattr(AcceleratorState, "_shared_state", {})
    make_accelerator("cuda:1", mixed_precision="no")
    assert made == [(False, "no", 1)]
    with pytest.raises(UserError) as e:
        make_accelerator("cuda:7", mixed_precision="no")
    assert _one_line(e.value).startswith("device 'cuda:7' names GPU 7 but torch sees 2 CUDA devices")
    with pytest.raises(UserError, match="device 'gpu' is not known"):
        make_accelerator("gpu", mixed_precision="no")
    assert len(made) == 1


def test_trainers_refuse_cuda_without_a_gpu(no_gpu):
    from baselines.common import make_accelerator

    for device in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=rf"device '{device}' requested but no CUDA device is available"):
            make_accelerator(device)


def test_device_name_names_the_current_gpu(two_gpus):
    from baselines.common import device_name

    resolve_device("cuda:1")
    assert device_name(torch.device("cuda")) == "cuda:1" and device_name("cuda:0") == "cuda:0"
    assert device_name("cpu") == "cpu"


# ---- real GPUs (skipped on a CPU-only machine) ----------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_gpu
def test_real_gpu_vocabulary():
    last = torch.cuda.device_count() - 1
    assert resolve_device(f"cuda:{last}") == f"cuda:{last}" and torch.cuda.current_device() == last
    with pytest.raises(UserError, match=rf"names GPU {last + 1} but torch sees {last + 1} CUDA device"):
        resolve_device(f"cuda:{last + 1}")
    resolve_device("cuda:0")


@needs_gpu
def test_real_gpu_purify_labels_and_trainer_run_on_the_named_gpu():
    """The last GPU by name: the purifier's and a trainer's tensors go there (the first GPU when there is one)."""
    from baselines.ce import CE
    from baselines.common import TrainData
    from dmlp_plugin import purify_labels

    gpu = torch.cuda.device_count() - 1
    name = f"cuda:{gpu}"
    rng = np.random.default_rng(0)
    y = np.arange(300) % 3
    x = rng.normal(size=(300, 16)).astype(np.float32) + 3 * np.eye(16, dtype=np.float32)[y]
    trusted = np.concatenate([np.flatnonzero(y == c)[:5] for c in range(3)])
    for i in range(gpu + 1):
        torch.cuda.reset_peak_memory_stats(i)
    r = purify_labels(x, y, trusted, y[trusted], params={"epochs": 6}, device=name, estimate_folds=0)
    assert r.info["device"] == name and r.hard.shape == (300,)
    assert torch.cuda.max_memory_allocated(gpu) > 0  # the purifier's tensors were on that GPU ...
    assert all(torch.cuda.max_memory_allocated(i) == 0 for i in range(gpu))  # ... and on no other
    images = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    data = TrainData(train_images=images, train_labels=np.arange(64) % 2, test_images=images[:16],
                     test_labels=np.arange(16) % 2, num_classes=2)
    res = CE.from_preset("small", epochs=1, batch_size=32).run(data, device=name, seed=0, progress=False)
    assert res.info["device"] == name
    assert all(torch.cuda.max_memory_allocated(i) == 0 for i in range(gpu))
