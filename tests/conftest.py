import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ helpers (synthetic data) are importable in tests
    sys.path.insert(0, str(ROOT))

# Two intra-op threads on the 2-core CI machine. On a machine shared with other jobs, set
# DMLP_TEST_THREADS=1: OpenMP threads competing for busy cores made tiny training runs ~25x slower.
THREADS = int(os.environ.get("DMLP_TEST_THREADS", "2"))
# (`threads: auto` follows OMP_NUM_THREADS when it is set: runs made in these tests use THREADS too)
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(THREADS)
    yield
