"""-p: qemu-img's progress line (and a richer one on a terminal)."""

from __future__ import annotations

import struct
import sys
import time
from _thread import allocate_lock  # (threading's Lock, without importing threading)

from qcow2lib.cli.common import Cli
from qcow2lib.sizes import format_size


def _f32(value: float) -> float:
    """Round to C's float: qemu-img keeps its progress in single precision."""
    return struct.unpack("f", struct.pack("f", value))[0]


class Progress:
    """QEMU's qemu-progress.c: "    (12.34/100%)\\r" on stdout, each time the value moved by
    more than min_skip percent (and at 0 and 100), a newline at the end. Disabled (no -p,
    or -q) it prints nothing.

    On a terminal, where nobody parses the line, it goes further: when the work is counted
    in bytes the line also shows bytes done of the total, the throughput and the time left,
    refreshed a few times a second. Piped output stays exactly qemu-img's."""

    REFRESH_SECONDS = 0.25

    def __init__(self, cli: Cli, enabled: bool, min_skip: float):
        self.cli = cli
        self.enabled = enabled
        self.min_skip = _f32(min_skip)
        self.current = 0.0
        self.last_print = 0.0
        self.lock = allocate_lock()
        self._last_done = -1
        self.terminal = enabled and _stdout_is_terminal()
        self._started = time.monotonic()
        self._bytes: tuple[int, int] | None = None  # (done, total) when counted in bytes
        self._last_refresh = 0.0

    def print(self, delta: float, maximum: int = 0) -> None:
        """qemu_progress_print(delta, max): absolute percent when max is 0, else a delta."""
        with self.lock:
            if maximum == 0:
                current = _f32(delta)
            else:
                current = _f32(self.current + _f32(_f32(_f32(delta) / 100) * maximum))
            if current > 100:
                current = 100.0
            self.current = current
            if (
                current > _f32(self.last_print + self.min_skip)
                or current < _f32(self.last_print - self.min_skip)
                or current == 100
                or current == 0
            ):
                self.last_print = current
                self._show(current)
            elif self.terminal and time.monotonic() - self._last_refresh >= self.REFRESH_SECONDS:
                self._show(current)

    def _show(self, percent: float) -> None:
        if not self.enabled:
            return
        line = "    (%3.2f/100%%)" % percent
        if self.terminal:
            self._last_refresh = time.monotonic()
            line += self._details() + "\x1b[K"  # erase what a longer line left behind
        self.cli.out(line + "\r")
        sys.stdout.flush()

    def _details(self) -> str:
        """Bytes done of the total, throughput and time left (terminal only)."""
        if self._bytes is None:
            return ""
        done, total = self._bytes
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = done / elapsed
        text = f"  {format_size(done)} of {format_size(total)}"
        if done > 0 and elapsed >= 0.5:
            text += f", {format_size(int(rate))}/s"
            if done < total:
                seconds = int((total - done) / rate)
                text += ", %d:%02d:%02d left" % (seconds // 3600, seconds // 60 % 60, seconds % 60)
        return text

    def callback(self, done: int, total: int) -> None:
        """A qcow2lib progress(done_bytes, total_bytes) callback: the absolute percentage,
        reported once per new amount of work done (thread-safe, never backwards)."""
        if total <= 0 or done <= 0:
            return
        with self.lock:
            if done <= self._last_done:
                return
            self._last_done = done
            self._bytes = (done, total)
        self.print(100.0 * done / total, 0)

    def end(self) -> None:
        if self.enabled:
            self.cli.out("\n")
            sys.stdout.flush()


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False
