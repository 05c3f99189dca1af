"""Persistent dirty bitmaps: qcow2lib's writes mark them exactly as QEMU's do.

Twin images get the same bitmaps (qemu-img bitmap --add) and the same guest writes, one
through qemu-io, one through qcow2lib; QEMU itself (qemu-nbd exporting each bitmap, read
by nbdinfo) must then report the same dirty ranges for both, `qemu-img check` must find
both clean, and `qemu-img info` must list the same bitmaps and flags.
"""

from __future__ import annotations

import json
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import structs as S
from qemutools import qemu_create, qemu_img, qemu_io
from test_cli_create_info import Twins, mask_disk_size, twins  # noqa: F401 (fixture)

MiB = 1 << 20
BITMAPS = [
    ("b0", "64k", True),
    ("fine", "512", True),
    ("coarse", "4M", True),
    ("off", "64k", False),
]


def dirty_map(image: Path, bitmap: str) -> list[tuple[int, int, str]]:
    """The bitmap's ranges as QEMU exports them over NBD: (offset, length, dirty|clean)."""
    result = subprocess.run(
        [
            "nbdinfo",
            "--json",
            f"--map=qemu:dirty-bitmap:{bitmap}",
            "--",
            "[",
            "qemu-nbd",
            "-r",
            "-f",
            "qcow2",
            "-B",
            bitmap,
            str(image),
            "]",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [(e["offset"], e["length"], e["description"]) for e in json.loads(result.stdout)]


def bitmap_info(image: Path) -> list[dict]:
    info = json.loads(qemu_img("info", "--output=json", "-U", image).stdout)
    return info["format-specific"]["data"].get("bitmaps", [])


def assert_clean(image: Path) -> None:
    result = qemu_img("check", "--output=json", image, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def make_twins(tmp_path: Path, size: int, cluster_size: str = "64k") -> tuple[Path, Path]:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_create(ours, size, options={"cluster_size": cluster_size})
    qemu_io(ours, "write -P 1 0 1M")
    for name, granularity, enabled in BITMAPS:
        qemu_img(
            "bitmap", "--add", "-g", granularity, *([] if enabled else ["--disable"]), ours, name
        )
    shutil.copy(ours, theirs)
    return ours, theirs


def crash_qemu_io(image: str) -> None:
    """qemu-io writes to `image`, then aborts (no core file) before closing it."""

    def no_core() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    result = subprocess.run(
        ["qemu-io", "-c", "write 1M 64k", "-c", "abort", image],
        capture_output=True,
        preexec_fn=no_core,
    )
    assert result.returncode < 0, result  # killed by SIGABRT


def random_ops(rng: random.Random, size: int, count: int) -> list[tuple[str, int, int]]:
    ops = []
    for _ in range(count):
        kind = rng.choice(["write", "write", "zero", "discard"])
        offset = rng.randrange(0, size // 512) * 512
        length = min(size - offset, rng.choice([512, 4096, 65536 + 512, 3 * MiB, 9 * MiB]))
        ops.append((kind, offset, length))
    return ops


def apply_ours(image: Path, ops) -> None:
    with qcow2lib.open(str(image), "r+") as dev:
        for kind, offset, length in ops:
            if kind == "write":
                dev.write(offset, bytes([0x5A]) * length)
            elif kind == "zero":
                dev.write_zeroes(offset, length)
            else:
                dev.discard(offset, length)


def apply_theirs(image: Path, ops) -> None:
    commands = {"write": "write -P 0x5a", "zero": "write -z", "discard": "discard"}
    qemu_io(image, *(f"{commands[kind]} {offset} {length}" for kind, offset, length in ops))


@pytest.mark.parametrize("seed", range(3))
def test_writes_mark_bitmaps_as_qemu_does(tmp_path, seed):
    size = 64 * MiB
    ours, theirs = make_twins(tmp_path, size)
    ops = random_ops(random.Random(seed), size, 25)
    apply_ours(ours, ops)
    apply_theirs(theirs, ops)
    for name, _, _ in BITMAPS:
        assert dirty_map(ours, name) == dirty_map(theirs, name), name
    assert bitmap_info(ours) == bitmap_info(theirs)
    assert_clean(ours)
    assert qemu_img("compare", ours, theirs, check=False).returncode == 0


def test_whole_disk_discard_and_later_writes(tmp_path):
    """A change covering whole bitmap clusters needs no copy of them; later writes into
    those clusters change nothing more."""
    size = 48 * MiB
    ours, theirs = make_twins(tmp_path, size, cluster_size="4k")  # many bitmap clusters
    ops = [("discard", 0, size), ("write", 5 * MiB + 7 * 512, 4096), ("zero", size - 512, 512)]
    apply_ours(ours, ops)
    apply_theirs(theirs, ops)
    for name, _, _ in BITMAPS:
        assert dirty_map(ours, name) == dirty_map(theirs, name), name
    assert_clean(ours)


def test_bitmaps_are_in_use_until_closed_and_a_crash_leaves_them_so(tmp_path):
    ours, _ = make_twins(tmp_path, 16 * MiB)
    script = (
        f"import os, qcow2lib\n"
        f"dev = qcow2lib.open({str(ours)!r}, 'r+')\n"
        f"dev.write(5 << 20, b'x' * 70000)\n"
        f"dev.flush()\n"
        f"dev.write(9 << 20, b'y' * 512)\n"
        f"os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    flags = {b["name"]: b["flags"] for b in bitmap_info(ours)}
    # What was tracked is marked inconsistent; a disabled bitmap was never touched.
    assert flags == {
        "b0": ["in-use", "auto"],
        "fine": ["in-use", "auto"],
        "coarse": ["in-use", "auto"],
        "off": [],
    }
    assert_clean(ours)


def test_opening_and_reading_leaves_bitmaps_untouched(tmp_path):
    ours, theirs = make_twins(tmp_path, 16 * MiB)
    with qcow2lib.open(str(ours), "r+") as dev:
        dev.read(0, 4 * MiB)
        dev.flush()
    assert ours.read_bytes() == theirs.read_bytes()


def _set_flags(image: Path, bitmap_index: int, flags: int) -> None:
    with qcow2lib.open(str(image)) as dev:
        entry = dev._bitmap_entries[bitmap_index]
    with open(image, "r+b") as f:
        f.seek(entry.entry_offset + 12)
        f.write(struct.pack(">I", flags))


def test_bitmaps_it_cannot_keep_are_invalidated_before_the_first_change(tmp_path):
    """A bitmap flag this code does not know: the first write clears the bitmaps'
    autoclear bit first (durably), and QEMU then ignores them and finds no corruption."""
    ours, _ = make_twins(tmp_path, 16 * MiB)
    _set_flags(ours, 0, 2 | 1 << 7)
    with qcow2lib.open(str(ours), "r+") as dev:
        assert len(dev.bitmaps) == 4
        dev.write(0, b"x" * 4096)
        assert dev.bitmaps == []
        with open(ours, "rb") as f:
            (autoclear,) = struct.unpack(">Q", f.read(96)[88:96])  # (header bytes 88-95)
        assert not autoclear & S.AUTOCLEAR_BITMAPS
    assert bitmap_info(ours) == []
    result = qemu_img("check", "--output=json", ours, check=False)
    assert result.returncode in (0, 3) and json.loads(result.stdout).get("corruptions", 0) == 0


@pytest.mark.parametrize("change", ["resize", "apply"])
def test_resize_and_snapshot_apply_invalidate_bitmaps(tmp_path, change):
    """Changes the tracker does not record: the bitmaps are invalidated instead."""
    from qcow2lib import snapshots
    from qcow2lib.ops.resize import resize

    ours, _ = make_twins(tmp_path, 16 * MiB)
    with qcow2lib.open(str(ours), "r+") as dev:
        snapshots.create_snapshot(dev, "s1")
        assert len(bitmap_info(ours)) == 4  # creating a snapshot changes no guest data
        if change == "resize":
            resize(dev, 32 * MiB)
        else:
            snapshots.apply_snapshot(dev, "s1")
    assert bitmap_info(ours) == []
    result = qemu_img("check", "--output=json", ours, check=False)
    assert result.returncode in (0, 3) and json.loads(result.stdout).get("corruptions", 0) == 0


# --- qimg bitmap, side by side with qemu-img bitmap ----------------------------------------


def _mask_node(text: str) -> str:
    """QEMU names an image by its internal node name (#blockNNN) in some messages."""
    text = re.sub(r"persistent in '[^']*'", "persistent in <node>", text)
    return re.sub(r"persistent bitmaps to \S+:", "persistent bitmaps to <node>:", text)


def _same_bitmaps(twins: Twins, image: str) -> None:
    twins.assert_same("info", "--output=json", image, mask=mask_disk_size)
    twins.assert_same("check", image, mask=lambda text: re.sub(r"end offset: \d+", "", text))
    with qcow2lib.open(str(twins.qemu_dir / image)) as dev:
        names = [b["name"] for b in dev.bitmaps]
    for name in names:
        assert dirty_map(twins.qimg_dir / image, name) == dirty_map(twins.qemu_dir / image, name), (
            name
        )


def test_bitmap_command_matches_qemu_img(twins):
    def build():
        qemu_create("img", "64M")
        qemu_io("img", "write -P 1 0 3M")
        qemu_create("src", "64M")
        qemu_img("bitmap", "--add", "src", "s")
        qemu_io("src", "write 20M 1536", "write 40M 9M")
        qemu_create("small", "32M")
        qemu_img("bitmap", "--add", "small", "s")
        qemu_create("v2", "1M", options={"compat": "0.10"})
        qemu_img("create", "-q", "-f", "raw", "r.raw", "1M")

    twins.setup_copied(build)
    for args in (
        ["--add", "img", "a"],
        ["--add", "-g", "512", "--disable", "img", "fine"],
        ["--add", "img", "a"],
        ["--add", "--add", "img", "x"],
        ["--add", "-g", "3000", "img", "c"],
        ["--add", "-g", "4G", "img", "c"],
        ["--add", "-g", "0", "img", "dflt"],
        ["--add", "-g", "2G", "img", "huge"],
        ["--add", "img", ""],
        ["--clear", "img", "nope"],
        ["--add", "v2", "b"],
        ["--add", "-f", "raw", "r.raw", "b"],
        ["--clear", "-f", "raw", "r.raw", "b"],
        ["img", "a"],
        ["-g", "64k", "--clear", "img", "a"],
        ["-F", "qcow2", "--clear", "img", "a"],
        ["-b", "src", "--clear", "img", "a"],
        ["--add", "img"],
        ["--add", "missing.qcow2", "b"],
    ):
        twins.assert_same("bitmap", *args, mask=_mask_node)
    _same_bitmaps(twins, "img")
    twins.setup(lambda directory: qemu_io("img", "write 5M 1M", "write -z 30M 64k"))
    for args in (
        ["--merge", "a", "img", "fine"],
        ["--enable", "img", "fine"],
        ["--disable", "img", "a"],
        ["--clear", "img", "x"],
        ["--remove", "img", "huge"],
        ["--remove", "--remove", "img", "dflt"],
        ["--merge", "s", "-b", "src", "-F", "qcow2", "img", "x"],
        ["--merge", "s", "-b", "src", "img", "a"],
        ["--merge", "zz", "-b", "src", "img", "a"],
        ["--merge", "s", "-b", "small", "img", "a"],
        ["--merge", "s", "-b", "r.raw", "-F", "raw", "img", "a"],
    ):
        twins.assert_same("bitmap", *args, mask=_mask_node)
    _same_bitmaps(twins, "img")
    for name in ("a", "fine", "x"):
        twins.assert_same("bitmap", "--remove", "img", name)
    _same_bitmaps(twins, "img")
    assert bitmap_info(twins.qimg_dir / "img") == []
    result = qemu_img("check", "--output=json", twins.qimg_dir / "img", check=False)
    assert result.returncode == 0, result.stdout  # every bitmap cluster given back


def test_bitmap_command_on_an_inconsistent_bitmap(twins):
    def build():
        qemu_create("img", "16M")
        qemu_img("bitmap", "--add", "img", "b0")
        crash_qemu_io("img")  # leaves b0 marked in use

    twins.setup_copied(build)
    for args in (
        ["--clear", "img", "b0"],
        ["--enable", "img", "b0"],
        ["--merge", "b0", "img", "b0"],
        ["--add", "img", "b1"],
        ["--merge", "b0", "img", "b1"],
        ["--remove", "img", "b0"],
    ):
        twins.assert_same("bitmap", *args)
    _same_bitmaps(twins, "img")


def test_bitmap_operations_keep_writes_tracked(tmp_path):
    """Bitmap operations on an image being written: what was tracked is stored first,
    and a bitmap added later tracks the writes after it."""
    from qcow2lib.ops import bitmap as ops

    path = tmp_path / "img"
    qemu_create(path, 16 * MiB)
    qemu_img("bitmap", "--add", path, "early")
    with qcow2lib.open(str(path), "r+") as dev:
        dev.write(1 * MiB, b"x" * 4096)
        ops.add_bitmap(dev, "late", 65536)
        dev.write(9 * MiB, b"y" * 4096)
        ops.set_bitmap_enabled(dev, "early", False)
        dev.write(12 * MiB, b"z" * 4096)
    assert dirty_map(path, "early") == [
        (0, MiB, "clean"),
        (MiB, 65536, "dirty"),
        (MiB + 65536, 8 * MiB - 65536, "clean"),
        (9 * MiB, 65536, "dirty"),
        (9 * MiB + 65536, 7 * MiB - 65536, "clean"),
    ]
    assert dirty_map(path, "late") == [
        (0, 9 * MiB, "clean"),
        (9 * MiB, 65536, "dirty"),
        (9 * MiB + 65536, 3 * MiB - 65536, "clean"),
        (12 * MiB, 65536, "dirty"),
        (12 * MiB + 65536, 4 * MiB - 65536, "clean"),
    ]
    assert_clean(path)


def test_convert_bitmaps_matches_qemu_img(twins):
    def build():
        qemu_create("src", "32M", options={"cluster_size": "4k"})
        qemu_img("bitmap", "--add", "src", "first")
        qemu_img("bitmap", "--add", "-g", "512", "--disable", "src", "off")
        qemu_img("bitmap", "--add", "-g", "1M", "src", "last")
        qemu_io("src", "write -P 9 3M 70k", "write -z 20M 2M")
        qemu_img("bitmap", "--merge", "first", "src", "off")
        qemu_create("broken", "8M")
        qemu_img("bitmap", "--add", "broken", "b0")
        qemu_img("bitmap", "--add", "broken", "b1")
        crash_qemu_io("broken")  # b0 and b1 left in use
        qemu_img("bitmap", "--add", "broken", "b2")
        qemu_create("v2", "1M", options={"compat": "0.10"})

    twins.setup_copied(build)
    twins.assert_same("convert", "--bitmaps", "-O", "qcow2", "src", "out")
    _same_bitmaps(twins, "out")
    twins.assert_same("compare", "src", "out")
    for args in (
        ["--bitmaps", "-O", "qcow2", "broken", "b.qcow2"],
        ["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "broken", "b.qcow2"],
        ["--skip-broken-bitmaps", "-O", "qcow2", "src", "x.qcow2"],
        ["--bitmaps", "-O", "raw", "src", "x.raw"],
        ["--bitmaps", "-O", "qcow2", "v2", "x2.qcow2"],
        ["--bitmaps", "-O", "qcow2", "src", "v2", "x3.qcow2"],
    ):
        twins.assert_same("convert", *args)
    _same_bitmaps(twins, "b.qcow2")


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_stale_bitmaps_are_warned_of_and_a_writer_drops_them(twins, version):
    """A bitmaps extension without its autoclear bit (a v2 image amended down from one
    with a bitmap, or a v3 image whose bit a program cleared): every open warns as
    QEMU's does, in its words for each version and for a backing file too, and the first
    read-write open drops the extension, after which opens say nothing."""

    def build():
        qemu_create("stale.qcow2", "64M")
        qemu_img("bitmap", "--add", "stale.qcow2", "b0")
        if version == "v2":
            qemu_img("amend", "-o", "compat=0.10", "stale.qcow2")
        else:
            with open("stale.qcow2", "r+b") as f:  # autoclear_features, a u64 at byte 88
                f.seek(88)
                f.write(bytes(8))
        qemu_create("top.qcow2", "64M", backing="stale.qcow2", backing_fmt="qcow2")

    twins.setup_copied(build)
    for args in (
        ["info", "stale.qcow2"],
        ["info", "--backing-chain", "top.qcow2"],
        ["map", "top.qcow2"],
        ["check", "stale.qcow2"],
        ["amend", "-o", "cluster_size=4k", "stale.qcow2"],  # opened read-write, then refused
        ["info", "stale.qcow2"],
        ["map", "top.qcow2"],
    ):
        twins.assert_same(*args, mask=mask_disk_size)
    for directory in twins.dirs():
        header = (directory / "stale.qcow2").read_bytes()[:4096]
        assert struct.pack(">I", S.EXT_BITMAPS) not in header, directory
