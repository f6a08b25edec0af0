"""Every shipped config is valid as written: names registered, presets known, parameters accepted."""

from pathlib import Path

import pytest
import yaml

from dmlp_plugin.config import BenchConfig, PurifyConfig, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path):
    from dmlp_plugin import bench, pipeline

    is_bench = "methods" in yaml.safe_load(path.read_text())
    cfg, _ = load_config(path, schema=BenchConfig if is_bench else PurifyConfig)
    if is_bench:
        built = bench.validate_bench(cfg)
        assert len(built["methods"]) == len(cfg.methods)
    else:
        pipeline.validate(cfg)


def test_the_readme_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "purify-digits.yaml", "cifar10.yaml", "cifar100.yaml"} <= names


# ---- a noise kind takes its own parameters only (issue 11, item 5) -------------------------------------------

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
PURIFY = Path(__file__).resolve().parents[1] / "configs" / "purify-digits.yaml"


@pytest.mark.parametrize("sets, message", [
    (["noise.pairs={0: 1}"], "noise.pairs={0: 1} is not a parameter of noise kind 'symmetric' (its parameters: rate, "
                             "include_true_class); remove it or set kind: pairflip"),
    (["noise.kind=pairflip", "noise.file=x.json"], "noise.file='x.json' is not a parameter of noise kind 'pairflip' "
                                                   "(its parameters: rate, pairs); remove it or set kind: human"),
    (["noise.kind=asymmetric", "noise.include_true_class=false"],
     "noise.include_true_class=False is not a parameter of noise kind 'asymmetric' (its parameters: rate); remove it "
     "or set kind: symmetric"),
    (["noise.kind=none", "noise.key=aggre_label"], "noise.key='aggre_label' is not a parameter of noise kind 'none' "
                                                   "(it takes no parameters); remove it or set kind: human"),
    (["noise.kind=human", "noise.file=h.npy", "noise.pairs={0: 1}"],
     "noise.pairs={0: 1} is not a parameter of noise kind 'human' (its parameters: file, key)"),
    (["noise.kind=instance", "noise.file=h.npy"], "noise.file='h.npy' is not a parameter of noise kind 'instance' "
                                                  "(its parameters: rate)"),
])
def test_a_noise_setting_the_kind_does_not_take_is_refused_before_any_work(sets, message, monkeypatch):
    from dmlp_plugin import pipeline
    from dmlp_plugin.errors import UserError

    monkeypatch.setattr(pipeline, "load_data", lambda cfg: pytest.fail("data loaded before the config was checked"))
    cfg, _ = load_config(PURIFY, sets)
    with pytest.raises(UserError) as e:
        pipeline.validate(cfg)
    assert "\n" not in str(e.value) and str(e.value).startswith(message), str(e.value)


def test_a_bench_noise_entry_is_named_by_its_index():
    from dmlp_plugin import bench
    from dmlp_plugin.errors import UserError

    cfg, _ = load_config(DEMO, ["noise=[{kind: symmetric, rate: 0.5}, {kind: asymmetric, rate: 0.4, pairs: {1: 2}}]"],
                         schema=BenchConfig)
    with pytest.raises(UserError, match=r"^noise\[1\]\.pairs=\{1: 2\} is not a parameter of noise kind 'asymmetric' "
                                        r"\(its parameters: rate\); remove it or set kind: pairflip$"):
        bench.validate_bench(cfg)


def test_the_cli_refuses_it_in_one_line_and_writes_nothing(tmp_path, capsys):
    from dmlp_plugin.cli import main

    out = tmp_path / "o"
    assert main(["purify", str(PURIFY), "--out", str(out), "--no-progress", "--set", "noise.kind=pairflip",
                 "--set", "noise.include_true_class=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: noise.include_true_class=False is not a parameter of noise "
                                                   "kind 'pairflip' (its parameters: rate, pairs)"), err
    assert not out.exists()


@pytest.mark.parametrize("sets", [
    ["noise.kind=human", "noise.file=labels.json", "noise.rate=0.8"],  # the README's switch to a DivideMix file
    ["noise.kind=none"],  # the config's rate and include_true_class: true stay, unused
    ["noise.kind=instance", "noise.rate=0.4"],  # include_true_class: true is the default: not a setting given
    ["noise.kind=pairflip", "noise.pairs={0: 1, 1: 0}", "noise.rate=0.3"],
])
def test_switching_the_kind_keeps_the_settings_it_ignores_harmless(sets):
    from dmlp_plugin import pipeline

    cfg, _ = load_config(PURIFY, sets)
    pipeline.validate(cfg)


def test_a_plugin_noise_kind_is_checked_by_its_own_signature():
    from dmlp_plugin.data.noise import check_settings
    from dmlp_plugin.errors import UserError

    def whole_protocol(truth, num_classes, *, kind, rate, seed, include_true_class, pairs, file, key):
        return None

    def own(truth, num_classes, *, rate=0.0, file=None, seed=0, **unused):
        return None

    check_settings("mine", whole_protocol, {"pairs": {0: 1}, "file": "x", "include_true_class": False})
    check_settings("mine", own, {"rate": 0.3, "file": "x", "pairs": None, "key": None})
    with pytest.raises(UserError, match=r"noise\.key='k' is not a parameter of noise kind 'mine' \(its parameters: "
                                        r"rate, file\)"):
        check_settings("mine", own, {"key": "k"})


# ---- a preprocessor's own seed is refused (it would be ignored: the run's seed seeds every preprocessor) --------

@pytest.mark.parametrize("sets, key", [
    (["preprocessor.params={seed: 3}"], "preprocessor.params.seed=3"),
    (["preprocessor.params_for={dmlp: {seed: 3}}"], "preprocessor.params_for.dmlp.seed=3"),
    (["preprocessor.params_for={knn_vote: {k: 5, seed: 4}}"], "preprocessor.params_for.knn_vote.seed=4"),
    (["preprocessor.name=auto", "preprocessor.params={dmlp: {seed: 1}}"], "preprocessor.params.dmlp.seed=1"),
    (["preprocessor.name=dmlp_authors", "preprocessor.params={seed: 0}"], "preprocessor.params.seed=0"),
])
def test_a_preprocessor_seed_is_refused_in_one_line(sets, key):
    from dmlp_plugin import pipeline
    from dmlp_plugin.errors import UserError

    cfg, _ = load_config(PURIFY, ["seed=2", *sets])
    with pytest.raises(UserError) as e:
        pipeline.validate(cfg)
    assert str(e.value) == (f"{key} is not honoured: a preprocessor is seeded by the run's seed (seed=2); remove it "
                            f"and set seed instead")


def test_a_bench_preprocessor_seed_names_the_seeds():
    from dmlp_plugin import bench
    from dmlp_plugin.errors import UserError

    cfg, _ = load_config(DEMO, ["preprocessor.params={epochs: 5, seed: 9}"], schema=BenchConfig)
    with pytest.raises(UserError, match=r"^preprocessor\.params\.seed=9 is not honoured: a preprocessor is seeded by "
                                        r"the run's seeds \(seeds=\[0, 1\]\); remove it and set seeds instead$"):
        bench.validate_bench(cfg)


def test_the_simclr_seed_is_not_a_preprocessor_seed():
    from dmlp_plugin import pipeline

    cfg, _ = load_config(PURIFY, ["features.ssl.seed=5"])
    pipeline.validate(cfg)
