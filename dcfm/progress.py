"""Progress for long commands: a live bar on an interactive terminal, nothing extra in logs and CI.

The bar redraws one line of stderr in place (chunks, frames, frames/s, ETA) at most a few times a second
and only when stderr is a TTY; the commands' own log lines stay exactly as they are, so logs and tests
that read them see no difference. Work done in Ray workers (training steps) reaches the driver's bar
through a small actor (``RemoteProgress`` / ``tell_progress``).
"""

from __future__ import annotations

import hashlib
import sys
import threading
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


def _counter_name(run: str) -> str:
    return "dcfm-progress-" + hashlib.sha256(run.encode()).hexdigest()[:16]


class RemoteProgress:
    """A bar on the driver for work that runs in Ray workers (training): workers call ``tell_progress``.

    Only when the driver's stderr is a terminal does it start anything: a zero-CPU Ray actor holding the
    latest count, and a thread that draws the bar from it.
    """

    def __init__(self, run: str, label: str, total: int, unit: str, stream: TextIO | None = None) -> None:
        self.bar = ProgressBar(label, total, unit, stream)
        self._actor = None
        self._stop = threading.Event()
        if not self.bar.enabled:
            return
        import ray

        @ray.remote(num_cpus=0)
        class Counter:
            def __init__(self) -> None:
                self.value = 0

            def set(self, value: int) -> None:
                self.value = value

            def get(self) -> int:
                return self.value

        self._actor = Counter.options(name=_counter_name(run)).remote()
        self._thread = threading.Thread(target=self._draw, args=(ray,), daemon=True)
        self._thread.start()

    def _draw(self, ray) -> None:
        while not self._stop.wait(_REDRAW_S * 2):
            try:
                self.bar.update(ray.get(self._actor.get.remote(), timeout=5))
            except Exception:  # a bar must never take the job down
                return

    def close(self) -> None:
        if self._actor is None:
            return
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        self.bar.close()
        ray.kill(self._actor)
        self._actor = None


_counters: dict[str, object] = {}


def tell_progress(run: str, done: int) -> None:
    """From a Ray worker: report ``done`` to the driver's bar of ``run``; nothing happens if none listens."""
    if run not in _counters:
        import ray

        _counters[run] = None
        # Outside Ray (train_locally) there is no driver to tell, and ray.get_actor would start a local Ray.
        if ray.is_initialized():
            try:
                _counters[run] = ray.get_actor(_counter_name(run))
            except Exception:  # ValueError: no terminal on the driver, so no counter; a bar never stops training
                pass
    counter = _counters[run]
    if counter is not None:
        counter.set.remote(done)
