"""Process memory figures for reports and ``/diagnostics``."""
from __future__ import annotations

import resource
from pathlib import Path


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (from /proc; falls back to the peak RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
