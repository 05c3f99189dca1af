"""`qimg mount` / `qimg umount` as commands: mount, write through the mount, unmount, and
the image is whole; encrypted images take qimg's --object/--image-opts secrets. The
filesystem itself is tested in test_fuse_mount.py (through `python -m fuse_mount`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import qcow2lib
from fusetools import is_mounted, mountpoints  # noqa: F401 (a fixture)
from qemu_luks import BLANK, copy_image
from qemu_luks import PASS as LUKS_PASS
from qemutools import QEMU_IO, assert_clean, qemu_create, qemu_img, qemu_io

ROOT = Path(__file__).resolve().parent.parent
QIMG = [sys.executable, str(ROOT / "tools" / "qimg.py")]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MIB = 1 << 20


def qimg(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QIMG, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def write_through(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_mount_write_umount_round_trip(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "8M")
    qemu_io(image, "write -P 0x61 0 1M", fmt="qcow2")
    mnt = mountpoints()
    result = qimg("mount", "--rw", image, mnt)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert sorted(os.listdir(mnt)) == ["disk.raw", "info.json", "partitions", "snapshots"]
    info = json.loads((mnt / "info.json").read_text())
    assert (info["format"], info["virtual-size"]) == ("qcow2", 8 * MIB)
    assert (mnt / "disk.raw").read_bytes()[:MIB] == b"\x61" * MIB
    write_through(mnt / "disk.raw", 2 * MIB, b"\x62" * (128 << 10))
    result = qimg("umount", mnt)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not is_mounted(mnt)
    assert_clean(image)
    with qcow2lib.open(str(image)) as device:
        assert device.read(2 * MIB, 128 << 10) == b"\x62" * (128 << 10)


def test_mount_is_read_only_by_default_and_serves_snapshots(tmp_path: Path, mountpoints) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "4M")
    qemu_io(image, "write -P 0x11 0 1M", fmt="qcow2")
    qemu_img("snapshot", "-c", "old", image)
    qemu_io(image, "write -P 0x22 0 1M", fmt="qcow2")
    mnt = mountpoints()
    assert qimg("mount", "-s", "old", image, mnt).returncode == 0
    try:
        assert (mnt / "disk.raw").read_bytes()[:MIB] == b"\x11" * MIB
        try:
            os.open(mnt / "disk.raw", os.O_WRONLY)
            raise AssertionError("a read-only mount opened disk.raw for writing")
        except OSError:
            pass
    finally:
        assert qimg("umount", mnt).returncode == 0
    assert_clean(image)


def test_encrypted_image_round_trip_with_object_and_image_opts(
    tmp_path: Path, tmp_path_factory, mountpoints
) -> None:
    image = copy_image(tmp_path_factory, BLANK, tmp_path / "secret.qcow2")  # 4 MiB, empty
    secret_file = tmp_path / "passphrase"
    secret_file.write_text(LUKS_PASS)
    secret = f"secret,id=sec0,file={secret_file}"
    opts = f"driver=qcow2,file.filename={image},encrypt.key-secret=sec0"
    mnt = mountpoints()
    result = qimg("mount", "--object", secret, "--image-opts", opts, "--rw", mnt)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert (mnt / "disk.raw").read_bytes() == bytes(4 * MIB)
    write_through(mnt / "disk.raw", MIB, b"\x5c" * 65536)
    assert qimg("umount", mnt).returncode == 0
    assert qemu_img("check", "--object", secret, "--image-opts", opts).returncode == 0
    check = subprocess.run(
        [
            QEMU_IO,
            "--object",
            secret,
            "--image-opts",
            opts,
            "-c",
            "read -P 0x5c 1M 64k",
            "-c",
            "read -P 0 0 1M",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and "verification failed" not in check.stdout, check.stdout
    # Without the secret, or with a secret that is not defined: one line, nothing mounted.
    for args, message in (
        (
            [image],
            f"qimg: Could not open '{image}': Parameter 'encrypt.key-secret' is "
            f"required for cipher\n",
        ),
        (["--image-opts", opts], f"qimg: Could not open '{opts}': No secret with id 'sec0'\n"),
        (
            ["--object", "secret,id=sec0,data=wrong", "--image-opts", opts],
            f"qimg: Could not open '{image}': Invalid password, cannot unlock any keyslot\n",
        ),
    ):
        result = qimg("mount", *args, mnt)
        assert (result.returncode, result.stderr) == (1, message)
        assert not is_mounted(mnt)


def test_mount_and_umount_errors(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "1M")
    cases = [
        (
            ("mount", image, tmp_path / "nodir"),
            f"qimg: mount point '{tmp_path / 'nodir'}' does not exist\n",
        ),
        (
            ("mount", tmp_path / "none.qcow2", tmp_path),
            f"qimg: Could not open '{tmp_path / 'none.qcow2'}': Could not open "
            f"'{tmp_path / 'none.qcow2'}': No such file or directory\n",
        ),
        (
            ("mount", "--rw", "-s", "x", image, tmp_path),
            "qimg: --rw cannot be used with --snapshot: snapshots are read-only\n",
        ),
        (
            ("mount", image),
            "qimg: Expecting an image and a mount point\n"
            "qimg: Try `qimg mount --help' for more information.\n",
        ),
        (("umount", tmp_path), f"qimg: '{tmp_path}' is not a mount point\n"),
        (
            ("umount",),
            "qimg: Expecting one mount point\n"
            "qimg: Try `qimg umount --help' for more information.\n",
        ),
    ]
    for args, message in cases:
        result = qimg(*args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", message), args


def test_help_texts() -> None:
    mount_help = qimg("mount", "--help")
    assert mount_help.returncode == 0 and mount_help.stdout.startswith(
        "Usage: qimg mount [OPTIONS] IMAGE MOUNTPOINT\n"
    )
    for option in (
        "--object",
        "--image-opts",
        "--rw",
        "--snapshot=NAME",
        "--foreground",
        "--allow-other",
        "--format=FORMAT",
    ):
        assert option in mount_help.stdout
    umount_help = qimg("umount", "--help")
    assert umount_help.returncode == 0
    assert umount_help.stdout.startswith("Usage: qimg umount MOUNTPOINT\n")
    top = qimg("--help").stdout
    assert "qimg's own commands" in top and "  umount mountpoint" in top
