"""A progress bar on stderr when it is a terminal; nothing otherwise."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def progress_bar(label: str, poll: Callable[[], tuple[float, float, str]],
                       enabled: bool = True) -> AsyncIterator[None]:
    """poll() -> (done, total, detail); refreshed a few times per second."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    # imported here: rich takes a while to load and scripts never need it
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task("", total=None)

    async def refresh() -> None:
        while True:
            done, total, detail = poll()
            progress.update(task, completed=done, total=total or None, description=detail)
            await trio.sleep(0.2)

    with progress:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
