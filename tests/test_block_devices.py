"""Images on block devices (loop devices over sparse files in tmp_path) against qemu-img.

A device's size is the device's, not st_size (0): info, map, convert (both ways),
resize and create must see it as qemu-img does, raw and as a qcow2 container, and
`host_device` is accepted as a format name.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import qcow2lib
from qemutools import qemu_img, qemu_io, require_root, run
from qemutools import assert_same_result
from qemutools import run_qimg


def run_qemu(*args) -> subprocess.CompletedProcess:
    return run(["qemu-img", *map(str, args)], check=False)


def assert_same(*args) -> subprocess.CompletedProcess:
    ours, theirs = run_qimg(*args), run_qemu(*args)
    assert_same_result(ours, theirs, args)
    return ours


@pytest.fixture
def loop(tmp_path: Path):
    """A 4 MiB loop device over a sparse file; detached however the test ends."""
    require_root("loop devices")
    backing = tmp_path / "loop-backing.img"
    with open(backing, "wb") as f:
        f.truncate(4 << 20)
    device = run(["losetup", "-f", "--show", str(backing)]).stdout.strip()
    try:
        yield device
    finally:
        run(["losetup", "-d", device], check=False)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "3M")
    qemu_io(path, "write -P 7 0 64k", "write -P 9 1M 128k", "write -z 2M 64k")
    return path


def test_raw_device_info_and_map(loop):
    run(["dd", "if=/dev/urandom", f"of={loop}", "bs=64k", "count=1", "conv=fsync"])
    for fmt in ([], ["-f", "raw"], ["-f", "host_device"]):
        assert "4 MiB (4194304 bytes)" in assert_same("info", *fmt, loop).stdout
        assert_same("info", "--output=json", *fmt, loop)
        assert_same("map", *fmt, loop)
        assert_same("map", "--output=json", *fmt, loop)
    with qcow2lib.open(loop) as device:
        assert device.size == 4 << 20
        assert [(e.offset, e.length, e.is_data) for e in device.extents()] == [(0, 4 << 20, True)]


def test_format_names_checked_against_file_type(loop, tmp_path: Path):
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(65536))
    assert assert_same("info", "-f", "host_device", plain).returncode == 1
    assert assert_same("info", "-f", "file", loop).returncode == 1
    assert_same("info", "-f", "file", plain)


def test_convert_onto_and_from_device(loop, source: Path, tmp_path: Path):
    assert assert_same("convert", "-n", "-O", "raw", source, loop).returncode == 0
    assert (
        qemu_img("compare", "-f", "qcow2", "-F", "raw", source, loop, check=False).returncode == 0
    )
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    assert run_qimg("convert", "-O", "qcow2", loop, ours).returncode == 0
    qemu_img("convert", "-O", "qcow2", loop, theirs)
    assert qemu_img("compare", ours, theirs, check=False).returncode == 0

    def info(result: subprocess.CompletedProcess, path: Path) -> list[str]:
        """The info lines, less the host filesystem's allocation (disk size)."""
        return [
            line
            for line in result.stdout.replace(str(path), "X").splitlines()
            if not line.startswith("disk size")
        ]

    assert info(run_qimg("info", ours), ours) == info(run_qemu("info", theirs), theirs)
    assert (
        run_qimg("map", "--output=json", ours).stdout
        == run_qemu("map", "--output=json", theirs).stdout
    )


def test_qcow2_container_on_device(loop, source: Path):
    run(["dd", "if=/dev/urandom", f"of={loop}", "bs=1M", "count=4", "conv=fsync"])
    created = assert_same("create", "-f", "qcow2", loop, "3M")
    assert created.returncode == 0
    assert qemu_img("check", loop, check=False).returncode == 0
    assert_same("info", loop)
    assert_same("map", "--output=json", loop)  # a fresh image on stale bytes reads zeros
    assert run_qimg("convert", "-n", "-O", "qcow2", source, loop).returncode == 0
    assert qemu_img("compare", source, loop, check=False).returncode == 0
    assert_same("map", "--output=json", loop)
    assert_same("check", loop)
    with qcow2lib.open(loop, "r+") as image:
        image.write((3 << 20) - 1, b"x")
    assert qemu_img("check", loop, check=False).returncode == 0


def test_device_size_fixed(loop):
    for args in (
        ("resize", "-f", "raw", loop, "8M"),
        ("resize", "--shrink", "-f", "raw", loop, "2M"),
        ("resize", "-f", "raw", loop, "4M"),
        ("create", "-f", "raw", loop, "8M"),
        ("create", "-f", "raw", loop, "1M"),
    ):
        assert_same(*args)
    assert_same("info", loop)
