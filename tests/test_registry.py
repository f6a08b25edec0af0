"""registry.yaml names resolve; third-party components register through entry points, lazily."""

import subprocess
import sys
import textwrap

import pytest

from dmlp_plugin.errors import UserError
from dmlp_plugin.registry import KINDS, load_registry

REG = load_registry()
ALL = [(k, n) for k in KINDS for n in REG.names(k)]


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}/{n}" for k, n in ALL])
def test_every_registered_name_imports(kind, name):
    assert callable(REG.get(kind, name))


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UserError, match=r"unknown preprocessor 'knn_vot'.*did you mean 'knn_vote'"):
        REG.entry("preprocessors", "knn_vot")


def _fake_distribution(root, name, module_src, entry_points):
    """A minimal installed distribution on a path entry: module + dist-info with entry_points.txt."""
    (root / f"{name}.py").write_text(textwrap.dedent(module_src))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


PLUGIN = """
    from dataclasses import dataclass
    import time
    import numpy as np
    from dmlp_plugin.records import PurifyResult

    @dataclass(frozen=True)
    class MajorityClass:
        '''Labels every sample with the most common noisy label (a silly but recognisable plugin).'''
        bias: int = 0

        def purify(self, inp):
            c = np.bincount(inp.noisy, minlength=inp.num_classes).argmax()
            soft = np.eye(inp.num_classes, dtype=np.float32)[np.full(len(inp.noisy), c)]
            return PurifyResult(soft=soft, hard=soft.argmax(1), confidence=soft.max(1))
"""


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "myplug", PLUGIN,
                       "[dmlp_plugin.preprocessors]\nmajority = myplug:MajorityClass\n")
    _fake_distribution(tmp_path, "brokenplug", "raise ImportError('needs libfoo')\n",
                       "[dmlp_plugin.preprocessors]\nbroken = brokenplug:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_registry.cache_clear()
    yield tmp_path
    load_registry.cache_clear()


def test_entry_point_plugin_registers_and_a_broken_one_fails_alone(plugin_path):
    reg = load_registry()
    assert {"majority", "broken", "dmlp", "knn_vote"} <= set(reg.names("preprocessors"))
    assert "myplug" in reg.entry("preprocessors", "majority").source
    assert reg.get("preprocessors", "majority")().bias == 0
    with pytest.raises(UserError, match=r"broken from entry point of brokenplug 0\.1 failed to load.*needs libfoo"):
        reg.get("preprocessors", "broken")
    assert callable(reg.get("preprocessors", "dmlp"))  # the rest still works


def test_autoload_switch_ignores_plugins(plugin_path, monkeypatch):
    monkeypatch.setenv("DMLP_PLUGIN_DISABLE_AUTOLOAD", "1")
    load_registry.cache_clear()
    assert "majority" not in load_registry().names("preprocessors")


def test_duplicate_name_is_an_error_naming_both(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "dupplug", PLUGIN, "[dmlp_plugin.preprocessors]\ndmlp = dupplug:MajorityClass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_registry.cache_clear()
    try:
        with pytest.raises(UserError, match=r"registered twice: by registry.yaml and by entry point of dupplug"):
            load_registry()
    finally:
        load_registry.cache_clear()


def test_registry_list_shows_plugins(plugin_path):
    out = subprocess.run([sys.executable, "-m", "dmlp_plugin", "registry", "list"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(plugin_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    for name in ("digits", "symmetric", "knn_vote", "dmlp", "majority"):
        assert name in out.stdout
    assert "[entry point of myplug 0.1]" in out.stdout
