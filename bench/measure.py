"""Timing and peak-memory measurement for the benchmark suite, and its result table.

Every sample is one child process reaped with os.wait4, whose rusage gives that run's
peak RSS (ru_maxrss, KiB on Linux; about 5 MiB is the floor, see LAUNCHER). Times are
either the wall time around the child, or its CPU time (user + system, from the same
rusage) when CPU_TIME is set (bench.py --cpu), or, for API and `bench` runs, the time the
child reports for its own work (interpreter start-up excluded).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"

# Bytecode caching on, as for an installed qimg (pip compiles it): with
# PYTHONDONTWRITEBYTECODE set, every run would compile qimg and qcow2lib again. This
# checkout's qcow2lib comes first on the path, whatever else is installed.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

# qimg as users start it: the installed `qimg` command is tools/qimg, its first line
# rewritten by pip to name the interpreter.
QIMG = [sys.executable, str(ROOT / "tools" / "qimg")]


# Set by bench.py --cpu: command rows then report the child's user + system CPU time
# instead of its wall time, and the table its minimum over the rounds instead of the
# median. On a machine shared with other jobs, wall time measures the neighbours as much
# as the command; CPU time and the best of several runs are far more stable.
CPU_TIME = False


class BenchError(Exception):
    """A benchmarked command failed: the suite reports it instead of a number."""


@dataclass
class Sample:
    seconds: float
    rss_kib: int | None


# A fresh, small process runs each measured command: the peak RSS that wait4 reports for a
# child starts at the RSS of the process it was forked from (Linux carries the forking
# process's high-water mark across exec), so forking from this suite, which grows while
# it builds images, would inflate every number. The launcher (an isolated interpreter,
# about 5 MiB) forks, execs the command, times it from fork to reaping, and writes
# "seconds maxrss_kib exit_code cpu_seconds" to the descriptor it is given. It ignores SIGTERM, so
# that signalling its process group stops only the command; the command gets the default
# disposition back before exec.
LAUNCHER = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
exit_code = os.waitstatus_to_exitcode(status)
cpu = usage.ru_utime + usage.ru_stime
os.write(int(sys.argv[1]), f"{seconds} {usage.ru_maxrss} {exit_code} {cpu}".encode())
"""


class Launched:
    """A command running under the launcher, its output going to temporary files."""

    def __init__(self, argv: list):
        self.argv = [str(a) for a in argv]
        self.out = tempfile.TemporaryFile()
        self.err = tempfile.TemporaryFile()
        result_read, result_write = os.pipe()
        self.result = os.fdopen(result_read, "rb")
        self.cpu_seconds = 0.0
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, str(result_write), *self.argv],
                stdout=self.out,
                stderr=self.err,
                stdin=subprocess.DEVNULL,
                env=ENV,
                pass_fds=(result_write,),
                start_new_session=True,
            )
        finally:
            os.close(result_write)

    def terminate(self) -> None:
        """SIGTERM to the command (the launcher ignores it)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait(
        self,
        timeout: float = 1800,
        accept: tuple[int, ...] = (0,),
    ) -> tuple[float, int, str]:
        """(seconds, peak RSS in KiB, stdout) of the finished command."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with self.result, self.out, self.err:
            fields = self.result.read().split()
            self.out.seek(0)
            self.err.seek(0)
            stdout = self.out.read().decode(errors="replace")
            stderr = self.err.read().decode(errors="replace").strip()
        if len(fields) != 4:
            raise BenchError(f"{' '.join(self.argv[:8])}... was killed (timeout {timeout} s)")
        seconds, rss, code = float(fields[0]), int(fields[1]), int(fields[2])
        self.cpu_seconds = float(fields[3])
        if code not in accept:
            raise BenchError(f"{' '.join(self.argv[:8])}... exited {code}: {stderr[-400:]}")
        return seconds, rss, stdout


def run_child(
    argv: list,
    *,
    accept: tuple[int, ...] = (0,),
    timeout: float = 1800,
) -> tuple[float, int, str]:
    """Run argv to completion: (wall seconds, peak RSS KiB, stdout), both from its own
    process alone."""
    return Launched(argv).wait(timeout, accept)


def wall(argv: list, accept: tuple[int, ...] = (0,)) -> Callable[[], Sample]:
    """A sampler: the child's wall time, start-up included (its CPU time with CPU_TIME)."""

    def sample() -> Sample:
        child = Launched(argv)
        seconds, rss, _ = child.wait(accept=accept)
        return Sample(child.cpu_seconds if CPU_TIME else seconds, rss)

    return sample


def reported(argv: list) -> Callable[[], Sample]:
    """A sampler for `qemu-img bench`/`qimg bench`: the run time the command prints."""

    def sample() -> Sample:
        _, rss, stdout = run_child(argv)
        return Sample(float(stdout.rsplit("Run completed in ", 1)[1].split()[0]), rss)

    return sample


def worker(**spec) -> Callable[[], Sample]:
    """A sampler running bench/worker.py, which times its API work in-process."""
    argv = [sys.executable, WORKER, json.dumps(spec)]

    def sample() -> Sample:
        _, rss, stdout = run_child(argv)
        return Sample(json.loads(stdout.strip().splitlines()[-1])["seconds"], rss)

    return sample


@dataclass
class Target:
    """What a row is held to: ours/theirs <= max_ratio, and/or absolute bounds on ours."""

    max_ratio: float | None = None
    max_seconds: float | None = None
    max_rss_mib: float | None = None

    def describe(self) -> str:
        parts = []
        if self.max_ratio is not None:
            parts.append(f"<= {self.max_ratio:g}x")
        if self.max_seconds is not None:
            parts.append(
                f"< {self.max_seconds * 1000:g} ms"
                if self.max_seconds < 1
                else f"< {self.max_seconds:g} s"
            )
        if self.max_rss_mib is not None:
            parts.append(f"< {self.max_rss_mib:g} MiB")
        return ", ".join(parts) or "-"

    def met(self, ours: float, theirs: float | None, ours_rss_kib: int | None) -> bool | None:
        verdicts = []
        if self.max_ratio is not None:
            if theirs is None:
                return None
            verdicts.append(ours / theirs <= self.max_ratio)
        if self.max_seconds is not None:
            verdicts.append(ours < self.max_seconds)
        if self.max_rss_mib is not None and ours_rss_kib is not None:
            verdicts.append(ours_rss_kib / 1024 < self.max_rss_mib)
        return all(verdicts) if verdicts else None


@dataclass
class Row:
    """One comparison: our sampler against the reference's, alternated round by round.

    `prepare` runs (untimed) before every sample, with "ours" or "theirs": the place to
    remove an output file or copy a fresh input. `missing` says why there is no reference
    (a module not installed); the row is still reported.
    """

    name: str
    ours: Callable[[], Sample]
    theirs: Callable[[], Sample] | None
    target: Target
    theirs_label: str = ""
    prepare: Callable[[str], None] | None = None
    missing: str = ""
    ours_samples: list[Sample] = field(default_factory=list)
    theirs_samples: list[Sample] = field(default_factory=list)
    error: str = ""


@dataclass
class Case:
    """A group of rows sharing fixtures; `setup(fixtures)` builds them (untimed)."""

    name: str
    title: str
    setup: Callable[[object], list[Row]]


def run_case(case: Case, fixtures: object, rounds: int, log: Callable[[str], None]) -> list[Row]:
    """Set the case up, then run every row `rounds` times, ours and theirs alternating
    which goes first, so that drift in machine load hits both sides alike."""
    started = time.perf_counter()
    try:
        rows = case.setup(fixtures)
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        failed = Row(f"{case.name}: setup", lambda: Sample(0, 0), None, Target())
        failed.error = str(exc)
        log(f"[{case.name}] setup failed: {exc}")
        return [failed]
    log(f"[{case.name}] fixtures ready in {time.perf_counter() - started:.1f} s")
    for round_index in range(rounds):
        for row_index, row in enumerate(rows):
            if row.error:
                continue
            sides = [("ours", row.ours, row.ours_samples)]
            if row.theirs is not None:
                sides.append(("theirs", row.theirs, row.theirs_samples))
            if (round_index + row_index) % 2:
                sides.reverse()
            for side, sampler, samples in sides:
                try:
                    if row.prepare is not None:
                        row.prepare(side)
                    samples.append(sampler())
                except (BenchError, OSError, ValueError, IndexError) as exc:
                    row.error = f"{side}: {exc}"
                    log(f"[{case.name}] {row.name}: {row.error}")
                    break
    log(f"[{case.name}] done in {time.perf_counter() - started:.1f} s")
    return rows


def _median(samples: list[Sample]) -> float | None:
    """The row's figure: the median, or with CPU_TIME the minimum (noise only adds)."""
    if not samples:
        return None
    times = [s.seconds for s in samples]
    return min(times) if CPU_TIME else statistics.median(times)


def _peak(samples: list[Sample]) -> int | None:
    values = [s.rss_kib for s in samples if s.rss_kib is not None]
    return max(values) if values else None


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


HEADER = ("case", "ours", "theirs", "reference", "ratio", "RSS ours", "RSS theirs", "target", "met")


def table_rows(rows: list[Row]) -> list[tuple[str, ...]]:
    """One line per row: medians, ours/theirs, the peak RSS of each side, the verdict."""
    lines = []
    for row in rows:
        ours, theirs = _median(row.ours_samples), _median(row.theirs_samples)
        ours_rss, theirs_rss = _peak(row.ours_samples), _peak(row.theirs_samples)
        ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "-"
        if row.error:
            verdict = "error: " + row.error[:120]
        elif row.missing:
            verdict = row.missing
        elif ours is None:
            verdict = "-"
        else:
            met = row.target.met(ours, theirs, ours_rss)
            verdict = {True: "yes", False: "NO", None: "-"}[met]
        lines.append(
            (
                row.name,
                _seconds(ours),
                _seconds(theirs),
                row.theirs_label,
                ratio,
                _mib(ours_rss),
                _mib(theirs_rss),
                row.target.describe(),
                verdict,
            )
        )
    return lines


def format_text(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(line[i]) for line in [HEADER, *lines]) for i in range(len(HEADER))]
    out = []
    for line in [HEADER, *lines]:
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    return "\n".join(out)


def format_markdown(lines: list[tuple[str, ...]]) -> str:
    def cells(line):
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |"

    return "\n".join([cells(HEADER), "|" + "---|" * len(HEADER), *map(cells, lines)])
