"""Stage 1: SimCLR loss, augmentations, training determinism and resume, feature extraction, the cache."""

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

from dmlp_plugin.errors import UserError
from dmlp_plugin.features import augment, cache, ssl
from dmlp_plugin.features.extract import extract_features
from dmlp_plugin.features.ssl import SimCLRConfig, nt_xent, train_simclr
from dmlp_plugin.records import ImageSet

# test_resnet is timm's smallest ResNet: seconds per run on 2 CPU cores.
TINY = dict(backbone="test_resnet", image_size=16, epochs=2, batch_size=32, proj_hidden=64, proj_dim=32,
            lr=3e-3, warmup_epochs=0)


def _patterns(n_per_class: int = 40, size: int = 16, seed: int = 0):
    """Three visually distinct classes with random phase, contrast and noise: horizontal stripes,
    vertical stripes, a centred blob. uint8 (N, size, size, 1), labels (N,)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images, labels = [], []
    for _ in range(n_per_class):
        for c in range(3):
            phase = rng.uniform(0, 2 * np.pi)
            period = rng.uniform(3.0, 5.0)
            if c == 0:
                img = 0.5 + 0.5 * np.sin(2 * np.pi * yy / period + phase)
            elif c == 1:
                img = 0.5 + 0.5 * np.sin(2 * np.pi * xx / period + phase)
            else:
                cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
                img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size * rng.uniform(0.12, 0.2)) ** 2))
            img = img * rng.uniform(0.6, 1.0) + rng.normal(0, 0.05, img.shape)
            images.append(np.clip(img * 255, 0, 255).astype(np.uint8)[..., None])
            labels.append(c)
    return np.stack(images), np.array(labels, dtype=np.int64)


def _naive_nt_xent(z1, z2, t):
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    b = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + b) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denom)
    return total / n2


# ---------------------------------------------------------------------------------------------------------
# loss


@pytest.mark.parametrize("b,d,t", [(2, 3, 0.5), (5, 8, 0.1), (7, 4, 1.0), (16, 32, 0.2)])
def test_nt_xent_matches_naive_loop_and_is_symmetric(b, d, t):
    g = torch.Generator().manual_seed(b * 100 + d)
    z1, z2 = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g) * 3.0  # scale must not matter
    got = float(nt_xent(z1, z2, t))
    assert got == pytest.approx(_naive_nt_xent(z1, z2, t), rel=1e-5, abs=1e-5)
    assert float(nt_xent(z2, z1, t)) == pytest.approx(got, rel=1e-6, abs=1e-6)


def test_nt_xent_prefers_aligned_views_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 16, generator=g, requires_grad=True)
    aligned = nt_xent(z1, z1.detach() + 0.01 * torch.randn(8, 16, generator=g), 0.5)
    shuffled = nt_xent(z1, z1.detach()[torch.roll(torch.arange(8), 1)], 0.5)
    assert float(aligned.detach()) < float(shuffled.detach())
    aligned.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# augmentations


@pytest.mark.parametrize("c,size", [(1, None), (3, None), (3, 24), (1, 32)])
def test_augment_deterministic_per_seed_and_shapes(c, size):
    x = torch.rand(6, c, 16, 16, generator=torch.Generator().manual_seed(1))
    a = augment.simclr_view(x, torch.Generator().manual_seed(5), size=size)
    b = augment.simclr_view(x, torch.Generator().manual_seed(5), size=size)
    other = augment.simclr_view(x, torch.Generator().manual_seed(6), size=size)
    s = size or 16
    assert a.shape == (6, c, s, s) and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.allclose(a, other)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_full_crop_is_identity_or_mirror_and_hflip_knob():
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = augment.random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1), hflip=True)
    same = (out - x).abs().flatten(1).amax(1) < 1e-5
    mirrored = (out - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert bool((same | mirrored).all())
    assert 0 < int(mirrored.sum()) < 32  # about half are flipped
    out = augment.random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1), hflip=False)
    assert torch.allclose(out, x, atol=1e-5)


def test_jitter_and_grayscale_are_channel_safe():
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(4, 1, 8, 8, generator=g)
    assert torch.equal(augment.random_grayscale(x1, g, p=1.0), x1)  # 1 channel: nothing to do
    x3 = torch.rand(4, 3, 8, 8, generator=g)
    gray = augment.random_grayscale(x3, g, p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    assert torch.equal(augment.color_jitter(x3, g, p=0.0), x3)


# ---------------------------------------------------------------------------------------------------------
# config


def test_config_validation_names_the_key():
    with pytest.raises(UserError, match="features.ssl.temperature"):
        SimCLRConfig(temperature=0.0)
    with pytest.raises(UserError, match="features.ssl.amp"):
        SimCLRConfig(amp="fp8")
    with pytest.raises(UserError, match="features.ssl.backbone.*resnet18"):
        SimCLRConfig(backbone="resnet-18")
    with pytest.raises(UserError, match="features.ssl.crop_scale_min"):
        SimCLRConfig(crop_scale_min=0.0)


def test_config_builds_through_from_mapping():
    from dmlp_plugin.config import from_mapping

    cfg = from_mapping(SimCLRConfig, {"epochs": 3, "hflip": False, "lr": 1}, "features.ssl")
    assert cfg.epochs == 3 and cfg.hflip is False and cfg.lr == 1.0
    with pytest.raises(UserError, match="features.ssl.epochs"):
        from_mapping(SimCLRConfig, {"epochs": "many"}, "features.ssl")


# ---------------------------------------------------------------------------------------------------------
# training and extraction


@pytest.fixture(scope="module")
def patterns():
    return _patterns()


def test_train_is_deterministic_and_loss_falls(patterns):
    images, _ = patterns
    cfg = SimCLRConfig(**{**TINY, "epochs": 4})
    before = torch.random.get_rng_state()
    m1 = train_simclr(images, cfg, progress=False)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's global RNG is untouched
    m2 = train_simclr(images, cfg, progress=False)
    f1 = extract_features(m1, images, cfg.image_size)
    f2 = extract_features(m2, images, cfg.image_size)
    np.testing.assert_array_equal(f1, f2)
    assert not m1.training
    assert m1.simclr_losses[-1] < m1.simclr_losses[0] - 0.05
    m3 = train_simclr(images, dataclasses.replace(cfg, seed=1, epochs=1), progress=False)
    assert not np.allclose(extract_features(m3, images, cfg.image_size), f1)


def test_extract_features_normalised_and_flip_consistent(patterns):
    images, _ = patterns
    cfg = SimCLRConfig(**TINY)
    model = train_simclr(images[:64], dataclasses.replace(cfg, epochs=1), progress=False)
    model.train()
    f = extract_features(model, images, 16, batch_size=50)
    assert f.dtype == np.float32 and f.shape[0] == len(images)
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    assert model.training  # mode restored
    flipped = extract_features(model, images, 16, flip=True)
    assert not np.allclose(flipped, f, atol=1e-4)
    np.testing.assert_allclose(extract_features(model, images[:, :, ::-1].copy(), 16, flip=True), f, atol=1e-5)
    assert extract_features(model, images[:0], 16).shape == (0, f.shape[1])


def _knn_loo_accuracy(x, y, k=5):
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nn_idx = np.argsort(-sims, axis=1)[:, :k]
    votes = np.apply_along_axis(np.bincount, 1, y[nn_idx], minlength=y.max() + 1)
    return float(np.mean(votes.argmax(1) == y))


def test_learned_features_separate_easy_classes(patterns):
    images, labels = patterns
    cfg = SimCLRConfig(**{**TINY, "epochs": 8, "hflip": False})
    model = train_simclr(images, cfg, progress=False)
    f = extract_features(model, images, cfg.image_size)
    acc = _knn_loo_accuracy(f, labels)
    assert acc > 0.8, acc  # chance is 1/3
    # The score comes from features that stay aligned with their images: shuffled rows fall to chance.
    assert _knn_loo_accuracy(f[np.random.default_rng(0).permutation(len(f))], labels) < 0.6


# ---------------------------------------------------------------------------------------------------------
# checkpoint resume


class _Stop(Exception):
    pass


def test_resume_from_checkpoint_matches_uninterrupted_run(patterns, tmp_path):
    images, _ = patterns
    cfg = SimCLRConfig(**{**TINY, "epochs": 3, "warmup_epochs": 1})
    full = train_simclr(images, cfg, progress=False)

    ckpt = tmp_path / "ssl.pt"

    def stop_after_first(epoch, loss):
        if epoch == 0:
            raise _Stop

    with pytest.raises(_Stop):
        train_simclr(images, cfg, progress=False, checkpoint=ckpt, on_epoch_end=stop_after_first)
    assert ckpt.exists()
    seen = []
    resumed = train_simclr(images, cfg, progress=False, checkpoint=ckpt, on_epoch_end=lambda e, l: seen.append(e))
    assert seen == [1, 2]  # epoch 0 was not run again
    assert resumed.simclr_losses == pytest.approx(full.simclr_losses, abs=0)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A checkpoint of other settings is ignored (with a warning), not loaded.
    with pytest.warns(RuntimeWarning, match="other settings"):
        train_simclr(images[:40], dataclasses.replace(cfg, epochs=1), progress=False, checkpoint=ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        train_simclr(images[:40], dataclasses.replace(cfg, epochs=1), progress=False, checkpoint=ckpt)


# ---------------------------------------------------------------------------------------------------------
# cache


def test_cache_hit_key_and_corrupt_rebuild(patterns, tmp_path, monkeypatch):
    images, labels = patterns
    data = ImageSet("patterns", images[:60], labels[:60], 3)
    cfg = SimCLRConfig(**{**TINY, "epochs": 1})
    bank = cache.get_features(data, cfg, tmp_path, progress=False)
    assert set(bank.views) == {"plain", "hflip"}
    for v in bank.views.values():
        assert v.dtype == np.float32 and v.shape[0] == 60
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    import torch

    key = cache.cache_key(data, cfg, torch.get_num_threads())  # on the CPU the thread count is in the key
    assert bank.path.endswith(f"features-{key}.npz")
    assert bank.provenance["key"] == key and bank.provenance["backbone"] == "test_resnet"
    assert bank.provenance["data_fingerprint"] == data.fingerprint() and bank.provenance["epochs"] == 1
    json.dumps(bank.provenance)
    assert json.loads((tmp_path / f"features-{key}.json").read_text())["key"] == key
    assert not (tmp_path / f"ssl-{key}.pt").exists()  # the checkpoint is gone once features are saved

    def boom(*a, **k):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(ssl, "train_simclr", boom)
    again = cache.get_features(data, cfg, tmp_path, progress=False)
    for name in bank.views:
        np.testing.assert_array_equal(again.views[name], bank.views[name])
    assert again.provenance == bank.provenance

    threads = torch.get_num_threads()
    assert cache.cache_key(data, dataclasses.replace(cfg, temperature=0.3), threads) != key
    assert cache.cache_key(data, dataclasses.replace(cfg, backbone="resnet10t"), threads) != key
    other = ImageSet("patterns", images[1:61], labels[1:61], 3)
    assert cache.cache_key(other, cfg, threads) != key
    monkeypatch.undo()

    # A damaged file (a truncated write from an older tool, a disk error) is rebuilt, not fatal.
    with open(bank.path, "r+b") as fh:
        fh.truncate(100)
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        rebuilt = cache.get_features(data, cfg, tmp_path, progress=False)
    for name in bank.views:
        np.testing.assert_array_equal(rebuilt.views[name], bank.views[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get_features(data, cfg, tmp_path, progress=False)  # and sound again


def test_cpu_bf16_hazard_falls_back_to_float32(patterns, monkeypatch):
    # torch 2.14.1's CPU bf16 weight gradient of a stride-2 conv on a 1-pixel input is garbage; a model
    # whose image is smaller than its total stride must train in float32 under amp=auto (else: NaN).
    assert ssl._build(SimCLRConfig(backbone="test_resnet", image_size=16), 1)[1]
    assert not ssl._build(SimCLRConfig(backbone="test_resnet", image_size=32), 1)[1]
    monkeypatch.setattr(ssl, "cpu_has_fast_bf16", lambda: True)
    assert not ssl._amp_enabled(SimCLRConfig(), torch.device("cpu"), hazard=True)
    assert ssl._amp_enabled(SimCLRConfig(), torch.device("cpu"), hazard=False)
    assert not ssl._amp_enabled(SimCLRConfig(amp="no"), torch.device("cpu"))
    # a CPU without native bfloat16 (AVX2 only: bf16 ran ~25x slower than float32) trains in float32
    monkeypatch.setattr(ssl, "cpu_has_fast_bf16", lambda: False)
    assert not ssl._amp_enabled(SimCLRConfig(), torch.device("cpu"), hazard=False)
    assert ssl._amp_enabled(SimCLRConfig(amp="bf16"), torch.device("cpu"), hazard=False)
    images, _ = patterns
    model = train_simclr(images, SimCLRConfig(**{**TINY, "epochs": 3}), progress=False)
    assert all(math.isfinite(v) for v in model.simclr_losses)


def test_cache_key_is_the_same_under_any_process_count(monkeypatch):
    # one process makes the features under any launch, so a 2-process run finds (and makes) 1 process's file
    import inspect

    from dmlp_plugin.data.datasets import load_digits
    from dmlp_plugin.features import cache

    data = load_digits().train
    cfg = SimCLRConfig(**TINY)
    assert list(inspect.signature(cache.cache_key).parameters) == ["imageset", "cfg", "threads"]
    key = cache.cache_key(data, cfg, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cache.cache_key(data, cfg, 1) == key
