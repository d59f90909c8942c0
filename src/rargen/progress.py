"""Progress reports: a tqdm bar on a terminal, plain periodic lines in a log file.

A tqdm bar redraws itself with carriage returns; written to a file or a pipe it left 55 KB of
redraws for 500 training steps. Every long command decides here (``on_terminal``) and, where it
has no log lines of its own, reports through ``progress_bar``: on a terminal a tqdm bar, otherwise
one line every ``every_seconds`` (and at the end) saying how far it is.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

# Seconds between two plain progress lines (the first comes after this long, the last at the end).
PLAIN_EVERY_SECONDS = 30.0


def on_terminal() -> bool:
    """Whether stderr is a terminal: the one test of whether a progress bar may redraw itself."""
    return sys.stderr.isatty()


class PlainProgress:
    """The part of tqdm's interface rargen uses (iterate, ``update``, ``set_postfix``, ``close``,
    ``disable``), reporting by whole lines on stderr: ``desc: 40/100 (40%), 12.3 s, 3.3 it/s``."""

    disable = True  # no bar is drawn: callers that print their own log lines do so

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        every_seconds: float = PLAIN_EVERY_SECONDS,
        enabled: bool = True,
    ) -> None:
        self.iterable, self.desc, self.unit, self.enabled = iterable, desc, unit, enabled
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.every, self.postfix = total, initial, every_seconds, ""
        self.began = self.last = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line()

    def _line(self) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.began
        done = f"{self.n}/{self.total} ({self.n / self.total:.0%})" if self.total else f"{self.n}"
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}, {elapsed:.1f} s{rate}{postfix}", file=sys.stderr, flush=True)


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    **tqdm_options: Any,
) -> Any:
    """A tqdm bar on a terminal; plain lines every ``PLAIN_EVERY_SECONDS`` otherwise; silent when
    ``enabled`` is False. Use it as tqdm (iterate it, or ``update`` it inside a ``with``)."""
    if enabled and on_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, **tqdm_options)
    initial = int(tqdm_options.get("initial", 0))
    return PlainProgress(iterable, total, desc, unit, initial, enabled=enabled)


_NOTICES_SHOWN: set[str] = set()


def notice_once(text: str, file: Any = None) -> None:
    """Print ``text`` (to stdout, or ``file``) the first time this process gives it: a sweep samples
    one folder per setting, and each printed the same note about its grid."""
    if text not in _NOTICES_SHOWN:
        _NOTICES_SHOWN.add(text)
        print(text, file=file or sys.stdout, flush=True)
