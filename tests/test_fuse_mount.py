"""The FUSE mount as a tool: the tree, writes, signals, crashes and every refusal.

Each test mounts with the real command (`python -m fuse_mount`, daemonizing unless told
otherwise) and checks what the kernel shows against qemu-img's own reading of the image.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fusetools import (
    ENV,
    ROOT,
    force_unmount,
    fuse_mount,
    is_mounted,
    mount_options,
    process_gone,
    server_pid,
    start_foreground,
    wait_until,
)
from fusetools import mountpoints  # noqa: F401 (a fixture)
from qemu_luks import BLANK, copy_image
from qemu_luks import PASS as LUKS_PASS
from qemutools import assert_clean, qemu_compare, qemu_create, qemu_img, qemu_io

SEEK_DATA, SEEK_HOLE = 3, 4


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_threads(work, count: int, timeout: float) -> None:
    """work(0) ... work(count - 1), each in a thread of its own, all at once."""
    threads = [threading.Thread(target=work, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)


def mount_ok(image: Path, mountpoint: Path, *options: str) -> None:
    result = fuse_mount(image, mountpoint, *options)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert is_mounted(mountpoint)


def unmount_ok(mountpoint: Path) -> None:
    result = fuse_mount("--unmount", mountpoint)
    assert (result.returncode, result.stderr) == (0, "")
    assert not is_mounted(mountpoint)


def convert_snapshot(image: Path, out: Path, option: str) -> bytes:
    qemu_img("convert", "-l", option, "-O", "raw", image, out)
    return out.read_bytes()


def test_tree_matches_qemu(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "8M")
    qemu_io(image, "write -P 0x11 0 1M", "write -P 0x22 3M 100k")
    qemu_img("snapshot", "-c", "before", image)
    qemu_io(image, "write -P 0x33 0 64k", "write -z 3M 64k")
    current = tmp_path / "now.raw"
    qemu_img("convert", "-O", "raw", image, current)
    mnt = mountpoints()
    mount_ok(image, mnt)
    assert sorted(os.listdir(mnt)) == ["disk.raw", "info.json", "partitions", "snapshots"]
    assert sorted(os.listdir(mnt / "snapshots")) == ["before.raw", "id-1.raw"]
    assert os.listdir(mnt / "partitions") == []
    assert (mnt / "disk.raw").stat().st_size == 8 << 20
    assert (mnt / "disk.raw").read_bytes() == current.read_bytes()
    snapshot = convert_snapshot(image, tmp_path / "before.raw", "snapshot.name=before")
    assert (mnt / "snapshots" / "before.raw").read_bytes() == snapshot
    assert (mnt / "snapshots" / "id-1.raw").read_bytes() == snapshot
    # read-only unless --rw, and the kernel keeps the pages of a read-only mount
    assert {"ro"} <= mount_options(mnt)
    with pytest.raises(OSError) as refused:
        open(mnt / "disk.raw", "r+b")
    assert refused.value.errno in (errno.EROFS, errno.EACCES)
    # info.json is what qimg and qemu-img print for the image
    qimg_info = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "qimg.py"), "info", "--output=json", str(image)],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
    ).stdout
    info_text = (mnt / "info.json").read_text()
    assert info_text == qimg_info
    assert json.loads(info_text) == json.loads(qemu_img("info", "--output=json", image).stdout)
    # df shows the image's allocation, not a full disk
    stats = os.statvfs(mnt)
    assert stats.f_blocks * stats.f_frsize == 8 << 20
    assert 0 < stats.f_bfree < stats.f_blocks
    unmount_ok(mnt)
    assert_clean(image)


def test_info_json_names_the_image_as_given(tmp_path: Path, mountpoints) -> None:
    """Mounted by a relative name from its directory, an image with a backing file:
    info.json is what `qemu-img info --output=json NAME` prints there (filename and
    full-backing-filename as the user named them, not the server's absolute path)."""
    qemu_create(tmp_path / "base.qcow2", "4M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2"
    )
    mnt = mountpoints()
    result = subprocess.run(
        [sys.executable, "-m", "fuse_mount", "top.qcow2", mnt.name],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")
    expected = subprocess.run(
        ["qemu-img", "info", "--output=json", "top.qcow2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert json.loads((mnt / "info.json").read_text()) == json.loads(expected)
    assert json.loads(expected)["full-backing-filename"] == "base.qcow2"
    unmount_ok(mnt)


def test_snapshot_names_that_are_no_file_names(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "1M")
    names = ["a/b", "", ".", "..", "dup", "dup", "id-1", "x" * 252, "fine"]
    for index, name in enumerate(names):
        qemu_io(image, f"write -P {index + 1} 0 64k")
        qemu_img("snapshot", "-c", name, image)
    mnt = mountpoints()
    mount_ok(image, mnt)
    listing = sorted(os.listdir(mnt / "snapshots"))
    # id-1.raw is snapshot 1's ('a/b'): the snapshot named "id-1" is reachable by its ID only
    # (a name of 252 bytes makes a file name longer than NAME_MAX, 255)
    assert listing == sorted([f"id-{n}.raw" for n in range(1, 10)] + ["fine.raw"])
    for snapshot_id in range(1, 10):
        expected = convert_snapshot(
            image, tmp_path / f"{snapshot_id}.raw", f"snapshot.id={snapshot_id}"
        )
        assert expected[:1] == bytes([snapshot_id])
        assert (mnt / "snapshots" / f"id-{snapshot_id}.raw").read_bytes() == expected
    assert (mnt / "snapshots" / "fine.raw").read_bytes()[:1] == b"\x09"
    for missing in ("dup.raw", ".raw", "..raw"):
        assert not (mnt / "snapshots" / missing).exists()
    unmount_ok(mnt)


def test_snapshot_option_serves_a_snapshot(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "2M")
    qemu_io(image, "write -P 0x5a 0 1M")
    qemu_img("snapshot", "-c", "old", image)
    qemu_io(image, "write -P 0x6b 0 2M")
    mnt = mountpoints()
    mount_ok(image, mnt, "--snapshot", "old")
    expected = convert_snapshot(image, tmp_path / "old.raw", "snapshot.name=old")
    assert (mnt / "disk.raw").read_bytes() == expected
    assert "ro" in mount_options(mnt)
    unmount_ok(mnt)
    result = fuse_mount(image, mnt, "--snapshot", "old", "--rw")
    assert result.returncode == 2 and "read-only" in result.stderr
    result = fuse_mount(image, mnt, "--snapshot", "nosuch")
    assert result.returncode == 1
    assert result.stderr.startswith("python -m fuse_mount: Could not open ")
    assert not is_mounted(mnt)


def test_writes_fsync_and_fixed_size(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "4M", options={"cluster_size": "4096"})
    qemu_io(image, "write -P 0x44 0 2M")
    model = bytearray(b"\x44" * (2 << 20) + bytes(2 << 20))
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw")
    assert "rw" in mount_options(mnt)
    disk = mnt / "disk.raw"
    fd = os.open(disk, os.O_RDWR)
    try:
        for offset, data in ((100, b"hello"), (4095, b"ab" * 3000), ((4 << 20) - 7, b"theend!")):
            os.pwrite(fd, data, offset)
            model[offset : offset + len(data)] = data
        os.fsync(fd)
        assert os.pread(fd, 16, 95) == bytes(model[95:111])
        with pytest.raises(OSError) as past_end:
            os.pwrite(fd, b"x", 4 << 20)
        assert past_end.value.errno in (errno.ENOSPC, errno.EFBIG)
        for size in (0, 1 << 20, 8 << 20):
            with pytest.raises(OSError) as resized:
                os.ftruncate(fd, size)
            assert resized.value.errno in (errno.EPERM, errno.EINVAL)
        os.ftruncate(fd, 4 << 20)  # its own size: nothing to change
        # hole punching and zeroing go to the engine as zero writes
        fallocate = __import__("ctypes").CDLL(None, use_errno=True).fallocate
        assert fallocate(fd, 0x03, 0, 8192) == 0  # PUNCH_HOLE | KEEP_SIZE
        model[0:8192] = bytes(8192)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as truncated:
        open(disk, "wb")
    assert truncated.value.errno in (errno.EPERM, errno.EINVAL)
    assert disk.stat().st_size == 4 << 20
    unmount_ok(mnt)
    assert_clean(image)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert qemu_compare(image, raw, "qcow2", "raw") == 0


@pytest.mark.parametrize("writable", [True, False], ids=["rw", "ro"])
def test_the_tree_cannot_change(tmp_path: Path, mountpoints, writable: bool) -> None:
    """Making, removing, renaming and linking files and changing modes, owners and times
    are refused with EPERM (EROFS on a read-only mount), never 'Function not
    implemented'; the image is untouched."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "1M")
    mnt = mountpoints()
    mount_ok(image, mnt, *(["--rw"] if writable else []))
    disk = mnt / "disk.raw"
    expected = errno.EPERM if writable else errno.EROFS
    changes = {
        "create": lambda: os.close(os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644)),
        "mknod": lambda: os.mknod(mnt / "fifo", 0o600 | stat.S_IFIFO),
        "mkdir": lambda: os.mkdir(mnt / "dir"),
        "unlink": lambda: os.unlink(disk),
        "rmdir": lambda: os.rmdir(mnt / "snapshots"),
        "rename": lambda: os.rename(disk, mnt / "other.raw"),
        "symlink": lambda: os.symlink("disk.raw", mnt / "link"),
        "link": lambda: os.link(disk, mnt / "hard"),
        "chmod": lambda: os.chmod(disk, 0o600),
        "chown": lambda: os.chown(disk, 1, 1),
        "utime": lambda: os.utime(disk, (0, 0)),
        "touch": lambda: os.utime(disk),
    }
    for name, change in changes.items():
        with pytest.raises(OSError) as refused:
            change()
        assert refused.value.errno == expected, name
    assert sorted(os.listdir(mnt)) == ["disk.raw", "info.json", "partitions", "snapshots"]
    unmount_ok(mnt)
    assert_clean(image)


def test_unmount_of_a_stopped_server_does_not_hang(tmp_path: Path, mountpoints) -> None:
    """A server that does not answer (here stopped) makes --unmount fail with a message
    after a few seconds, not wait forever; once it runs again, the unmount works."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "1M")
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw")
    pid = server_pid(mnt)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = fuse_mount("--unmount", mnt, timeout=60)
        assert time.monotonic() - started < 30
        assert result.returncode == 1
        assert result.stderr == (
            f"python -m fuse_mount: could not unmount '{mnt}': its server does not answer "
            f"(stopped "
            f"or hung); `fusermount3 -u -z {mnt}` detaches the mount\n"
        )
        assert is_mounted(mnt)
    finally:
        os.kill(pid, signal.SIGCONT)
    unmount_ok(mnt)
    assert process_gone(pid)
    assert_clean(image)


def test_large_requests_threads_and_page_cache(tmp_path: Path, mountpoints) -> None:
    """1 MiB requests (max_read), several server threads serving at once, and on a
    read-only mount the kernel's page cache: a second read of disk.raw does not reach the
    server (its read bytes do not grow)."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "16M")
    qemu_io(image, "write -P 0x5a 0 16M")
    mnt = mountpoints()
    mount_ok(image, mnt)
    assert "max_read=1048576" in mount_options(mnt)
    pid = server_pid(mnt)

    def server_read_bytes() -> int:
        with open(f"/proc/{pid}/io") as io_counters:
            return int(dict(line.split(": ") for line in io_counters)["rchar"])

    expected = b"\x5a" * (16 << 20)
    assert (mnt / "disk.raw").read_bytes() == expected
    after_first = server_read_bytes()
    assert (mnt / "disk.raw").read_bytes() == expected
    assert server_read_bytes() - after_first < 1 << 20  # served from the page cache
    unmount_ok(mnt)

    # read-write: direct requests, served by several threads at once
    mount_ok(image, mnt, "--rw")
    pid = server_pid(mnt)
    busy = threading.Event()
    done = threading.Event()

    def reader() -> None:
        with open(mnt / "disk.raw", "rb", buffering=0) as disk:
            while not done.is_set():
                disk.seek(0)
                disk.read(16 << 20)
                busy.set()

    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    try:
        busy.wait(30)
        wait_until(lambda: len(os.listdir(f"/proc/{pid}/task")) >= 3, 30, "server threads")
    finally:
        done.set()
        for thread in readers:
            thread.join(60)
    unmount_ok(mnt)
    assert_clean(image)


def test_sparse_copy_keeps_holes(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "64M")
    qemu_io(image, "write -P 0x01 8M 1M", "write -P 0x02 40M 64k")
    mnt = mountpoints()
    mount_ok(image, mnt)
    fd = os.open(mnt / "disk.raw", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, SEEK_DATA) == 8 << 20
        assert os.lseek(fd, (8 << 20) + 5, SEEK_HOLE) == 9 << 20
        assert os.lseek(fd, 9 << 20, SEEK_DATA) == 40 << 20
        assert os.lseek(fd, 40 << 20, SEEK_HOLE) == (40 << 20) + (64 << 10)
        assert os.lseek(fd, 41 << 20, SEEK_HOLE) == 41 << 20
        with pytest.raises(OSError) as no_data:
            os.lseek(fd, 41 << 20, SEEK_DATA)
        assert no_data.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    copy = tmp_path / "copy.raw"
    subprocess.run(["cp", "--sparse=always", str(mnt / "disk.raw"), str(copy)], check=True)
    assert copy.stat().st_size == 64 << 20
    assert copy.stat().st_blocks * 512 <= 4 << 20
    # du of disk.raw: what the image file takes, not the virtual size
    allocated = (mnt / "disk.raw").stat().st_blocks * 512
    assert allocated == min(64 << 20, image.stat().st_blocks * 512)
    info_fd = os.open(mnt / "info.json", os.O_RDONLY)
    try:
        assert os.lseek(info_fd, 0, SEEK_DATA) == 0
        assert os.lseek(info_fd, 0, SEEK_HOLE) == os.fstat(info_fd).st_size
    finally:
        os.close(info_fd)
    unmount_ok(mnt)
    assert qemu_compare(image, copy, "qcow2", "raw") == 0


def test_seek_across_many_windows(tmp_path: Path, mountpoints) -> None:
    """SEEK_DATA/SEEK_HOLE look further at each step (16 MiB, then twice as far): a run
    of data and a hole each spanning several steps, and the ends of the disk, answered
    as the image's own map says."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "512M")
    qemu_io(image, "write -P 0x01 2M 70M", "write -P 0x02 400M 64k", "write -P 0x03 511M 1M")
    mnt = mountpoints()
    mount_ok(image, mnt)
    fd = os.open(mnt / "disk.raw", os.O_RDONLY)
    try:
        mib = 1 << 20
        assert os.lseek(fd, 0, SEEK_HOLE) == 0
        assert os.lseek(fd, 0, SEEK_DATA) == 2 * mib
        assert os.lseek(fd, 2 * mib, SEEK_HOLE) == 72 * mib  # (data through 3 steps)
        assert os.lseek(fd, 71 * mib + 7, SEEK_DATA) == 71 * mib + 7
        assert os.lseek(fd, 72 * mib, SEEK_DATA) == 400 * mib  # (a hole through 5 steps)
        assert os.lseek(fd, 400 * mib, SEEK_HOLE) == 400 * mib + (64 << 10)
        assert os.lseek(fd, 401 * mib, SEEK_DATA) == 511 * mib
        assert os.lseek(fd, 511 * mib + 1, SEEK_HOLE) == 512 * mib  # (the end)
        with pytest.raises(OSError) as past_end:
            os.lseek(fd, 512 * mib, SEEK_DATA)
        assert past_end.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    unmount_ok(mnt)


def test_seek_sees_writes_on_a_writable_mount(tmp_path: Path, mountpoints) -> None:
    """A read-only disk's last SEEK window is kept for the next query; a writable one's is
    not: data written into a hole is found by the next SEEK_DATA."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "64M")
    qemu_io(image, "write -P 0x01 8M 1M")
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw")
    fd = os.open(mnt / "disk.raw", os.O_RDWR)
    try:
        assert os.lseek(fd, 0, SEEK_DATA) == 8 << 20
        assert os.lseek(fd, 1 << 20, SEEK_HOLE) == 1 << 20
        os.pwrite(fd, b"\x02" * 65536, 2 << 20)
        assert os.lseek(fd, 0, SEEK_DATA) == 2 << 20
        assert os.lseek(fd, 2 << 20, SEEK_HOLE) == (2 << 20) + 65536
    finally:
        os.close(fd)
    unmount_ok(mnt)
    assert_clean(image)


def _ext4_workload(tmp_path: Path, mountpoints, populate) -> None:
    """An ext4 made through disk.raw of an overlay, changed by `populate(disk_raw)`;
    the image must be clean, the backing file untouched and the filesystem whole."""
    base = tmp_path / "base.qcow2"
    qemu_create(base, "64M")
    qemu_io(base, "write -P 0xb5 0 4M")
    base_digest = digest(base)
    image = tmp_path / "img.qcow2"
    qemu_create(image, "64M", backing=str(base), backing_fmt="qcow2")
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(mnt / "disk.raw")], check=True, capture_output=True
    )
    populate(mnt / "disk.raw")
    unmount_ok(mnt)
    assert_clean(image)
    assert digest(base) == base_digest
    raw = tmp_path / "converted.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    subprocess.run(["e2fsck", "-fn", str(raw)], check=True, capture_output=True)
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /", str(raw)], capture_output=True, text=True, check=True
    ).stdout
    assert "kept.txt" in listing and "gone.txt" not in listing
    kept = subprocess.run(
        ["debugfs", "-R", "cat /kept.txt", str(raw)], capture_output=True, check=True
    ).stdout
    assert kept == b"kept\n" * 10000


def test_ext4_through_a_loop_mount(tmp_path: Path, mountpoints) -> None:
    def populate(disk: Path) -> None:
        inner = tmp_path / "inner"
        inner.mkdir()
        subprocess.run(["mount", "-o", "loop", str(disk), str(inner)], check=True)
        try:
            (inner / "kept.txt").write_bytes(b"kept\n" * 10000)
            (inner / "gone.txt").write_bytes(os.urandom(300_000))
            subprocess.run(["sync", "-f", str(inner)], check=True)
            (inner / "gone.txt").unlink()
        finally:
            subprocess.run(["umount", str(inner)], check=True)

    _ext4_workload(tmp_path, mountpoints, populate)


def test_ext4_through_debugfs(tmp_path: Path, mountpoints) -> None:
    def populate(disk: Path) -> None:
        kept, gone = tmp_path / "kept", tmp_path / "gone"
        kept.write_bytes(b"kept\n" * 10000)
        gone.write_bytes(os.urandom(300_000))
        for request in (f"write {kept} kept.txt", f"write {gone} gone.txt", "rm gone.txt"):
            subprocess.run(
                ["debugfs", "-w", "-R", request, str(disk)], check=True, capture_output=True
            )

    _ext4_workload(tmp_path, mountpoints, populate)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_signals_close_the_image_cleanly(tmp_path: Path, mountpoints, how: str) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "4M", options={"lazy_refcounts": "on"})  # writes make it dirty
    mnt = mountpoints()
    proc = start_foreground(image, mnt, "--rw")
    try:
        wait_until(lambda: is_mounted(mnt) and (mnt / "disk.raw").exists(), 30, "the mount")
        with open(mnt / "disk.raw", "r+b") as disk:
            disk.seek(12345)
            disk.write(b"signalled" * 1000)
        proc.send_signal(getattr(signal, how))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (0, "", "")
    assert not is_mounted(mnt)
    assert_clean(image)
    assert json.loads(qemu_img("info", "--output=json", image).stdout)["dirty-flag"] is False
    raw = tmp_path / "raw"
    qemu_img("convert", "-O", "raw", image, raw)
    assert raw.read_bytes()[12345 : 12345 + 9000] == b"signalled" * 1000


def test_daemon_stops_cleanly_on_sigterm(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "4M", options={"lazy_refcounts": "on"})
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw", "--allow-other")
    assert "allow_other" in mount_options(mnt)
    pid = server_pid(mnt)
    assert os.getsid(pid) != os.getsid(0)  # detached from the caller's session
    with open(mnt / "disk.raw", "r+b") as disk:
        disk.write(b"x" * 70000)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: process_gone(pid), 30, "the server to exit")
    assert not is_mounted(mnt)
    assert_clean(image)
    assert json.loads(qemu_img("info", "--output=json", image).stdout)["dirty-flag"] is False


def test_kill_9_keeps_fsynced_writes(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "32M", options={"cluster_size": "65536"})
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw")
    pid = server_pid(mnt)
    rng = random.Random(7)
    durable: dict[int, bytes] = {}
    fd = os.open(mnt / "disk.raw", os.O_RDWR)
    for _ in range(60):  # the durable half: 16 MiB..32 MiB, fsynced
        offset = rng.randrange(16 << 20, 32 << 20, 4096)
        data = rng.randbytes(rng.choice((4096, 65536, 200_000)))
        data = data[: (32 << 20) - offset]
        os.pwrite(fd, data, offset)
        for block in range(0, len(data), 4096):
            durable[offset + block] = data[block : block + 4096]
    os.fsync(fd)
    stop = threading.Event()

    def churn() -> None:  # the volatile half, written until the server dies
        try:
            while not stop.is_set():
                os.pwrite(fd, rng.randbytes(65536), rng.randrange(0, (16 << 20) - 65536, 512))
        except OSError:
            pass

    writer = threading.Thread(target=churn)
    writer.start()
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), 30, "the server to die")
    stop.set()
    writer.join(30)
    try:
        os.close(fd)
    except OSError as exc:  # the file of a dead server: not connected, or (when the
        # kernel was still waiting for it on a request) the connection aborted
        assert exc.errno in (errno.ENOTCONN, errno.ECONNABORTED), exc
    force_unmount(mnt)
    check = qemu_img("check", image, check=False)
    assert check.returncode in (0, 3), check.stdout + check.stderr  # leaks at most
    raw = tmp_path / "after.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    content = raw.read_bytes()
    for offset, block in durable.items():
        assert content[offset : offset + len(block)] == block, offset


def _no_mount_and_untouched(mnt: Path, image: Path, before: str) -> None:
    assert not is_mounted(mnt)
    assert digest(image) == before


def test_bad_mount_points(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "1M")
    before = digest(image)
    missing = tmp_path / "missing"
    result = fuse_mount(image, missing)
    assert (result.returncode, result.stderr) == (
        1,
        f"python -m fuse_mount: mount point '{missing}' does not exist\n",
    )
    file_mountpoint = tmp_path / "afile"
    file_mountpoint.write_text("")
    result = fuse_mount(image, file_mountpoint)
    assert (result.returncode, result.stderr) == (
        1,
        f"python -m fuse_mount: mount point '{file_mountpoint}' is not a directory\n",
    )
    mnt = mountpoints()
    other = tmp_path / "other.qcow2"
    qemu_create(other, "1M")
    mount_ok(other, mnt)
    for options in ((), ("--foreground",)):
        result = fuse_mount(image, mnt, *options)
        assert (result.returncode, result.stderr) == (
            1,
            f"python -m fuse_mount: mount point '{mnt}' is busy: something is mounted there\n",
        )
    unmount_ok(mnt)
    _no_mount_and_untouched(mnt, image, before)


def test_image_in_use_and_bad_images(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "1M")
    first, second = mountpoints(), mountpoints()
    mount_ok(image, first, "--rw")
    # qemu-img's words for a lock, opening for writing (snapshot -c) and for reading (info)
    for options, qemu_args in ((("--rw",), ("snapshot", "-c", "x")), ((), ("info",))):
        result = fuse_mount(image, second, *options)
        expected = qemu_img(*qemu_args, image, check=False).stderr
        assert expected.startswith("qemu-img: Could not open ")
        assert "Is another process using the image" in expected
        assert result.returncode == 1
        assert result.stderr == expected.replace("qemu-img:", "python -m fuse_mount:", 1)
        assert not is_mounted(second)
    unmount_ok(first)
    assert_clean(image)

    missing = tmp_path / "missing.qcow2"
    result = fuse_mount(missing, second)
    expected = qemu_img("info", missing, check=False).stderr
    assert (result.returncode, result.stderr) == (
        1,
        expected.replace("qemu-img:", "python -m fuse_mount:", 1),
    )
    garbage = tmp_path / "garbage.qcow2"
    garbage.write_bytes(b"QFI\xfb" + bytes(1000))
    before = digest(garbage)
    result = fuse_mount(garbage, second, "--rw")
    assert result.returncode == 1
    assert result.stderr.startswith(f"python -m fuse_mount: Could not open '{garbage}': ")
    assert result.stderr.count("\n") == 1
    _no_mount_and_untouched(second, garbage, before)


def test_encrypted_image_needs_its_passphrase(
    tmp_path: Path, tmp_path_factory, mountpoints
) -> None:
    image = copy_image(tmp_path_factory, BLANK, tmp_path / "enc.qcow2")
    mnt = mountpoints()
    result = fuse_mount(image, mnt)
    assert (result.returncode, result.stderr) == (
        1,
        f"python -m fuse_mount: Could not open '{image}': Parameter 'encrypt.key-secret' "
        f"is required for cipher\n",
    )
    assert not is_mounted(mnt)
    result = fuse_mount(
        image,
        mnt,
        "--rw",
        "--passphrase-env",
        "FUSE_TEST_SECRET",
        env={"FUSE_TEST_SECRET": LUKS_PASS},
    )
    assert (result.returncode, result.stderr) == (0, "")
    with open(mnt / "disk.raw", "r+b") as disk:
        disk.write(b"\x77" * 65536)
    unmount_ok(mnt)
    raw = tmp_path / "plain.raw"
    qemu_img(
        "convert",
        "--object",
        f"secret,id=s,data={LUKS_PASS}",
        "--image-opts",
        f"driver=qcow2,file.filename={image},encrypt.key-secret=s",
        "-O",
        "raw",
        raw,
    )
    assert raw.read_bytes()[:65536] == b"\x77" * 65536


def test_unmount_refusals_and_help(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "1M")
    mnt = mountpoints()
    result = fuse_mount("--unmount", mnt)
    assert (result.returncode, result.stderr) == (
        1,
        f"python -m fuse_mount: '{mnt}' is not a mount point\n",
    )
    mount_ok(image, mnt)
    with open(mnt / "disk.raw", "rb"):
        result = fuse_mount("--unmount", mnt)
        assert result.returncode == 1
        assert result.stderr == (
            f"python -m fuse_mount: could not unmount '{mnt}': Device or resource busy\n"
        )
        assert is_mounted(mnt)
    unmount_ok(mnt)
    help_text = fuse_mount("--help")
    assert help_text.returncode == 0
    for words in (
        "id-ID.raw",
        "contain '/'",
        "exit status",
        "--foreground",
        "--unmount",
        "partitions/N.raw",
        "info.json",
        "SIGTERM",
    ):
        assert words in help_text.stdout, words
    usage = fuse_mount(image)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_foreground_prints_nothing(tmp_path: Path, mountpoints) -> None:
    """No libfuse chatter (the max threads warning), no traceback, in the foreground either."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "1M")
    mnt = mountpoints()
    proc = start_foreground(image, mnt)
    try:
        wait_until(lambda: is_mounted(mnt) and (mnt / "disk.raw").exists(), 30, "the mount")
        assert (mnt / "disk.raw").read_bytes() == bytes(1 << 20)
        unmount_ok(mnt)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (0, "", "")


def test_corrupt_cluster_reads_fail_alone(tmp_path: Path, mountpoints) -> None:
    """An L2 entry pointing far past the end of the file: that cluster reads as EIO, the
    rest of the disk still reads, and the server lives on to unmount cleanly."""
    image = tmp_path / "bad.qcow2"
    qemu_create(image, "4M")
    qemu_io(image, "write -P 7 0 128k")
    with open(image, "r+b") as f:
        l1_offset = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    mnt = mountpoints()
    mount_ok(image, mnt)
    fd = os.open(mnt / "disk.raw", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as broken:
            os.pread(fd, 4096, 0)
        assert broken.value.errno == errno.EIO
        assert os.pread(fd, 65536, 65536) == b"\x07" * 65536
    finally:
        os.close(fd)
    unmount_ok(mnt)


def test_raw_image(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw", "-f", "raw")
    assert os.listdir(mnt / "snapshots") == []
    with open(mnt / "disk.raw", "r+b") as disk:
        disk.seek(4096)
        disk.write(b"raw!" * 1024)
    info = json.loads((mnt / "info.json").read_text())
    assert (info["format"], info["virtual-size"]) == ("raw", 1 << 20)
    unmount_ok(mnt)
    assert image.read_bytes()[4096:8192] == b"raw!" * 1024


def test_parallel_readers_and_writers(tmp_path: Path, mountpoints) -> None:
    """Several threads at once through the multi-threaded server, each on its own region,
    then every region as its thread left it."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "64M", options={"cluster_size": "65536"})
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw")
    region = 8 << 20
    expected: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            rng = random.Random(index)
            model = bytearray(region)
            fd = os.open(mnt / "disk.raw", os.O_RDWR)
            try:
                for _ in range(40):
                    offset = rng.randrange(0, region - 300_000)
                    data = rng.randbytes(rng.randrange(1, 300_000))
                    os.pwrite(fd, data, index * region + offset)
                    model[offset : offset + len(data)] = data
                    check = rng.randrange(0, region - 65536)
                    assert os.pread(fd, 65536, index * region + check) == bytes(
                        model[check : check + 65536]
                    )
                os.fsync(fd)
            finally:
                os.close(fd)
            expected[index] = bytes(model)
        except BaseException as exc:  # noqa: B902 (reported by the main thread)
            errors.append(exc)

    run_threads(worker, 6, 120)
    assert not errors, errors
    unmount_ok(mnt)
    assert_clean(image)
    raw = tmp_path / "after.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    content = raw.read_bytes()
    for index, model in expected.items():
        assert content[index * region : (index + 1) * region] == model, index


def run_entry(function: str, prog: str, *args) -> subprocess.CompletedProcess:
    """fuse_mount.command.<function>(argv, prog) as qimg mount/umount will call it."""
    code = (
        f"import sys\nfrom fuse_mount.command import {function}\n"
        f"sys.exit({function}(sys.argv[1:], {prog!r}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_entry_points_for_qimg(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "1M")
    mnt = mountpoints()
    result = run_entry("main", "qimg mount", image, tmp_path / "nowhere")
    assert (result.returncode, result.stderr) == (
        1,
        f"qimg mount: mount point '{tmp_path / 'nowhere'}' does not exist\n",
    )
    usage = run_entry("main", "qimg mount")
    assert usage.returncode == 2 and usage.stderr.startswith("usage: qimg mount ")
    result = run_entry("main", "qimg mount", image, mnt, "--rw")
    assert (result.returncode, result.stderr) == (0, "")
    assert is_mounted(mnt)
    result = run_entry("umount_main", "qimg umount", mnt)
    assert (result.returncode, result.stderr) == (0, "")
    assert not is_mounted(mnt)
    assert_clean(image)
    result = run_entry("umount_main", "qimg umount", mnt)
    assert (result.returncode, result.stderr) == (1, f"qimg umount: '{mnt}' is not a mount point\n")


def test_hostile_snapshot_table_is_refused(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "4M")
    qemu_img("snapshot", "-c", "s1", image)
    with open(image, "r+b") as f:
        table = struct.unpack(">Q", f.read(72)[64:72])[0]
        f.seek(table + 36)
        f.write(struct.pack(">I", 0xFFFFFFF0))  # the entry's extra data size
    before = digest(image)
    mnt = mountpoints()
    result = fuse_mount(image, mnt)
    assert result.returncode == 1
    assert result.stderr.startswith(f"python -m fuse_mount: Could not open '{image}': ")
    assert result.stderr.count("\n") == 1
    assert not is_mounted(mnt) and digest(image) == before


def test_each_write_is_one_request(tmp_path: Path, mountpoints) -> None:
    """The filesystem has no extended attributes, so the kernel learns that once and asks
    nothing before a write (with a getxattr handler it asks for security.capability before
    every one): 200 direct writes reach the server as about 200 reads of /dev/fuse."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "16M")
    qemu_io(image, "write -P 0x11 0 16M")
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw")
    pid = server_pid(mnt)

    def server_reads() -> int:
        with open(f"/proc/{pid}/io") as io_counters:
            return int(dict(line.split(": ") for line in io_counters)["syscr"])

    block = b"\x22" * 4096
    fd = os.open(mnt / "disk.raw", os.O_WRONLY | os.O_DIRECT)
    try:
        os.pwrite(fd, block, 0)  # (the first write: the kernel asks, learns, and stops)
        before = server_reads()
        for index in range(1, 201):
            os.pwrite(fd, block, index * 65536)
        requests = server_reads() - before
    finally:
        os.close(fd)
    assert 200 <= requests < 260, requests
    with pytest.raises(OSError) as raised:
        os.getxattr(mnt / "disk.raw", "security.capability")
    assert raised.value.errno == errno.EOPNOTSUPP
    unmount_ok(mnt)
    assert_clean(image)
    expected = bytearray(b"\x11" * (16 << 20))
    for index in range(201):
        expected[index * 65536 : index * 65536 + 4096] = b"\x22" * 4096
    qemu_img("convert", "-O", "raw", image, tmp_path / "check.raw")
    assert (tmp_path / "check.raw").read_bytes() == expected


SERVER_SCRIPT = """
import json, sys, threading
import qcow2lib
from fuse_mount import filesystem

counts = {}
calls = threading.local()


class Counting(filesystem.DiskFilesystem):
    def read(self, path, buffer, offset, fi):
        calls.count = getattr(calls, "count", 0) + 1
        counts[threading.get_native_id()] = calls.count
        return super().read(path, buffer, offset, fi)


device = qcow2lib.open(sys.argv[1])
filesystem.serve(Counting(device), sys.argv[2])
device.close()
print(json.dumps(counts))
"""


def test_server_threads_keep_their_state(tmp_path: Path, mountpoints) -> None:
    """Each of libfuse's threads keeps its Python thread state from one request to the
    next (per-thread buffers and decoders live on): a thread-local count of the reads a
    thread served adds up to every read, where a state made afresh per request would
    count each read as its thread's first."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "8M")
    qemu_io(image, "write -P 0x33 0 8M")
    mnt = mountpoints()
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(image), str(mnt)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (mnt / "disk.raw").exists(), 30, "the mount")
        block = memoryview(bytearray(4096))

        def reader(first: int) -> None:
            fd = os.open(mnt / "disk.raw", os.O_RDONLY | os.O_DIRECT)
            try:
                for index in range(first, 2048, 4):
                    assert os.preadv(fd, [block], index * 4096) == 4096
            finally:
                os.close(fd)

        run_threads(reader, 4, 60)
        assert subprocess.run(["fusermount3", "-u", str(mnt)]).returncode == 0
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            force_unmount(mnt)
            server.kill()
    assert server.returncode == 0, err
    counts = json.loads(out)
    assert sum(counts.values()) >= 2048, counts
    assert len(counts) <= 2, counts  # (libfuse's workers: serve's max_threads)
