"""Python's cyclic garbage collector, kept out of the way of bulk work.

A save of many small files keeps hundreds of thousands of objects alive (the
tree's entries, the session's blob table) and allocates millions more: with the
default thresholds the collector ran ~1,400 times over a 100,000-file save and
traversed the live ones again and again, 3.5 s of CPU (13%), all of it holding
the GIL. Almost nothing in that work makes reference cycles (they are freed by
reference counting), so the objects alive at the start are frozen out of the
collector's sight and young collections run far less often; it still runs, so
the few cycles trio makes are collected.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from .tuning import SAVE_GC_YOUNG


@contextmanager
def quiet_gc() -> Iterator[None]:
    """Within: objects alive at entry are left alone, young collections are rare."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(SAVE_GC_YOUNG, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
