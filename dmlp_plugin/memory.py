"""Peak memory of a run's stages (Linux): the process's resident-set high-water mark, reset at a stage's start
(``/proc/self/clear_refs``), read at its end, and how much of it was not file pages (memory-mapped features
count as file pages: ``VmHWM - RssFile``, an estimate of the stage's own memory beyond the mapped features).
Elsewhere (no /proc) every figure is None."""

from __future__ import annotations

import contextlib
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status() -> dict[str, int]:
    out = {}
    try:
        for line in _STATUS.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) // 1024  # kB -> MiB
    except (OSError, ValueError, IndexError):
        return {}
    return out


def reset_peak() -> bool:
    """Start a new high-water mark at the current resident set; False where the kernel does not allow it."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def peak() -> dict:
    """{"peak_mib", "beyond_mapped_mib"} since the last :func:`reset_peak` (or the process start)."""
    s = _status()
    if "VmHWM" not in s:
        return {"peak_mib": None, "beyond_mapped_mib": None}
    return {"peak_mib": s["VmHWM"], "beyond_mapped_mib": max(0, s["VmHWM"] - s.get("RssFile", 0))}


@contextlib.contextmanager
def stage(peaks: dict, name: str):
    """Record the stage's peak memory into ``peaks[name]`` (a stage run twice keeps its larger peak)."""
    reset_peak()
    try:
        yield
    finally:
        got = peak()
        old = peaks.get(name)
        if old is None or (got["peak_mib"] or 0) > (old["peak_mib"] or 0):
            peaks[name] = got


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, or the cgroup's limit minus its use when lower."""
    out = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                out = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            out = min(out if out is not None else int(limit), int(limit) - used)
    except (OSError, ValueError):
        pass
    return out
