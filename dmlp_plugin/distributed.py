"""Processes launched by ``accelerate launch`` or ``torchrun``: who am I, which rows are mine, and sums over all.

The purifier shards the rows of the features over the processes (process r holds rows
``[n * r // P, n * (r + 1) // P)``) and all-reduces the sufficient statistics of its closed form, so P processes
compute what one computes (up to the order of float additions). ``Dist()`` is the single-process case: no
communication at all.

A trap we guard against (measured with accelerate 1.15.0): under ``torchrun --nproc_per_node 2`` (or
``accelerate launch --multi_gpu --num_processes 2``) on a machine without a GPU, a plain ``Accelerator()``
reports "process 0 of 1" in BOTH processes while a 2-process group exists, so each process would purify all
rows and the shards and reductions would be silently wrong. :func:`current` creates the state with
``cpu=True`` when the device is the CPU, and :func:`check_world_size` refuses any state whose process count
differs from the launcher's ``WORLD_SIZE``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dmlp_plugin.errors import UserError


def launcher_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun or "
                        f"accelerate launch, which set it") from None


def launcher_rank() -> int:
    """This process's rank in the launch (``RANK``; 0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def check_world_size(num_processes: int, what: str = "accelerate state") -> None:
    """Fail loudly when a process count disagrees with the launcher's (the plain-``Accelerator()`` trap)."""
    want = launcher_world_size()
    if num_processes != want:
        raise UserError(f"{what} reports {num_processes} process(es) but the launcher started {want} "
                        f"(WORLD_SIZE={want}); on a machine without a GPU create Accelerator(cpu=True) (or set "
                        f"ACCELERATE_USE_CPU=1), else every process would work on all the data")


@dataclass(frozen=True)
class Dist:
    """Rank and world size of this process, with the few collectives the purifier needs."""

    rank: int = 0
    world_size: int = 1

    def block(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """Rows [lo, hi) of n that process ``rank`` (default: this one) holds."""
        r = self.rank if rank is None else rank
        return n * r // self.world_size, n * (r + 1) // self.world_size

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over all processes (returns t)."""
        if self.world_size > 1:
            _in_place(t, torch.distributed.all_reduce)
        return t

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """In place: every process gets process ``src``'s t (returns t)."""
        if self.world_size > 1:
            _in_place(t, lambda c: torch.distributed.broadcast(c, src=src))
        return t

    def gather_blocks(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every process's block of rows (``block``), concatenated in row order: (n, ...) on every process."""
        if self.world_size == 1:
            return local
        sizes = [hi - lo for lo, hi in (self.block(n, r) for r in range(self.world_size))]
        width = max(sizes)
        pad = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
        pad[: local.shape[0]] = local
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, pad)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _in_place(t: torch.Tensor, collective) -> None:
    """Run a collective on t's values in row-major order. gloo sends a tensor's storage as laid out, so a
    column-major tensor (what torch.cholesky_solve returns) would arrive transposed in a row-major one."""
    if t.is_contiguous():
        collective(t)
    else:
        c = t.contiguous()
        collective(c)
        t.copy_(c)


def current(device: str = "cpu") -> Dist:
    """This process's place in the launch: ``Dist()`` without a launcher; else accelerate's process state,
    created for the CPU (gloo) when ``device`` is the CPU and checked against ``WORLD_SIZE``."""
    if launcher_world_size() == 1:
        return Dist()
    from accelerate import PartialState  # noqa: PLC0415 - only under a launcher

    state = PartialState(cpu=str(device).startswith("cpu"))
    check_world_size(state.num_processes, "accelerate's process state")
    return Dist(rank=state.process_index, world_size=state.num_processes)


def shutdown() -> None:
    """End this process's part in a launch cleanly (all processes meet, then the group is destroyed): a
    process that exits with the group alive can abort ("terminate called without an active exception")."""
    import torch.distributed as td  # noqa: PLC0415

    if td.is_available() and td.is_initialized():
        try:
            td.barrier()
        finally:
            td.destroy_process_group()
