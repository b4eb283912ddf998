"""Peak resident memory per benchmark phase.

Linux: writing "5" to /proc/self/clear_refs resets the process's peak-RSS high-water mark, which
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` then reports from that moment on. Elsewhere the reset
is unavailable and the number is the process-lifetime peak (``reset_ok`` says which).
"""

from __future__ import annotations

import resource
import sys


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def current_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")
