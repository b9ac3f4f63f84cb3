"""Memory accounting: parameter bytes of a network, and resident memory (RSS) of this process."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class RSSMonitor:
    """Samples RSS in a background thread: ``with RSSMonitor() as m: ...; m.peak``."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RSSMonitor:
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak = max(self.peak, current_rss())


def parameter_bytes(net: Any) -> dict[str, Any]:
    """Parameters of a network: count, bytes, and bytes per dtype (tied parameters counted once)."""
    total = count = 0
    by_dtype: dict[str, int] = {}
    for _, p in net.parameters_and_names():
        nbytes = int(p.size * p.itemsize)
        total += nbytes
        count += int(p.size)
        key = str(p.dtype)
        by_dtype[key] = by_dtype.get(key, 0) + nbytes
    return {"num_params": count, "bytes": total, "by_dtype": by_dtype}


def release_memory(collect: bool = True) -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; after a garbage collection unless
    ``collect=False``), so that RSS reflects what is really held: after a pass, and between its layers,
    where the temporaries of quantizing one layer would otherwise stay resident."""
    import gc

    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list = []


def _malloc_trim():
    if not _TRIM:
        import ctypes

        try:
            _TRIM.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # not glibc
            _TRIM.append(None)
    return _TRIM[0]
