"""Peak memory of one phase of a benchmark (Linux): reset the high-water mark, read it back."""

from __future__ import annotations

from pathlib import Path


def reset_peak_memory() -> None:
    """Restart Linux's count of the peak resident set (VmHWM) from the current size."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return (
        int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]) / 1024**2
    )
