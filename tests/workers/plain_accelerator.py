"""Run by tests under ``torchrun --nproc_per_node 2`` on a CPU: a plain ``Accelerator()`` reports 1 process
while 2 run (accelerate 1.15.0); our guard must refuse it, and our own state must see 2."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402

from dmlp_plugin.distributed import check_world_size, current  # noqa: E402
from dmlp_plugin.errors import UserError  # noqa: E402

plain = Accelerator()
try:
    check_world_size(plain.num_processes, "a plain Accelerator()")
    print(f"GUARD MISSED: plain Accelerator() num_processes={plain.num_processes}", flush=True)
except UserError as e:
    print(f"refused: {e}", flush=True)

from dmlp_plugin.distributed import shutdown  # noqa: E402

shutdown()
