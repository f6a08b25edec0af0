"""DivideMix (baselines/dividemix.py): the pieces of the recipe one by one, the co-divide wiring inside the
loop, the paper's settings table, a short end-to-end run and resuming it. Tiny data: the file runs in well
under a minute on two cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import baselines.dividemix as dm
from baselines.common import RunResult, TrainData, derive_seed
from baselines.dividemix import (DivideMix, co_divide, co_guess, co_refine, gmm_clean_probability, linear_rampup,
                                 mixmatch, paper_settings, sharpen)
from dmlp_plugin.errors import UserError


def _auc(prob, positive):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.asarray(positive, bool), prob)


def easy_images(n: int, num_classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8x8 grey images whose class is the bright 4x4 quadrant, on faint noise: learnt in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n).astype(np.int64)
    x = rng.integers(0, 40, (n, 8, 8, 1))
    for c in range(num_classes):
        r, q = divmod(c, 2)
        x[y == c, 4 * r:4 * r + 4, 4 * q:4 * q + 4, 0] += 200
    return x.astype(np.uint8), y


def noisy_easy_data(n=320, n_test=80, rate=0.4, seed=0, soft=False):
    x, y = easy_images(n + n_test, seed=seed)
    rng = np.random.default_rng(seed + 1)
    noisy = y[:n].copy()
    flip = rng.permutation(n)[: int(rate * n)]
    noisy[flip] = (y[:n][flip] + rng.integers(1, 4, flip.size)) % 4  # always a wrong class
    labels = np.eye(4, dtype=np.float32)[noisy] * 0.9 + 0.025 if soft else noisy
    data = TrainData(x[:n], labels, x[n:], y[n:], 4, noise_rate=rate, noise_rate_source="known")
    return data, y[:n]


TINY = dict(backbone="test_resnet", cifar_stem=False, image_size=None, epochs=3, warm_up=2, batch_size=32,
            warmup_batch_size=32, lr=0.02, milestones=(), crop_pad=1, hflip=False, rampup_length=1.0,
            lambda_u=25.0, p_threshold=0.5)


# ------------------------------------------------------------------------------------------ GMM division


def test_gmm_separates_two_loss_populations_and_takes_the_low_mean_component():
    rng = np.random.default_rng(0)
    clean = rng.normal(0.3, 0.1, 700).clip(0)
    noisy = rng.normal(2.5, 0.5, 300)
    losses = np.concatenate([clean, noisy])
    is_clean = np.arange(1000) < 700
    prob = gmm_clean_probability(losses, seed=0)
    assert prob.shape == (1000,) and np.all((prob >= 0) & (prob <= 1))
    assert _auc(prob, is_clean) > 0.99  # the high-mean component would give an AUC near 0
    assert prob[is_clean].mean() > 0.9 and prob[~is_clean].mean() < 0.1
    # min-max normalisation: an affine change of the losses leaves the split (almost) unchanged
    np.testing.assert_allclose(gmm_clean_probability(losses * 7 + 3, seed=0), prob, atol=1e-3)
    # seeded: the same call gives the same numbers
    np.testing.assert_array_equal(gmm_clean_probability(losses, seed=0), prob)


def test_gmm_constant_losses_give_everyone_clean():
    np.testing.assert_array_equal(gmm_clean_probability(np.full(50, 0.7), seed=1), np.ones(50))


def test_co_divide_gives_each_network_the_other_networks_division():
    p1 = np.array([0.9, 0.1, 0.9, 0.1])
    p2 = np.array([0.9, 0.9, 0.1, 0.1])
    d1, d2 = co_divide(p1, p2, 0.5)
    assert (d1["net"], d1["from_net"], d2["net"], d2["from_net"]) == (1, 2, 2, 1)
    np.testing.assert_array_equal(d1["labelled"], [0, 1])  # net 1 trains on net 2's division
    np.testing.assert_array_equal(d1["unlabelled"], [2, 3])
    np.testing.assert_array_equal(d1["prob"], p2)
    np.testing.assert_array_equal(d2["labelled"], [0, 2])
    np.testing.assert_array_equal(d2["prob"], p1)


# ------------------------------------------------------------------------------------ per-batch formulas


def test_sharpen_formula():
    p = torch.tensor([[0.6, 0.4], [0.5, 0.5]])
    out = sharpen(p, 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.36 / 0.52, 0.16 / 0.52], [0.5, 0.5]]))
    torch.testing.assert_close(sharpen(p, 1.0), p)


def test_co_refine_formula_hard_and_soft_labels():
    pred = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    onehot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    w = torch.tensor([0.75, 0.0])
    out = co_refine(onehot, w, pred)
    torch.testing.assert_close(out, torch.tensor([[0.75 + 0.25 * 0.2, 0.25 * 0.5, 0.25 * 0.3], [0.1, 0.1, 0.8]]))
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]])
    torch.testing.assert_close(co_refine(soft, torch.ones(2), pred), soft)  # w = 1 keeps the given distribution
    torch.testing.assert_close(co_refine(soft, w, pred)[0], 0.75 * soft[0] + 0.25 * pred[0])
    torch.testing.assert_close(co_refine(soft, w, pred).sum(1), torch.ones(2))


def test_co_guess_is_the_sharpened_mean_of_all_four_predictions():
    ps = [torch.tensor([[0.7, 0.3]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]]),
          torch.tensor([[0.5, 0.5]])]
    mean = torch.tensor([[0.65, 0.35]])
    torch.testing.assert_close(co_guess(ps, 0.5), mean ** 2 / (mean ** 2).sum())


def test_mixmatch_keeps_l_at_least_half_and_mixes_inputs_and_targets_with_one_permutation():
    n = 6
    inputs = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds the value i
    targets = torch.eye(n)  # row i is one-hot i: the target tells which rows were mixed
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    for l in (0.2, 0.8):  # 0.2 is used as 0.8
        x, t = mixmatch(inputs, targets, l, perm)
        torch.testing.assert_close(x[:, 0], 0.8 * torch.arange(n) + 0.2 * perm.float())
        for j in range(n):
            assert t[j, j] == pytest.approx(0.8) and t[j, perm[j]] == pytest.approx(0.2)
            # the same weights in the inputs: x = sum_i t_i * i
            assert float(x[j, 0]) == pytest.approx(float((t[j] * torch.arange(n)).sum()))


def test_linear_rampup():
    assert linear_rampup(5.0, 10) == 0.0
    assert linear_rampup(10.0, 10) == 0.0
    assert linear_rampup(18.0, 10) == pytest.approx(0.5)
    assert linear_rampup(26.0, 10) == 1.0
    assert linear_rampup(100.0, 10) == 1.0
    assert linear_rampup(11.0, 10, rampup_length=2) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ settings and config


@pytest.mark.parametrize("kind, rate, classes, expected", [
    ("symmetric", 0.2, 10, (0.0, 0.5)), ("symmetric", 0.5, 10, (25.0, 0.5)), ("symmetric", 0.8, 10, (25.0, 0.5)),
    ("symmetric", 0.9, 10, (50.0, 0.6)), ("asymmetric", 0.4, 10, (0.0, 0.5)),
    ("symmetric", 0.2, 100, (25.0, 0.5)), ("symmetric", 0.5, 100, (150.0, 0.5)),
    ("symmetric", 0.8, 100, (150.0, 0.5)), ("symmetric", 0.9, 100, (150.0, 0.6)),
    ("symmetric", 0.05, 10, (0.0, 0.5)), ("symmetric", 0.45, 10, (25.0, 0.5)),  # nearest tabulated rate
    # the measured wrong fraction of DivideMix's symmetric noise, r * (1 - 1/C), picks the same row
    ("symmetric", 0.81, 10, (50.0, 0.6)), ("symmetric", 0.72, 10, (25.0, 0.5)), ("symmetric", 0.711, 10, (25.0, 0.5)),
    ("symmetric", 0.891, 100, (150.0, 0.6)), ("asymmetric", 0.2, 10, (0.0, 0.5)),
])
def test_paper_settings_table(kind, rate, classes, expected):
    assert paper_settings(kind, rate, classes) == expected


def test_paper_settings_refuses_what_the_paper_does_not_cover():
    with pytest.raises(UserError, match="asymmetric"):
        paper_settings("asymmetric", 0.4, 100)
    with pytest.raises(UserError, match="noise_kind"):
        paper_settings("pairflip", 0.4, 10)


def test_settings_record_where_they_came_from():
    data, _ = noisy_easy_data(n=20, n_test=4)
    s = DivideMix().settings(data)
    assert (s["lambda_u"], s["p_threshold"]) == (25.0, 0.5)  # 0.4 -> nearest tabulated 0.5
    assert "paper table" in s["lambda_u_source"] and "oracle" in s["oracle_note"]
    assert s["loss_history"] == 1 and s["warmup_penalty"] is False
    s = DivideMix(lambda_u=3.0, p_threshold=0.7, loss_history=2).settings(data)
    assert (s["lambda_u"], s["lambda_u_source"], s["p_threshold_source"]) == (3.0, "config", "config")
    x, y = easy_images(24)
    at90 = TrainData(x[:20], y[:20], x[20:], y[20:], 4, noise_rate=0.9, noise_rate_source="known")
    s = DivideMix().settings(at90)
    assert (s["lambda_u"], s["p_threshold"], s["loss_history"]) == (50.0, 0.6, 5)
    measured90 = TrainData(x[:20], y[:20], x[20:], y[20:], 4, noise_rate=0.68,  # 0.9 * (1 - 1/4) wrong
                           noise_rate_source="known: measured against the true labels (oracle)")
    s = DivideMix(lambda_u=1.0, p_threshold=0.5).settings(measured90)
    assert s["loss_history"] == 5 and "measured" in s["loss_history_source"] and "oracle" in s["oracle_note"]
    unknown = TrainData(x[:20], y[:20], x[20:], y[20:], 4)
    with pytest.raises(UserError, match="noise_rate"):
        DivideMix().settings(unknown)
    assert DivideMix(lambda_u=0.0, p_threshold=0.5).settings(unknown)["loss_history"] == 1
    assert DivideMix(noise_kind="asymmetric").settings(data)["warmup_penalty"] is True


@pytest.mark.parametrize("field, value", [
    ("lambda_u", -1.0), ("p_threshold", 1.5), ("p_threshold", 0.0), ("temperature", 0.0), ("temperature", 2.0),
    ("mix_alpha", 0.0), ("warm_up", -1), ("warm_up", 1.5), ("loss_history", 0), ("noise_kind", "pairflip"),
    ("rampup_length", 0.0), ("epochs", 0), ("lr", -0.1), ("warmup_batch_size", 0), ("gamma", 0.0),
    ("mixed_precision", "fp8"), ("crop_pad", -1), ("momentum", 1.0),
])
def test_bad_hyperparameters_are_user_errors(field, value):
    with pytest.raises(UserError, match=field):
        DivideMix(**{field: value})


def test_presets():
    c = DivideMix.from_preset("cifar10")
    assert c == DivideMix()
    assert (c.lr, c.batch_size, c.epochs, c.warm_up, c.milestones, c.temperature, c.mix_alpha) == (
        0.02, 64, 300, 10, (150,), 0.5, 4.0)
    assert DivideMix.from_preset("cifar100").warm_up == 30
    assert DivideMix.from_preset("small").backbone == "test_resnet"
    with pytest.raises(UserError, match="preset"):
        DivideMix.from_preset("imagenet")
    with pytest.raises(UserError, match="no field"):
        DivideMix.from_preset("small", lambda_x=1)


# ------------------------------------------------------------------------------------------ the loop


def test_short_run_divides_well_and_returns_a_sane_result():
    """Two warm-up epochs on easy images with 40% wrong labels, then one DivideMix epoch: the GMM split of
    the real per-sample losses separates the clean samples (AUC > 0.9) and the labelled sets are mostly
    clean."""
    data, truth = noisy_easy_data(n=480)
    result = DivideMix(**TINY).run(data, device="cpu", seed=0, progress=False, true_labels=truth)
    assert isinstance(result, RunResult)
    assert [r["epoch"] for r in result.curve] == [1, 2, 3]
    assert [r["phase"] for r in result.curve] == ["warmup", "warmup", "dividemix"]
    last = result.curve[-1]
    assert result.test_accuracy == last["test_accuracy"]
    assert 0.0 <= result.test_accuracy <= 1.0 and result.test_accuracy > 0.5  # chance is 0.25
    for k in (1, 2):
        assert last[f"auc_net{k}"] > 0.9
        assert last[f"precision_net{k}"] > 0.85  # 60% of the labels are right
        assert 0.3 < last[f"labelled_fraction_net{k}"] < 0.9
    assert all(np.isfinite(r["train_loss"]) and r["lr"] == 0.02 for r in result.curve)
    assert last["lambda_u_ramped"] > 0
    info = result.info
    assert info["method"] == "dividemix" and info["accuracy_reported"] == "last epoch"
    assert info["lambda_u_source"] == "config" and info["p_threshold"] == 0.5
    assert result.seconds > 0


def test_each_network_trains_on_the_other_networks_division(monkeypatch):
    """Give the two networks' GMMs different, known outputs and record what each network is trained on."""
    data, _ = noisy_easy_data(n=96, n_test=16)
    n, seed = 96, 3
    first_half = np.where(np.arange(n) < n // 2, 0.9, 0.1)
    even = np.where(np.arange(n) % 2 == 0, 0.8, 0.2)
    own = {}

    def fake_gmm(losses, s, normalise=True):
        k = next(k for k in (0, 1) if s == derive_seed(seed, "gmm", 1, k))  # net k's GMM at epoch 1
        own[k] = first_half if k == 0 else even
        return own[k]

    seen = []
    real_epoch = dm.semi_supervised_epoch

    def spy(accelerator, cfg, net, peer, optimizer, images, label_matrix, labelled, unlabelled, prob, **kw):
        seen.append((kw["net_index"], net, peer, np.asarray(labelled), prob.numpy().copy()))
        return real_epoch(accelerator, cfg, net, peer, optimizer, images, label_matrix, labelled, unlabelled,
                          prob, **kw)

    monkeypatch.setattr(dm, "gmm_clean_probability", fake_gmm)
    monkeypatch.setattr(dm, "semi_supervised_epoch", spy)
    cfg = DivideMix(**{**TINY, "epochs": 2, "warm_up": 1})
    result = cfg.run(data, device="cpu", seed=seed, progress=False)
    assert [s[0] for s in seen] == [0, 1]
    (_, net1, peer1, lab1, prob1), (_, net2, peer2, lab2, prob2) = seen
    assert peer1 is net2 and peer2 is net1  # the peer guesses labels for the trained net
    np.testing.assert_array_equal(lab1, np.flatnonzero(even > 0.5))  # net 1 <- net 2's division
    np.testing.assert_allclose(prob1, even, rtol=1e-6)
    np.testing.assert_array_equal(lab2, np.flatnonzero(first_half > 0.5))  # net 2 <- net 1's division
    np.testing.assert_allclose(prob2, first_half, rtol=1e-6)
    assert result.curve[-1]["labelled_fraction_net1"] == pytest.approx(0.5)


def test_soft_labels_run_and_refine_from_the_distribution(monkeypatch):
    data, _ = noisy_easy_data(n=64, n_test=16, soft=True)
    rows = []
    real = dm.co_refine

    def spy(labels, w, mean_pred):
        rows.append(labels.clone())
        return real(labels, w, mean_pred)

    monkeypatch.setattr(dm, "co_refine", spy)
    result = DivideMix(**{**TINY, "epochs": 2, "warm_up": 1}).run(data, device="cpu", seed=0, progress=False)
    assert result.info["labels"] == "soft" and len(result.curve) == 2
    assert rows and all(torch.all(r.max(1).values < 0.95) for r in rows)  # the soft rows, not one-hot


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, monkeypatch):
    data, _ = noisy_easy_data(n=96, n_test=16)
    cfg = DivideMix(**{**TINY, "epochs": 4, "warm_up": 1, "loss_history": 2})  # the history is restored too
    full = cfg.run(data, device="cpu", seed=1, progress=False, checkpoint_dir=tmp_path / "a")
    real_save = dm.save_checkpoint
    calls = []

    def dying_save(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # killed after epoch 2 (its checkpoint is written)
            raise KeyboardInterrupt

    monkeypatch.setattr(dm, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cfg.run(data, device="cpu", seed=1, progress=False, checkpoint_dir=tmp_path / "b")
    monkeypatch.setattr(dm, "save_checkpoint", real_save)
    resumed = cfg.run(data, device="cpu", seed=1, progress=False, checkpoint_dir=tmp_path / "b")
    assert resumed.info["resumed_at_epoch"] == 2
    assert resumed.curve == full.curve
    assert resumed.test_accuracy == full.test_accuracy
