"""What every registered training method must do: train on hard and soft labels, report the LAST epoch's
accuracy, be deterministic given a seed, and resume a killed run to exactly the uninterrupted result."""

import importlib

import numpy as np
import pytest

from baselines.common import TrainData, cross_entropy
from dmlp_plugin.errors import UserError
from dmlp_plugin.registry import load_registry

METHODS = load_registry().names("methods")
# the small preset, shortened to 3 epochs on 240 images (method-specific knobs so every phase runs)
TINY = {"epochs": 3, "batch_size": 32}
EXTRA = {"coteaching": {"num_gradual": 2}, "dividemix": {"warm_up": 1}, "elr_plus": {}, "elr": {}, "ce": {}}


@pytest.fixture(scope="module")
def tiny():
    from dmlp_plugin.data.datasets import load_digits
    from dmlp_plugin.data.noise import apply_noise

    d = load_digits()
    x, y = d.train.images[:240], d.train.labels[:240]
    noisy = apply_noise(y, 10, kind="symmetric", rate=0.4, seed=0)
    data = TrainData(x, noisy.labels, d.test.images[:100], d.test.labels[:100], 10,
                     noise_rate=noisy.flip_rate, noise_rate_source="known")
    return data, y


def _method(name, **kw):
    cls = load_registry().get("methods", name)
    fields = {f for f in cls.__dataclass_fields__}
    extra = {k: v for k, v in EXTRA.get(name, {}).items() if k in fields}
    return cls.from_preset("small", **{**TINY, **extra, **kw})


@pytest.mark.parametrize("name", METHODS)
def test_killed_run_resumes_to_the_uninterrupted_result(name, tiny, tmp_path, monkeypatch):
    data, truth = tiny
    method = _method(name)
    full = method.run(data, device="cpu", seed=3, progress=False, true_labels=truth)
    assert len(full.curve) == 3 and full.test_accuracy == full.curve[-1]["test_accuracy"]
    assert 0.0 <= full.test_accuracy <= 1.0

    module = importlib.import_module(type(method).__module__)
    real_save = module.save_checkpoint
    saved = []

    def save_then_die(accelerator, checkpoint_dir, meta):
        real_save(accelerator, checkpoint_dir, meta)
        saved.append(1)
        if len(saved) == 2:
            raise KeyboardInterrupt  # as if killed right after epoch 2 was saved

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        method.run(data, device="cpu", seed=3, progress=False, checkpoint_dir=tmp_path / "ck", true_labels=truth)
    monkeypatch.setattr(module, "save_checkpoint", real_save)
    resumed = method.run(data, device="cpu", seed=3, progress=False, checkpoint_dir=tmp_path / "ck",
                         true_labels=truth)
    assert resumed.info.get("resumed_at_epoch") == 2
    assert [c["test_accuracy"] for c in resumed.curve] == [c["test_accuracy"] for c in full.curve]
    assert resumed.test_accuracy == full.test_accuracy


@pytest.mark.parametrize("name", METHODS)
def test_soft_labels_train_and_the_checkpoint_refuses_other_settings(name, tiny, tmp_path):
    data, truth = tiny
    soft = np.full((len(truth), 10), 0.02, np.float32)
    soft[np.arange(len(truth)), truth] = 0.82
    sdata = TrainData(data.train_images, soft, data.test_images, data.test_labels, 10, noise_rate=0.0,
                      noise_rate_source="known")
    method = _method(name, epochs=1)
    res = method.run(sdata, device="cpu", seed=0, progress=False, checkpoint_dir=tmp_path / "ck")
    assert res.info["labels"] == "soft" and len(res.curve) == 1
    other = _method(name, epochs=2, lr=method.lr * 2)
    with pytest.raises(UserError, match="differs in"):
        other.run(sdata, device="cpu", seed=0, progress=False, checkpoint_dir=tmp_path / "ck")


def test_soft_targets_are_used_as_distributions():
    import torch

    logits = torch.tensor([[2.0, 0.0, -1.0]])
    soft = torch.tensor([[0.6, 0.4, 0.0]])
    hard = torch.tensor([0])
    # against the distribution, not its argmax: -(0.6 log p0 + 0.4 log p1)
    logp = torch.log_softmax(logits, 1)[0]
    assert torch.isclose(cross_entropy(logits, soft), -(0.6 * logp[0] + 0.4 * logp[1]))
    assert not torch.isclose(cross_entropy(logits, soft), cross_entropy(logits, hard))


def test_train_data_refuses_bad_labels(tiny):
    data, _ = tiny
    x, tx, ty = data.train_images, data.test_images, data.test_labels
    bad = [
        (np.full(len(x), 10), r"integer labels in \[0, 10\)"),
        (np.full(len(x), -1), r"integer labels in \[0, 10\)"),
        (np.zeros(len(x), np.float64), r"integer labels"),
        (np.zeros(len(x) - 1, np.int64), r"need 240 integer labels"),
        (np.full((len(x), 10), 0.5, np.float32), "probability distribution"),
    ]
    for labels, match in bad:
        with pytest.raises(UserError, match=match):
            TrainData(x, labels, tx, ty, 10)


@pytest.mark.parametrize("name", METHODS)
def test_cpu_bf16_bug_is_avoided(name, tiny, monkeypatch):
    # On a CPU with native bfloat16 (Intel Xeon, torch 2.14.1) bf16 autocast gave NaN losses from the 2nd
    # step for test_resnet on 16x16 digits (a strided conv on a 1-pixel input). `auto` must train such a
    # model in float32 there, and an explicit bf16 must be refused before training.
    import baselines.common as common
    from dmlp_plugin import hardware

    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    data, truth = tiny
    result = _method(name, epochs=1).run(data, device="cpu", seed=0, progress=False, true_labels=truth)
    assert all(np.isfinite(r["train_loss"]) for r in result.curve)
    with pytest.raises(UserError, match="mixed_precision=bf16.*1-pixel"):
        _method(name, epochs=1, mixed_precision="bf16").run(data, device="cpu", seed=0, progress=False)


def test_bf16_hazard_detection():
    from baselines.common import make_classifier
    from dmlp_plugin.hardware import bf16_hazard_layers

    assert bf16_hazard_layers(make_classifier("test_resnet", 1, 10, False), 1, 16)
    assert not bf16_hazard_layers(make_classifier("test_resnet", 1, 10, False), 1, 32)
    assert not bf16_hazard_layers(make_classifier("resnet18", 3, 10, True), 3, 32)
