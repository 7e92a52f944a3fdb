"""Progress towards a run's budget, written to stderr.

On a terminal the bar is tqdm's, redrawn in place at most every ``tty_interval`` seconds.
Elsewhere (CI logs, files, pipes) a plain line is printed at the first update, then at most
every ``interval`` seconds, and once more at the end, so logs stay short and readable: the one
behaviour kept from before tqdm, since off a terminal tqdm still writes carriage-return redraws
(one long line in a log file). The run loop reports cumulative budget use (oracle calls,
seconds, steps: whichever limit is nearest), which :class:`Progress` turns into tqdm's
increments; on resume ``initial`` is the work of earlier sessions, which the rate (hence the
ETA) leaves out in both modes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from bilevel.problem import BilevelError

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS``; ``?`` when unknown (NaN or infinite)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _format_number(x: float) -> str:
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def _format_field(value: Any) -> str:
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        value = item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _count(x: float) -> float | int:
    """Whole counts as integers and fractional ones (minibatch oracle calls, seconds) to two
    decimals, so that tqdm shows ``4/10`` and ``12.5/60``."""
    return int(x) if float(x).is_integer() else round(float(x), 2)


def _postfix(fields: dict[str, Any]) -> dict[str, str]:
    return {k: _format_field(v) for k, v in fields.items()}


class Progress:
    """Progress towards a budget of ``total`` units (oracle calls, epochs, seconds, ...).

    ``update(done, **fields)`` reports the units done so far (cumulative, not an increment)
    and optional named values shown after the bar (e.g. ``loss=0.012, cost=4500``); fields
    persist until replaced. ``initial`` is the amount already done when the bar starts (on
    resume): the rate, hence the ETA, counts only the work done since. ``enabled=False``
    prints nothing. Use as a context manager, or call :meth:`close` at the end. On a terminal
    (``tty``, default: whether the stream is one) tqdm draws the bar; ``clock`` and
    ``interval`` rule the plain lines written elsewhere.
    """

    def __init__(
        self,
        total: float,
        *,
        unit: str = "",
        description: str = "",
        initial: float = 0.0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 5.0,
        tty_interval: float = 0.1,
        width: int = 20,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        total = float(total)
        if not (math.isfinite(total) and total > 0):
            raise BilevelError(f"progress total must be finite and positive, got {total!r}")
        self.total = total
        self.unit = unit
        self.description = description
        self.initial = float(initial)
        self.done = self.initial
        self.enabled = bool(enabled)
        self.interval = float(interval)
        self.tty_interval = float(tty_interval)
        self.width = int(width)
        self.fields: dict[str, Any] = {}
        self._stream = stream
        self._tty = tty
        self._clock = clock
        self._start = clock()
        self._last_print: float | None = None
        self._printed_state: tuple | None = None
        self._closed = False
        self._tqdm: Any = None
        if self.enabled and self.is_tty:
            from tqdm import tqdm

            self._tqdm = tqdm(
                total=_count(total),
                initial=_count(self.initial),
                desc=description or None,
                unit=f" {unit}" if unit else "it",
                file=self.stream,
                mininterval=self.tty_interval,
                smoothing=0.0,  # the mean rate since the start, as off a terminal
                dynamic_ncols=True,
                leave=True,
            )

    # output target

    @property
    def stream(self) -> TextIO:
        """The stream written to (``sys.stderr`` at the time of writing unless given)."""
        return self._stream if self._stream is not None else sys.stderr

    @property
    def is_tty(self) -> bool:
        """Whether the bar is redrawn in place."""
        if self._tty is not None:
            return self._tty
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    # state

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return self._clock() - self._start

    @property
    def fraction(self) -> float:
        """Fraction of the budget done, in [0, 1]."""
        return min(max(self.done / self.total, 0.0), 1.0)

    @property
    def eta(self) -> float:
        """Estimated seconds left at the mean rate since the start (NaN while unknown)."""
        progress = self.done - self.initial
        if self.done >= self.total:
            return 0.0
        elapsed = self.elapsed
        if progress <= 0 or elapsed <= 0:
            return math.nan
        return (self.total - self.done) * elapsed / progress

    def format(self) -> str:
        """The current progress line, without line ending."""
        frac = self.fraction
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        unit = f" {self.unit}" if self.unit else ""
        head = f"{self.description}: " if self.description else ""
        line = (
            f"{head}{100 * frac:5.1f}% |{bar}| {_format_number(self.done)}/"
            f"{_format_number(self.total)}{unit} [{format_duration(self.elapsed)}"
            f"<{format_duration(self.eta)}]"
        )
        if self.fields:
            line += " " + " ".join(f"{k}={_format_field(v)}" for k, v in self.fields.items())
        return line

    # updates

    def update(self, done: float, **fields: Any) -> None:
        """Record ``done`` units in total so far and the given fields; redraw if it is time."""
        self.done = float(done)
        self.fields.update(fields)
        if not self.enabled or self._closed:
            return
        if self._tqdm is not None:
            if fields:
                self._tqdm.set_postfix(_postfix(self.fields), refresh=False)
            self._tqdm.update(_count(self.done) - self._tqdm.n)
            return
        now = self._clock()
        if self._last_print is None or now - self._last_print >= self.interval:
            self._emit(now)

    def write(self, message: str) -> None:
        """Print a message on its own line without garbling the bar."""
        if not self.enabled:
            return
        if self._tqdm is not None and not self._closed:
            self._tqdm.write(message.rstrip("\n"), file=self.stream)
            return
        self.stream.write(message.rstrip("\n") + "\n")
        self.stream.flush()

    def close(self, **fields: Any) -> None:
        """Print the final state (if not printed already) and end the line. Idempotent."""
        self.fields.update(fields)
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix(_postfix(self.fields), refresh=False)
            self._tqdm.update(_count(self.done) - self._tqdm.n)
            self._tqdm.close()
            return
        if self._state() != self._printed_state:
            self._emit(self._clock())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _state(self) -> tuple:
        return (self.done, tuple((k, repr(v)) for k, v in self.fields.items()))

    def _emit(self, now: float) -> None:
        stream = self.stream
        stream.write(self.format() + "\n")
        stream.flush()
        self._last_print = now
        self._printed_state = self._state()
