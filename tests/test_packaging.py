"""pyproject.toml's ranges, constraints.txt (the tested set) and the install scripts agree."""

import fnmatch
import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extras=("faiss", "cleanlab")) -> list[Requirement]:
    deps = PROJECT["project"]["dependencies"]
    for e in extras:
        deps = deps + PROJECT["project"]["optional-dependencies"][e]
    return [Requirement(d) for d in deps]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_dependencies_are_ranges_with_lower_bounds():
    for r in _requirements():
        ops = {s.operator for s in r.specifier}
        assert "==" not in ops and "===" not in ops, f"{r}: an exact pin belongs in constraints.txt"
        assert ">=" in ops, f"{r}: give the oldest release the code supports as a lower bound"


def test_constraints_pin_every_dependency_inside_its_range():
    pins = _constraints()
    for r in _requirements():
        name = r.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt does not pin {r.name}"
        assert r.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} is outside {r}"


def test_installed_versions_are_inside_the_ranges():
    for r in _requirements(extras=()):
        assert r.specifier.contains(importlib.metadata.version(r.name), prereleases=True), r


def test_faiss_gpu_extras_take_the_tested_faiss_release():
    extras = PROJECT["project"]["optional-dependencies"]
    tested = _constraints()["faiss-cpu"]
    for e in ("faiss", "faiss-gpu", "faiss-gpu-cuvs"):
        (req,) = [Requirement(x) for x in extras[e]]
        assert req.name.startswith("faiss-") and req.specifier.contains(tested), (e, str(req), tested)
    assert extras["faiss-gpu"] == [extras["faiss"][0].replace("faiss-cpu", "faiss-gpu")]


def test_package_list_covers_every_package_folder_and_nothing_else():
    include = PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    folders = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.rglob("__init__.py")
               if ".venv" not in p.parts and "runs" not in p.parts}
    matched = {f for f in folders if any(fnmatch.fnmatchcase(f, pat) for pat in include)}
    assert {f.split(".")[0] for f in matched} == {"dmlp_plugin", "baselines"}
    assert {f for f in folders if f.split(".")[0] in ("dmlp_plugin", "baselines")} <= matched
    assert PROJECT["tool"]["setuptools"]["package-dir"] == {"": "."}  # (see pyproject: no editable-install warning)


def test_install_commands_use_the_constraints():
    assert '-c constraints.txt -e ".[faiss,cleanlab,test]"' in (ROOT / "scripts" / "_env.sh").read_text()
    assert "pip install -c constraints.txt" in (ROOT / "README.md").read_text()
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == ["bash scripts/test"] and "bash scripts/test" in (ROOT / "README.md").read_text()
