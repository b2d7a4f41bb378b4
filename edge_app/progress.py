"""A progress bar on stderr for long headless runs, drawn only on a terminal (no tqdm on the device)."""
from __future__ import annotations

import sys
import time

WIDTH = 30


def progress(items, label: str, stream=None):
    """Yields `items`, drawing `label [####......] i/n  elapsed` on `stream` (stderr) as it goes;
    nothing is drawn when the stream is not a terminal or there are fewer than two items."""
    items = list(items)
    stream = sys.stderr if stream is None else stream
    if len(items) < 2 or not stream.isatty():
        yield from items
        return
    start = time.monotonic()
    for i, item in enumerate(items):
        _draw(stream, label, i, len(items), start)
        yield item
    _draw(stream, label, len(items), len(items), start)
    stream.write("\n")


def _draw(stream, label: str, done: int, total: int, start: float) -> None:
    filled = WIDTH * done // total
    stream.write(f"\r{label} [{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total}"
                 f"  {time.monotonic() - start:.0f} s")
    stream.flush()
