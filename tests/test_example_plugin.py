"""The worked example plugin (examples/dmlp_example_plugin), registered from its own pyproject.toml entry point:
listed with its summary, run by `dmlp purify` and `dmlp bench` with `--set preprocessor.name=...` alone, its
UserError a one-line error (exit 2). Also: the shipped configs switch preprocessor without touching params."""

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from dmlp_plugin.cli import main
from dmlp_plugin.config import load_config
from dmlp_plugin.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "dmlp_example_plugin"
CONFIG = str(ROOT / "configs" / "purify-digits.yaml")
FAST = ["--no-progress", "--set", "features.source=raw", "--set", "checks.estimate_folds=0",
        "--set", "checks.compare=[knn_vote]"]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The example as pip would install it: its module on the path and a dist-info whose entry points are the
    ones its pyproject.toml declares."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = tmp_path / f"dmlp_example_plugin-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
                     for group, eps in project["entry-points"].items())
    (info / "entry_points.txt").write_text(groups)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    load_registry.cache_clear()
    yield project
    load_registry.cache_clear()


def test_registry_list_shows_the_example_with_its_docstring_summary(installed, capsys):
    assert main(["registry", "list", "preprocessors"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "trusted_centroid" in x)
    assert re.search(r"trusted_centroid\s+Relabel each sample by its nearest trusted-class centroid \(cosine "
                     r"similarity on one feature view\)\s+\[entry point of dmlp-example-plugin 0\.1\.0\]", line), line


def test_purify_and_bench_run_the_example_by_name_alone(installed, tmp_path):
    out = tmp_path / "p"
    assert main(["purify", CONFIG, "--out", str(out), *FAST, "--set", "preprocessor.name=trusted_centroid"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["preprocessor"] == "trusted_centroid" and m["preprocessor_info"]["temperature"] == 0.05
    assert m["label_accuracy_after"] > m["label_accuracy_before"] + 0.2  # 0.79 from 0.56 (4 trusted per class)
    b = tmp_path / "b"
    assert main(["bench", str(ROOT / "configs" / "demo.yaml"), "--out", str(b), *FAST,
                 "--set", "preprocessor.name=trusted_centroid", "--set", "seeds=[0]", "--set", "arms=[purified]",
                 "--set", "methods=[{name: ce, params: {epochs: 1}}]"]) == 0
    runs = json.loads((b / "results.json").read_text())
    assert [(r["method"], r["labels"]) for r in runs] == [("ce", "purified")]
    assert runs[0]["label_accuracy"] == pytest.approx(m["label_accuracy_after"], abs=0.05)


def test_a_plugin_user_error_is_one_line_exit_2(installed, tmp_path, capsys):
    code = main(["purify", CONFIG, "--out", str(tmp_path / "o"), *FAST, "--set", "preprocessor.name=trusted_centroid",
                 "--set", "preprocessor.params_for.trusted_centroid={temperature: 0}"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: preprocessor.params.temperature=0.0 must be > 0, e.g. 0.05\n"
    assert not (tmp_path / "o").exists()
    # raised while purifying (not when the config is checked): the same one line
    code = main(["purify", CONFIG, "--out", str(tmp_path / "o"), *FAST, "--set", "preprocessor.name=trusted_centroid",
                 "--set", "trusted.source=none"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: preprocessor 'trusted_centroid' needs a trusted subset; set trusted.source\n"
    assert not (tmp_path / "o").exists()


def test_shipped_configs_switch_preprocessor_by_name_alone(tmp_path):
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        schema = "BenchConfig" if "methods:" in path.read_text() else "PurifyConfig"
        from dmlp_plugin import config

        cfg, _ = load_config(path, ["preprocessor.name=knn_vote"], schema=getattr(config, schema))
        assert cfg.preprocessor.params == {}, path  # dmlp's epochs stay with dmlp
        cfg, _ = load_config(path, [], schema=getattr(config, schema))
        assert cfg.preprocessor.params == cfg.preprocessor.params_for.get(cfg.preprocessor.name, {}), path
    cfg, _ = load_config(CONFIG, ["preprocessor.params={epochs: 5, batch_size: 100}"])
    assert cfg.preprocessor.params == {"epochs": 5, "batch_size": 100}  # params on top of params_for
    out = tmp_path / "k"
    assert main(["purify", CONFIG, "--out", str(out), *FAST, "--set", "preprocessor.name=knn_vote"]) == 0
    with np.load(out / "labels.npz") as z:
        assert z["hard"].shape == (1437,)


def test_a_typo_in_params_for_is_an_error(tmp_path, capsys):
    code = main(["purify", CONFIG, "--out", str(tmp_path / "o"), *FAST, "--set", "preprocessor.params_for.dmpl={}"])
    err = capsys.readouterr().err
    assert code == 2 and "preprocessor.params_for: unknown preprocessor 'dmpl' (did you mean 'dmlp'" in err


def test_summary_from_docstring_and_a_broken_plugin_says_why(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from dmlp_plugin.registry import docstring_summary
    from tests.test_registry import _fake_distribution

    @dataclass
    class Bare:
        x: int = 1

    def documented():
        """Flip every label. Then more
        on a second line.

        Another paragraph."""

    assert docstring_summary(Bare) == "" and docstring_summary(documented) == "Flip every label"
    _fake_distribution(tmp_path, "brokenplug", "raise ImportError('needs libfoo')\n",
                       "[dmlp_plugin.noise]\nbroken = brokenplug:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_registry.cache_clear()
    try:
        [entry] = [e for e in load_registry().entries("noise") if e.name == "broken"]
        assert entry.summary == "(fails to load: ImportError: needs libfoo; reinstall or fix that package)"
    finally:
        load_registry.cache_clear()
