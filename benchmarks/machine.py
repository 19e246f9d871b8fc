"""What the machine was and how busy it was: CPU, memory, versions, load average, other processes' CPU."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

_PACKAGES = ("embedding-bridge", "numpy", "onnx", "onnxruntime", "torch", "tensorflow-cpu", "tensorflow",
             "keras", "gensim", "matplotlib")
_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
        "TF_NUM_INTEROP_THREADS", "OMP_WAIT_POLICY")


def machine_info() -> dict[str, Any]:
    """CPU model and count, memory, OS, Python and package versions, threading environment."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _memory_bytes(),
        "versions": _versions(),
        "env": {k: os.environ[k] for k in _ENV if k in os.environ},
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _busy_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = float(os.sysconf("SC_CLK_TCK"))
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])
    return (total - idle) / hz, total / hz


@dataclass
class CpuMonitor:
    """How many cores were busy during a stretch of the run, split into this process and the others.

    ``other_cores`` near 0 means the machine was quiet; 1.0 on a 2-core machine means another process
    kept one core busy on average, so multi-threaded figures (and, to a lesser extent, all figures) are
    pessimistic.
    """

    start_wall: float = field(default_factory=time.perf_counter)
    start_self: float = field(default_factory=lambda: _self_cpu())
    start_busy: tuple[float, float] | None = field(default_factory=_busy_jiffies)
    start_load: list[float] | None = field(default_factory=load_average)

    def report(self) -> dict[str, Any]:
        """Figures since this monitor was created."""
        wall = max(time.perf_counter() - self.start_wall, 1e-9)
        own = (_self_cpu() - self.start_self) / wall
        busy_now = _busy_jiffies()
        total_busy = None
        if busy_now is not None and self.start_busy is not None:
            total_busy = (busy_now[0] - self.start_busy[0]) / wall
        return {
            "wall_s": round(wall, 3),
            "load_average_start": self.start_load,
            "load_average_end": load_average(),
            "busy_cores": None if total_busy is None else round(total_busy, 3),
            "self_cores": round(own, 3),
            "other_cores": None if total_busy is None else round(max(0.0, total_busy - own), 3),
        }


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system
