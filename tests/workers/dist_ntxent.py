"""Run by tests under ``torchrun --nproc_per_node 2``: the gradient of the whole-batch NT-Xent loss, computed
data-parallel as train_simclr does (each process embeds its half, embeddings all-gathered, loss x P, DDP
averages), must equal the one-process gradient. Prints the largest difference."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from dmlp_plugin.distributed import current  # noqa: E402
from dmlp_plugin.features.ssl import _gather_keep_grad, nt_xent  # noqa: E402

dist = current("cpu")
g = torch.Generator().manual_seed(0)
a, b = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)  # two views of 16 images
lin = torch.nn.Linear(8, 4)
with torch.no_grad():
    lin.weight.copy_(torch.randn(4, 8, generator=g))
    lin.bias.copy_(torch.randn(4, generator=g))
ref = torch.nn.Linear(8, 4)
ref.load_state_dict(lin.state_dict())
nt_xent(ref(a), ref(b), 0.5).backward()

ddp = torch.nn.parallel.DistributedDataParallel(lin)
lo, hi = dist.rank * 16 // dist.world_size, (dist.rank + 1) * 16 // dist.world_size
z1 = _gather_keep_grad(ddp(a[lo:hi]), dist)
z2 = _gather_keep_grad(ddp(b[lo:hi]), dist)
(nt_xent(z1, z2, 0.5) * dist.world_size).backward()
diff = max(float((p.grad - q.grad).abs().max()) for p, q in zip(lin.parameters(), ref.parameters()))
scale = max(float(q.grad.abs().max()) for q in ref.parameters())
print(f"rank {dist.rank} max grad diff {diff:.3e} of {scale:.3e}", flush=True)

from dmlp_plugin.distributed import shutdown  # noqa: E402

del ddp, z1, z2  # DDP's reducer must go before the process group (else gloo can abort at exit)
shutdown()
