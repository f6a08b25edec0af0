"""Run by tests under ``torchrun --nproc_per_node P``: purify synthetic clusters sharded over P processes and
save process 0's result (hard, soft) to the path given. Also reports what each process saw."""

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.synthetic import clustered_features, symmetric_noise  # noqa: E402
from dmlp_plugin.distributed import current  # noqa: E402
from dmlp_plugin.purifier.dmlp import DMLPConfig, purify  # noqa: E402


def problem():
    x, y = clustered_features(3001, 32, 10, spread=1.2, seed=0, modes_per_class=2)  # odd N: unequal shards
    noisy = symmetric_noise(y, 0.8, 10, seed=1)
    meta = np.random.default_rng(2).choice(len(y), 60, replace=False)
    return x, y, noisy, meta


CFG = DMLPConfig(epochs=6, batch_size=1000, eac_period=3, eac_batch_size=300)


def main(out: str) -> None:
    torch.set_num_threads(1)
    x, y, noisy, meta = problem()
    dist = current("cpu")
    res = purify([x], noisy, meta, y[meta], 10, CFG, truth=y, progress=False)
    if dist.is_main:
        np.savez(out, hard=res.hard, soft=res.soft)
        Path(out + ".json").write_text(json.dumps({"world_size": dist.world_size,
                                                   "history": res.history[-1]}))


if __name__ == "__main__":
    main(sys.argv[1])
    from dmlp_plugin.distributed import shutdown

    shutdown()
