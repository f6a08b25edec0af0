"""YAML -> frozen dataclasses, with dotted ``--set`` overrides. Validates keys and types; builds no objects.

Every error is a :class:`UserError` naming the dotted key, the bad value and what would be right, raised
before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from dmlp_plugin.errors import UserError


@dataclass(frozen=True)
class DatasetConfig:
    """Which data set (a registry name under ``datasets``) and its loader's arguments."""

    name: str = "digits"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NoiseConfig:
    """Synthetic or human label noise applied to the training split (registry kind ``noise``: each kind is
    its own function, whose keyword parameters are the settings it takes).

    rate: the noise level (symmetric, asymmetric, pairflip, instance; ``none`` and ``human`` take none and
    record the measured flip rate). include_true_class (symmetric only): the new label is drawn from all C
    classes (DivideMix's convention, flip rate ~ rate*(1-1/C)) when true, from the other C-1 classes (flip
    rate ~ rate) when false. pairs (pairflip only): source class -> target class. file, key (human only): the
    labels file and the array in it. A setting the kind does not take is refused before any work
    (:func:`dmlp_plugin.data.noise.check_config`, run by the purify and bench validation).
    """

    kind: str = "symmetric"
    rate: float = 0.5
    include_true_class: bool = True
    pairs: dict | None = None
    file: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class TrustedConfig:
    """The trusted meta subset. source: ``clean_sample`` (draw ``size`` samples and use their true labels,
    for benchmarks), ``index_file`` (``file``: .npy of indices, or .csv/.txt of ``index[,label]`` rows;
    labels default to the true labels), ``knn_auto`` (no true labels: pick samples whose faiss
    neighbours agree with their given label, class-balanced), or ``none``.
    size: a fraction of the training set (< 1) or a count (>= 1)."""

    source: str = "clean_sample"
    size: float = 0.03
    file: str | None = None
    balanced: bool = True
    k: int = 10


@dataclass(frozen=True)
class FeaturesConfig:
    """Where the features come from: ``ssl`` (SimCLR on a timm backbone, cached), ``npy`` (your own
    (N, d) file at ``path``; ``path2`` optionally a second view) or ``raw`` (flattened, standardised
    pixels: a quick baseline). ``second_view``: how view 2 is made when no second file is given:
    ``random_relu`` (random ReLU features of view 1, a kernel view), ``raw`` (standardised pixels: a view
    whose errors differ from the learned one's; best on small images such as digits), ``hflip`` (SSL features of flipped
    images), ``same`` (the authors' script: view 1 again)."""

    source: str = "ssl"
    path: str | None = None
    path2: str | None = None
    second_view: str = "random_relu"
    second_view_dim: int = 2048
    cache_dir: str = ".dmlp_cache"
    ssl: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PreprocessorConfig:
    """A registry name under ``preprocessors`` and its parameters. ``auto`` runs several (``params.candidates``,
    default dmlp, knn_vote, cleanlab, trusted_only; each one's parameters under its name, e.g.
    ``params: {dmlp: {epochs: 60}}``) and keeps the one with the best label accuracy estimated without true
    labels (``checks.estimate_folds``); see :class:`dmlp_plugin.purifier.preprocessors.Auto`.

    ``params_for``: parameters kept per preprocessor name (``{dmlp: {epochs: 60}, knn_vote: {k: 50}}``); only
    the entry of the preprocessor named is used (names are checked against the registry), with ``params`` on
    top of it, so a config switches preprocessor by ``--set preprocessor.name=...`` alone. After building,
    ``params`` holds the merged parameters."""

    name: str = "dmlp"
    params: dict = field(default_factory=dict)
    params_for: dict = field(default_factory=dict)

    def __post_init__(self):
        for key, value in self.params_for.items():
            if not isinstance(value, dict):
                raise UserError(f"preprocessor.params_for.{key}: expected a mapping of {key}'s parameters, got "
                                f"{value!r}")
        own = self.params_for.get(self.name) or {}
        if own and isinstance(self.params, dict):
            object.__setattr__(self, "params", {**own, **self.params})


@dataclass(frozen=True)
class ChecksConfig:
    """faiss checks: ``k`` neighbours for the agreement score. ``compare``: other preprocessors run for the
    report when the true labels are known (their label accuracy, setting and seconds; ``cleanlab`` needs
    ``pip install 'dmlp_plugin[cleanlab]'`` and is reported as not installed otherwise). For ``knn_vote``:
    ``vote_ks`` the k values tried (``auto``: 5, 10, 20, 50, 100, 200, ... up to max(200, sqrt(N)), at most
    400 and N - 1; or a list of positive integers) and ``vote_views`` the features searched (``auto``: each
    view alone and all views concatenated; or a list of ``1``, ``2``, ``all``); one search per view set at
    the largest k, and the best (views, k) by label accuracy is reported (chosen with the true labels).
    ``estimate_folds``: K of the label-accuracy estimate that needs no true labels (K-fold cross-validation
    over the trusted subset, :mod:`dmlp_plugin.estimate`) for the preprocessor and every comparison; 0 turns it
    off (not with ``preprocessor: auto``, which chooses by it). It costs K more runs of each;
    ``estimate_compare: false`` estimates the preprocessor only. ``index``: how neighbours are searched at scale
    (kind ``auto``: exact below ``threshold`` rows, default 200,000, an approximate faiss IVF index at or above;
    ``exact``, ``ivf`` or ``hnsw``; nlist, nprobe, train_size, hnsw_m, ef_construction, ef_search, recall_sample,
    recall_k: see :class:`dmlp_plugin.checks.index.IndexSettings`); the recall measured goes into metrics.json."""

    k: int = 10
    vote_ks: str | list = "auto"
    vote_views: str | list = "auto"
    compare: list = field(default_factory=lambda: ["knn_vote", "trusted_only", "cleanlab"])
    estimate_folds: int = 5
    estimate_compare: bool = True
    index: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PurifyConfig:
    """A ``dmlp purify`` run. threads: CPU threads of torch and faiss (``auto``: the CPUs this process may use,
    shared among a launch's processes; see :func:`dmlp_plugin.hardware.auto_threads`), or a count."""

    seed: int = 0
    device: str = "auto"
    threads: int | str = "auto"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    trusted: TrustedConfig = field(default_factory=TrustedConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)


@dataclass(frozen=True)
class MethodConfig:
    """A training method: a registry name under ``methods``, one of its presets (``small`` for the
    embedded data, ``cifar10`` for the paper's settings, ...) and overrides of the preset's fields.
    label: the name in results and the report (default: the registry name; needed when one method is
    listed twice with other settings)."""

    name: str = "ce"
    preset: str = "small"
    params: dict = field(default_factory=dict)
    label: str | None = None


ARMS = ("noisy", "purified", "purified_soft")


@dataclass(frozen=True)
class BenchConfig:
    """A ``dmlp bench`` run: the grid {noise settings} x {seeds} x {methods} x {arms}.

    arms: ``noisy`` (the noisy labels, with the trusted samples' labels replaced by their trusted labels,
    so both arms spend the same M trusted labels), ``purified`` (the preprocessor's hard labels),
    ``purified_soft`` (its soft distributions, for methods that take them). Features are label-free and
    made once (with ``seeds[0]``); noise, trusted subset, purification and training use each seed.
    noise_rate: what methods that need the noise rate (Co-teaching's forget rate, DivideMix's settings)
    are told: ``known`` (the measured fraction of wrong training labels, an oracle fact, as the official
    codes assume) or ``none`` (methods must be given their setting in params).
    purified_labels: labels artifacts made earlier by ``dmlp purify`` to train the purified arms on, instead of
    purifying here (purify once on a big machine, benchmark many methods later): a path in which ``{noise}``
    and ``{seed}`` stand for each cell's noise tag (e.g. ``symmetric-80``) and seed. Each must be of this data
    set (sample-order fingerprint), made with the cell's seed and ``trusted`` setting, and of the noisy labels
    and trusted subset the cell draws; all of one preprocessor and feature setting. Features are not made then."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])
    device: str = "auto"
    threads: int | str = "auto"  # as PurifyConfig.threads; set once for the whole grid
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    noise: list[NoiseConfig] = field(default_factory=lambda: [NoiseConfig(rate=0.8)])
    trusted: TrustedConfig = field(default_factory=TrustedConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    preprocessor: PreprocessorConfig = field(default_factory=PreprocessorConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    methods: list[MethodConfig] = field(default_factory=lambda: [MethodConfig()])
    arms: list[str] = field(default_factory=lambda: ["noisy", "purified"])
    noise_rate: str = "known"
    purified_labels: str | None = None


# ---------------------------------------------------------------------------------------------------------
# generic dataclass building


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError as e:
                errors.append(e)
        if len(errors) > 1:  # e.g. str | list: name every form the key takes
            kinds = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
                     dict: "a mapping"}
            forms = [kinds.get(typing.get_origin(a) or a, _type_name(a)) for a in args if a is not type(None)]
            raise UserError(f"{where}: expected {' or '.join(forms)}, got {value!r}")
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise UserError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))) if args else tuple(value)
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def from_mapping(cls, data: Any, where: str = "config"):
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise UserError naming the key."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        raise UserError(f"{where}: unknown key {k!r}{_suggest(k, names)}; known keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


# ---------------------------------------------------------------------------------------------------------
# YAML files and overrides


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of settings: 1 MiB is far more than any needs
MAX_NODES = 100_000  # YAML nodes after expanding aliases (a "billion laughs" bomb expands to 10**9)
MAX_DEPTH = 64  # nesting levels of mappings and lists


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (no tags that build objects) that refuses duplicate keys, reads numbers
    as YAML 1.2 does (``010`` is 10, ``1:30`` a string, not 8 and 90; ``1e-3`` a number) and caps the
    nesting depth and the number of nodes after alias expansion."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.constructor.ConstructorError(
                    None, None, f"nesting deeper than {MAX_DEPTH} levels; flatten the config", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        if _expanded_size(node, {}) > MAX_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"more than {MAX_NODES} values once its aliases (*name) are expanded; write the "
                            f"settings out without nested aliases", node.start_mark)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True) if key_node.tag != "tag:yaml.org,2002:merge" else "<<"
                if key != "<<" and isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}); give each key once",
                        key_node.start_mark)
                if isinstance(key, typing.Hashable):
                    seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict) -> int:
    """Nodes under ``node`` with every alias expanded (memoised on shared nodes: linear in the file)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # (a recursive alias counts once; construction handles it)
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


# YAML 1.2 core schema numbers instead of YAML 1.1's (octal 010, base-60 1:30, 1_000)
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in ("tag:yaml.org,2002:int",
                                                                              "tag:yaml.org,2002:float")]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                              list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _construct_int(loader, node):
    text = loader.construct_scalar(node)
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    base = 16 if body.startswith("0x") else 8 if body.startswith("0o") else 10
    return sign * int(body[2:] if base != 10 else body, base)


def _construct_float(loader, node):
    return float(loader.construct_scalar(node).lower().replace(".inf", "inf").replace(".nan", "nan"))


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def yaml_load(text: str):
    """``yaml.safe_load`` with :class:`_Loader`'s checks (raises yaml.YAMLError)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; pass the path of a YAML config, e.g. configs/purify-digits.yaml")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"config file {str(path)!r} is {size / 2**20:.1f} MiB, more than a config's limit of "
                        f"{MAX_CONFIG_BYTES // 2**20} MiB; put large data (indices, labels) in .npy files it names")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config file {str(path)!r} is not valid YAML{at}: {problem}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text; pass a YAML file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of settings at the top, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str], schema) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a nested dict, checking each key
    against the dataclass ``schema`` (free-form ``params``/``ssl`` mappings accept any sub-key; those are
    checked when their component is built)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set noise.rate=0.8")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.constructor.ConstructorError as e:  # a duplicate key, a tag, a bomb: not a plain string
            raise UserError(f"--set {key.strip()}: {e.problem}") from None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        cls = schema
        for i, p in enumerate(parts):
            if cls is None:
                break  # inside a free-form mapping
            names = {f.name: f for f in dataclasses.fields(cls)}
            if p not in names:
                prefix = ".".join(parts[:i])
                raise UserError(f"--set {key}: unknown key {p!r}{' under ' + repr(prefix) if prefix else ''}"
                                f"{_suggest(p, names)}; known keys: {', '.join(names)}")
            tp = typing.get_type_hints(cls)[p]
            cls = tp if dataclasses.is_dataclass(tp) else None
            if cls is None and i < len(parts) - 1 and not (tp is dict or typing.get_origin(tp) is dict
                                                             or dict in typing.get_args(tp)):
                raise UserError(f"--set {key}: {'.'.join(parts[:i + 1])!r} is a {_type_name(tp)}, it has no sub-keys")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, schema=PurifyConfig):
    """Read a YAML config, apply overrides, validate it into ``schema``; returns (config, raw dict)."""
    data = apply_overrides(read_yaml(path), overrides or [], schema)
    return from_mapping(schema, data), data


# ---------------------------------------------------------------------------------------------------------
# values no component could run with (checked before any work, by pipeline.validate and bench.validate_bench)


MAX_SEED = 2**32 - 1  # numpy's and torch's seeding both take it; larger ones overflow somewhere downstream
MAX_EPOCHS = 10_000
MAX_VIEW_DIM = 65_536
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def check_name(name: str, where: str, fix: str) -> str:
    """A name that becomes a file or folder name: letters, digits, ``.``, ``_`` and ``-``, not starting with a
    dot, without ``..``, at most 100 characters; else UserError naming it and ``fix``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or len(name) > 100:
        raise UserError(f"{where}={name!r} cannot name a folder: use letters, digits, '.', '_' and '-' (not a "
                        f"leading '.', no '..', at most 100 characters); {fix}")
    return name


MAX_THREADS = 1024


def check_threads(value) -> None:
    """``threads``: ``auto`` or an integer 1..MAX_THREADS; else UserError."""
    ok = value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_THREADS)
    if not ok:
        raise UserError(f"threads={value!r} is not a thread count; use auto (the CPUs this process may use, shared "
                        f"among a launch's processes) or an integer 1..{MAX_THREADS}, e.g. --threads 2")


def check_seed(seed: int, where: str) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"{where}={seed} is outside 0..{MAX_SEED}; give a non-negative seed such as 0")


def _epochs(params, where: str):
    """(dotted key, value) of every ``epochs`` setting in a free-form params mapping (nested: ``auto``)."""
    if not isinstance(params, dict):
        return
    for k, v in params.items():
        if k == "epochs":
            yield f"{where}.epochs", v
        elif isinstance(v, dict):
            yield from _epochs(v, f"{where}.{k}")


def check_epochs(params: dict, where: str) -> None:
    """Refuse an epoch count that would run for days (wrong types are left to the component's own check)."""
    for key, v in _epochs(params, where):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > MAX_EPOCHS:
            years = v / (365 * 86400)
            raise UserError(f"{key}={v} is more than the {MAX_EPOCHS} epochs allowed (at even one second an "
                            f"epoch it would run {years:,.0f} years); give a count such as 100")


def _keys_named(params, name: str, where: str):
    """(dotted key, value) of every ``name`` setting in a free-form params mapping (nested: ``auto``)."""
    if not isinstance(params, dict):
        return
    for k, v in params.items():
        if k == name:
            yield f"{where}.{k}", v
        elif isinstance(v, dict):
            yield from _keys_named(v, name, f"{where}.{k}")


def refuse_own_seed(params, where: str, run: str, run_value) -> None:
    """UserError when the preprocessor parameters ``params`` (named ``where``) hold a ``seed`` at any depth:
    every preprocessor draws its randomness from the run's seed (``PurifyInputs.seed``, see
    :class:`dmlp_plugin.interfaces.Preprocessor`; ``dmlp`` replaces its own ``seed`` field by it), so such a
    seed would be ignored. ``run`` / ``run_value``: the run's seed setting and its value, for the message."""
    for key, value in _keys_named(params, "seed", where):
        raise UserError(f"{key}={value!r} is not honoured: a preprocessor is seeded by the run's {run} "
                        f"({run}={run_value!r}); remove it and set {run} instead")


def check_preprocessor_seed(cfg) -> None:
    """Refuse a preprocessor's own ``seed`` (``preprocessor.params.seed``, ``preprocessor.params_for.<name>.seed``,
    ``auto``'s ``params.<candidate>.seed``): see :func:`refuse_own_seed`."""
    run = "seed" if hasattr(cfg, "seed") else "seeds"
    refuse_own_seed(cfg.preprocessor.params_for, "preprocessor.params_for", run, getattr(cfg, run))
    refuse_own_seed(cfg.preprocessor.params, "preprocessor.params", run, getattr(cfg, run))


def check_values(cfg) -> None:
    """Settings of a PurifyConfig or BenchConfig that are the right type but no run could use: UserError."""
    seeds = [("seed", cfg.seed)] if hasattr(cfg, "seed") else [(f"seeds[{i}]", s) for i, s in enumerate(cfg.seeds)]
    for where, s in seeds:
        check_seed(s, where)
    check_preprocessor_seed(cfg)
    check_threads(getattr(cfg, "threads", "auto"))
    t = cfg.trusted
    if t.size != t.size or t.size in (float("inf"), float("-inf")):
        raise UserError(f"trusted.size={t.size} is not a number of samples; give a fraction (< 1) or a count (>= 1)")
    if t.k < 1:
        raise UserError(f"trusted.k={t.k} must be at least 1 (the neighbours knn_auto asks to agree), e.g. 10")
    if isinstance(cfg.checks.vote_ks, list) and not cfg.checks.vote_ks:
        raise UserError("checks.vote_ks=[] tries no k; use auto or a list of positive integers such as [5, 20, 100]")
    dim = cfg.features.second_view_dim
    if not 1 <= dim <= MAX_VIEW_DIM:
        raise UserError(f"features.second_view_dim={dim} is outside 1..{MAX_VIEW_DIM} (N x dim float32 values are "
                        f"held in memory); give a width such as 2048")
    cache = Path(cfg.features.cache_dir)
    if cache.exists() and not cache.is_dir():
        raise UserError(f"features.cache_dir={str(cache)!r} is a file, not a folder; give a folder for the feature "
                        f"cache and checkpoints (e.g. .dmlp_cache), or move that file away")
    check_epochs(cfg.preprocessor.params, "preprocessor.params")
    check_epochs(getattr(cfg.preprocessor, "params_for", None), "preprocessor.params_for")
    check_epochs(cfg.features.ssl, "features.ssl")
    for i, m in enumerate(getattr(cfg, "methods", [])):
        check_epochs(m.params, f"methods[{i}].params")
