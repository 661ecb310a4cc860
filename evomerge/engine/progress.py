"""Progress for long work: a live bar on a terminal, whole lines in a log.

tqdm redraws its bar with carriage returns, which a log file keeps as one
ever longer line. When the output is not a terminal, :func:`progress_bar`
gives a bar that writes a plain line when it starts, at most one every
``LINE_EVERY_S`` seconds while it runs, and one when it ends.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

LINE_EVERY_S = 30.0


class LineProgress(tqdm):
    """A tqdm that prints each update as its own line, never a carriage return."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("mininterval", LINE_EVERY_S)
        kwargs.update(dynamic_ncols=False, ncols=0)  # stats only, no bar drawn
        self._shown: tuple[Any, ...] | None = None
        self._line_at: float | None = None
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None, final: bool = False) -> None:
        if msg == "":
            return  # tqdm clearing the line
        shown = (self.n, self.total, self.postfix)
        if shown == self._shown:
            return  # a refresh with nothing new
        now = time.monotonic()
        if not final and self._line_at is not None and now - self._line_at < self.mininterval:
            return  # a postfix or refresh between lines
        self._shown, self._line_at = shown, now
        self.fp.write((msg or self.format_meter(**self.format_dict)).strip() + "\n")
        self.fp.flush()

    def close(self) -> None:
        if not self.disable:
            self.display(final=True)  # the last line (unless it was just shown), kept bars or not
            self.leave = False  # tqdm would end a kept bar with a newline of its own
        super().close()

    def clear(self, nolock: bool = False) -> None:
        pass  # nothing on the line to clear

    def moveto(self, n: int) -> None:
        pass  # lines are never revisited


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (a closed or odd stream is not)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(*, enabled: bool = True, stream: TextIO | None = None, **kwargs: Any) -> tqdm:
    """A progress bar over ``kwargs`` (tqdm's: total, desc, unit, ...): off
    unless ``enabled``, live on a terminal, whole lines otherwise."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return tqdm(disable=True, **kwargs)
    if is_terminal(stream):
        from tqdm.auto import tqdm as live

        return live(file=stream, dynamic_ncols=True, **kwargs)
    return LineProgress(file=stream, **kwargs)


__all__ = ["LINE_EVERY_S", "LineProgress", "is_terminal", "progress_bar"]
