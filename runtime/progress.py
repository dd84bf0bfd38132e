"""A progress display for work that can take seconds: building a plan (the first call of a
shape: kernels generated, compiled and autotuned, tables built) and ``Pattern.explain``.

``with progress("compiling ..."):`` shows nothing unless the work is still running after
:data:`DELAY` seconds and the display is on (``SPATTN_PROGRESS``, read by
:func:`spattn.runtime.settings.progress`): ``auto`` (the default) when stderr is a
terminal, ``1`` always, ``0`` never. On a terminal it is a transient rich spinner with the
elapsed time; elsewhere (forced on) two plain lines on stderr, when it starts showing and
when it ends. Either way a line with the total time is left when it ends. Only one display
runs at a time: a nested or concurrent long task shows nothing of its own.
"""
from __future__ import annotations

import sys
import threading
import time

from . import settings as _settings

__all__ = ["DELAY", "progress"]

#: Seconds of work before anything is shown.
DELAY = 1.5

_active = threading.Lock()        # held by the one display running


class progress:
    """Context manager: a progress display for ``text`` if the work takes long."""

    def __init__(self, text: str):
        self.text = text
        self._timer = None
        self._display = None
        self._shown = False
        self._owner = False
        self._lock = threading.Lock()

    def __enter__(self):
        mode = _settings.progress()
        stream = sys.stderr
        if mode is False or (mode is None and not _isatty(stream)):
            return self
        if not _active.acquire(blocking=False):
            return self                 # another display runs
        self._owner = True
        self._stream = stream
        self._t0 = time.perf_counter()
        if DELAY <= 0:
            self._show()
        else:
            self._timer = threading.Timer(DELAY, self._show)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _show(self):
        with self._lock:
            if self._shown is None:     # already finished
                return
            self._shown = True
            if _isatty(self._stream):
                try:
                    self._display = _spinner(self.text, self._stream)
                except ImportError:     # rich is not installed: plain lines
                    self._display = None
            if self._display is None:
                print(f"spattn: {self.text} ...", file=self._stream, flush=True)

    def __exit__(self, *exc):
        if not self._owner:
            return False
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            shown, self._shown = self._shown, None
            if self._display is not None:
                self._display.stop()
        if shown:
            what = "failed after" if exc[0] is not None else "done in"
            print(f"spattn: {self.text}: {what} {time.perf_counter() - self._t0:.1f} s",
                  file=self._stream, flush=True)
        _active.release()
        return False


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _spinner(text: str, stream):
    """A started transient rich progress line: spinner, text, elapsed time."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    display = Progress(SpinnerColumn(), TextColumn("spattn: {task.description}"),
                       TimeElapsedColumn(), console=Console(file=stream), transient=True)
    display.add_task(text, total=None)
    display.start()
    return display
