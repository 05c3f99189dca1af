"""qemu-img convert --salvage against the real qemu-img 7.2: the same warnings in the same
order, exit status 0, and the same output image (zeros where the source could not be
read); without --salvage the same errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from qcow2lib.convert import convert
from qcow2lib.errors import Qcow2IOError
from qemutools import qemu_compare, qemu_img, qemu_io, run
from qemutools import run_qimg_in as run_qimg

SECTOR = 512


def blkdebug_source(image: Path, status_sectors=(), read_sectors=()) -> str:
    """A json: name with blkdebug above the qcow2 image, failing block status and reads
    of the given sectors from the start (event "none")."""
    rules = [
        f"{{'event': 'none', 'iotype': '{kind}', 'errno': 5, 'sector': {sector}}}"
        for kind, sectors in (("block-status", status_sectors), ("read", read_sectors))
        for sector in sectors
    ]
    return (
        "json:{'driver': 'blkdebug', 'image': {'driver': 'qcow2', 'file': "
        f"{{'driver': 'file', 'filename': '{image}'}}}}, 'inject-error': [{', '.join(rules)}]}}"
    )


def convert_both(tmp_path: Path, *args) -> tuple:
    """Run `convert ARGS OUT` with both programs; (result, output path) for each."""
    results = []
    for who in ("ours", "theirs"):
        out = tmp_path / f"out-{who}"
        if who == "ours":
            result = run_qimg(tmp_path, "convert", *args, out)
        else:
            result = run(["qemu-img", "convert", *args, out], check=False, cwd=tmp_path)
        results.append((result, out))
    return results


@pytest.fixture
def source(tmp_path: Path) -> Path:
    image = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "8M")
    qemu_io(image, "write -P 42 0 3M", "write -P 7 5M 2M")
    return image


@pytest.mark.parametrize("extra", [[], ["-m", "1"], ["-O", "raw"], ["-c"]])
def test_salvage_warnings_and_image_as_qemu(tmp_path: Path, source: Path, extra: list):
    """qemu-iotests 251 in small: block status failing at two sectors, reads failing at
    one of them, at another, and at a run of eight sectors. (Not with -W: qemu-img's
    order is then its coroutines', which qimg keeps in guest order.)"""
    name = blkdebug_source(
        source,
        status_sectors=(2064, 11265),
        read_sectors=(1000, 11265, *range(12288, 12296)),
    )
    fmt = ["-O", "qcow2"] if "-O" not in extra else []
    (ours, ours_out), (theirs, theirs_out) = convert_both(tmp_path, "--salvage", *fmt, *extra, name)
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        theirs.returncode,
        theirs.stdout,
        theirs.stderr,
    )
    assert ours.returncode == 0
    if "-c" not in extra:  # compressed, whole clusters are read: no status is asked
        assert ours.stderr.count("warning: error while reading block status") == 4
    assert "warning: error while reading offset 6291456: Input/output error" in ours.stderr
    assert qemu_compare(ours_out, theirs_out) == 0


def test_quiet_salvage_prints_nothing(tmp_path: Path, source: Path):
    name = blkdebug_source(source, status_sectors=(10,), read_sectors=(20,))
    (ours, ours_out), (theirs, theirs_out) = convert_both(
        tmp_path, "-q", "--salvage", "-O", "qcow2", name
    )
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr) == (0, "")
    assert qemu_compare(ours_out, theirs_out) == 0


@pytest.mark.parametrize(
    "status_sectors, read_sectors", [((2064,), ()), ((), (3000,)), ((2064,), (2064,))]
)
def test_without_salvage_the_error_stops_convert(tmp_path, source, status_sectors, read_sectors):
    name = blkdebug_source(source, status_sectors, read_sectors)
    (ours, _), (theirs, _) = convert_both(tmp_path, "-O", "qcow2", name)
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr)
    assert ours.returncode == 1


def test_damaged_l2_entry(tmp_path: Path):
    """Without blkdebug: an L2 entry with an unaligned offset makes its cluster unreadable;
    --salvage copies the rest and writes zeros there, warning of each sector as qemu-img,
    after the one-time notice of the damage its driver prints."""
    image = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    qemu_io(image, "write -P 1 0 1M")
    with open(image, "r+b") as handle:  # L2 table in cluster 4, entry of guest cluster 3
        handle.seek(0x40000 + 8 * 3)
        (entry,) = struct.unpack(">Q", handle.read(8))
        handle.seek(0x40000 + 8 * 3)
        handle.write(struct.pack(">Q", entry | 0x200))
    (ours, ours_out), (theirs, theirs_out) = convert_both(tmp_path, "--salvage", "-O", "raw", image)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stderr == theirs.stderr
    lines = theirs.stderr.splitlines()
    assert lines[0].startswith("qcow2: Image is corrupt: Cluster allocation offset 0x80200")
    assert len(lines) == 1 + 3 * 128  # the notice; 128 sectors: status twice, read once
    expected = bytearray(b"\1" * (1 << 20))
    expected[3 << 16 : 4 << 16] = bytes(1 << 16)
    assert ours_out.read_bytes() == theirs_out.read_bytes() == bytes(expected)


def test_engine_salvage_callback(tmp_path: Path, source: Path):
    """The library reports what it went past to the callback, in guest order."""
    import qcow2lib
    from qcow2lib.chain import json_image_target

    name = blkdebug_source(source, status_sectors=(100,), read_sectors=(50, 100))
    seen = []
    qemu_img("create", "-q", "-f", "raw", tmp_path / "t.raw", "8M")
    target, fmt = json_image_target(name)
    with qcow2lib.open(target, fmt=fmt) as src, qcow2lib.open(str(tmp_path / "t.raw"), "r+") as dst:
        convert(src, dst, salvage=lambda what, offset, exc: seen.append((what, offset)))
        with pytest.raises(Qcow2IOError):
            convert(src, dst)
    assert seen == [
        ("block status", 100 * SECTOR),
        ("read", 50 * SECTOR),
        ("block status", 100 * SECTOR),
        ("read", 100 * SECTOR),
    ]
    data = (tmp_path / "t.raw").read_bytes()
    assert data[50 * SECTOR : 51 * SECTOR] == bytes(SECTOR)
    assert data[51 * SECTOR : 100 * SECTOR] == b"\x2a" * (49 * SECTOR)
