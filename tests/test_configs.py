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
