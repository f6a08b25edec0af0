"""`preprocessor: auto`: runs its candidates, keeps the one with the best label accuracy estimated without true
labels (K-fold over the trusted subset), says which and why; never looks at the true labels."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.synthetic import clustered_features, symmetric_noise
from dmlp_plugin.cli import main
from dmlp_plugin.errors import UserError
from dmlp_plugin.estimate import cv_accuracy
from dmlp_plugin.purifier import preprocessors as P
from dmlp_plugin.records import PurifyInputs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")
FAST = ["--no-progress", "--set", "features.source=raw"]  # raw pixels: no SSL
KS = [5, 10, 20, 50]


def _balanced(y, per, c, seed):
    rng = np.random.default_rng([seed, 5])
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == k), per, replace=False) for k in range(c)]))


def _sectors(n=1000, sectors=16, rate=0.4, per=20, seed=0):
    """Two classes in alternating sectors of a circle: a neighbour vote reads them, no line separates them."""
    rng = np.random.default_rng(seed)
    ang = rng.uniform(0, 2 * np.pi, n)
    y = np.floor(ang / (2 * np.pi) * sectors).astype(np.int64) % 2
    r = 1 + 0.05 * rng.standard_normal(n)
    x = np.stack([np.cos(ang) * r, np.sin(ang) * r, np.full(n, 0.3)], 1).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y, symmetric_noise(y, rate, 2, seed=seed), _balanced(y, per, 2, seed), 2


def _blurred(n=1500, c=5, seed=0):
    """Wide, overlapping clusters at 80% noise: each neighbourhood's vote is mostly noise, while a linear
    purifier pools every sample of a class (dmlp 0.85 against knn_vote 0.56 here)."""
    x, y = clustered_features(n, 64, c, spread=3.0, seed=seed)
    return x, y, symmetric_noise(y, 0.8, c, seed=seed), _balanced(y, 10, c, seed), c


def _inputs(case, truth=True, seed=0):
    x, y, noisy, meta, c = case
    return PurifyInputs(views=[x, x], noisy=noisy, meta_idx=meta, meta_labels=y[meta], num_classes=c,
                        truth=y if truth else None, device="cpu", progress=False, seed=seed)


def _auto(candidates, folds=5, **params):
    return P.Auto(candidates=candidates, **params).with_checks(folds, KS, None)


def _accuracy(hard, case):
    _, y, _, meta, _ = case
    rest = np.setdiff1d(np.arange(len(y)), meta)
    return float(np.mean(hard[rest] == y[rest]))


def _without_seconds(obj):
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    return obj


def test_auto_leaves_a_linear_dmlp_for_the_knn_vote_where_no_line_separates_the_classes():
    case = _sectors()
    inp = _inputs(case)
    # dmlp reading its linear heads only (its neighbour readout off): a linear purifier
    r = _auto(["dmlp", "knn_vote"], dmlp={"epochs": 10, "neighbour_ks": [0]}).purify(inp)
    rep = r.info["auto"]
    assert rep["chosen"] == "knn_vote" and r.info["chosen"] == "knn_vote"
    dmlp_acc, knn_acc = (_accuracy(r.candidates[n][1].hard, case) for n in ("dmlp", "knn_vote"))
    assert knn_acc > dmlp_acc + 0.1  # the case is what it claims: the choice is right
    v = rep["candidates"]["knn_vote"]["versus_incumbent"]
    assert v["probability_better"] >= 0.95 and v["difference"] > 0.1
    assert rep["reason"].startswith("chose knn_vote (k ") and "over dmlp" in rep["reason"]
    # the labels are the chosen candidate's: knn_vote at the k and views its estimate picked
    s = rep["candidates"]["knn_vote"]["setting"]
    assert s["ks"] == KS and len(s["fold_picks"]) == 5
    again = P.KnnVote(k=s["k"], views=s["views"]).purify(inp)
    for key in ("hard", "soft", "confidence"):
        assert np.array_equal(getattr(r, key), getattr(again, key)), key
    assert json.dumps(rep)  # the report is JSON as it stands (metrics.json, provenance)


def test_auto_moves_to_dmlp_where_it_is_clearly_better_and_never_looks_at_the_true_labels():
    case = _blurred()
    auto = _auto(["knn_vote", "dmlp"], dmlp={"epochs": 10})
    seen = auto.purify(_inputs(case, truth=True))
    blind = auto.purify(_inputs(case, truth=False))
    assert seen.info["auto"]["chosen"] == "dmlp"
    assert _accuracy(seen.hard, case) > _accuracy(seen.candidates["knn_vote"][1].hard, case) + 0.1
    # the same choice, labels, estimates and reason whether or not the truth is given
    for key in ("hard", "soft", "confidence"):
        assert np.array_equal(getattr(seen, key), getattr(blind, key)), key
    assert _without_seconds(seen.info["auto"]) == _without_seconds(blind.info["auto"])
    assert seen.history and "label_accuracy" in seen.history[0]  # the truth only logs dmlp's progress


def test_the_estimates_are_the_reports_and_the_rule_is_paired():
    case = _sectors(seed=1)
    inp = _inputs(case)
    r = _auto(["trusted_only", "knn_vote"]).purify(inp)
    rep = r.info["auto"]
    # trusted_only's estimate is exactly the K-fold estimate a run reports, with the same class weights
    _, y, _, meta, c = case

    def trusted_only(idx, lab):
        return P.TrustedOnly().purify(PurifyInputs(views=inp.views, noisy=inp.noisy, meta_idx=idx, meta_labels=lab,
                                                   num_classes=c, seed=0)).hard

    prior = np.asarray(rep["class_prior"])
    assert rep["candidates"]["trusted_only"]["estimate"] == cv_accuracy(trusted_only, meta, y[meta], c, 5, 0, prior)
    # the paired difference is the difference of the two estimates (same samples, same weights)
    e = {n: rep["candidates"][n]["estimate"]["estimate"] for n in ("trusted_only", "knn_vote")}
    v = rep["candidates"]["knn_vote"]["versus_incumbent"]
    assert v["difference"] == pytest.approx(e["knn_vote"] - e["trusted_only"], abs=1e-12)
    assert rep["chosen"] == "knn_vote" and "rule" in rep and "0.95" in rep["rule"]


def test_paired_difference_calls_equal_correctors_a_tie_and_a_clear_gap_a_win():
    labels = np.repeat(np.arange(4), 10)
    rng = np.random.default_rng(0)
    a = rng.random(40) < 0.8
    tie = P.paired_difference(a, a.copy(), labels, 4, None)
    assert tie["difference"] == 0 and 0.4 < tie["probability_better"] < 0.6  # never >= 0.95: keep the first
    assert P.paired_difference(a | (labels < 2), a, labels, 4, None)["probability_better"] > 0.95  # right on 6 more
    one = a.copy()
    one[np.flatnonzero(~a)[0]] = True  # right on one more sample: noise, not a win
    assert P.paired_difference(one, a, labels, 4, None)["probability_better"] < 0.95
    worse = P.paired_difference(a & (labels != 0), a, labels, 4, None)
    assert worse["difference"] < 0 and worse["probability_better"] < 0.05


def test_too_few_trusted_samples_keep_the_first_candidate_without_running_the_others():
    case = _sectors(per=2)  # 4 trusted, fewer than the 5 folds
    r = _auto(["trusted_only", "knn_vote"]).purify(_inputs(case))
    rep = r.info["auto"]
    assert rep["chosen"] == "trusted_only" and set(r.candidates) == {"trusted_only"}
    assert "too few for the 5-fold estimate" in rep["reason"]


def test_a_candidate_whose_package_is_missing_is_dropped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # `import cleanlab` raises ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    assert P.Auto().dropped == {"cleanlab": "not installed: pip install 'dmlp_plugin[cleanlab]'"}
    r = _auto(["trusted_only", "cleanlab", "knn_vote"]).purify(_inputs(_sectors(seed=2)))
    rep = r.info["auto"]
    assert "cleanlab" not in rep["candidates"] and rep["dropped"]["cleanlab"].startswith("not installed")
    assert "dropped: cleanlab (not installed: pip install 'dmlp_plugin[cleanlab]')" in rep["reason"]
    with pytest.raises(UserError, match="none of its candidates can run"):
        P.Auto(candidates=["cleanlab"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `dmlp purify` with auto on the digits' raw pixels (2 folds, dmlp at 10 epochs); counts dmlp's runs."""
    import dmlp_plugin.purifier.preprocessors as pre

    out = tmp_path_factory.mktemp("auto") / "out"
    calls = []
    orig = pre.DMLP.purify

    def counted(self, inp):
        calls.append(int(np.asarray(inp.meta_idx).size))
        return orig(self, inp)

    pre.DMLP.purify = counted
    try:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["purify", CONFIG, "--out", str(out), *FAST, "--set", "checks.estimate_folds=2",
                         "--set", "checks.compare=[knn_vote, trusted_only]", "--set", "noise.rate=0.5",
                         "--set", "preprocessor={name: auto, params: {candidates: [dmlp, knn_vote, trusted_only], "
                                  "dmlp: {epochs: 10}}}"])
    finally:
        pre.DMLP.purify = orig
    assert code == 0
    return out, buf.getvalue(), calls


def test_purify_with_auto_writes_the_chosen_labels_and_says_which_and_why(run):
    from dmlp_plugin.artifacts import load_labels
    from dmlp_plugin.pipeline import raw_pixel_features

    out, shown, calls = run
    m = json.loads((out / "metrics.json").read_text())
    auto = m["auto"]
    chosen = auto["chosen"]
    assert m["preprocessor"] == "auto" and chosen in ("dmlp", "knn_vote", "trusted_only")
    assert set(auto["candidates"]) == {"dmlp", "knn_vote", "trusted_only"}
    for e in auto["candidates"].values():
        assert 0 <= e["estimate"]["low"] <= e["estimate"]["estimate"] <= e["estimate"]["high"] <= 1
        assert e["seconds"]["run"] >= 0 and e["seconds"]["estimate"] > 0 and "label_accuracy_after" in e
    assert m["label_accuracy_after"] == auto["candidates"][chosen]["label_accuracy_after"]
    # the estimate work is done once: dmlp ran once on the whole trusted subset and once per fold, and the
    # run's estimates are auto's
    assert len(calls) == 3 and calls[0] == 40 and sum(40 - k for k in calls[1:]) == 40, calls
    est = m["estimated_accuracy"]
    assert set(est) == {"auto", "dmlp", "knn_vote", "trusted_only"} and est["auto"]["chosen"] == chosen
    assert est["dmlp"]["estimate"] == auto["candidates"]["dmlp"]["estimate"]["estimate"]
    assert m["trusted_only"]["reused"] and m["seconds"]["estimate"] >= auto["seconds"]["estimate"]
    # said in one line each: terminal, report, metrics
    line = f"auto {auto['reason']}"
    assert line in shown.splitlines() and auto["reason"].startswith(("kept dmlp", "chose "))
    assert f"auto ({chosen}) {m['label_accuracy_after']:.4f}" in shown
    report = (out / "report.md").read_text()
    assert f"- {line}" in report and "## auto: which candidate and why" in report and "Rule: keep the first" in report
    # the artifact holds the chosen candidate's labels
    with np.load(out / "labels.npz", allow_pickle=False) as z:
        prov = json.loads(str(z["provenance_json"]))
    art = load_labels(out / "labels.npz")
    assert prov["auto"]["chosen"] == chosen and "label_accuracy_after" not in prov["auto"]["candidates"][chosen]
    from dmlp_plugin.config import load_config
    from dmlp_plugin.pipeline import load_data

    cfg, _ = load_config(CONFIG)
    v = raw_pixel_features(load_data(cfg).train.images)
    inp = PurifyInputs(views=[v, v], noisy=art.noisy, meta_idx=art.meta_indices, meta_labels=art.meta_labels,
                       num_classes=10, device="cpu", progress=False, seed=0)
    setting = auto["candidates"][chosen].get("setting", {})
    fresh = {"dmlp": lambda: P.DMLP(epochs=10), "trusted_only": P.TrustedOnly,
             "knn_vote": lambda: P.KnnVote(k=setting["k"], views=setting["views"])}[chosen]().purify(inp)
    for key in ("hard", "soft", "confidence"):
        assert np.array_equal(getattr(art, key), getattr(fresh, key)), key


@pytest.mark.parametrize("sets, message", [
    (["preprocessor={name: auto, params: {candidates: [dmlp, knn_vot]}}"],
     "preprocessor.params.candidates: unknown preprocessor 'knn_vot' (did you mean 'knn_vote'?)"),
    (["preprocessor={name: auto, params: {candidates: []}}"], "preprocessor.params.candidates=[] gives auto nothing"),
    (["preprocessor={name: auto, params: {}}", "checks.estimate_folds=0"],
     "preprocessor auto picks by the label-accuracy estimate, which checks.estimate_folds=0 turns off"),
    (["preprocessor={name: auto, params: {candidates: [dmlp, auto]}}"], "lists auto itself"),
    (["preprocessor={name: auto, params: {candidates: [dmlp, dmlp]}}"], "lists dmlp twice"),
    (["preprocessor={name: auto, params: {candidates: [dmlp], cleanlab: {l2: 1}}}"],
     "preprocessor.params.cleanlab is set but cleanlab is not among the candidates"),
    (["preprocessor={name: auto, params: {dmlp: {epoch: 3}}}"], "preprocessor.params.dmlp: unknown key 'epoch'"),
    (["preprocessor={name: auto, params: {confidence: 1.5}}"], "preprocessor.params.confidence=1.5 must be in"),
    (["preprocessor={name: auto, params: {}}", "trusted.source=none"], "preprocessor 'auto' needs a trusted subset"),
])
def test_bad_auto_configs_are_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, sets, message):
    import dmlp_plugin.pipeline as pipeline

    def no_work(*a, **k):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr(pipeline, "load_data", no_work)
    args = [a for s in sets for a in ("--set", s)]
    code = main(["purify", CONFIG, "--out", str(tmp_path / "o"), *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert not (tmp_path / "o").exists()
