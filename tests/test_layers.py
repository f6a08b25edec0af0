"""The import graph runs one way: data -> features -> purifier/checks -> artifacts -> baselines -> the top floor
(pipeline, bench, report, the array API) -> cli. Every import counts, those inside functions too (a lazy import
is still a dependency), read from the source with ``ast``: nothing is imported to check it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [  # lowest first; a module may import its own layer and the layers below it
    ("foundation", ["dmlp_plugin", "dmlp_plugin.errors", "dmlp_plugin.records", "dmlp_plugin.metrics",
                    "dmlp_plugin.atomic", "dmlp_plugin.config", "dmlp_plugin.hardware", "dmlp_plugin.distributed",
                    "dmlp_plugin.registry", "dmlp_plugin.estimate", "dmlp_plugin.memory"]),
    ("data", ["dmlp_plugin.data"]),
    ("features", ["dmlp_plugin.features"]),
    ("purifier/checks", ["dmlp_plugin.checks", "dmlp_plugin.purifier"]),
    ("artifacts", ["dmlp_plugin.artifacts", "dmlp_plugin.export"]),
    ("baselines", ["baselines"]),
    ("top", ["dmlp_plugin.pipeline", "dmlp_plugin.report", "dmlp_plugin.bench", "dmlp_plugin.bench_report",
             "dmlp_plugin.api", "dmlp_plugin.integrations", "dmlp_plugin.interfaces", "dmlp_plugin.envinfo"]),
    ("cli", ["dmlp_plugin.cli", "dmlp_plugin.__main__"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in ("dmlp_plugin", "baselines"):
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _layer(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer of tests/test_layers.py: add it where it belongs"
    return best[0]


def _imports(path: Path, modules: dict) -> set[str]:
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            deps.add(node.module)  # `from dmlp_plugin import metrics` imports the submodule
            deps |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return {d for d in deps if d in modules}


def _violations(modules: dict) -> list[str]:
    wrong = []
    for name, path in sorted(modules.items()):
        for dep in sorted(_imports(path, modules)):
            if _layer(dep) > _layer(name):
                wrong.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    return wrong


def test_every_import_points_to_the_same_layer_or_below():
    wrong = _violations(_modules())
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {n: _imports(p, modules) - {n} for n, p in modules.items()}
    # a package imports nothing of its own (dmlp_plugin/__init__.py names its exports as strings)
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = "open"
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_contract_can_fail(tmp_path):
    """A function-level import against the flow, in a lower layer's module, is reported."""
    bad = tmp_path / "noise.py"
    bad.write_text("def f():\n    from dmlp_plugin.pipeline import purify_labels\n    from dmlp_plugin import api\n")
    modules = {**_modules(), "dmlp_plugin.data.noise": bad}
    assert _violations(modules) == ["dmlp_plugin.data.noise (data) imports dmlp_plugin.api (top)",
                                    "dmlp_plugin.data.noise (data) imports dmlp_plugin.pipeline (top)"]
