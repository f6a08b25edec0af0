"""Every registered component (and the example plugin) fits its Protocol in dmlp_plugin.interfaces, checked by
structure and, where it is cheap, by running it on a tiny problem."""

import dataclasses
import importlib
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest

from dmlp_plugin import interfaces as I
from dmlp_plugin import pipeline
from dmlp_plugin.records import DataSplits, ImageSet, PurifyInputs, PurifyResult
from dmlp_plugin.registry import KINDS, load_registry

ROOT = Path(__file__).resolve().parents[1]
REG = load_registry()
ALL = [(k, n) for k in KINDS for n in REG.names(k)]


def _example_plugin():
    sys.path.insert(0, str(ROOT / "examples" / "dmlp_example_plugin"))
    try:
        return importlib.import_module("dmlp_example_plugin").TrustedCentroid
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}/{n}" for k, n in ALL])
def test_registered_component_fits_its_protocol(kind, name):
    obj = REG.get(kind, name)
    assert I.check_component(kind, obj) == []
    if kind == "methods":
        trainer = obj.from_preset("small")
        assert isinstance(trainer, I.TrainingMethod) and dataclasses.is_dataclass(trainer)
        dataclasses.asdict(trainer)  # what the benchmark keys its runs with


def _tiny_problem(seed=0):
    """150 samples of 3 separable classes in 8-d, 30% of the labels flipped, 5 trusted per class."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(3), 50)
    x = rng.normal(size=(150, 8)).astype(np.float32) + 3 * np.eye(8, dtype=np.float32)[truth]
    noisy = truth.copy()
    flip = rng.random(150) < 0.3
    noisy[flip] = (truth[flip] + 1) % 3
    meta = np.sort(np.concatenate([np.flatnonzero(truth == c)[:5] for c in range(3)]))
    views = [pipeline._l2(x), pipeline.random_relu_view(pipeline._l2(x), 64, seed)]
    return PurifyInputs(views=views, noisy=noisy, meta_idx=meta, meta_labels=truth[meta], num_classes=3,
                        device="cpu", progress=False, seed=seed)


PREPROCESSORS = [*REG.names("preprocessors"), "example:trusted_centroid"]


@pytest.mark.parametrize("name", PREPROCESSORS)
def test_preprocessor_keeps_the_purify_contract(name):
    from dmlp_plugin.config import PurifyConfig

    if name.startswith("example:"):
        obj = _example_plugin()
        assert I.check_component("preprocessors", obj) == []
        pre = obj()
    else:
        pre = pipeline.with_checks(PurifyConfig(), pipeline.build_component("preprocessors", name, {}))
    assert isinstance(pre, I.Preprocessor)
    inp = _tiny_problem()
    r = pre.purify(inp)
    assert isinstance(r, PurifyResult)
    assert r.soft.shape == (150, 3) and r.soft.dtype == np.float32
    np.testing.assert_allclose(r.soft.sum(1), 1, atol=1e-4)
    assert r.hard.shape == (150,) and r.hard.dtype == np.int64 and r.confidence.shape == (150,)
    np.testing.assert_array_equal(r.hard[inp.meta_idx], inp.meta_labels)  # trusted rows keep trusted labels
    again = pre.purify(inp)  # no state kept between calls (the K-fold estimate calls it again)
    np.testing.assert_array_equal(again.hard, r.hard)


@pytest.mark.parametrize("name", REG.names("noise"))
def test_noise_model_returns_noisy_labels(name, tmp_path):
    fn = REG.get("noise", name)
    truth = np.arange(200) % 10
    np.save(tmp_path / "human.npy", (truth + (np.arange(200) % 3 == 0)) % 10)
    extra = {}
    if "images" in inspect.signature(fn).parameters:
        extra["images"] = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 1), dtype=np.uint8)
    out = fn(truth, 10, kind=name, rate=0.4, seed=0, include_true_class=True, pairs=None,
             file=str(tmp_path / "human.npy") if name == "human" else None, key=None, **extra)
    assert out.labels.shape == (200,) and out.labels.dtype == np.int64
    assert 0 <= out.labels.min() and out.labels.max() < 10 and out.kind == name
    assert out.flip_rate == pytest.approx((out.labels != truth).mean())
    again = fn(truth, 10, kind=name, rate=0.4, seed=0, include_true_class=True, pairs=None,
               file=str(tmp_path / "human.npy") if name == "human" else None, key=None, **extra)
    np.testing.assert_array_equal(again.labels, out.labels)  # same seed, same labels


def test_an_embedded_dataset_loader_returns_data_splits():
    splits = REG.get("datasets", "digits")()
    assert isinstance(splits, DataSplits) and isinstance(splits.train, ImageSet)
    assert splits.train.images.dtype == np.uint8 and splits.train.images.ndim == 4


def test_check_component_names_what_is_missing():
    class NoPurify:
        pass

    class TwoArgs:
        def purify(self, inp, extra):
            return None

    class NotADataclass:
        def run(self, data):
            return None

    def noise(truth, num_classes, *, kind, rate):
        return None

    def loader(root, /):
        return None

    assert I.check_component("preprocessors", NoPurify) == ["has no purify(inputs) method"]
    assert "must take exactly one argument" in I.check_component("preprocessors", TwoArgs)[0]
    problems = I.check_component("methods", NotADataclass)
    assert len(problems) == 3 and "dataclass" in problems[0] and "from_preset" in problems[1]
    assert "checkpoint_dir" in problems[2]
    assert I.check_component("noise", noise) == [
        "the noise model does not take the keyword argument(s) seed, include_true_class, pairs, file, key"]
    assert "positional-only" in I.check_component("datasets", loader)[0]
    assert not isinstance(NoPurify(), I.Preprocessor)
