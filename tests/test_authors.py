"""``DMLPConfig.authors()`` is the released script's algorithm: its doubled-softmax EAC loss, its exchange
timing and its readout (``benchmarks/authors_check.py`` compares it with the script itself)."""

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.synthetic import clustered_features, symmetric_noise
from dmlp_plugin.errors import UserError
from dmlp_plugin.purifier import dmlp as D


@pytest.fixture(scope="module")
def easy():
    x, y = clustered_features(1200, 16, 4, spread=1.0, seed=0)
    noisy = symmetric_noise(y, 0.6, 4, seed=1)
    meta = np.sort(np.random.default_rng(2).choice(len(y), 60, replace=False))
    return x, y, noisy, meta


def _script_eac_loss(head: torch.nn.Linear, x: torch.Tensor, t: torch.Tensor, conf_w: float, prior_w: float):
    """The released script's EAC loss, written out independently: nn.Sequential(Linear, Softmax) under
    nn.CrossEntropyLoss, a confidence penalty on softmax(output), a balance term on softmax(softmax(output))."""
    out = torch.nn.functional.softmax(head(x), dim=1)
    loss = torch.nn.CrossEntropyLoss()(out, t)
    q = torch.softmax(out, dim=1)
    conf = torch.mean(torch.sum(q.log() * q, dim=1))
    c = out.shape[1]
    prior = torch.ones(c) / c
    pred_mean = torch.softmax(q, dim=1).mean(0)
    return loss + prior_w * torch.sum(prior * torch.log(prior / pred_mean)) + conf_w * conf


# float32 values of a balance term near 0 weighted by 2200 agree to ~1e-4 only (log(1/C) - log(mean) and
# log((1/C) / mean) round differently); its weight 1 pins the value, 2200 the gradient (the Adam step)
@pytest.mark.parametrize("double, balance, tol", [(True, 1.0, 1e-6), (True, 2200.0, 1e-3), (False, 2200.0, None)])
def test_eac_loss_and_step_are_the_scripts(double, balance, tol):
    x, y = clustered_features(300, 8, 3, spread=1.0, seed=4)
    x = torch.as_tensor(x)
    y0 = torch.nn.functional.one_hot(torch.as_tensor(y), 3).float()
    cfg = dataclasses.replace(D.DMLPConfig.authors(), eac_double_softmax=double, eac_batch_size=1000,
                              eac_balance_weight=balance)
    view = D._View(x, x[:5], y0, cfg, torch.Generator().manual_seed(0))
    ref = torch.nn.Linear(8, 3)
    ref.load_state_dict(view.head.state_dict())
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.eac_lr, betas=cfg.eac_betas, weight_decay=cfg.eac_weight_decay)
    idx = torch.arange(300)
    got = D._eac_pass(view, idx, cfg, torch.Generator().manual_seed(1), 0, 300, D.Dist())
    want = _script_eac_loss(ref, x, torch.as_tensor(y), cfg.eac_conf_weight, cfg.eac_balance_weight)
    if not double:  # ours (one softmax) is a different loss: the comparison can tell them apart
        assert abs(got - float(want.detach())) > 0.1
        return
    assert got == pytest.approx(float(want.detach()), rel=0, abs=tol)
    opt.zero_grad()
    want.backward()
    opt.step()  # one mini-batch of all rows: the same Adam step as the script's
    torch.testing.assert_close(view.head.weight, ref.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(view.head.bias, ref.bias, rtol=1e-4, atol=1e-6)


def test_authors_settings_exchange_timing_and_readout(easy, tmp_path):
    x, y, noisy, meta = easy
    cfg = D.DMLPConfig.authors()
    assert (cfg.eac_double_softmax, cfg.readout, cfg.eac_exchange, cfg.ridge) == (True, "authors", "batch", 0.0)
    assert (cfg.eac_conf_weight, cfg.eac_balance_weight, cfg.ipc_balance_weight) == (0.4, 2200.0, 1.0)
    ck = tmp_path / "ck.pt"
    res = D.purify([x, x], noisy, meta, y[meta], 4, cfg, truth=y, progress=False, checkpoint=str(ck))
    # the script's `i % 20 == 0 and i != 0` (epochs counted from 0) made to fire: epochs 21, 41, 61, 81
    assert [r["epoch"] for r in res.history if r["exchanged"]] == [21, 41, 61, 81]
    # its readout: argmax of the raw label matrices averaged (soft: softmax of that mean), not our posterior
    ys = [v["y"] for v in torch.load(ck, weights_only=True)["views"]]
    mean = (ys[0] + ys[1]) / 2
    rest = np.setdiff1d(np.arange(len(y)), meta)
    np.testing.assert_array_equal(res.hard[rest], mean.argmax(1).numpy()[rest])
    np.testing.assert_allclose(res.soft[rest], torch.softmax(mean, 1).numpy()[rest], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.hard[meta], y[meta])
    # ... and it purifies easy clusters well beyond the given labels
    before = float(np.mean(noisy[rest] == y[rest]))
    after = float(np.mean(res.hard[rest] == y[rest]))
    assert before < 0.6 and after > before + 0.3, (before, after)


@pytest.mark.parametrize("params, match", [
    ({"readout": "script"}, r"readout='script' must be 'posterior'"),
    ({"eac_exchange": "sometimes"}, r"eac_exchange='sometimes' must be 'epoch'"),
    ({"eac_double_softmax": 1}, r"eac_double_softmax=1 must be true"),
    ({"eac_exchange": "batch", "eac_target": "posterior"}, r"eac_exchange='batch' .* needs eac_target: prediction"),
    ({"eac_exchange": "batch", "epochs": 20, "eac_period": 20}, r"eac_period=20 >= epochs=20 with eac_exchange: batch"),
])
def test_new_settings_are_validated(params, match):
    with pytest.raises(UserError, match=match):
        D.DMLPConfig(**params)
    D.DMLPConfig(eac_exchange="batch", epochs=21, eac_period=20)  # fires once, in epoch 21


def test_the_registered_dmlp_authors_preprocessor_is_the_released_algorithm():
    DMLPConfig = D.DMLPConfig
    import dataclasses

    from dmlp_plugin.pipeline import build_component

    pre = build_component("preprocessors", "dmlp_authors", {})
    fields = [f.name for f in dataclasses.fields(DMLPConfig)]
    assert {f: getattr(pre, f) for f in fields} == dataclasses.asdict(DMLPConfig.authors())
    assert build_component("preprocessors", "dmlp_authors", {"epochs": 40}).epochs == 40
    assert build_component("preprocessors", "dmlp", {}).readout == "posterior"
