"""Python's cyclic garbage collector, kept out of the way of bulk work (a
save, a mount's serving).

A save of many small files keeps hundreds of thousands of objects alive (the
tree's entries, the session's blob table) and allocates millions more: with the
default thresholds the collector ran ~1,400 times over a 100,000-file save and
traversed the live ones again and again, 3.5 s of CPU (13%), all of it holding
the GIL. Almost nothing in that work makes reference cycles (they are freed by
reference counting), so the objects alive at the start are frozen out of the
collector's sight and young collections run far less often; it still runs, so
the few cycles trio makes are collected. A mount daemon holds a node for every
entry the kernel knows and allocates a few objects per request: at the default
rates the collector took 2.9 s of a 100,000-file `find` (0.6 s quieted).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_gc(thresholds: tuple[int, int, int]) -> Iterator[None]:
    """Within: objects alive at entry are left alone, collections run at these
    thresholds (tuning.py), young ones rarely."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*thresholds)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
