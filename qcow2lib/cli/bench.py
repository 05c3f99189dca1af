"""`bench`: time `count` reads (or writes, -w) of `-s` bytes each, `-d` of them in
flight at once on as many threads, at offsets stepping by -S from -o (wrapping at the
end of the image), with an optional flush every --flush-interval requests."""

from __future__ import annotations

import os
import threading
import time

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli, cvtnum
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    CACHE_MODES,
    OpenFailure,
    image_spec,
    open_spec,
    report_failure,
)
from qcow2lib.ops import error_text
from qcow2lib.hostfile import io_buffer
from qcow2lib.sizes import SizeError, parse_number

INT_MAX = (1 << 31) - 1


def cmd_bench(cli: Cli, argv: list[str]) -> int:
    """`bench`: time `count` reads (or writes, -w) of `-s` bytes each, `-d` of them in
    flight at once on as many threads, at offsets stepping by -S from -o (wrapping at the
    end of the image), with an optional flush every --flush-interval requests."""
    fmt = None
    quiet = image_opts = force_share = is_write = False
    drain_on_flush = True
    count, depth, offset, bufsize, step, pattern, flush_interval = 75000, 64, 0, 4096, 0, 0, 0
    cache = "writeback"

    def whole_number(text: str, limit: int, what: str) -> int | None:
        try:
            value = parse_number(text)
        except SizeError:
            value = None
        if value is None or value > limit:
            cli.error_report(f"Invalid {what} specified")
            return None
        return value

    getopt = GetoptLong(
        argv,
        ":hc:d:f:ni:o:qs:S:t:wU",
        (
            LongOpt("help", False, "h"),
            LongOpt("flush-interval", True, "flush-interval"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("pattern", True, "pattern"),
            LongOpt("no-drain", False, "no-drain"),
            LongOpt("force-share", False, "U"),
        ),
    )
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "c":
            if (number := whole_number(arg, INT_MAX, "request count")) is None:
                return 1
            count = number
        elif c == "d":
            if (number := whole_number(arg, INT_MAX, "queue depth")) is None:
                return 1
            depth = number
        elif c == "f":
            fmt = arg
        elif c == "n":
            continue  # native AIO: qcow2lib's threads serve every request
        elif c == "i":
            if arg not in ("threads", "native", "io_uring"):
                cli.error_report(f"Invalid aio option: {arg}")
                return 1
        elif c == "o":
            if (number := cvtnum(cli, "offset", arg)) is None:
                return 1
            offset = number
        elif c == "q":
            quiet = True
        elif c == "s":
            if (number := cvtnum(cli, "buffer size", arg, INT_MAX)) is None:
                return 1
            bufsize = number
        elif c == "S":
            if (number := cvtnum(cli, "step_size", arg, INT_MAX)) is None:
                return 1
            step = number
        elif c == "t":
            if arg not in CACHE_MODES:
                cli.error_report("Invalid cache mode")
                return 1
            cache = arg
        elif c == "w":
            is_write = True
        elif c == "U":
            force_share = True
        elif c == "pattern":
            if (number := whole_number(arg, 0xFF, "pattern byte")) is None:
                return 1
            pattern = number
        elif c == "flush-interval":
            if (number := whole_number(arg, INT_MAX, "flush interval")) is None:
                return 1
            flush_interval = number
        elif c == "no-drain":
            drain_on_flush = False
        elif c == "image-opts":
            image_opts = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    if not is_write and flush_interval:
        cli.error_report("--flush-interval is only available in write tests")
        return 1
    if flush_interval and flush_interval < depth:
        cli.error_report("Flush interval can't be smaller than depth")
        return 1
    try:
        spec = image_spec(getopt.argv[getopt.optind], image_opts, fmt, force_share)
        img = open_spec(cli, spec, "r+" if is_write else "r", warn_probe=not quiet, cache=cache)
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with img:
        step = step or bufsize
        cli.out(
            f"Sending {count} {'write' if is_write else 'read'} requests, {bufsize} bytes "
            f"each, {depth} in parallel (starting at offset {offset}, step size {step})\n"
        )
        if flush_interval:
            cli.out(f"Sending flush every {flush_interval} requests\n")
        run = _BenchRun(
            img,
            count,
            depth,
            offset,
            bufsize,
            step,
            pattern,
            is_write,
            flush_interval,
            drain_on_flush,
        )
        start = time.monotonic()
        failure = run.run()
        elapsed = time.monotonic() - start
        if failure is not None:
            cli.error_report(f"Failed request: {failure}")
            return 1
        cli.out(f"Run completed in {elapsed:.3f} seconds.\n")
    return 0


class _BenchRun:
    """QEMU's bench_cb() on threads: `depth` requests in flight, each on its own buffer;
    at a flush point the queue drains (unless --no-drain) and a flush is sent."""

    def __init__(
        self,
        image,
        count,
        depth,
        offset,
        bufsize,
        step,
        pattern,
        is_write,
        flush_interval,
        drain_on_flush,
    ) -> None:
        self.image, self.remaining, self.offset = image, count, offset
        self.bufsize, self.step, self.write = bufsize, step, is_write
        self.flush_interval, self.drain = flush_interval, drain_on_flush
        # More threads than two per CPU only contend for the GIL (I/O releases it).
        self.threads = max(1, min(depth, count, 2 * (os.cpu_count() or 1)))
        self.buffers = [io_buffer(bufsize) for _ in range(self.threads)]
        for buffer in self.buffers:
            buffer[:] = bytes([pattern]) * bufsize
        self.in_flight = 0
        self.flushing = False
        self.failure: str | None = None
        self.cond = threading.Condition()

    def run(self) -> str | None:
        workers = [
            threading.Thread(target=self._worker, args=(buffer,), daemon=True)
            for buffer in self.buffers
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return self.failure

    def _next(self) -> int | None:
        """Under cond: the offset of the next request, None when all are issued."""
        while self.flushing and self.failure is None:
            self.cond.wait()
        if self.failure is not None or self.remaining <= self.in_flight:
            return None
        self.in_flight += 1
        offset = self.offset
        # (an empty image: every request lies outside it and fails as such, where
        # qemu-img's modulo by zero kills it with SIGFPE)
        self.offset = (self.offset + self.step) % (self.image.size or 1 << 63)
        return offset

    def _worker(self, buffer: bytearray) -> None:
        image, view = self.image, memoryview(buffer)
        while True:
            with self.cond:
                offset = self._next()
            if offset is None:
                return
            try:
                if self.write:
                    image.write(offset, view)
                else:
                    image.readinto(offset, view)
                error = None
            except Qcow2Error as exc:
                error = (
                    error_text(exc)
                    if isinstance(exc, OSError) and exc.strerror
                    else "Input/output error"
                )
            with self.cond:
                left = self.remaining - self.in_flight
                self.remaining -= 1
                self.in_flight -= 1
                if error is not None:
                    self.failure = self.failure or error
                flush = (
                    self.flush_interval
                    and left % self.flush_interval == 0
                    and (not self.in_flight or not self.drain)
                )
                if flush and self.drain:
                    self.flushing = True
                self.cond.notify_all()
            if flush and self.failure is None:
                try:
                    image.flush()
                except Qcow2Error as exc:
                    with self.cond:
                        self.failure = self.failure or error_text(exc)
                with self.cond:
                    self.flushing = False
                    self.cond.notify_all()
