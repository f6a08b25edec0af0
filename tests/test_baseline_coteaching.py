"""Co-teaching: the forget-rate schedule, the small-loss cross selection, the Adam plan, config errors, and
short end-to-end runs (tiny images, test_resnet) whose measured kept fraction follows the schedule."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from baselines.common import RunResult, TrainData
from baselines.coteaching import (PRESETS, CoTeaching, adam_plan, coteaching_losses, forget_rate_schedule,
                                  num_remember, per_sample_ce, small_loss_selection)
from dmlp_plugin.errors import UserError



# ------------------------------------------------------------------------------------------- schedule


def test_schedule_ramps_linearly_to_tau_then_stays():
    tau, tk = 0.5, 10
    got = [forget_rate_schedule(e, tau, tk) for e in range(30)]
    # the official rate_schedule[:num_gradual] = linspace(0, tau, num_gradual), then tau
    official = np.concatenate([np.linspace(0, tau, tk), np.full(20, tau)])
    np.testing.assert_allclose(got, official, rtol=0, atol=1e-12)
    assert got[0] == 0.0 and got[tk - 1] == pytest.approx(tau) and got[tk - 2] < tau
    steps = np.diff(got[:tk])
    np.testing.assert_allclose(steps, tau / (tk - 1), rtol=1e-9)  # linear: equal steps
    assert all(g == pytest.approx(tau) for g in got[tk - 1:])


def test_schedule_edge_cases_and_exponent():
    assert forget_rate_schedule(0, 0.3, 1) == pytest.approx(0.3)  # no ramp
    assert forget_rate_schedule(0, 0.0, 10) == 0.0 and forget_rate_schedule(50, 0.0, 10) == 0.0
    # exponent c: tau * (e / (T_k - 1)) ** c, still reaching tau at T_k - 1
    assert forget_rate_schedule(3, 0.6, 7, exponent=2) == pytest.approx(0.6 * 0.25)
    assert forget_rate_schedule(6, 0.6, 7, exponent=2) == pytest.approx(0.6)
    assert forget_rate_schedule(3, 0.6, 7, exponent=0.5) == pytest.approx(0.6 * math.sqrt(0.5))


def test_adam_plan_matches_official_alpha_and_beta_plans():
    lr, n, start = 1e-3, 200, 80
    for e in (0, 79):
        assert adam_plan(e, lr, n, start, 0.9, 0.1) == (lr, 0.9)
    for e in (80, 150, 199):
        got_lr, got_b1 = adam_plan(e, lr, n, start, 0.9, 0.1)
        assert got_lr == pytest.approx((n - e) / (n - start) * lr) and got_b1 == 0.1
    assert adam_plan(5, lr, 5, 5, 0.9, 0.1) == (lr, 0.9)  # decay start at the end: no decay


# ------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize("b,rate", [(128, 0.5), (50, 0.3), (64, 0.443), (10, 0.0), (33, 0.8)])
def test_selection_keeps_int_1_minus_r_times_b_smallest_of_each_ranking(b, rate):
    g = torch.Generator().manual_seed(b)
    loss_a, loss_b = torch.rand(b, generator=g), torch.rand(b, generator=g)
    idx_for_b, idx_for_a = small_loss_selection(loss_a, loss_b, rate)
    k = int((1 - rate) * b)
    assert len(idx_for_b) == len(idx_for_a) == k == num_remember(b, rate)
    assert len(set(idx_for_b.tolist())) == k and len(set(idx_for_a.tolist())) == k
    # B is updated on A's k smallest-loss samples (A's own ranking), and A on B's
    assert set(idx_for_b.tolist()) == set(torch.topk(loss_a, k, largest=False).indices.tolist())
    assert set(idx_for_a.tolist()) == set(torch.topk(loss_b, k, largest=False).indices.tolist())
    if k < b:  # every kept loss is <= every dropped loss
        dropped = torch.ones(b, dtype=torch.bool)
        dropped[idx_for_b] = False
        assert loss_a[idx_for_b].max() <= loss_a[dropped].min()


def test_each_network_is_updated_on_its_peers_selection():
    """Opposite rankings: net 1 finds the first half easy, net 2 the second half. Net 1's gradient must
    reach only the second half (net 2's pick), net 2's only the first half."""
    b, c = 8, 3
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    good = torch.nn.functional.one_hot(targets, c).float() * 5
    logits1 = torch.where(torch.arange(b)[:, None] < 4, good, -good).requires_grad_()
    logits2 = torch.where(torch.arange(b)[:, None] >= 4, good, -good).requires_grad_()
    loss1, loss2 = per_sample_ce(logits1, targets), per_sample_ce(logits2, targets)
    update1, update2, idx_for_1, idx_for_2 = coteaching_losses(loss1, loss2, 0.5)
    assert sorted(idx_for_1.tolist()) == [4, 5, 6, 7] and sorted(idx_for_2.tolist()) == [0, 1, 2, 3]
    (update1 + update2).backward()
    rows1 = logits1.grad.abs().sum(1) > 0
    rows2 = logits2.grad.abs().sum(1) > 0
    assert rows1.tolist() == [False] * 4 + [True] * 4
    assert rows2.tolist() == [True] * 4 + [False] * 4
    # a plain mean over the kept samples (not the official double normalisation)
    assert float(update1.detach()) == pytest.approx(float(loss1[4:].mean().detach()))
    assert float(update2.detach()) == pytest.approx(float(loss2[:4].mean().detach()))


def test_kept_samples_are_much_cleaner_than_chance_when_noisy_losses_are_larger():
    n, c, noise = 2000, 10, 0.4
    rng = np.random.default_rng(0)
    truth = rng.integers(0, c, n)
    given = truth.copy()
    flip = rng.permutation(n)[: int(noise * n)]
    given[flip] = (truth[flip] + rng.integers(1, c, len(flip))) % c  # a wrong class
    clean = torch.from_numpy(given == truth)
    targets = torch.from_numpy(given)
    # two "networks" that learned the truth, each with its own logit noise: wrong labels get large losses
    onehot = torch.nn.functional.one_hot(torch.from_numpy(truth), c).float()
    g = torch.Generator().manual_seed(0)
    logits1 = 3 * onehot + torch.randn(n, c, generator=g)
    logits2 = 3 * onehot + torch.randn(n, c, generator=g)
    picks = []
    for start in range(0, n, 128):  # per mini-batch, as in training
        sl = slice(start, start + 128)
        a, b = per_sample_ce(logits1[sl], targets[sl]), per_sample_ce(logits2[sl], targets[sl])
        for idx in small_loss_selection(a, b, noise):
            picks.append(clean[sl][idx])
    precision = float(torch.cat(picks).float().mean())
    assert float(clean.double().mean()) == pytest.approx(1 - noise)
    assert precision > 0.95  # chance (a random subset) would be 0.6


def test_soft_labels_rank_by_cross_entropy_against_the_distribution():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [2.0, 2.0]])
    soft = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.5, 0.5]])
    loss = per_sample_ce(logits, soft)
    expected = -(soft * torch.log_softmax(logits, 1)).sum(1)
    torch.testing.assert_close(loss, expected)
    idx_for_b, _ = small_loss_selection(loss, loss, 1 / 3)
    assert sorted(idx_for_b.tolist()) == [0, 2]


# ---------------------------------------------------------------------------------------------- config


def test_presets_build_and_defaults_are_the_cifar10_preset():
    assert CoTeaching() == CoTeaching.from_preset("cifar10")
    c = CoTeaching()
    assert (c.lr, c.batch_size, c.epochs, c.epoch_decay_start, c.num_gradual, c.beta1, c.beta1_decayed,
            c.augment) == (0.001, 128, 200, 80, 10, 0.9, 0.1, False)
    assert CoTeaching.from_preset("small").backbone == "test_resnet"
    assert set(PRESETS) == {"cifar10", "small"}


@pytest.mark.parametrize("bad", [dict(forget_rate=1.0), dict(forget_rate=-0.1), dict(num_gradual=0),
                                 dict(exponent=0), dict(beta1=1.0), dict(beta1_decayed=-0.1),
                                 dict(epoch_decay_start=-1), dict(epochs=0), dict(lr=0.0),
                                 dict(crop_pad=-1), dict(weight_decay=-1.0), dict(mixed_precision="fp8")])
def test_bad_hyperparameter_is_a_user_error(bad):
    with pytest.raises(UserError) as err:
        CoTeaching.from_preset("small", **bad)
    assert next(iter(bad)) in str(err.value) and "\n" not in str(err.value)


def test_unknown_field_or_preset_is_a_user_error():
    with pytest.raises(UserError, match="forget_rte"):
        CoTeaching.from_preset("small", forget_rte=0.2)
    with pytest.raises(UserError, match="unknown preset"):
        CoTeaching.from_preset("imagenet")


def _tiny(n=96, noise_rate=None, source=None, soft=False, seed=0):
    """Two classes of 8x8 grey images (bright left or right half) with 25% of the labels flipped."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, n + 32)
    img = rng.integers(0, 60, (n + 32, 8, 8, 1)).astype(np.uint8)
    for i, y in enumerate(truth):
        img[i, :, (0 if y == 0 else 4):(4 if y == 0 else 8)] += 180
    noisy = truth[:n].copy()
    flip = rng.permutation(n)[: n // 4]
    noisy[flip] = 1 - noisy[flip]
    labels = np.eye(2, dtype=np.float32)[noisy] * 0.9 + 0.05 if soft else noisy
    data = TrainData(img[:n], labels, img[n:], truth[n:], 2, noise_rate=noise_rate, noise_rate_source=source)
    return data, truth[:n]


TINY = dict(backbone="test_resnet", image_size=16, epochs=3, batch_size=32, lr=0.003, epoch_decay_start=2,
            num_gradual=3, augment=False)


def test_missing_forget_rate_is_a_user_error():
    data, _ = _tiny()
    with pytest.raises(UserError, match="forget_rate") as err:
        CoTeaching(**TINY).run(data, device="cpu", progress=False)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ end to end


def test_end_to_end_kept_fraction_follows_the_schedule():
    data, truth = _tiny(noise_rate=0.25, source="known")
    cfg = CoTeaching(**TINY)
    res = cfg.run(data, device="cpu", seed=0, progress=False, true_labels=truth)
    assert isinstance(res, RunResult) and len(res.curve) == 3
    assert res.info["forget_rate"] == 0.25 and res.info["forget_rate_source"] == "known noise rate"
    assert res.test_accuracy == res.curve[-1]["test_accuracy"]
    for e, row in enumerate(res.curve):
        rate = forget_rate_schedule(e, 0.25, 3)
        assert row["epoch"] == e + 1 and row["forget_rate"] == pytest.approx(rate)
        # 96 samples = 3 full batches of 32: each network keeps int((1 - R) * 32) per batch
        assert row["kept_fraction"] == pytest.approx(int((1 - rate) * 32) / 32)
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["test_accuracy_net2"] <= 1
        assert 0 <= row["label_precision"] <= 1 and math.isfinite(row["train_loss"])
        assert row["lr"] == pytest.approx(adam_plan(e, 0.003, 3, 2, 0.9, 0.1)[0])
    assert [r["kept_fraction"] for r in res.curve] == sorted((r["kept_fraction"] for r in res.curve), reverse=True)
    assert res.curve[0]["kept_fraction"] == 1.0 and res.curve[-1]["kept_fraction"] == 24 / 32


def test_end_to_end_soft_labels_and_given_forget_rate():
    data, _ = _tiny(soft=True)
    cfg = dataclasses.replace(CoTeaching(**TINY), epochs=1, forget_rate=0.5, num_gradual=1)
    res = cfg.run(data, device="cpu", seed=0, progress=False)
    assert res.info["labels"] == "soft" and res.info["forget_rate_source"] == "given"
    assert res.curve[0]["kept_fraction"] == pytest.approx(0.5) and "label_precision" not in res.curve[0]


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    import baselines.coteaching as cot

    data, truth = _tiny(noise_rate=0.25, source="known")
    cfg = dataclasses.replace(CoTeaching(**TINY), augment=True, crop_pad=2)
    whole = cfg.run(data, device="cpu", seed=3, progress=False, true_labels=truth)
    real_save, calls = cot.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed after epoch 2")

    monkeypatch.setattr(cot, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cfg.run(data, device="cpu", seed=3, progress=False, checkpoint_dir=tmp_path, true_labels=truth)
    monkeypatch.setattr(cot, "save_checkpoint", real_save)
    resumed = cfg.run(data, device="cpu", seed=3, progress=False, checkpoint_dir=tmp_path, true_labels=truth)
    assert resumed.info["resumed_at_epoch"] == 2
    assert resumed.curve == whole.curve and resumed.test_accuracy == whole.test_accuracy
