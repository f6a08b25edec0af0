"""``dmlp bench``: the A/B grid {noise settings} x {seeds} x {methods} x {arms}, resumable.

For each noise setting and seed: noisy labels and the trusted subset are drawn (seeded), the
preprocessor purifies the labels once (saved under ``DIR/purify/<noise>-s<seed>/``), then every method
trains on every arm:

- ``noisy``: the noisy labels with the M trusted samples' labels replaced by their trusted labels, so
  both arms spend the same M trusted labels (otherwise the comparison flatters purification);
- ``purified``: the preprocessor's hard labels (the trusted rows keep their trusted labels);
- ``purified_soft``: its soft distributions (methods train against them as distributions).

Each run writes ``DIR/runs/<run id>/result.json`` atomically when it ends and checkpoints every epoch
while it runs, so rerunning the command skips finished runs and resumes a killed one. A run is keyed by
everything that decides its result (method settings, arm, noise, seed, trusted subset, preprocessor,
features, data): a changed config reruns what it changes. ``DIR/results.json`` / ``results.csv`` are
rewritten after every run; ``DIR/report.md`` and the plots at the end (:mod:`dmlp_plugin.bench_report`).

Names that become folders (method labels, noise tags) are checked first (letters, digits, ``.``, ``_``,
``-``; no leading dot, no ``..``), and every write or delete is checked to stay inside ``DIR`` (links
followed). ``DIR/.dmlp-bench.lock`` keeps a second run out of ``DIR`` while one runs (its checkpoints are
that run's alone); a lock left by a killed run is taken over.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import re
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmlp_plugin.atomic import exclusive, inside, remove_tree
from dmlp_plugin.config import ARMS, BenchConfig, MethodConfig, NoiseConfig, PurifyConfig, check_name, check_values, to_dict
from dmlp_plugin.distributed import Dist, current, launcher_rank
from dmlp_plugin.errors import UserError
from dmlp_plugin.hardware import apply_threads, resolve_device, threads_info
from dmlp_plugin.registry import load_registry

FORMAT_VERSION = 1
NOISE_RATE_MODES = ("known", "none")


# ---------------------------------------------------------------------------------------------------------
# the grid


def noise_tag(noise: NoiseConfig) -> str:
    """A short folder-safe name of a noise setting, e.g. ``symmetric-80`` or ``human-aggre_label``."""
    if noise.kind == "human":  # the file's name or key, with what cannot be in a folder name made '_'
        name = re.sub(r"[^A-Za-z0-9._-]+|\.\.+", "_", noise.key or Path(noise.file or "labels").stem)
        return f"human-{name[:60]}"
    if noise.kind == "none":
        return "none"
    tag = f"{noise.kind}-{round(noise.rate * 100):d}"
    return tag + ("-excl" if noise.kind == "symmetric" and not noise.include_true_class else "")


def method_label(m: MethodConfig) -> str:
    """The name a method entry goes by in results and the report: its label, else its registry name."""
    return m.label or m.name


@dataclass(frozen=True)
class RunSpec:
    noise: NoiseConfig
    seed: int
    method: MethodConfig
    arm: str

    @property
    def run_id(self) -> str:
        return f"{noise_tag(self.noise)}-s{self.seed}-{method_label(self.method)}-{self.arm}"


def purify_config(cfg: BenchConfig, noise: NoiseConfig, seed: int) -> PurifyConfig:
    """The ``dmlp purify`` config of one cell of the grid."""
    return PurifyConfig(seed=seed, device=cfg.device, dataset=cfg.dataset, noise=noise, trusted=cfg.trusted,
                        features=cfg.features, preprocessor=cfg.preprocessor, checks=cfg.checks)


def build_method(m: MethodConfig, where: str):
    """The configured trainer of a method entry; errors name the entry."""
    cls = load_registry().get("methods", m.name)
    if not hasattr(cls, "from_preset") or not hasattr(cls, "run"):
        raise UserError(f"{where}: method {m.name!r} has no from_preset/run; it is not a trainer")
    try:
        return cls.from_preset(m.preset, **m.params)
    except UserError as e:
        raise UserError(f"{where} ({m.name}): {e}") from None
    except TypeError as e:
        raise UserError(f"{where} ({m.name}): params rejected: {e}") from None


def validate_bench(cfg: BenchConfig) -> dict:
    """Check every name, setting and method of a bench config before any work; returns built pieces."""
    from dmlp_plugin import pipeline  # noqa: PLC0415

    if not cfg.seeds:
        raise UserError("seeds is empty; give at least one seed, e.g. seeds: [0, 1]")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"seeds={cfg.seeds} lists a seed twice; list each seed once")
    check_values(cfg)
    from dmlp_plugin.data.noise import check_configs  # noqa: PLC0415

    check_configs(cfg)
    if not cfg.noise:
        raise UserError("noise is empty; give at least one setting, e.g. noise: [{kind: symmetric, rate: 0.8}]")
    tags = [check_name(noise_tag(n), f"noise[{i}]'s folder name", f"noise kind {n.kind!r} gives no folder-safe "
                       f"name") for i, n in enumerate(cfg.noise)]
    if len(set(tags)) != len(tags):
        raise UserError(f"noise lists one setting twice ({', '.join(tags)}); list each once")
    if not cfg.arms:
        raise UserError(f"arms is empty; give some of {', '.join(ARMS)}")
    for a in cfg.arms:
        if a not in ARMS:
            raise UserError(f"arms: unknown arm {a!r}; use {', '.join(ARMS)}")
    if len(set(cfg.arms)) != len(cfg.arms):
        raise UserError(f"arms={cfg.arms} lists an arm twice")
    if cfg.noise_rate not in NOISE_RATE_MODES:
        raise UserError(f"noise_rate={cfg.noise_rate!r} is not known; use {' or '.join(NOISE_RATE_MODES)}")
    if not cfg.methods:
        raise UserError("methods is empty; give at least one, e.g. methods: [{name: ce}]")
    built = {"purify": pipeline.validate(purify_config(cfg, cfg.noise[0], cfg.seeds[0]))}
    for n in cfg.noise[1:]:
        pipeline.validate(purify_config(cfg, n, cfg.seeds[0]))
    labels = [check_name(method_label(m), f"methods[{i}].{'label' if m.label else 'name'}",
                         "give the entry a plain label (methods[i].label), e.g. ce-long")
              for i, m in enumerate(cfg.methods)]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise UserError(f"methods lists {dup[0]!r} twice; give each entry its own label (methods[i].label)")
    built["methods"] = [build_method(m, f"methods[{i}]") for i, m in enumerate(cfg.methods)]
    resolve_device(cfg.device)
    if cfg.purified_labels is not None:
        given_label_paths(cfg)
    return built


def given_label_paths(cfg: BenchConfig) -> dict[tuple[str, int], Path]:
    """The labels artifact of each (noise tag, seed) cell named by ``purified_labels``."""
    pattern = cfg.purified_labels
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    except ValueError as e:
        raise UserError(f"purified_labels={pattern!r} is not a valid path pattern ({e}); use {{noise}} and "
                        f"{{seed}} as placeholders, e.g. runs/purify-{{noise}}-s{{seed}}/labels.npz") from None
    unknown = sorted(fields - {"noise", "seed"})
    if unknown:
        raise UserError(f"purified_labels={pattern!r} has the placeholder {{{unknown[0]}}}; only {{noise}} and "
                        f"{{seed}} are filled in (e.g. runs/purify-{{noise}}-s{{seed}}/labels.npz)")
    try:
        paths = {(noise_tag(n), s): Path(pattern.format(noise=noise_tag(n), seed=s)).expanduser()
                 for n in cfg.noise for s in cfg.seeds}
    except (ValueError, IndexError, KeyError, AttributeError) as e:
        raise UserError(f"purified_labels={pattern!r} cannot be filled in ({e}); use plain {{noise}} and {{seed}}, "
                        f"e.g. runs/purify-{{noise}}-s{{seed}}/labels.npz") from None
    if len(set(paths.values())) < len(paths):
        raise UserError(f"purified_labels={pattern!r} names one file for {len(paths)} (noise, seed) cells; put "
                        f"{{noise}} and/or {{seed}} in the path, e.g. runs/purify-{{noise}}-s{{seed}}/labels.npz")
    return paths


@dataclass(frozen=True)
class GivenLabels:
    """A labels artifact that ``dmlp purify`` wrote, checked against one cell of the grid."""

    artifact: object  # LabelsArtifact
    made_with: PurifyConfig  # the config it records, defaults filled in
    path: Path
    digest: str  # sha256 of the file: a changed file retrains the cell's runs
    metrics: dict | None  # the metrics.json written beside it by the same run, when there


def _settings(obj) -> dict:
    """A config section without file paths (the same file may be spelled differently; contents are checked)."""
    return {k: v for k, v in to_dict(obj).items() if k not in ("file", "cache_dir", "root")}


def _features_identity(prov: dict) -> dict:
    """What identifies the features an artifact was purified on (not when or where they were made)."""
    out = {k: prov[k] for k in ("source", "key", "path", "dims") if k in prov}
    out["view2"] = prov.get("view2")
    if isinstance(prov.get("ssl_config"), dict):
        out["ssl_seed"] = prov["ssl_config"].get("seed")
    return out


def _describe(feats: dict) -> str:
    if feats.get("source") == "ssl":
        return f"SimCLR features {feats.get('key')} (SimCLR seed {feats.get('ssl_seed')})"
    return f"{feats.get('source')} {feats.get('path') or ''}".strip() + f", view 2 {(feats.get('view2') or {}).get('source')}"


def load_given_labels(cfg: BenchConfig, data) -> dict[tuple[str, int], GivenLabels]:
    """Read and check every artifact ``purified_labels`` names, before any training. Refused (one line): a
    missing, damaged or foreign file (another data set or sample order); one made with another seed or
    trusted-subset setting than its cell; noisy labels or a trusted subset other than those the cell draws;
    artifacts made with different preprocessors or features."""
    from dmlp_plugin import pipeline  # noqa: PLC0415
    from dmlp_plugin.artifacts import load_labels  # noqa: PLC0415
    from dmlp_plugin.config import from_mapping  # noqa: PLC0415

    out: dict[tuple[str, int], GivenLabels] = {}
    paths = given_label_paths(cfg)
    first = None
    for noise in cfg.noise:
        for seed in cfg.seeds:
            tag = noise_tag(noise)
            path = paths[(tag, seed)]
            where = f"purified_labels {str(path)!r} (noise {tag}, seed {seed})"
            try:
                art = load_labels(path, data.train.fingerprint())
            except UserError as e:
                raise UserError(f"purified_labels (noise {tag}, seed {seed}): {e}") from None
            recorded = art.provenance.get("config")
            try:
                made = from_mapping(PurifyConfig, recorded if isinstance(recorded, dict) else None, "its config")
            except UserError as e:
                raise UserError(f"{where} does not record a usable `dmlp purify` config ({e}); purify again") from None
            want = purify_config(cfg, noise, seed)
            # (the noise setting is checked by its outcome, the noisy labels, below)
            for name, a, b in (("seed", made.seed, want.seed), ("trusted", _settings(made.trusted),
                                                                 _settings(want.trusted))):
                if a != b:
                    raise UserError(f"{where} was made with {name} {json.dumps(a)} but the cell has {json.dumps(b)}; "
                                    f"give the artifact made with the cell's settings (or set {name} to match)")
            noisy, truth = pipeline.make_noisy(want, data)
            differ = int(np.sum(noisy.labels != art.noisy))
            if differ:
                raise UserError(f"{where} was purified from other noisy labels than the cell draws ({differ} of "
                                f"{len(art.noisy)} differ); give the artifact `dmlp purify` made with that noise "
                                f"setting and seed")
            if want.trusted.source != "knn_auto":  # knn_auto's choice depends on the features, not made here
                idx, labels = pipeline.select_trusted(want, noisy.labels, truth, data.train.num_classes, None)
                if not (np.array_equal(idx, art.meta_indices) and np.array_equal(labels, art.meta_labels)):
                    raise UserError(f"{where} has another trusted subset than the cell draws ({art.meta_indices.size} "
                                    f"vs {idx.size} samples); give the artifact made with the cell's trusted setting")
            feats = _features_identity(art.provenance.get("features") or {})
            if first is None:
                first = (where, to_dict(made.preprocessor), feats)
            elif to_dict(made.preprocessor) != first[1]:
                raise UserError(f"{where} was made with preprocessor {json.dumps(to_dict(made.preprocessor))} but "
                                f"{first[0]} with {json.dumps(first[1])}; give artifacts of one preprocessor setting")
            elif feats != first[2]:
                hint = (f"; SimCLR is seeded by `dmlp purify`'s seed unless features.ssl.seed is set: purify every seed "
                        f"with --set features.ssl.seed={first[2].get('ssl_seed')} to share one set of features"
                        if feats.get("source") == first[2].get("source") == "ssl" else "")
                raise UserError(f"{where} was purified on other features than {first[0]} "
                                f"({_describe(feats)} vs {_describe(first[2])}); give artifacts purified on one set "
                                f"of features{hint}")
            beside = _read_json(path.parent / "metrics.json")
            if beside is not None and beside.get("config_hash") != pipeline.config_hash(recorded):
                beside = None  # written by another run than the artifact
            out[(tag, seed)] = GivenLabels(art, made, path, hashlib.sha256(path.read_bytes()).hexdigest()[:16],
                                           beside)
    return out


def _given_cell(given: GivenLabels) -> tuple:
    """The (artifact, metrics, key) of a cell whose purified labels were given: the metrics ``dmlp purify``
    wrote beside the artifact when they belong to it, else the label accuracies computed here."""
    from dmlp_plugin import metrics as M  # noqa: PLC0415

    art = given.artifact
    metrics = dict(given.metrics or {})
    if not metrics and art.true_labels is not None:
        rest = np.ones(len(art.noisy), bool)
        rest[art.meta_indices] = False
        metrics["evaluated_on"] = "the samples outside the trusted subset"
        metrics["label_accuracy_before"] = M.label_accuracy(art.noisy[rest], art.true_labels[rest])
        metrics["label_accuracy_after"] = M.label_accuracy(art.hard[rest], art.true_labels[rest])
    metrics["given"] = str(given.path)
    return art, metrics, _hash({"format": FORMAT_VERSION, "given_labels": given.digest})


def grid(cfg: BenchConfig) -> list[RunSpec]:
    return [RunSpec(n, s, m, a) for n in cfg.noise for s in cfg.seeds for m in cfg.methods for a in cfg.arms]


# ---------------------------------------------------------------------------------------------------------
# one cell


def arm_labels(arm: str, art) -> np.ndarray:
    """The training labels of an arm: (N,) int64 hard labels or (N, C) float32 distributions."""
    if arm == "noisy":
        y = art.noisy.copy()
        y[art.meta_indices] = art.meta_labels  # the same M trusted labels the purified arm spent
        return y
    if arm == "purified":
        return art.hard.copy()
    return art.soft.astype(np.float32, copy=True)


def wrong_fraction(labels: np.ndarray, truth: np.ndarray | None) -> float | None:
    if truth is None:
        return None
    hard = labels.argmax(1) if labels.ndim == 2 else labels
    return float(np.mean(hard != truth))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _purify_cell(cfg: BenchConfig, noise: NoiseConfig, seed: int, data, views, built, device, out: Path,
                 progress: bool, dist: Dist = Dist()):
    """The labels artifact of one (noise, seed) cell: reused from ``out/purify/...`` when its key matches.
    Under several processes all of them decide from the same files, purify together (rows sharded) and
    process 0 writes."""
    from dmlp_plugin import pipeline  # noqa: PLC0415
    from dmlp_plugin.artifacts import load_labels, save_labels  # noqa: PLC0415
    from dmlp_plugin.atomic import write_json  # noqa: PLC0415

    pcfg = purify_config(cfg, noise, seed)
    key = _hash({"format": FORMAT_VERSION, "config": to_dict(pcfg), "features": views.provenance,
                 "data": data.train.fingerprint()})
    folder = inside(out, out / "purify" / f"{noise_tag(noise)}-s{seed}")
    dist.barrier()  # every process reads what process 0 has written so far
    metrics = _read_json(folder / "metrics.json")
    if metrics is not None and metrics.get("bench_key") == key and (folder / "labels.npz").is_file():
        try:
            return load_labels(folder / "labels.npz", data.train.fingerprint()), metrics, key
        except UserError:
            pass  # damaged: purify again
    ckpt = folder / f"purifier-checkpoint-{key}.pt"  # a killed cell resumes its purification from here
    p = pipeline.purify_labels(pcfg, data, views, built["purify"], device, progress, raw=to_dict(pcfg),
                               checkpoint=str(ckpt))
    metrics = {**p.metrics, "bench_key": key}
    if dist.is_main:
        save_labels(folder / "labels.npz", p.artifact)
        write_json(folder / "history.json", p.result.history)
        write_json(folder / "metrics.json", metrics)
    dist.barrier()
    if dist.is_main:
        for f in folder.glob("purifier-checkpoint-*"):
            inside(out, f).unlink(missing_ok=True)
    return p.artifact, metrics, key


def _train_cell(spec: RunSpec, trainer, art, data, cfg: BenchConfig, device: str,
                out: Path, progress: bool, dist: Dist = Dist()) -> dict:
    """Train one method on one arm; returns the run record (reused when its key matches). Under several
    processes the trainer runs data-parallel (accelerate) and process 0 writes."""
    from baselines.common import TrainData  # noqa: PLC0415
    from dmlp_plugin.atomic import write_json  # noqa: PLC0415

    folder = inside(out, out / "runs" / spec.run_id)
    labels = arm_labels(spec.arm, art)
    # a run depends on what it trains on: the training labels themselves (not on how they were made, so a
    # noisy arm, or a purified arm whose labels came out the same, is reused after a purifier change)
    labels_sha = hashlib.sha256(np.ascontiguousarray(labels).tobytes() + str(labels.dtype).encode()).hexdigest()[:16]
    key = _hash({"format": FORMAT_VERSION, "method": dataclasses.asdict(trainer), "name": spec.method.name,
                 "arm": spec.arm, "labels": labels_sha, "noise_rate": cfg.noise_rate,
                 "train": data.train.fingerprint(), "test": data.test.fingerprint()})
    dist.barrier()
    done = _read_json(folder / "result.json")
    if done is not None and done.get("key") == key:
        done["reused"] = True
        return done
    truth = art.true_labels
    wrong = wrong_fraction(labels, truth)
    known = cfg.noise_rate == "known" and wrong is not None
    td = TrainData(data.train.images, labels, data.test.images, data.test.labels, data.train.num_classes,
                   noise_rate=min(wrong, 0.999) if known else None,
                   noise_rate_source="known: measured against the true labels (oracle)" if known else None)
    ckpt = folder / "checkpoint"
    if done is not None and dist.is_main:  # a finished run of other settings: start this one afresh
        remove_tree(folder, out)
    dist.barrier()
    dev = "cuda" if device.startswith("cuda") else "cpu"
    res = trainer.run(td, device=dev, seed=spec.seed, progress=progress, checkpoint_dir=ckpt, true_labels=truth)
    record = {
        "method": spec.method.name, "method_label": method_label(spec.method), "preset": spec.method.preset,
        "labels": spec.arm, "seed": spec.seed, "noise": {"kind": spec.noise.kind, "rate": spec.noise.rate},
        "noise_tag": noise_tag(spec.noise), "test_accuracy": float(res.test_accuracy),
        "seconds": float(res.seconds), "label_accuracy": None if wrong is None else 1.0 - wrong,
        "trusted_size": int(art.meta_indices.size), "run_id": spec.run_id, "key": key,
        "curve": res.curve, "info": res.info, "threads": threads_info()["used"],
    }
    if dist.is_main:
        write_json(folder / "result.json", record)
        remove_tree(ckpt, out)  # finished: the checkpoint is no longer needed
    return record


# ---------------------------------------------------------------------------------------------------------
# the whole run


CSV_FIELDS = ("noise_tag", "method", "method_label", "labels", "seed", "test_accuracy", "label_accuracy",
              "trusted_size", "seconds", "run_id")


def results_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow(r)
    return buf.getvalue()


def bench_run(cfg: BenchConfig, out: str | Path, raw: dict | None = None, progress: bool = True) -> list[dict]:
    """Run (or resume) the grid of ``cfg`` into ``out``; returns the run records in grid order."""
    from dmlp_plugin import pipeline  # noqa: PLC0415

    out = Path(out)
    pipeline.check_out_dir(out)
    built = validate_bench(cfg)
    apply_threads(cfg.threads, warn=launcher_rank() == 0)  # once for the grid, before any torch work
    device = resolve_device(cfg.device)
    dist = current(device)  # under accelerate launch / torchrun: sharded purification, data-parallel training
    progress = progress and dist.is_main
    first = purify_config(cfg, cfg.noise[0], cfg.seeds[0])
    data = pipeline.load_data(first)
    if data.train.images is None:
        raise UserError(f"dataset {cfg.dataset.name!r} has no images (labels only), and the benchmark's methods "
                        f"train on images; give dataset.params.images, or use `dmlp purify` for your features")
    if data.test is None:
        raise UserError(f"dataset {cfg.dataset.name!r} has no test split, which the benchmark scores on; "
                        f"give dataset.params that keep one (e.g. test_fraction: 0.2)")
    given = load_given_labels(cfg, data) if cfg.purified_labels is not None else None
    t0 = time.perf_counter()
    views = None if given else pipeline.make_views(first, data, device, built["purify"], progress)  # every process
    feature_seconds = time.perf_counter() - t0
    hold = contextlib.ExitStack()  # one run at a time in ``out``: its checkpoints are this run's alone
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        hold.enter_context(exclusive(out / ".dmlp-bench.lock", f"the benchmark in {str(out)!r}"))
    with hold:
        return _run_grid(cfg, out, raw, progress, built, device, dist, data, given, views, feature_seconds)


def _run_grid(cfg: BenchConfig, out: Path, raw, progress: bool, built: dict, device: str, dist: Dist, data,
              given, views, feature_seconds: float) -> list[dict]:
    """Every run of the grid (reused, resumed or run), then the results, the summary and the report."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from dmlp_plugin import pipeline  # noqa: PLC0415
    from dmlp_plugin.atomic import write_json, write_text  # noqa: PLC0415
    from dmlp_plugin.bench_report import write_bench_report  # noqa: PLC0415

    if dist.is_main:
        write_text(out / "config.yaml", pipeline.yaml_dump(raw or to_dict(cfg)))

    specs = grid(cfg)
    trainers = {method_label(m): t for m, t in zip(cfg.methods, built["methods"])}
    records: list[dict] = []
    purifications: dict[str, dict] = {}
    bar = tqdm(total=len(specs), desc="bench", unit="run", disable=not progress, dynamic_ncols=True)
    try:
        cell = None
        for spec in specs:
            if cell is None or cell[0] != (noise_tag(spec.noise), spec.seed):
                bar.set_description(f"bench: purify {noise_tag(spec.noise)} seed {spec.seed}")
                if given:
                    art, pmetrics, _ = _given_cell(given[(noise_tag(spec.noise), spec.seed)])
                else:
                    art, pmetrics, _ = _purify_cell(cfg, spec.noise, spec.seed, data, views, built, device,
                                                       out, progress, dist)
                purifications[f"{noise_tag(spec.noise)}-s{spec.seed}"] = pmetrics
                cell = ((noise_tag(spec.noise), spec.seed), art)
            bar.set_description(f"bench: {spec.method.name} on {spec.arm} ({noise_tag(spec.noise)}, seed {spec.seed})")
            rec = _train_cell(spec, trainers[method_label(spec.method)], cell[1], data, cfg, device, out,
                              progress, dist)
            records.append(rec)
            if dist.is_main:
                write_json(out / "results.json", [_public(r) for r in records])
                write_text(out / "results.csv", results_csv(records))
            bar.update(1)
    finally:
        bar.close()
    if given:  # what made the given labels (the same for every cell: checked)
        one = next(iter(given.values()))
        features = dict(one.artifact.provenance.get("features") or {})
        preprocessor = {"name": one.made_with.preprocessor.name, "params": one.made_with.preprocessor.params,
                        "given": cfg.purified_labels}
    else:
        features = views.provenance
        preprocessor = {"name": cfg.preprocessor.name, "params": cfg.preprocessor.params}
    summary = {"features": features, "feature_seconds": feature_seconds, "device": device,
               "config_hash": pipeline.config_hash(raw or to_dict(cfg)), "versions": pipeline.versions(),
               "preprocessor": preprocessor,
               "trusted": to_dict(cfg.trusted), "noise_rate": cfg.noise_rate, "seeds": list(cfg.seeds),
               "arms": list(cfg.arms), "dataset": cfg.dataset.name,
               "n_train": len(data.train), "n_test": len(data.test), "num_classes": data.train.num_classes,
               "world_size": dist.world_size, "threads": threads_info()}
    if dist.is_main:
        write_json(out / "purification.json", purifications)
        write_bench_report(out, records, purifications, summary)
    dist.barrier()
    return records


def _public(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "reused"}
