"""VMDK images (qcow2lib/vmdk.py) against the real qemu-img and qemu-io.

qemu-img and qemu-io write monolithicSparse and streamOptimized images (plain,
zeroed and compressed grains); qcow2lib reads them byte for byte and maps them as
qemu-img does. qimg creates them; the result is qemu-img's byte for byte (the random
CID aside), QEMU writes compressed grains into it and both tools read them back alike.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import CorruptImageError, Qcow2Error
from qcow2lib.vmdk import VmdkImage
from qemutools import inside, qemu_img, qemu_io, run_qimg_in

KiB, MiB = 1024, 1024 * 1024
PATTERNS = [(0, 64 * KiB, 0x11), (MiB, 4 * KiB, 0x22), (3 * MiB - 512, 512, 0x33)]


def _raw_twin(tmp_path: Path, size: int) -> bytes:
    """The bytes PATTERNS give a disk of `size`."""
    data = bytearray(size)
    for offset, length, byte in PATTERNS:
        data[offset : offset + length] = bytes([byte]) * length
    return bytes(data)


def _source(tmp_path: Path) -> Path:
    source = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, "3M")
    qemu_io(source, *(f"write -P {b} {o} {n}" for o, n, b in PATTERNS), "write -z 2M 64k")
    return source


@pytest.fixture
def qemu_images(tmp_path) -> dict[str, Path]:
    """VMDK images written by QEMU: converted (sparse, stream-optimized) and written in
    place with zeroed grains."""
    source = _source(tmp_path)
    images = {}
    for name, options in (
        ("sparse", []),
        ("stream", ["-o", "subformat=streamOptimized"]),
        ("compat6", ["-o", "compat6=on,adapter_type=lsilogic"]),
    ):
        images[name] = tmp_path / f"{name}.vmdk"
        qemu_img("convert", "-O", "vmdk", *options, source, images[name])
    zeroed = images["zeroed"] = tmp_path / "zeroed.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", zeroed, "3M")
    qemu_io(zeroed, *(f"write -P {b} {o} {n}" for o, n, b in PATTERNS), "write -z 2M 64k")
    return images


@pytest.mark.parametrize("name", ["sparse", "stream", "compat6", "zeroed"])
def test_reads_what_qemu_wrote(tmp_path, qemu_images, name):
    image = qemu_images[name]
    expected = _raw_twin(tmp_path, 3 * MiB)
    with qcow2lib.open(str(image)) as device:  # probed: the KDMV magic says vmdk
        assert device.format == "vmdk"
        assert device.size == 3 * MiB
        assert device.read(0, device.size) == expected
        # unaligned pieces across grain boundaries, and the last sector
        assert device.read(64 * KiB - 100, 300) == expected[64 * KiB - 100 : 64 * KiB + 200]
        assert device.read(3 * MiB - 512, 512) == b"\x33" * 512


@pytest.mark.parametrize("name", ["sparse", "stream", "compat6", "zeroed"])
@pytest.mark.parametrize(
    "args",
    [
        ["map", "--output=json"],
        ["map"],
        ["info"],
        ["info", "--output=json"],
        ["compare", "-f", "vmdk", "-F", "qcow2", "{image}", "src.qcow2"],
        ["convert", "-O", "raw", "{image}", "out.raw"],
        ["check"],
        ["check", "--output=json"],
        ["check", "-r", "all"],
    ],
    ids=" ".join,
)
def test_cli_matches_qemu_img(tmp_path, qemu_images, name, args):
    image = qemu_images[name]
    argv = [a.format(image=image.name) for a in args]
    if "{image}" not in args:
        argv.append(image.name)
    with inside(tmp_path):
        expected = qemu_img(*argv, check=False)
    if "out.raw" in argv:
        expected_raw = (tmp_path / "out.raw").read_bytes()
        (tmp_path / "out.raw").unlink()
    actual = run_qimg_in(tmp_path, *argv)

    def seen(result):
        # the two tools order stdout and stderr differently in a pipe; disk size is the host's
        text = re.sub(r"disk size: .*|\"actual-size\": \d+", "", result.stdout)
        return result.returncode, text, result.stderr

    assert seen(actual) == seen(expected)
    if "out.raw" in argv:
        assert (tmp_path / "out.raw").read_bytes() == expected_raw


def _without_cid(data: bytes) -> bytes:
    """An image's bytes with its random content ID (and the padding it shifts) taken out."""
    descriptor = re.sub(rb"\nCID=[0-9a-f]+\n", b"\nCID=\n", data[512 : 21 * 512].rstrip(b"\0"))
    return data[:512] + descriptor + data[21 * 512 :]


CREATE_CASES = [
    ["img", "64M"],
    ["-o", "subformat=streamOptimized", "img", "64M"],
    ["-o", "subformat=monolithicSparse,zeroed_grain=on,compat6=on,adapter_type=lsilogic", "img"],
    ["-o", "hwversion=7,toolsversion=123,adapter_type=legacyESX", "img", "3G"],
    ["img", "1000"],
    ["img", "100G"],
    ["-o", "subformat=foo", "img", "1M"],
    ["-o", "adapter_type=foo", "img", "1M"],
    ["-o", "compat6=on,hwversion=7", "img", "1M"],
    ["-o", "backing_fmt=qcow2", "img", "1M"],
    ["-o", "zeroed_grain=maybe", "img", "1M"],
    ["-o", "help"],
]


@pytest.mark.parametrize("args", CREATE_CASES, ids=" ".join)
def test_create_matches_qemu_img(tmp_path, args):
    theirs_dir, ours_dir = tmp_path / "qemu", tmp_path / "qimg"
    theirs_dir.mkdir()
    ours_dir.mkdir()
    if args[-1] == "img":
        args = [*args, "1G"]
    expected = qemu_img(
        "create",
        "-f",
        "vmdk",
        *[str(theirs_dir / a) if a == "img" else a for a in args],
        check=False,
    )
    actual = run_qimg_in(ours_dir, "create", "-f", "vmdk", *args)
    assert actual.returncode == expected.returncode
    assert actual.stdout == expected.stdout.replace(str(theirs_dir / "img"), "img")
    assert actual.stderr == expected.stderr.replace(str(theirs_dir / "img"), "img")
    theirs, ours = theirs_dir / "img", ours_dir / "img"
    assert ours.exists() == theirs.exists()
    if ours.exists():
        assert _without_cid(ours.read_bytes()) == _without_cid(theirs.read_bytes())
        assert qemu_img("check", ours, check=False).returncode == 0


def test_qemu_writes_compressed_grains_into_a_qimg_image(tmp_path):
    """iotest 055's use: a streamOptimized target made by qimg, compressed grains written
    by QEMU, the result compared with the source by both tools."""
    target = tmp_path / "target.vmdk"
    run_qimg_in(
        tmp_path, "create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", target.name, "3M"
    )
    qemu_io(target, *(f"write -c -P {b} {o - o % 65536} 64k" for o, _, b in PATTERNS))
    reference = tmp_path / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", reference, "3M")
    qemu_io(reference, *(f"write -P {b} {o - o % 65536} 64k" for o, _, b in PATTERNS))
    assert qemu_img("compare", "-f", "qcow2", "-F", "vmdk", reference, target).returncode == 0
    result = run_qimg_in(
        tmp_path, "compare", "-f", "qcow2", "-F", "vmdk", reference.name, target.name
    )
    assert (result.returncode, result.stdout) == (0, "Images are identical.\n")


# Header field offsets in the file (after the 4-byte magic): capacity 12, grain size 20,
# GTEs per GT 44, GD offset 56, overhead 64.
def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _first_grain_entry_offset(path: Path) -> int:
    data = path.read_bytes()
    gd_offset = struct.unpack_from("<Q", data, 4 + 52)[0] * 512
    gt_offset = struct.unpack_from("<I", data, gd_offset)[0] * 512
    return gt_offset


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _patch(p, 4, "<I", 4), "Unsupported VMDK version 4"),
        (lambda p: _patch(p, 4 + 40, "<I", 513), "L2 table size too big"),
        (lambda p: _patch(p, 4 + 16, "<Q", 0x400000), "Invalid granularity"),
        (lambda p: _patch(p, 4 + 16, "<Q", 0), "L1 entry size is invalid"),
        (lambda p: _patch(p, 4 + 60, "<Q", 1 << 20), "File truncated"),
        (lambda p: _patch(p, 4 + 52, "<Q", (1 << 64) - 1), "Invalid footer"),
        (lambda p: _patch(p, 4 + 52, "<Q", 1 << 30), "past the end of the file"),
        (lambda p: _patch(p, 4 + 8, "<Q", 1 << 50), "L1 size too big"),
    ],
)
def test_bad_headers_are_refused_with_a_message(tmp_path, damage, message):
    image = tmp_path / "bad.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", image, "4M")
    damage(image)
    with pytest.raises(Qcow2Error, match=message):
        VmdkImage(str(image))


@pytest.mark.parametrize("entry", [1 << 30, 200])
def test_bad_grain_entries_fail_reads_of_that_grain_only(tmp_path, entry):
    """A grain past the end of the file, or a compressed grain that does not inflate:
    a clear error for that grain, the rest still reads."""
    image = tmp_path / "bad.vmdk"
    source = _source(tmp_path)
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source, image)
    _patch(image, _first_grain_entry_offset(image), "<I", entry)
    with VmdkImage(str(image)) as device:
        with pytest.raises(CorruptImageError):
            device.read(0, 4096)
        assert device.read(MiB, 4096) == b"\x22" * 4096


@pytest.mark.parametrize("args", [["check"], ["check", "--output=json"], ["info"]])
def test_check_of_a_grain_past_the_end_matches_qemu_img(tmp_path, args):
    image = tmp_path / "bad.vmdk"
    qemu_img("convert", "-O", "vmdk", _source(tmp_path), image)
    _patch(image, _first_grain_entry_offset(image) + 16 * 4, "<I", 1 << 24)  # grain at 1 MiB
    expected = qemu_img(*args, image, check=False)
    actual = run_qimg_in(tmp_path, *args, image.name)
    strip = re.compile(r"disk size: .*|cid: \d+")
    assert (actual.returncode, actual.stderr) == (expected.returncode, expected.stderr)
    assert strip.sub("", actual.stdout) == strip.sub(
        "", expected.stdout.replace(str(image), image.name)
    )


@pytest.mark.parametrize(
    "options",
    [[], ["-o", "subformat=streamOptimized"], ["-o", "zeroed_grain=on"], ["-o", "compat6=on"]],
    ids=lambda o: " ".join(o) or "default",
)
def test_convert_to_vmdk_matches_qemu_img(tmp_path, options):
    """qimg's VMDK target: same content, same map and a clean check for qemu-img."""
    source = _source(tmp_path)
    theirs, ours = tmp_path / "theirs.vmdk", tmp_path / "ours.vmdk"
    qemu_img("convert", "-O", "vmdk", *options, source, theirs)
    result = run_qimg_in(tmp_path, "convert", "-O", "vmdk", *options, source.name, ours.name)
    assert (result.returncode, result.stderr) == (0, "")
    assert qemu_img("compare", "-f", "qcow2", "-F", "vmdk", source, ours).returncode == 0
    assert qemu_img("check", ours).stdout == "No errors were found on the image.\n"
    maps = [qemu_img("map", "--output=json", path).stdout for path in (theirs, ours)]
    if not options:  # plain grains land where QEMU puts them, offsets included
        assert maps[1] == maps[0]
    strip = re.compile(r', "offset": \d+')
    assert strip.sub("", maps[1]) == strip.sub("", maps[0])


def test_writes_read_back_by_qemu(tmp_path):
    """Partial grain writes (a new grain is zero around them), rewrites in place, zeroed
    grains: qemu-io reads what was written."""
    image = tmp_path / "w.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", image, "4M")
    with qcow2lib.open(str(image), "r+") as device:
        device.write(1000, b"\x41" * 3000)
        device.write(1500, b"\x42" * 100)
        device.write(3 * MiB - 10, b"\x43" * 20)
        device.write_zeroes(MiB, 128 * KiB)
        device.write(MiB + 64 * KiB, b"\x44" * 512)
    qemu_io(
        image,
        "read -P 0 0 1000",
        "read -P 0x41 1000 500",
        "read -P 0x42 1500 100",
        "read -P 0x41 1600 2400",
        "read -P 0 4000 60536",
        "read -P 0x43 3145718 20",
        "read -P 0 1048576 65536",
        "read -P 0x44 1114112 512",
    )
    assert qemu_img("check", image).returncode == 0
    entries = qemu_img("map", "--output=json", image).stdout
    assert '"start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": true' in entries


def test_stream_optimized_takes_whole_grains_once(tmp_path):
    image = tmp_path / "s.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", image, "1M")
    with qcow2lib.open(str(image), "r+") as device:
        with pytest.raises(Qcow2Error, match="whole compressed grains"):
            device.write(512, b"x" * 512)
        device.write(64 * KiB, b"\x55" * 64 * KiB)
        with pytest.raises(OSError, match="allocated cluster"):
            device.write(64 * KiB, b"\x56" * 64 * KiB)
    qemu_io(image, "read -P 0x55 64k 64k", "read -P 0 0 64k")


@pytest.mark.parametrize(
    "text",
    [
        b'# Disk DescriptorFile\nversion=1\ncreateType="foo"\n',
        b"# c\n   \n  \r\nversion=2\r\n",
        b"\nversion=1\n",
        b"version=4\n",
        b" x\nversion=1\n",
    ],
)
def test_descriptor_files_are_probed_and_refused_as_qemu_img(tmp_path, text):
    """Text descriptors probe as VMDK as QEMU's probe decides; what QEMU refuses is refused
    with its message."""
    (tmp_path / "d.vmdk").write_bytes(text)
    with inside(tmp_path):
        expected = qemu_img("info", "d.vmdk", check=False)
    actual = run_qimg_in(tmp_path, "info", "d.vmdk")
    strip = re.compile(r"disk size: .*")
    assert (actual.returncode, actual.stderr) == (expected.returncode, expected.stderr)
    assert strip.sub("", actual.stdout) == strip.sub("", expected.stdout)


def test_version3_sparse_image_opens_read_only_only(tmp_path):
    image = tmp_path / "v3.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", image, "1M")
    _patch(image, 4, "<I", 3)
    qcow2lib.open(str(image), fmt="vmdk").close()
    with pytest.raises(Qcow2Error, match="VMDK version 3 must be read only"):
        qcow2lib.open(str(image), "r+", fmt="vmdk")
