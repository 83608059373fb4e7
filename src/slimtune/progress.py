"""Progress bars: one policy for every loop that shows one (training, bench cells, ...).

On a terminal (the bar's stream is a TTY, or a Jupyter kernel) this is tqdm's redrawing bar.
Anywhere else (a pipe, a file, a CI log) a redrawing bar would write hundreds of ``\\r`` frames,
so :func:`progress` returns a :class:`LineProgress` instead: a plain line when the loop starts,
then every ``every`` units (default: about 20 lines per loop) or every ``seconds`` (default 30 s,
for slow loops), and once at the end::

    train lora: 40/270 steps (15%)  loss 0.5120  lr 9.80e-04  epoch 1  1.9 step/s  eta 2:01

Both have the same small interface: iterate, ``update(n)``, ``set_postfix(**kw)``,
``set_postfix_str(s)``, ``close()`` (also as a context manager). Messages between updates go
through :func:`write` (``tqdm.write``: it keeps a terminal bar intact; in a log it is a print).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

#: Without an explicit ``every``, a non-terminal loop logs about this many lines.
LINES_PER_LOOP = 20
#: ... and at least one line this often (seconds) while the loop moves.
SECONDS_BETWEEN_LINES = 30.0


def is_terminal(stream: IO[str] | None) -> bool:
    """True when ``stream`` is shown live: a TTY, or a notebook (where tqdm draws a widget)."""
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return _in_notebook()


def _in_notebook() -> bool:
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    file: IO[str] | None = None,
    every: int | None = None,
    seconds: float = SECONDS_BETWEEN_LINES,
):
    """A progress bar over ``iterable`` (or ``total`` units updated by hand) on ``file``
    (default ``sys.stderr``): tqdm on a terminal, a :class:`LineProgress` otherwise, nothing
    with ``disable``."""
    stream = file if file is not None else sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if disable or is_terminal(stream):
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=stream, every=every, seconds=seconds)


def write(message: str, file: IO[str] | None = None) -> None:
    """Print a message without breaking a terminal bar (a plain print in a log)."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=file)
    _flush(file if file is not None else sys.stdout)


def _flush(stream: IO[str] | None) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (AttributeError, ValueError, OSError):
        pass


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


class LineProgress:
    """Plain progress lines for logs and pipes (see the module docstring)."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        file: IO[str] | None = None,
        every: int | None = None,
        seconds: float = SECONDS_BETWEEN_LINES,
        clock=time.monotonic,
    ):
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = self.initial = initial
        self.file = file
        remaining = (total - initial) if total else 0
        if every is None:
            every = max(1, math.ceil(remaining / LINES_PER_LOOP)) if remaining > 0 else 100
        self.every = max(1, every)
        self.seconds = seconds
        self.postfix = ""
        self.closed = False
        self._clock = clock
        self._started = self._last_time = clock()
        self._last_n = initial
        self._emit()

    # -- the tqdm-like interface --------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate (give an iterable, or call update())")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if self.n - self._last_n >= self.every or (now - self._last_time >= self.seconds and self.n > self._last_n):
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = "  ".join(f"{key} {value}" for key, value in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n != self._last_n:
            self._emit(final=True)

    # -- the line -----------------------------------------------------------------------------
    def line(self, now: float | None = None, final: bool = False) -> str:
        now = self._clock() if now is None else now
        unit = self.unit
        units = unit if unit.endswith("s") or unit == "it" else unit + "s"
        parts = [f"{self.n}/{self.total} {units}" if self.total else f"{self.n} {units}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if self.postfix:
            parts.append(self.postfix)
        elapsed, done = now - self._started, self.n - self.initial
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{_number(rate)} {unit}/s" if rate >= 1 else f"{_number(1 / rate)} s/{unit}")
            if self.total and self.n < self.total and not final:
                parts.append(f"eta {_clock((self.total - self.n) / rate)}")
            else:
                parts.append(f"took {_clock(elapsed)}")
        return (f"{self.desc}: " if self.desc else "") + "  ".join(parts)

    def _emit(self, now: float | None = None, final: bool = False) -> None:
        now = self._clock() if now is None else now
        stream = self.file if self.file is not None else sys.stderr
        if stream is not sys.stdout:  # messages printed before this line (tqdm.write) come first in a merged log
            _flush(sys.stdout)
        print(self.line(now, final), file=stream, flush=True)
        self._last_n, self._last_time = self.n, now
