"""Run by tests: the `dmlp` command line (``sys.argv[1:]``), which SIGKILLs its own process (kill -9: no
cleanup, no ``finally``) right after a checkpoint is written. ``KILL_AT=ssl:k`` dies once SimCLR's checkpoint
of epoch k (1-based) is on disk, ``KILL_AT=purify:k`` once the purifier's checkpoint of epoch k is,
``KILL_AT=train:k`` once a baseline's k-th checkpoint is (in `dmlp bench`). Under a launcher every process waits
for the others first, so process 0's checkpoint write is complete; SimCLR trains in process 0 alone (the others
wait for its features), so there process 0 dies alone and the launcher ends the others."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dmlp_plugin.cli import main  # noqa: E402
from dmlp_plugin.features import ssl  # noqa: E402
from dmlp_plugin.purifier import dmlp  # noqa: E402


def _die(barrier: bool = True):
    import torch.distributed as td  # noqa: PLC0415

    if barrier and td.is_available() and td.is_initialized():
        td.barrier()
    os.kill(os.getpid(), signal.SIGKILL)


def _die_after(module, name: str, hook: str, epoch: int, barrier: bool = True) -> None:
    """Replace ``module.name`` by a wrapper that passes a per-epoch callback ``hook(e, _)`` dying after epoch
    ``epoch`` (1-based; the callbacks run once the epoch's checkpoint is written)."""
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        kwargs[hook] = lambda e, _: _die(barrier) if e + 1 == epoch else None
        return fn(*args, **kwargs)

    setattr(module, name, wrapper)


def _arm(stage: str, epoch: int) -> None:
    if stage == "ssl":
        _die_after(ssl, "train_simclr", "on_epoch_end", epoch, barrier=False)
    elif stage == "purify":
        _die_after(dmlp, "purify", "on_epoch", epoch)
    elif stage == "train":
        from dmlp_plugin.registry import load_registry  # noqa: PLC0415

        saved = []
        for entry in load_registry().entries("methods"):
            module = sys.modules[load_registry().get("methods", entry.name).__module__]
            save = getattr(module, "save_checkpoint", None)
            if save is None or getattr(save, "armed", False):
                continue

            def save_then_die(accelerator, folder, meta, save=save):
                save(accelerator, folder, meta)
                saved.append(folder)
                if len(saved) == epoch:
                    _die()

            save_then_die.armed = True
            module.save_checkpoint = save_then_die
    else:
        raise SystemExit(f"KILL_AT stage {stage!r}: use ssl, purify or train")


if __name__ == "__main__":
    stage, _, k = os.environ["KILL_AT"].partition(":")
    _arm(stage, int(k))
    sys.exit(main(sys.argv[1:]))
