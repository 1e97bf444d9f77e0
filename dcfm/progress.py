"""Progress for long commands: a live bar on an interactive terminal, nothing extra in logs and CI.

The bar redraws one line of stderr in place (chunks, frames, frames/s, ETA) at most a few times a second
and only when stderr is a TTY; the commands' own log lines stay exactly as they are, so logs and tests
that read them see no difference.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_REDRAW_S = 0.2
_WIDTH = 24


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """``update(done, ...)`` with ``done`` out of ``total`` units (frames, steps); ``close()`` at the end."""

    def __init__(self, label: str, total: int | None, unit: str = "frames", stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(self.stream.isatty()) if enabled is None else enabled
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn = False
        self.done = 0

    def update(self, done: int, extra: str | None = None, total: int | None = None) -> None:
        """Record progress (and a new ``total`` estimate); redraw if due. ``extra``: e.g. ``"812 frames"``."""
        self.done = done
        if total is not None:
            self.total = total
        now = time.perf_counter()
        if not self.enabled or now - self._last_draw < _REDRAW_S:
            return
        self._last_draw = now
        self.stream.write("\r" + self.line(now, extra) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def line(self, now: float | None = None, extra: str | None = None) -> str:
        """The text of the bar (without terminal control characters)."""
        elapsed = (now if now is not None else time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"[{self.label}]"]
        if self.total:
            share = min(1.0, self.done / self.total)
            filled = int(share * _WIDTH)
            parts.append("[" + "#" * filled + "-" * (_WIDTH - filled) + f"] {100 * share:3.0f}%")
        parts.append(f"{self.done}{'/' + str(self.total) if self.total else ''} {self.unit}")
        if extra:
            parts.append(extra)
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        return "  ".join(parts)

    def close(self) -> None:
        """End the bar's line so the next log line starts on a fresh one."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
