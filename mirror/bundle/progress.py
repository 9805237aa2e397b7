"""A progress bar on a terminal; a plain line every 10% when the output is not one."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from mirror.cache.inventory import human_size

BAR = 30


class Progress:
    """Bytes done of a known total, drawn at most a few times a second."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 quiet: bool = False) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._quiet = quiet
        self._began = time.monotonic()
        self._drawn = 0.0
        self._decile = -1

    def set(self, done: int) -> None:
        """Record ``done`` bytes so far."""
        self.done = done
        if self._quiet:
            return
        if self._tty:
            now = time.monotonic()
            if now - self._drawn >= 0.2 or done >= self.total:
                self._drawn = now
                self._stream.write("\r" + self._line())
                self._stream.flush()
            return
        decile = min(done * 10 // self.total, 10)
        if decile > self._decile:
            self._decile = decile
            self._stream.write(self._line() + "\n")
            self._stream.flush()

    def _line(self) -> str:
        share = min(self.done / self.total, 1.0)
        seconds = max(time.monotonic() - self._began, 1e-6)
        bar = "#" * int(share * BAR) + "-" * (BAR - int(share * BAR))
        return (f"{self.label} [{bar}] {share:4.0%} {human_size(self.done)} of "
                f"{human_size(self.total)}, {human_size(int(self.done / seconds))}/s")

    def finish(self) -> None:
        """End the bar's line on a terminal."""
        if self._tty and not self._quiet:
            self.set(self.total)
            self._stream.write("\n")
            self._stream.flush()
