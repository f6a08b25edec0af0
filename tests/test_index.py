"""Neighbour search at scale (dmlp_plugin.checks.index): exact below a size threshold, an approximate faiss
index above it with its recall measured against exact search; the kNN vote on approximate neighbours matches
the exact one; under 2 processes every search is sharded over the queries and gives what one process gives."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlp_plugin.checks import index as ix
from dmlp_plugin.checks import knn
from dmlp_plugin.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ROOT / "tests" / "workers"
sys.path.insert(0, str(WORKERS))
from dist_search import IVF, problem, searches  # noqa: E402


def _recall(a, b, k):
    return float(np.mean([len(set(r[:k]) & set(s[:k])) / k for r, s in zip(a, b)]))


def test_auto_plans_exact_below_the_threshold_and_ivf_at_it():
    s = ix.IndexSettings(threshold=1000)
    assert (s.plan(999), s.plan(1000)) == ("exact", "ivf")
    assert ix.IndexSettings(kind="hnsw").plan(10) == "hnsw"
    assert ix.IndexSettings().cells(1_000_000) == 2000 and ix.IndexSettings().cells(1000) == 25


@pytest.mark.parametrize("given, word", [({"kind": "annoy"}, "kind"), ({"nprobe": 0}, "nprobe"),
                                         ({"nlist": "many"}, "nlist"), ({"probes": 3}, "probes"),
                                         ({"recall_sample": -1}, "recall_sample")])
def test_bad_index_settings_are_one_line_errors(given, word):
    with pytest.raises(UserError, match=word) as e:
        ix.IndexSettings.from_dict(given)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_is_measured_and_high_on_low_dimensional_data(kind):
    x, *_ = problem()
    exact_s, exact_i = knn.search(x, 10)
    ix.clear_records()
    with ix.using(ix.IndexSettings(kind=kind, nlist=40, nprobe=8, recall_sample=300, ef_search=64)):
        s, i = knn.search(x, 10)
    rec = ix.records()
    assert len(rec) == 1 and rec[0]["kind"] == kind and rec[0]["recall_queries"] == 300
    assert rec[0]["recall_at_10"] >= 0.95
    measured = _recall(exact_i, i, 10)
    assert abs(measured - rec[0]["recall_at_10"]) < 0.03  # the sample's recall is the whole search's
    assert not np.any(i == np.arange(len(x))[:, None])  # a row is never its own neighbour
    assert np.all(np.diff(s, axis=1) <= 1e-6)  # best first


def test_recall_record_falls_when_the_index_is_too_coarse():
    """The recall check is not a constant: one probe of 40 cells on 24-d data misses neighbours."""
    x, *_ = problem()
    ix.clear_records()
    with ix.using(ix.IndexSettings(kind="ivf", nlist=60, nprobe=1, recall_sample=300)):
        _, i = knn.search(x, 10)
    got = ix.records()[0]["recall_at_10"]
    assert got < 0.9
    assert abs(got - _recall(knn.search(x, 10)[1], i, 10)) < 0.05


def test_knn_vote_on_the_ivf_index_matches_exact_search():
    x, y, noisy, _ = problem()
    ks = [10, 50]
    exact = knn.vote_at(*knn.search(x, 50), noisy, 8, ks)
    with ix.using(IVF):
        approx = knn.vote_at(*knn.search(x, 50), noisy, 8, ks)
    for k in ks:
        a, b = np.mean(exact[k].argmax(1) == y), np.mean(approx[k].argmax(1) == y)
        assert a > np.mean(noisy == y) + 0.1 and abs(a - b) < 0.01, (k, a, b)  # it cleans; ivf as well


def test_votes_in_row_blocks_equal_one_block():
    x, _, noisy, _ = problem()
    s, i = knn.search(x, 30)
    whole = knn.vote_at(s, i, noisy, 8, [3, 30])
    blocks = knn.vote_at(s, i, noisy, 8, [3, 30], chunk=257)
    for k in whole:
        np.testing.assert_array_equal(whole[k], blocks[k])


def test_an_index_is_built_once_per_matrix_and_settings():
    x, *_ = problem()
    ix.clear_records()
    knn.clear_caches()
    with ix.using(IVF):
        knn.search(x, 5)
        knn.search(x, 12)
    rec = ix.records()
    assert [r.get("reused", False) for r in rec] == [False, True]


def test_purify_command_records_the_index_and_its_recall(tmp_path):
    from dmlp_plugin.cli import main

    out = tmp_path / "run"
    args = ["purify", str(ROOT / "configs" / "purify-digits.yaml"), "--out", str(out), "--no-progress", "-q",
            "--set", "features.source=raw", "--set", "preprocessor.params={epochs: 5}",
            "--set", "checks.estimate_folds=0", "--set", "checks.compare=[knn_vote]",
            "--set", "checks.index={kind: ivf, nlist: 20, nprobe: 20, recall_sample: 200}",
            "--set", f"features.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    ni = m["neighbour_index"]
    assert ni["kind"] == "ivf" and ni["settings"]["nprobe"] == 20
    assert ni["indexes"] and all(r["recall_at_10"] >= 0.99 for r in ni["indexes"])  # 20 of 20 cells: exact
    assert m["knn_vote"]["label_accuracy_after"] > 0.8
    assert set(m["peak_rss_mib"]) >= {"data", "features", "purify", "compare", "checks"}
    assert all(v["peak_mib"] is None or v["peak_mib"] >= v["beyond_mapped_mib"] > 0 for v in m["peak_rss_mib"].values())
    report = (out / "report.md").read_text()
    assert "Neighbour search: approximate" in report and "| ivf | 1,437 x 64 | nlist 20, nprobe 20 |" in report


def test_bad_index_setting_stops_before_any_work(tmp_path, capsys):
    from dmlp_plugin.cli import main

    out = tmp_path / "run"
    code = main(["purify", str(ROOT / "configs" / "purify-digits.yaml"), "--out", str(out), "--no-progress",
                 "--set", "checks.index={kind: annoy}"])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert "checks.index.kind='annoy'" in err and "\n" not in err


def test_sharded_searches_and_purification_equal_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "two.npz"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(WORKERS / "dist_search.py"), str(out)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(tmp_path / f"two.npz.rank{k}").read_text() for k in (0, 1)] == ["2", "2"]
    two = np.load(out)
    x, y, noisy, meta = problem()
    from dist_search import CFG

    from dmlp_plugin.hardware import apply_threads
    from dmlp_plugin.purifier.dmlp import purify

    before = torch.get_num_threads()
    apply_threads(1, warn=False)  # as each worker runs: BLAS products differ in the last bit across thread counts
    try:
        knn.clear_caches()
        one = searches(x)
        with ix.using(IVF):
            res = purify([x], noisy, meta, y[meta], 8, CFG, progress=False)
    finally:
        apply_threads(before, warn=False)
    for name, a in one.items():
        np.testing.assert_array_equal(two[name], a, err_msg=name)
    np.testing.assert_array_equal(two["hard"], res.hard)


def test_a_large_feature_file_is_memory_mapped_not_read_whole(tmp_path, monkeypatch):
    from dmlp_plugin import pipeline

    x, *_ = problem()
    raw = (x * 3.0).astype(np.float64)  # not unit length, not float32: normalised into the cache, block by block
    np.save(tmp_path / "f.npy", raw)
    np.save(tmp_path / "unit.npy", x)
    small = pipeline._load_feature_file(str(tmp_path / "f.npy"), len(x), "features.path", str(tmp_path / "c"))
    assert not isinstance(small, np.memmap) and not (tmp_path / "c").exists()
    monkeypatch.setattr(pipeline, "IN_MEMORY_BYTES", 0)
    mapped = pipeline._load_feature_file(str(tmp_path / "f.npy"), len(x), "features.path", str(tmp_path / "c"))
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32
    assert [p.name.startswith("normalised-") for p in (tmp_path / "c").glob("*.npy")] == [True]
    np.testing.assert_allclose(mapped, small, atol=1e-6)
    same = pipeline._load_feature_file(str(tmp_path / "unit.npy"), len(x), "features.path", str(tmp_path / "c"))
    assert isinstance(same, np.memmap) and Path(same.filename).name == "unit.npy"  # used as it is
    bad = raw.copy()
    bad[2000] = 0
    np.save(tmp_path / "zero.npy", bad)
    with pytest.raises(UserError, match=r"has 1 all-zero rows \(first: row 2000\)"):
        pipeline._load_feature_file(str(tmp_path / "zero.npy"), len(x), "features.path", str(tmp_path / "c"))


def test_a_run_that_would_not_fit_in_memory_is_refused_before_it_starts(tmp_path, monkeypatch, capsys):
    from dmlp_plugin import memory
    from dmlp_plugin.cli import main

    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)  # 1 MiB left (digits need ~6 MiB)
    out = tmp_path / "run"
    code = main(["purify", str(ROOT / "configs" / "purify-digits.yaml"), "--out", str(out), "--no-progress",
                 "--set", "features.source=raw", "--set", f"features.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert "GiB more memory for" in err[-1] and "features.second_view=same" in err[-1]
