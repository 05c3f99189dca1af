"""Running `python -m fuse_mount` in tests, and leaving no mount behind whatever happens."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tools'}"}


def fuse_mount(*args, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the command to its end (a mount returns once the filesystem is ready)."""
    return subprocess.run(
        [sys.executable, "-m", "fuse_mount", *map(str, args)],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_foreground(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fuse_mount", *map(str, args), "--foreground"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def is_mounted(path: Path) -> bool:
    """Asked of /proc alone: a stat of the mount point would wait for a stopped server."""
    head, name = os.path.split(os.path.abspath(path))
    target = os.path.join(os.path.realpath(head), name).encode()
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        return any(line.split(b" ")[4] == target for line in mountinfo.read().splitlines())


def mount_options(path: Path) -> set[str]:
    target = os.path.realpath(path).encode()
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo.read().splitlines():
            fields = line.split(b" ")
            if fields[4] == target:
                super_options = line.split(b" - ")[1].split(b" ")[2]
                return set(fields[5].decode().split(",")) | set(super_options.decode().split(","))
    raise AssertionError(f"{path} is not mounted")


def server_pid(mountpoint: Path) -> int:
    """Asked of the server with the ioctl `qimg umount` uses (_IOR('q', 1, u64) on the
    root), its number written out here."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        answer = bytearray(8)
        fcntl.ioctl(fd, 0x80087101, answer, True)
    finally:
        os.close(fd)
    return int.from_bytes(answer, sys.byteorder)


def wait_until(condition, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def force_unmount(mountpoint: Path) -> None:
    """Unmount whatever is left (a dead server's mount too) and stop its server."""
    if not is_mounted(mountpoint):
        return
    try:
        pid = server_pid(mountpoint)
    except OSError:
        pid = None
    if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
    if pid is not None:
        try:
            wait_until(lambda: process_gone(pid), 20, "the server to exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def mountpoints(tmp_path: Path):
    """mountpoints() gives a fresh empty directory; each is unmounted at teardown."""
    made: list[Path] = []

    def make() -> Path:
        path = tmp_path / f"mnt{len(made)}"
        path.mkdir()
        made.append(path)
        return path

    yield make
    for path in reversed(made):
        force_unmount(path)
    for path in made:
        assert not is_mounted(path)
