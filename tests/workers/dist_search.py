"""Run by tests under ``torchrun --nproc_per_node P``: neighbour searches (exact and an IVF index, a
self-search and one with separate queries) and a DMLP purification whose neighbour readout uses the IVF
index; process 0 saves every result to the .npz path given, each process its world size beside it."""

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dmlp_plugin.checks import index as ix  # noqa: E402
from dmlp_plugin.checks import knn  # noqa: E402
from dmlp_plugin.distributed import current  # noqa: E402
from dmlp_plugin.purifier.dmlp import DMLPConfig, purify  # noqa: E402

IVF = ix.IndexSettings(kind="ivf", nlist=40, nprobe=10, recall_sample=200)
CFG = DMLPConfig(epochs=4, batch_size=1000, eac_period=2, eac_batch_size=300, neighbour_ks=(0, 10, 30))


def problem():
    """Points on a 4-d curved surface in 24 dims (low intrinsic dimension, like learned features): an odd N
    so the shards are unequal; labels from the surface's coordinates; 80% symmetric noise."""
    rng = np.random.default_rng(0)
    n = 3001
    z = rng.uniform(-1, 1, (n, 4)).astype(np.float32)
    a = rng.standard_normal((4, 24)).astype(np.float32)
    x = np.tanh(z @ a) + 0.02 * rng.standard_normal((n, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (np.digitize(z[:, 0], [-0.5, 0, 0.5]) * 2 + (z[:, 1] > 0)).astype(np.int64)
    noisy = np.where(rng.random(n) < 0.8, rng.integers(0, 8, n), y)
    meta = np.sort(rng.choice(n, 80, replace=False))
    return x, y, noisy, meta


def searches(x: np.ndarray) -> dict:
    out = {}
    q = x[::7][:300] * 0.9 + 0.1 * x[1::7][:300]
    for name, settings in (("exact", ix.IndexSettings(kind="exact")), ("ivf", IVF)):
        with ix.using(settings):
            out[f"{name}_self_s"], out[f"{name}_self_i"] = knn.search(x, 15)
            out[f"{name}_q_s"], out[f"{name}_q_i"] = knn.search(x, 9, queries=q, exclude_self=False)
    return out


def main(out: str) -> None:
    torch.set_num_threads(1)
    x, y, noisy, meta = problem()
    dist = current("cpu")
    found = searches(x)
    with ix.using(IVF):
        res = purify([x], noisy, meta, y[meta], 8, CFG, progress=False)
    Path(f"{out}.rank{dist.rank}").write_text(str(dist.world_size))
    if dist.is_main:
        np.savez(out, hard=res.hard, soft=res.soft, **found)


if __name__ == "__main__":
    main(sys.argv[1])
