"""Run by tests under ``torchrun --nproc_per_node 2``: train a method (small preset, few epochs) on noisy
digits with a checkpoint folder; with KILL_AFTER_EPOCH=k every process SIGKILLs itself right after the
checkpoint of epoch k is written (a real kill -9 mid-run). Process 0 writes the result as JSON."""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from baselines import common  # noqa: E402
from baselines.common import TrainData  # noqa: E402
from dmlp_plugin.data.datasets import load_digits  # noqa: E402
from dmlp_plugin.data.noise import apply_noise  # noqa: E402
from dmlp_plugin.registry import load_registry  # noqa: E402


def main(method: str, epochs: int, checkpoint_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    kill_after = int(os.environ.get("KILL_AFTER_EPOCH", "0"))
    if kill_after:
        module = sys.modules[load_registry().get("methods", method).__module__]
        save = module.save_checkpoint
        seen = []

        def save_then_die(accelerator, folder, meta):
            save(accelerator, folder, meta)
            seen.append(1)
            if len(seen) == kill_after:
                accelerator.wait_for_everyone()
                os.kill(os.getpid(), signal.SIGKILL)

        module.save_checkpoint = save_then_die
    d = load_digits()
    x, y = d.train.images[:600], d.train.labels[:600]
    noisy = apply_noise(y, 10, kind="symmetric", rate=0.4, seed=0)
    data = TrainData(x, noisy.labels, d.test.images[:200], d.test.labels[:200], 10, noise_rate=noisy.flip_rate,
                     noise_rate_source="known")
    cls = load_registry().get("methods", method)
    result = cls.from_preset("small", epochs=epochs, batch_size=32).run(
        data, device="cpu", seed=0, progress=False, checkpoint_dir=checkpoint_dir)
    if os.environ.get("RANK", "0") == "0":
        Path(out).write_text(json.dumps({"test_accuracy": result.test_accuracy, "curve": result.curve,
                                         "info": {k: v for k, v in result.info.items()
                                                  if isinstance(v, (int, float, str, type(None)))}}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
    from dmlp_plugin.distributed import shutdown

    shutdown()
