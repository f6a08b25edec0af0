"""ELR / ELR+ (baselines/elr.py): the mechanism as pure functions, the loops' wiring, short runs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines import elr as elr_mod
from baselines.common import TrainData
from baselines.elr import (ELR, PLUS_PRESETS, PRESETS, ELRPlus, clamped_probs, draw_mixup, ema_decay_at, elr_loss,
                           elr_term, mix, reweight_by_targets, sigmoid_rampup, temporal_average, update_ema,
                           update_targets, write_rows)
from dmlp_plugin.errors import UserError



# ------------------------------------------------------------------------------------------- mechanism


def test_targets_are_the_closed_form_temporal_average_updated_only_at_given_indices():
    g = torch.Generator().manual_seed(0)
    n, c, beta = 7, 4, 0.7
    targets = torch.zeros(n, c)
    batches = [torch.tensor([0, 2, 5]), torch.tensor([2, 3]), torch.tensor([5, 2, 0]), torch.tensor([2])]
    history = {i: [] for i in range(n)}
    for idx in batches:
        raw = torch.rand(len(idx), c, generator=g) + 0.1  # unnormalised on purpose: the update normalises
        rows = update_targets(targets, idx, raw, beta)
        assert torch.allclose(rows, targets[idx])
        for i, r in zip(idx.tolist(), raw):
            history[i].append((r / r.sum()).numpy())
    for i in range(n):
        ps = history[i]
        m = len(ps)
        expected = sum((1 - beta) * beta ** (m - 1 - j) * ps[j] for j in range(m)) if m else np.zeros(c)
        np.testing.assert_allclose(targets[i].numpy(), expected, rtol=1e-5, atol=1e-7)
    for i in (1, 4, 6):  # never in a batch
        assert torch.count_nonzero(targets[i]) == 0
    # from a non-zero start t0 the start decays as beta^m
    t0 = torch.full((1, c), 0.25)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    out = temporal_average(temporal_average(t0, p, beta), p, beta)
    np.testing.assert_allclose(out.numpy(), (beta ** 2 * t0 + (1 - beta ** 2) * p).numpy(), rtol=1e-6)


def test_repeated_index_takes_its_first_row():
    table = torch.zeros(4, 2)
    write_rows(table, torch.tensor([3, 1, 3]), torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    assert table[3].tolist() == [1.0, 0.0] and table[1].tolist() == [0.5, 0.5] and table[0].sum() == 0


def test_elr_loss_value_and_its_gradient_pulls_p_toward_the_target():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 5, generator=g)
    t = torch.softmax(torch.randn(16, 5, generator=g) * 3, 1) * 0.9  # targets sum to < 1 early in training
    y = torch.randint(0, 5, (16,), generator=g)
    p = torch.softmax(z, 1).clamp(1e-4, 1 - 1e-4)
    by_hand = F.cross_entropy(z, y) + 3.0 * torch.log(1 - (t * p).sum(1)).mean()
    assert torch.allclose(elr_loss(z, y, t, 3.0), by_hand, atol=1e-6)
    assert torch.allclose(elr_loss(z, y, t, 0.0), F.cross_entropy(z, y))

    z = z.clone().requires_grad_(True)
    elr_term(z, t).backward()
    z2 = z.detach() - 0.5 * z.grad
    before = (t * torch.softmax(z.detach(), 1)).sum(1)
    after = (t * torch.softmax(z2, 1)).sum(1)
    assert bool((after > before).all()), "the ELR term must raise <t, p> for every sample"
    # the target gets no gradient (it is a fixed, detached average)
    assert not elr_term(z.detach(), t.clone().requires_grad_(True)).requires_grad


def test_confident_agreement_gives_a_negative_loss_and_clamp_keeps_it_finite():
    z = torch.tensor([[50.0, -50.0, -50.0]])
    t = torch.tensor([[1.0, 0.0, 0.0]])
    loss = elr_loss(z, torch.tensor([0]), t, 3.0)
    assert torch.isfinite(loss) and loss < 0
    assert math.isclose(float(loss), 3.0 * math.log(1e-4), rel_tol=1e-3)  # <t, p> capped at 1 - 1e-4
    assert float(clamped_probs(z).min()) == pytest.approx(1e-4)


def test_soft_labels_are_used_as_distributions():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, generator=g)
    soft = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.5, 0.5]])
    t = torch.full((3, 4), 0.2)
    by_hand = -(soft * torch.log_softmax(z, 1)).sum(1).mean() + 2.0 * torch.log(
        1 - (t * torch.softmax(z, 1).clamp(1e-4, 1 - 1e-4)).sum(1)).mean()
    assert torch.allclose(elr_loss(z, soft, t, 2.0), by_hand, atol=1e-6)
    assert not torch.allclose(elr_loss(z, soft, t, 2.0), elr_loss(z, soft.argmax(1), t, 2.0))


def test_mixup_draw_keeps_the_larger_weight_and_mixes_with_one_permutation():
    rng = np.random.default_rng(0)
    lams = [draw_mixup(8, 1.0, rng)[0] for _ in range(300)]
    assert min(lams) >= 0.5 and max(lams) <= 1.0 and np.std(lams) > 0.05
    lam, perm = draw_mixup(8, 1.0, rng)
    assert sorted(perm.tolist()) == list(range(8))
    assert draw_mixup(5, 0.0, rng)[0] == 1.0 and draw_mixup(5, 0.0, rng)[1].tolist() == list(range(5))
    x = torch.arange(8.0)[:, None]
    y = F.one_hot(torch.arange(8), 8).float()
    xm, ym = mix(x, lam, perm), mix(y, lam, perm)
    np.testing.assert_allclose(xm[:, 0].numpy(), lam * np.arange(8) + (1 - lam) * perm.numpy(), rtol=1e-6)
    for i in range(8):  # the label row of sample i mixes the classes of i and perm[i], weights lam / 1 - lam
        if perm[i] != i:
            assert ym[i, i] == pytest.approx(lam) and ym[i, perm[i]] == pytest.approx(1 - lam)


def test_reweight_by_targets_is_y_times_t_normalised():
    y = torch.tensor([[0.7, 0.3, 0.0]])
    t = torch.tensor([[0.2, 0.6, 0.2]])
    np.testing.assert_allclose(reweight_by_targets(y, t).numpy(), [[0.14 / 0.32, 0.18 / 0.32, 0.0]], rtol=1e-6)


def test_ema_decay_ramp_and_update_match_the_formula():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(500, 100) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    for step in (1, 10, 150, 299, 1000):
        phase = 1 - min(step + 1, 300) / 300
        assert ema_decay_at(step, 0.997, 300) == pytest.approx(0.997 * math.exp(-5 * phase ** 2))
    assert ema_decay_at(7, 0.997, 0) == pytest.approx(0.997)

    torch.manual_seed(0)
    model, ema = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema.requires_grad_(False)
    model[1].running_mean.fill_(5.0)
    before = [p.clone() for p in ema.parameters()]
    a = ema_decay_at(20, 0.997, 300)
    update_ema(ema, model, a)
    for e, e0, p in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, a * e0 + (1 - a) * p.detach())
    assert ema[1].running_mean.abs().sum() == 0  # buffers: not averaged


# ------------------------------------------------------------------------------------------- configs


def test_presets_build_and_differ_where_the_official_configs_do():
    for name in PRESETS:
        ELR.from_preset(name)
    for name in PLUS_PRESETS:
        ELRPlus.from_preset(name)
    assert ELR() == ELR.from_preset("cifar10") and ELRPlus() == ELRPlus.from_preset("cifar10")
    asym, c100 = ELR.from_preset("cifar10_asym"), ELR.from_preset("cifar100")
    assert (asym.beta, asym.lam, asym.milestones, asym.gamma, asym.epochs) == (0.9, 1.0, (40, 80), 0.01, 120)
    assert (c100.beta, c100.lam) == (0.9, 7.0)
    assert ELR().lr_at(0) == pytest.approx(0.02) and ELR().lr_at(10) == pytest.approx(0.02)
    assert ELR().lr_at(5) == pytest.approx(0.001 + 0.019 * 0.5)
    p100 = ELRPlus.from_preset("cifar100")
    assert (p100.lam, p100.coef_rampup_steps, p100.reweight_labels, p100.epochs) == (7.0, 40000, True, 250)


@pytest.mark.parametrize("cls,overrides", [
    (ELR, {"beta": 1.0}), (ELR, {"beta": -0.1}), (ELR, {"lam": -1.0}), (ELR, {"lr_schedule": "linear"}),
    (ELR, {"eta_min": 0.5}), (ELR, {"restart_period": 0}), (ELR, {"milestones": (80, 40)}),
    (ELR, {"gamma": 0.0}), (ELR, {"epochs": 0}), (ELR, {"crop_pad": -1}), (ELR, {"momentum": 1.0}),
    (ELRPlus, {"mixup_alpha": -1.0}), (ELRPlus, {"ema_decay": 1.0}), (ELRPlus, {"ema_rampup_steps": -5}),
    (ELRPlus, {"coef_rampup_steps": 1.5}), (ELRPlus, {"lam": float("nan")}), (ELRPlus, {"weight_decay": -1e-4}),
])
def test_bad_hyperparameters_are_user_errors(cls, overrides):
    field = next(iter(overrides))
    with pytest.raises(UserError, match=field):
        cls(**overrides)


def test_unknown_preset_or_field_is_a_user_error():
    with pytest.raises(UserError, match="preset"):
        ELR.from_preset("cifar11")
    with pytest.raises(UserError, match="alpha"):
        ELRPlus.from_preset("small", alpha=1.0)


# ------------------------------------------------------------------------------------------ short runs


def tiny_data(soft: bool = False, seed: int = 0):
    """3 classes told apart by a bright band (rows 2c..2c+2) on 8x8 grey images; 32 train (a third of the
    labels wrong), 12 test."""
    rng = np.random.default_rng(seed)

    def images(labels):
        x = rng.integers(0, 60, size=(len(labels), 8, 8, 1))
        for i, c in enumerate(labels):
            x[i, 2 * c:2 * c + 2] += 180
        return x.astype(np.uint8)

    truth = np.arange(32) % 3
    noisy = truth.copy()
    noisy[::3] = (noisy[::3] + 1) % 3
    test = np.arange(12) % 3
    labels = np.eye(3, dtype=np.float32)[noisy] * 0.8 + 0.2 / 3 if soft else noisy
    return TrainData(images(truth), labels, images(test), test, 3, noise_rate=1 / 3, noise_rate_source="known"), truth


SHORT = dict(backbone="test_resnet", cifar_stem=False, image_size=16, batch_size=16, crop_pad=1, hflip=False)


def check_result(result, epochs):
    assert 0.0 <= result.test_accuracy <= 1.0 and len(result.curve) == epochs
    assert result.test_accuracy == result.curve[-1]["test_accuracy"]
    assert [r["epoch"] for r in result.curve] == list(range(1, epochs + 1))
    for row in result.curve:
        assert math.isfinite(row["train_loss"]) and row["lr"] > 0 and 0 <= row["target_accuracy"] <= 1
    assert result.info["accuracy_reported"] == "last epoch" and result.seconds > 0


def test_elr_short_run_with_soft_labels_and_target_init(monkeypatch):
    written = []
    real_write = elr_mod.write_rows

    def spy(table, idx, rows):
        written.append(idx.tolist())
        return real_write(table, idx, rows)

    monkeypatch.setattr(elr_mod, "write_rows", spy)
    data, truth = tiny_data(soft=True)
    cfg = ELR(**SHORT, epochs=3, lr=0.05, lr_schedule="cosine_restart", restart_period=2,
              init_targets_from_labels=True)
    result = cfg.run(data, device="cpu", seed=0, progress=False, true_labels=truth)
    check_result(result, 3)
    n = len(truth)
    per_epoch = [sum(written[e * 2:(e + 1) * 2], []) for e in range(3)]  # 2 batches of 16 per epoch
    assert len(written) == 6 and all(sorted(ix) == list(range(n)) for ix in per_epoch)
    assert result.info["labels"] == "soft" and result.info["method"] == "elr"
    assert [r["lr"] for r in result.curve] == pytest.approx([0.05, 0.0255, 0.05])


def test_elr_plus_short_run_mixes_inputs_labels_and_targets_alike(monkeypatch):
    calls = []
    real_mix = elr_mod.mix

    def spy(t, lam, perm):
        calls.append((lam, perm))
        return real_mix(t, lam, perm)

    events, hooked = [], set()
    real_update = elr_mod.update_ema

    def ema_spy(ema, model, alpha):  # from the first update on, log which EMA net runs forward
        if id(ema) not in hooked:
            hooked.add(id(ema))
            ema.register_forward_hook(lambda m, i, o: events.append(("forward", id(m))))
        events.append(("update", id(ema)))
        return real_update(ema, model, alpha)

    monkeypatch.setattr(elr_mod, "mix", spy)
    monkeypatch.setattr(elr_mod, "update_ema", ema_spy)
    data, truth = tiny_data()
    cfg = ELRPlus(**SHORT, epochs=2, lr=0.05, milestones=(1,), ema_rampup_steps=4)
    result = cfg.run(data, device="cpu", seed=0, progress=False, true_labels=truth)
    # each network's targets come from the OTHER network's EMA: the EMA that ran forward before an update is
    # never the one being updated
    pairs = [(events[i - 1][1], ev[1]) for i, ev in enumerate(events) if ev[0] == "update" and i > 0
             and events[i - 1][0] == "forward"]
    assert len(hooked) == 2 and len(pairs) >= 5 and all(fwd != upd for fwd, upd in pairs)
    check_result(result, 2)
    assert [r["lr"] for r in result.curve] == pytest.approx([0.05, 0.005])
    assert {"train_loss_1", "train_loss_2", "target_accuracy_1", "target_accuracy_2"} <= set(result.curve[0])
    steps = 2 * 2 * 2  # epochs x networks x batches
    assert len(calls) == 3 * steps  # labels, targets, inputs: one mixup draw each step
    for s in range(steps):
        (l1, p1), (l2, p2), (l3, p3) = calls[3 * s:3 * s + 3]
        assert l1 == l2 == l3 >= 0.5 and p1 is p2 is p3
    assert len({c[0] for c in calls}) > 1


@pytest.mark.parametrize("cls,extra", [(ELR, {"lr_schedule": "step"}), (ELRPlus, {"ema_rampup_steps": 4})])
def test_a_killed_run_resumes_to_the_same_result(cls, extra, tmp_path, monkeypatch):
    data, truth = tiny_data()
    cfg = cls(**SHORT, epochs=2, lr=0.05, milestones=(1,), **extra)
    full = cfg.run(data, device="cpu", seed=1, progress=False, true_labels=truth)
    real_save, saved = elr_mod.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(1)
        if len(saved) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(elr_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cfg.run(data, device="cpu", seed=1, progress=False, checkpoint_dir=tmp_path, true_labels=truth)
    monkeypatch.setattr(elr_mod, "save_checkpoint", real_save)
    resumed = cfg.run(data, device="cpu", seed=1, progress=False, checkpoint_dir=tmp_path, true_labels=truth)
    assert resumed.info["resumed_at_epoch"] == 1
    assert resumed.curve == full.curve  # bitwise: losses, accuracies and target diagnostics of every epoch
