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

A second trap (measured with accelerate 1.15.0 on a machine without a GPU): ``accelerate launch --cpu
--num_processes 2`` (or ``--num_processes 2`` alone, or ``num_processes: 2`` in a ``--config_file`` or in the
default config under ``$HF_HOME/accelerate`` whose ``distributed_type`` is not ``MULTI_GPU``) starts ONE process
and tells it nothing of the 2: no ``WORLD_SIZE``, no process count in the environment. :func:`check_launch` reads
what the launch asked for from the launching process's command line (and the accelerate config it names or
finds, as accelerate does) and refuses a count the run does not see, in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from dmlp_plugin.errors import UserError


def launcher_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return launcher_world_size_of(os.environ)


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


_MPI_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _fix(n) -> str:
    return (f"launch with `accelerate launch --multi_gpu --num_processes {n} ...` or `torchrun --standalone "
            f"--nproc_per_node {n} -m dmlp_plugin ...` (both also work without a GPU), or ask for 1 process")


def accelerate_launch_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``launch`` when ``argv`` is an ``accelerate launch`` command line (``accelerate
    launch ...``, ``accelerate-launch ...``, ``python -m accelerate.commands.launch ...``), else None."""
    for i, tok in enumerate(argv[:4]):  # (the interpreter, the script or -m, the module, then `launch`)
        base = os.path.basename(tok)
        if base in ("accelerate", "accelerate.commands.accelerate_cli") and argv[i + 1:i + 2] == ["launch"]:
            return argv[i + 2:]
        if base == "accelerate-launch" or tok == "accelerate.commands.launch":
            return argv[i + 1:]
    return None


def _read_config(path: str) -> dict:
    """An accelerate config file (YAML or JSON) as a mapping; {} when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml  # noqa: PLC0415

            data = yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - missing or broken: accelerate itself reports that
        return {}
    return data if isinstance(data, dict) else {}


def _default_config_file(env) -> str:
    """accelerate's default config file, found as ``accelerate.commands.config.config_args`` finds it."""
    home = os.path.expanduser(env.get("HF_HOME", os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")))
    yaml_file = json_file = os.path.join(home, "accelerate", "default_config.yaml")  # (accelerate's own names)
    return yaml_file if os.path.isfile(yaml_file) or not os.path.isfile(json_file) else json_file


def launch_request(argv: list[str], env=None, cwd: str | None = None) -> dict | None:
    """What an ``accelerate launch`` command line asked for: ``num_processes`` and ``mixed_precision`` (None
    where it did not say) with where each came from (``--num_processes 2``, ``num_processes: 2 in f.yaml``),
    as accelerate resolves them: a flag wins over the config file (``--config_file``, else the default config
    under ``$HF_HOME/accelerate`` unless ``--cpu``). None when ``argv`` is not an accelerate launch or cannot be
    parsed. ``cwd``: where the launch ran (a relative ``--config_file`` is read from there)."""
    env = os.environ if env is None else env
    rest = accelerate_launch_args(argv)
    if rest is None:
        return None
    try:
        from accelerate.commands.launch import launch_command_parser  # noqa: PLC0415

        args = launch_command_parser().parse_args(rest)
    except (SystemExit, Exception):  # noqa: BLE001 - accelerate itself would have refused it
        return None
    config_file = args.config_file
    if config_file is None and not args.cpu and os.path.isfile(_default_config_file(env)):
        config_file = _default_config_file(env)
    config = {}
    if config_file is not None:
        config_file = os.path.join(cwd or os.getcwd(), os.path.expanduser(config_file))
        config = _read_config(config_file)
    out = {"num_processes": None, "num_processes_from": None, "mixed_precision": None, "mixed_precision_from": None,
           "config_file": config_file}
    for key in ("num_processes", "mixed_precision"):
        flag = getattr(args, key, None)
        if flag is not None:
            out[key], out[f"{key}_from"] = flag, f"--{key} {flag}"
        elif config.get(key) is not None:
            out[key], out[f"{key}_from"] = config[key], f"{key}: {config[key]} in {config_file}"
    if out["num_processes"] is not None:
        try:
            out["num_processes"] = int(out["num_processes"])
        except (TypeError, ValueError):
            out["num_processes"] = None
    if out["mixed_precision"] is not None:
        out["mixed_precision"] = str(out["mixed_precision"]).lower()
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().decode(errors="replace").split("\0")
    except OSError:
        return []
    return parts[:-1] if parts and parts[-1] == "" else parts


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


@lru_cache(maxsize=1)
def parent_launch() -> dict | None:
    """:func:`launch_request` of the process that started this one, when that is an ``accelerate launch``
    (read once per process from ``/proc``; None elsewhere, and without a launcher's ``ACCELERATE_*`` variables,
    so a plain run reads nothing)."""
    if not any(k.startswith("ACCELERATE_") for k in os.environ):
        return None
    ppid = os.getppid()
    return launch_request(_cmdline(ppid), os.environ, _cwd(ppid))


def check_launch(request: dict | None = None, env=None) -> None:
    """Refuse, in one line, a launch whose process count this run does not see: ``accelerate launch`` asked
    for N processes (flag, config file, default config) while ``WORLD_SIZE`` says otherwise (accelerate starts
    one process unless the launch is multi-GPU, even with ``--cpu --num_processes 2``), or an MPI launch of
    several processes (no ``WORLD_SIZE``: each would work on all the data). ``request``: default
    :func:`parent_launch`."""
    env = os.environ if env is None else env
    seen = launcher_world_size_of(env)
    request = parent_launch() if request is None else request
    if request and request.get("num_processes") is not None and max(1, request["num_processes"]) != seen:
        asked = request["num_processes"]
        started = "started ONE process" if seen == 1 else f"started {seen} (WORLD_SIZE={seen})"
        raise UserError(f"accelerate launch asked for {asked} processes ({request['num_processes_from']}) but "
                        f"{started}: it starts several only for a multi-GPU launch (--multi_gpu, or distributed_type: "
                        f"MULTI_GPU in its config), --cpu or not; {_fix(asked)}")
    if "WORLD_SIZE" not in env:
        for name in _MPI_SIZES:
            value = str(env.get(name, "")).strip()
            if value.isdigit() and int(value) > 1:
                raise UserError(f"this process is one of {value} started by MPI ({name}={value}) without "
                                f"WORLD_SIZE, so each would work on all the data; {_fix(value)}")


def launcher_world_size_of(env) -> int:
    """``WORLD_SIZE`` of ``env`` (1 when absent)."""
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError(f"WORLD_SIZE={env['WORLD_SIZE']!r} is not an integer; launch with torchrun or "
                        f"accelerate launch, which set it") from None


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
    created for the CPU (gloo) when ``device`` is the CPU and checked against ``WORLD_SIZE``. A launch whose
    process count this run does not see is refused first (:func:`check_launch`)."""
    check_launch()
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
