"""Names -> components: a thin lookup over ``registry.yaml`` plus third-party entry points.

``registry.yaml`` maps kind -> name -> {target: "module:attr", summary}. Third-party packages register
through the entry-point groups ``dmlp_plugin.<kind>`` (e.g. ``dmlp_plugin.preprocessors``); their names
are read at discovery without importing anything, and a target is imported only when asked for, so a
broken plugin fails only for its own component, with a message naming its distribution. Set
``DMLP_PLUGIN_DISABLE_AUTOLOAD=1`` to ignore third-party entry points. A name registered twice is an error
naming both sources. Configs can name only registered components, never import paths. An entry point carries
no summary: the listing (:meth:`Registry.entries`, ``dmlp registry list``) shows the first sentence of the
object's docstring instead. What each kind must provide: :mod:`dmlp_plugin.interfaces`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from dmlp_plugin.errors import UserError

KINDS = ("datasets", "noise", "preprocessors", "methods")
ENTRY_POINT_PREFIX = "dmlp_plugin."
AUTOLOAD_ENV = "DMLP_PLUGIN_DISABLE_AUTOLOAD"


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    target: str
    summary: str
    source: str  # "registry.yaml" or "entry point of <distribution>"


def registry_path() -> Path:
    """The registry file: the repository copy in an editable install, the packaged copy otherwise."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "registry.yaml", here / "registry.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("registry.yaml is missing from the dmlp_plugin installation")


class Registry:
    def __init__(self, entries: list[Entry]):
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        for e in entries:
            table = self._entries.setdefault(e.kind, {})
            if e.name in table:
                raise UserError(f"component name {e.kind}/{e.name} is registered twice: by {table[e.name].source} "
                                f"and by {e.source}; uninstall or rename one of them")
            table[e.name] = e

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries.get(kind, {}))

    def entries(self, kind: str) -> list[Entry]:
        """Every entry of ``kind``, by name; an entry registered without a summary (an entry point has none)
        gets the first sentence of its object's docstring, which imports it (only this listing does); one that
        fails to import says why instead."""
        return [self._described(self._entries[kind][n]) for n in self.names(kind)]

    def _described(self, e: Entry) -> Entry:
        if e.summary:
            return e
        try:
            obj = self.get(e.kind, e.name)
        except UserError as exc:
            return replace(e, summary=f"(fails to load: {str(exc).split(': ', 1)[-1]})")
        return replace(e, summary=docstring_summary(obj))

    def entry(self, kind: str, name: str) -> Entry:
        table = self._entries.get(kind)
        if table is None:
            raise UserError(f"unknown component kind {kind!r}; known kinds: {', '.join(KINDS)}")
        if name not in table:
            close = difflib.get_close_matches(str(name), list(table), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise UserError(f"unknown {kind[:-1] if kind.endswith('s') else kind} {name!r}{hint}; "
                            f"registered: {', '.join(sorted(table))} (see `dmlp registry list`)")
        return table[name]

    def get(self, kind: str, name: str) -> Any:
        """Import and return the component ``name`` of ``kind``."""
        e = self.entry(kind, name)
        module_name, _, attr = e.target.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (Exception, SystemExit) as exc:  # a broken plugin (even one calling sys.exit) fails only for itself
            what = f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
            raise UserError(f"{kind}/{name} from {e.source} failed to load ({e.target}): {what}; reinstall or fix "
                            f"that package") from None
        return obj


def docstring_summary(obj) -> str:
    """The first sentence of the first paragraph of ``obj``'s own docstring, or ``""``."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
    if isinstance(obj, type) and doc == _generated_dataclass_doc(obj):
        doc = ""  # a dataclass without a docstring gets its signature as one: not a summary
    first = " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split()) if doc else ""
    return first.split(". ", 1)[0].rstrip(".") if first else ""


def _generated_dataclass_doc(cls) -> str | None:
    try:
        return cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
    except (TypeError, ValueError):
        return None


def _builtin_entries() -> list[Entry]:
    data = yaml.safe_load(registry_path().read_text(encoding="utf-8")) or {}
    out = []
    for kind, table in data.items():
        for name, spec in (table or {}).items():
            out.append(Entry(kind, str(name), spec["target"], spec.get("summary", ""), "registry.yaml"))
    return out


def _plugin_entries() -> list[Entry]:
    if os.environ.get(AUTOLOAD_ENV, "").strip() not in ("", "0"):
        return []
    out = []
    for kind in KINDS:
        for ep in metadata.entry_points(group=ENTRY_POINT_PREFIX + kind):
            dist = getattr(ep, "dist", None)
            dist_name = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown distribution"
            # no summary here (reading the docstring would import the plugin): Registry.entries fills it in
            out.append(Entry(kind, ep.name, ep.value, "", f"entry point of {dist_name}"))
    return out


@lru_cache(maxsize=1)
def load_registry() -> Registry:
    """The registry of this process (built once; call ``load_registry.cache_clear()`` after installing
    a plugin in-process)."""
    return Registry(_builtin_entries() + _plugin_entries())
