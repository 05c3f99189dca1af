"""The FUSE mount: the guest disk and its snapshots as files, read and written for real."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemutools import assert_clean, qemu_compare, qemu_create, qemu_img, qemu_io

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def mounted(tmp_path: Path):
    """Start `python -m fuse_mount` on an image; yields (image, mountpoint, start)."""
    processes = []

    def start(image: Path, *options: str) -> Path:
        mountpoint = tmp_path / f"mnt{len(processes)}"
        mountpoint.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "fuse_mount", str(image), str(mountpoint),
                                 *options], env=env, stderr=subprocess.PIPE, text=True)
        processes.append((proc, mountpoint))
        deadline = time.monotonic() + 20
        while not (mountpoint / "disk").exists():
            if proc.poll() is not None:
                raise AssertionError(f"fuse_mount exited: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("the mount did not appear")
            time.sleep(0.05)
        return mountpoint

    yield start
    for proc, mountpoint in processes:
        if proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
            proc.wait(timeout=20)


def unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True, capture_output=True)


def test_disk_and_snapshots_read_as_files(tmp_path: Path, mounted) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "8M")
    qemu_io(image, "write -P 0x11 0 1M", "write -P 0x22 3M 100k")
    qemu_img("snapshot", "-c", "before", image)
    qemu_io(image, "write -P 0x33 0 64k", "write -z 3M 64k")
    expected = tmp_path / "now.raw"
    qemu_img("convert", "-O", "raw", image, expected)
    snap_expected = tmp_path / "before.raw"
    qemu_img("convert", "-l", "snapshot.name=before", "-O", "raw", image, snap_expected)

    mountpoint = mounted(image)
    assert sorted(os.listdir(mountpoint)) == ["disk", "snapshots"]
    assert os.listdir(mountpoint / "snapshots") == ["before"]
    assert (mountpoint / "disk").stat().st_size == 8 << 20
    assert (mountpoint / "disk").read_bytes() == expected.read_bytes()
    assert (mountpoint / "snapshots" / "before").read_bytes() == snap_expected.read_bytes()
    with pytest.raises(OSError):
        with open(mountpoint / "disk", "r+b") as f:
            f.write(b"x")
    unmount(mountpoint)


def test_writes_through_the_mount_reach_the_image(tmp_path: Path, mounted) -> None:
    image = tmp_path / "img.qcow2"
    qemu_create(image, "4M", options={"cluster_size": "4096"})
    qemu_io(image, "write -P 0x44 0 2M")
    model = bytearray(b"\x44" * (2 << 20) + bytes(2 << 20))
    mountpoint = mounted(image, "--rw")
    fd = os.open(mountpoint / "disk", os.O_RDWR)
    try:
        for offset, data in ((100, b"hello"), (4095, b"ab" * 3000), ((4 << 20) - 7, b"theend!")):
            os.pwrite(fd, data, offset)
            model[offset:offset + len(data)] = data
        os.fsync(fd)
        assert os.pread(fd, 16, 95) == bytes(model[95:111])
    finally:
        os.close(fd)
    unmount(mountpoint)
    time.sleep(0.2)
    for _ in range(100):  # the server closes the image after the unmount
        if subprocess.run(["qemu-img", "check", str(image)], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)
    assert_clean(image)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert qemu_compare(image, raw, "qcow2", "raw") == 0
