"""Noise models: rates hit their targets, transition structure, seeding, human-label files."""

import json
import zipfile

import numpy as np
import pytest

from dmlp_plugin.data import noise as noise_module
from dmlp_plugin.data.noise import CIFAR10_ASYMMETRIC, KINDS, NoisyLabels, apply_noise
from dmlp_plugin.errors import UserError
from dmlp_plugin.metrics import transition_matrix
from dmlp_plugin.registry import load_registry

N, C = 50_000, 10


@pytest.fixture(scope="module")
def truth():
    return np.random.default_rng(123).integers(0, C, N)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_symmetric_including_true_class_flips_rate_times_one_minus_one_over_c(truth, rate):
    out = apply_noise(truth, C, kind="symmetric", rate=rate, seed=0, include_true_class=True)
    assert isinstance(out, NoisyLabels) and out.labels.dtype == np.int64 and out.labels.shape == (N,)
    assert abs(out.flip_rate - rate * (1 - 1 / C)) < 0.01
    assert out.rate == rate and out.include_true_class is True
    assert out.flip_rate == pytest.approx(np.mean(out.labels != truth))
    assert (out.labels != truth).sum() <= int(rate * N)  # only the drawn samples can change


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_symmetric_excluding_true_class_flips_exactly_the_drawn_samples(truth, rate):
    out = apply_noise(truth, C, kind="symmetric", rate=rate, seed=0, include_true_class=False)
    assert (out.labels != truth).sum() == int(rate * N)
    assert abs(out.flip_rate - rate) < 0.01
    # the new label is uniform over the other classes: every off-diagonal entry ~ rate / (C - 1)
    t = transition_matrix(truth, out.labels, C)
    off = t[~np.eye(C, dtype=bool)]
    np.testing.assert_allclose(off, rate / (C - 1), atol=0.015)


def test_asymmetric_moves_only_the_cifar10_pairs(truth):
    rate = 0.4
    out = apply_noise(truth, C, kind="asymmetric", rate=rate, seed=1)
    t = transition_matrix(truth, out.labels, C)
    allowed = np.eye(C, dtype=bool)
    for src, dst in CIFAR10_ASYMMETRIC.items():
        allowed[src, dst] = True
    assert np.all(t[~allowed] == 0)
    for src, dst in CIFAR10_ASYMMETRIC.items():
        assert abs(t[src, dst] - rate) < 0.02
    unaffected = [c for c in range(C) if c not in CIFAR10_ASYMMETRIC]
    assert np.all(np.diag(t)[unaffected] == 1)
    assert abs(out.flip_rate - rate * len(CIFAR10_ASYMMETRIC) / C) < 0.01  # 40% -> ~20% of CIFAR-10
    assert out.include_true_class is None
    assert out.details["mapping"] == {"9": 1, "2": 0, "4": 7, "3": 5, "5": 3}


def test_asymmetric_needs_ten_classes():
    with pytest.raises(UserError, match="pairflip"):
        apply_noise(np.arange(100) % 5, 5, kind="asymmetric", rate=0.4)


def test_pairflip_default_moves_each_class_to_the_next(truth):
    rate = 0.45
    out = apply_noise(truth, C, kind="pairflip", rate=rate, seed=2)
    t = transition_matrix(truth, out.labels, C)
    nxt = (np.arange(C) + 1) % C
    np.testing.assert_allclose(np.diag(t), 1 - rate, atol=0.03)
    np.testing.assert_allclose(t[np.arange(C), nxt], rate, atol=0.03)
    t[np.arange(C), np.arange(C)] = 0
    t[np.arange(C), nxt] = 0
    assert np.all(t == 0)
    assert out.details["pairs"]["9"] == 0


def test_pairflip_with_yaml_style_pairs_moves_only_the_sources(truth):
    out = apply_noise(truth, C, kind="pairflip", rate=0.3, seed=3, pairs={"0": 4, 7: "2"})
    t = transition_matrix(truth, out.labels, C)
    assert abs(t[0, 4] - 0.3) < 0.03 and abs(t[7, 2] - 0.3) < 0.03
    others = [c for c in range(C) if c not in (0, 7)]
    assert np.all(np.diag(t)[others] == 1)
    assert out.details["pairs"] == {"0": 4, "7": 2}


@pytest.mark.parametrize("pairs, match", [
    ({0: 10}, "outside"), ({-1: 2}, "outside"), ({3: 3}, "itself"), ({"a": 1}, "class index"),
    ({True: 1}, "class index"), ([[0, 1]], "mapping"), ({0: 1, "0": 2}, "twice"),
])
def test_pairflip_rejects_bad_pairs(pairs, match):
    with pytest.raises(UserError, match=match):
        apply_noise(np.arange(20) % C, C, kind="pairflip", rate=0.2, pairs=pairs)


@pytest.mark.parametrize("kind, kw", [
    ("symmetric", {"rate": 0.5}), ("symmetric", {"rate": 0.5, "include_true_class": False}),
    ("asymmetric", {"rate": 0.4}), ("pairflip", {"rate": 0.3}),
])
def test_same_seed_same_labels_other_seed_other_labels_and_no_global_rng(truth, kind, kw):
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    a = apply_noise(truth, C, kind=kind, seed=5, **kw)
    b = apply_noise(truth, C, kind=kind, seed=5, **kw)
    c = apply_noise(truth, C, kind=kind, seed=6, **kw)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert np.mean(a.labels != c.labels) > 0.05
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_none_keeps_labels_and_truth_is_not_modified(truth):
    keep = truth.copy()
    out = apply_noise(truth, C, kind="none", rate=0.5)
    np.testing.assert_array_equal(out.labels, truth)
    assert out.flip_rate == 0.0 and out.rate == 0.0
    apply_noise(truth, C, kind="symmetric", rate=0.9)
    np.testing.assert_array_equal(truth, keep)


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric", "pairflip", "none"])
def test_details_are_json_and_record_both_rates(truth, kind):
    out = apply_noise(truth, C, kind=kind, rate=0.4 if kind != "none" else 0.0, seed=0)
    d = json.loads(json.dumps(out.details))
    assert d["flip_rate"] == out.flip_rate and d["requested_rate"] == out.rate
    assert d["convention"] and len(d["per_class_flip_rate"]) == C
    assert np.mean(d["per_class_flip_rate"]) == pytest.approx(out.flip_rate, abs=0.01)


def test_per_class_flip_rate_is_none_for_absent_classes():
    out = apply_noise(np.array([0, 0, 1, 1]), 3, kind="none")
    assert out.details["per_class_flip_rate"] == [0.0, 0.0, None]


@pytest.mark.parametrize("kw, match", [
    ({"kind": "symmetric", "rate": 1.0}, "outside"), ({"kind": "symmetric", "rate": -0.1}, "outside"),
    ({"kind": "symmetric", "rate": "0.5"}, "outside"), ({"kind": "gaussian"}, "unknown noise 'gaussian'"),
    ({"kind": "symmetric", "pairs": {0: 1}}, "pairflip"), ({"kind": "pairflip", "file": "x.npy"}, "human"),
    ({"kind": "none", "rate": 1.5}, "outside"), ({"kind": "human", "rate": -1.0}, "outside"),
    ({"kind": "symmetric", "rat": 0.5}, "unknown setting 'rat'"),
])
def test_bad_arguments_are_user_errors(kw, match):
    with pytest.raises(UserError, match=match):
        apply_noise(np.arange(20) % C, C, **kw)


def test_bad_truth_is_a_user_error():
    with pytest.raises(UserError, match="outside"):
        apply_noise(np.array([0, 1, 10]), C, kind="none")
    with pytest.raises(UserError, match="dtype"):
        apply_noise(np.array([0.0, 1.0]), C, kind="none")


# The parameters each kind takes: its function's keyword parameters (noise.* settings), nothing else.
OWN_PARAMETERS = {"none": (), "symmetric": ("rate", "include_true_class"), "asymmetric": ("rate",),
                  "pairflip": ("rate", "pairs"), "human": ("file", "key"), "instance": ("rate",)}


def test_every_noise_kind_is_its_own_registered_function_with_its_own_parameters():
    reg = load_registry()
    assert set(KINDS) | {"instance"} <= set(reg.names("noise"))
    fns = {kind: reg.get("noise", kind) for kind in OWN_PARAMETERS}
    assert len({id(f) for f in fns.values()}) == len(fns)  # no function dispatching on the kind inside
    assert all(f is not apply_noise for f in fns.values())
    for kind, fn in fns.items():
        assert noise_module.kind_parameters(fn) == OWN_PARAMETERS[kind], kind


def test_the_settings_are_the_noise_config_fields():
    import dataclasses

    from dmlp_plugin.config import NoiseConfig

    fields = {f.name: f.default for f in dataclasses.fields(NoiseConfig)}
    assert set(noise_module.SETTINGS) == set(fields) - {"kind"}
    for name, unset in noise_module.UNSET.items():  # an unset setting is the config's default
        assert fields[name] == unset


@pytest.mark.parametrize("kind, setting, value", [
    ("symmetric", "pairs", {0: 1}), ("symmetric", "file", "x.npy"), ("symmetric", "key", "aggre_label"),
    ("asymmetric", "include_true_class", False), ("asymmetric", "pairs", {9: 1}),
    ("pairflip", "include_true_class", False),
    ("pairflip", "key", "k"), ("none", "pairs", {0: 1}), ("none", "include_true_class", False),
    ("human", "pairs", {0: 1}), ("human", "include_true_class", False),
])
def test_a_setting_the_kind_does_not_take_is_refused_naming_the_kind_parameters(truth, kind, setting, value):
    fn = load_registry().get("noise", kind)
    with pytest.raises(UserError) as e:
        fn(truth[:100], C, kind=kind, rate=0.2, seed=0, **{setting: value})
    msg = str(e.value)
    assert "\n" not in msg and f"noise.{setting}={value!r} is not a parameter of noise kind {kind!r}" in msg
    own = OWN_PARAMETERS[kind]
    assert (f"its parameters: {', '.join(own)}" if own else "it takes no parameters") in msg
    # the same through the registry-looked-up entry point
    with pytest.raises(UserError, match=f"noise.{setting}="):
        apply_noise(truth[:100], C, kind=kind, rate=0.2, **{setting: value})


def test_unset_settings_pass_and_change_nothing(truth):
    """What the pipeline hands every kind (every noise.* setting, the others at their defaults) gives the labels
    of the kind's own parameters alone."""
    unset = dict(noise_module.UNSET, rate=0.3)
    for kind, fn in (("symmetric", noise_module.symmetric_noise), ("asymmetric", noise_module.asymmetric_noise),
                     ("pairflip", noise_module.pairflip_noise), ("none", noise_module.no_noise)):
        full = fn(truth, C, kind=kind, seed=4, **unset)
        own = fn(truth, C, seed=4, **{k: unset[k] for k in OWN_PARAMETERS[kind]})
        np.testing.assert_array_equal(full.labels, own.labels)
        assert full.details == own.details and full.kind == kind


def test_a_kind_function_refuses_another_kind(truth):
    with pytest.raises(UserError, match="noise kind 'asymmetric' asked of the 'symmetric' noise model"):
        noise_module.symmetric_noise(truth, C, kind="asymmetric", rate=0.4)


def _old_dispatch_cases():
    """The grid the labels of the old single ``apply_noise(kind=...)`` dispatcher were recorded on."""
    for n, c in ((50_000, 10), (1437, 10), (997, 3), (2000, 100), (7, 2)):
        for seed in (0, 1, 4_294_967_295):
            for rate in (0.0, 0.2, 0.5, 0.8, 0.9):
                for inc in (True, False):
                    yield n, c, "symmetric", seed, {"rate": rate, "include_true_class": inc}
                yield n, c, "pairflip", seed, {"rate": rate}
                if c == 10:
                    yield n, c, "asymmetric", seed, {"rate": rate}
                    yield n, c, "pairflip", seed, {"rate": rate, "pairs": {"0": 4, 7: "2", 9: 0}}
            yield n, c, "none", seed, {}
            yield n, c, "none", seed, {"rate": 0.5}


# sha256 over the grid above of (labels, details, kind, rate, flip rate, include_true_class), per kind, as the
# single dispatcher ``apply_noise`` gave them before each kind became its own function (commit 142c9e1)
OLD_DISPATCH_DIGESTS = {"asymmetric": "f339f2130b0b3c938558baa1", "none": "c632c3452185c89f2bf015fc",
                        "pairflip": "f30876e0545c69fa4e35d8b1", "symmetric": "73a1129d8b49a553d88e5418"}


@pytest.mark.parametrize("through", ["registry", "apply_noise"])
def test_each_kind_gives_bitwise_the_labels_of_the_old_dispatcher(through):
    import collections
    import hashlib

    reg = load_registry()
    per_case = {}
    for n, c, kind, seed, kw in _old_dispatch_cases():
        t = np.random.default_rng([n, c]).integers(0, c, n)
        if through == "registry":  # as pipeline.make_noisy calls it: every setting, the unused ones unset
            args = {**noise_module.UNSET, "rate": 0.0, **kw}
            out = reg.get("noise", kind)(t, c, kind=kind, seed=seed, **args)
        else:
            out = apply_noise(t, c, kind=kind, seed=seed, **kw)
        h = hashlib.sha256(np.ascontiguousarray(out.labels).astype("<i8").tobytes())
        h.update(json.dumps(out.details, sort_keys=True).encode())
        h.update(repr((out.kind, out.rate, out.flip_rate, out.include_true_class)).encode())
        per_case[f"{n}/{c}/{kind}/{seed}/{sorted((k, repr(v)) for k, v in kw.items())}"] = h.hexdigest()[:20]
    digests = collections.defaultdict(hashlib.sha256)
    for key in sorted(per_case):
        digests[key.split("/")[2]].update(f"{key}={per_case[key]}\n".encode())
    assert {k: d.hexdigest()[:24] for k, d in digests.items()} == OLD_DISPATCH_DIGESTS


# ---- human noise files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def human(truth):
    """CIFAR-N-like arrays: clean labels plus two noisy versions."""
    rng = np.random.default_rng(9)
    worse = np.where(rng.random(N) < 0.4, rng.integers(0, C, N), truth)
    aggre = np.where(rng.random(N) < 0.1, rng.integers(0, C, N), truth)
    return {"clean_label": truth.copy(), "aggre_label": aggre, "worse_label": worse}


def _check_human(out, arrays, truth, key, path):
    np.testing.assert_array_equal(out.labels, arrays[key])
    assert out.labels.dtype == np.int64
    assert out.flip_rate == pytest.approx(np.mean(arrays[key] != truth))
    assert out.rate == out.flip_rate  # measured, not requested
    assert out.details["file"] == str(path) and out.details["key"] == key
    assert out.details["requested_rate"] is None
    json.dumps(out.details)


def test_human_from_torch_pt_dict_of_numpy_arrays(tmp_path, truth, human):
    import torch

    path = tmp_path / "CIFAR-10_human.pt"
    torch.save(human, path)
    out = apply_noise(truth, C, kind="human", rate=0.5, file=str(path), key="worse_label")
    _check_human(out, human, truth, "worse_label", path)
    # tensors instead of arrays load too
    torch.save({k: torch.from_numpy(v) for k, v in human.items()}, path)
    out = apply_noise(truth, C, kind="human", file=path, key="aggre_label")
    _check_human(out, human, truth, "aggre_label", path)


def test_human_pt_written_with_numpy1_names_loads(tmp_path, truth, human):
    """The published CIFAR-N files were pickled under numpy 1.x, which names numpy.core.multiarray."""
    import torch

    path = tmp_path / "new.pt"
    torch.save({"aggre_label": human["aggre_label"]}, path)
    with zipfile.ZipFile(path) as z:
        files = {name: z.read(name) for name in z.namelist()}
    pkl = next(name for name in files if name.endswith("data.pkl"))
    assert b"numpy._core.multiarray\n" in files[pkl]
    files[pkl] = files[pkl].replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(old, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    out = apply_noise(truth, C, kind="human", file=old, key="aggre_label")
    np.testing.assert_array_equal(out.labels, human["aggre_label"])


class _Touch:
    """Pickles as a call to open(marker, 'w'): loading it unsafely would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_human_pt_with_code_is_refused_and_not_run(tmp_path, truth):
    import torch

    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"aggre_label": _Touch(str(marker))}, path)
    with pytest.raises(UserError, match=r"cannot be read.*GLOBAL io\.open"):
        apply_noise(truth, C, kind="human", file=path, key="aggre_label")
    assert not marker.exists()


def test_human_from_npy_and_npz(tmp_path, truth, human):
    npy = tmp_path / "worse.npy"
    np.save(npy, human["worse_label"])
    _check_human(apply_noise(truth, C, kind="human", file=npy), {None: human["worse_label"]}, truth, None, npy)
    npz = tmp_path / "labels.npz"
    np.savez(npz, **human)
    _check_human(apply_noise(truth, C, kind="human", file=npz, key="aggre_label"), human, truth, "aggre_label", npz)


def test_human_key_errors_list_the_available_keys(tmp_path, truth, human):
    npz = tmp_path / "labels.npz"
    np.savez(npz, **human)
    with pytest.raises(UserError, match="aggre_label, clean_label, worse_label"):
        apply_noise(truth, C, kind="human", file=npz, key="random_label1")
    with pytest.raises(UserError, match="set noise.key to one of: aggre_label"):
        apply_noise(truth, C, kind="human", file=npz)
    npy = tmp_path / "a.npy"
    np.save(npy, human["aggre_label"])
    with pytest.raises(UserError, match="remove the key"):
        apply_noise(truth, C, kind="human", file=npy, key="aggre_label")


@pytest.mark.parametrize("labels, match", [
    (np.zeros(N - 1, np.int64), "49999 labels"), (np.zeros((N, 2), np.int64), "1-d"),
    (np.zeros(N, np.float32), "dtype"), (np.full(N, C, np.int64), "outside"), (np.full(N, -1, np.int64), "outside"),
])
def test_human_bad_label_arrays_are_user_errors(tmp_path, truth, labels, match):
    path = tmp_path / "bad.npy"
    np.save(path, labels)
    with pytest.raises(UserError, match=match):
        apply_noise(truth, C, kind="human", file=path)


def test_human_file_errors(tmp_path, truth, human):
    with pytest.raises(UserError, match="needs noise.file"):
        apply_noise(truth, C, kind="human")
    with pytest.raises(UserError, match="not found"):
        apply_noise(truth, C, kind="human", file=tmp_path / "missing.pt", key="aggre_label")
    txt = tmp_path / "labels.txt"
    txt.write_text("1 2 3")
    with pytest.raises(UserError, match="suffix"):
        apply_noise(truth, C, kind="human", file=txt)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot be read"):
        apply_noise(truth, C, kind="human", file=broken, key="aggre_label")
    # a labels file whose clean labels disagree with the data set is for another data set or order
    shuffled = dict(human, clean_label=np.roll(human["clean_label"], 1))
    npz = tmp_path / "other.npz"
    np.savez(npz, **shuffled)
    with pytest.raises(UserError, match="clean_label"):
        apply_noise(truth, C, kind="human", file=npz, key="aggre_label")


# ---- instance-dependent noise (Xia et al. 2020) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def images_and_truth():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, C, 6000)
    proto = rng.integers(0, 256, (C, 12, 12), dtype=np.uint8)
    noise = rng.integers(-40, 40, (6000, 12, 12))
    images = np.clip(proto[truth].astype(int) + noise, 0, 255).astype(np.uint8)[..., None]
    return images, truth


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6])
def test_instance_noise_hits_the_requested_rate(images_and_truth, rate):
    from dmlp_plugin.data.noise import apply_instance_noise

    images, truth = images_and_truth
    out = apply_instance_noise(truth, C, images=images, rate=rate, seed=0)
    assert out.kind == "instance" and out.labels.dtype == np.int64 and out.labels.shape == truth.shape
    assert abs(out.flip_rate - rate) < 0.025
    assert out.details["requested_rate"] == rate and out.details["flip_rate"] == out.flip_rate
    assert "Xia et al." in out.details["convention"] and len(out.details["per_class_flip_rate"]) == C


def test_instance_noise_depends_on_the_image_and_is_seeded(images_and_truth):
    from dmlp_plugin.data.noise import apply_instance_noise, instance_flip_distribution

    images, truth = images_and_truth
    p = instance_flip_distribution(images, truth, C, 0.4, seed=0)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    # two copies of one image (same true label) get the same flip distribution, wherever they are
    twin = np.concatenate([images[:50], images[:50][::-1]])
    twin_truth = np.concatenate([truth[:50], truth[:50][::-1]])
    q = instance_flip_distribution(twin, twin_truth, C, 0.4, seed=0)
    np.testing.assert_allclose(q[:50], q[50:][::-1])
    np.testing.assert_allclose(q[:50], p[:50])
    # different images of one class get different distributions (not a class-level transition matrix)
    same_class = np.flatnonzero(truth == 3)[:20]
    assert np.ptp(p[same_class, 3]) > 0.05 and np.unique(p[same_class].round(6), axis=0).shape[0] == 20
    # the per-sample flip rates follow the truncated normal N(0.4, 0.1^2) on [0, 1]
    q_n = 1 - p[np.arange(len(truth)), truth]
    assert abs(q_n.mean() - 0.4) < 0.01 and abs(q_n.std() - 0.1) < 0.01
    a = apply_instance_noise(truth, C, images=images, rate=0.4, seed=3)
    b = apply_instance_noise(truth, C, images=images, rate=0.4, seed=3)
    c = apply_instance_noise(truth, C, images=images, rate=0.4, seed=4)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.labels != c.labels).mean() > 0.1
    assert apply_instance_noise(truth, C, images=images, rate=0.0, seed=0).flip_rate == 0.0


def test_instance_noise_bad_input(images_and_truth):
    from dmlp_plugin.data.noise import apply_instance_noise

    images, truth = images_and_truth
    with pytest.raises(UserError, match="noise.rate=1.2 is outside"):
        apply_instance_noise(truth, C, images=images, rate=1.2)
    with pytest.raises(UserError, match="5999 images but 6000 labels"):
        apply_instance_noise(truth, C, images=images[1:], rate=0.4)
    with pytest.raises(UserError, match=r"noise.pairs=\{1: 2\} is not a parameter of noise kind 'instance' \(its "
                                         r"parameters: rate\)"):
        apply_instance_noise(truth, C, images=images, rate=0.4, pairs={1: 2})
    with pytest.raises(UserError, match="include_true_class=False is not a parameter"):
        apply_instance_noise(truth, C, images=images, rate=0.4, include_true_class=False)


def test_instance_noise_through_a_purify_config():
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data, make_noisy

    cfg, _ = load_config("configs/purify-digits.yaml", ["noise.kind=instance", "noise.rate=0.4"])
    noisy, truth = make_noisy(cfg, load_data(cfg))
    assert noisy.kind == "instance" and abs(noisy.flip_rate - 0.4) < 0.05 and truth is not None
    assert load_registry().entry("noise", "instance").summary.startswith("instance-dependent")
