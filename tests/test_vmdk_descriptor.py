"""VMDK descriptor files (vmdk_descriptor.py): what VMware ESXi and Workstation keep, a
text descriptor naming flat or sparse extent files, read side by side with qemu-img."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcow2lib
from qcow2lib import UnsupportedFeatureError
from qcow2lib.vmdk_descriptor import DESCRIPTOR_FILE_TYPES, EXTENT_TYPES
from qemutools import (
    assert_same_in,
    assert_same_result,
    qemu_img,
    qemu_io,
    run_both_in,
    run_qimg_in,
)

MiB = 1 << 20
SUBFORMATS = ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]

COMMANDS = [
    ["info"],
    ["info", "--output=json"],
    ["map"],
    ["map", "--output=json"],
    ["check"],
    ["check", "--output=json"],
    ["measure", "-O", "qcow2"],
]


@pytest.fixture(scope="module")
def made_by_qemu(tmp_path_factory) -> Path:
    """Descriptor images qemu-img creates, with data written by qemu-io across extents."""
    directory = tmp_path_factory.mktemp("vmdk-descriptors")
    for subformat, size in (
        ("monolithicFlat", "100M"),
        ("twoGbMaxExtentSparse", "5G"),
        ("twoGbMaxExtentFlat", "5G"),
    ):
        image = directory / f"{subformat}.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", image, size)
        writes = ["write -P 0x11 1M 64k", "write -P 0x22 3M 4k"]
        if size == "5G":  # (the second and third extents too, and across their border)
            writes += ["write -P 0x33 3G 64k", "write -P 0x44 4095M 2M"]
        qemu_io(image, *writes)
    return directory


@pytest.mark.parametrize(
    "subformat", ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]
)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_descriptor_images_described_as_qemu_img_describes_them(
    made_by_qemu: Path, subformat: str, command: list[str], absolute: bool
) -> None:
    """info (extents, their files, the disk size of them all), map (each extent's file
    and offsets in it), check and measure, named from the directory or by full path."""
    name = str(made_by_qemu / f"{subformat}.vmdk") if absolute else f"{subformat}.vmdk"
    assert_same_in(made_by_qemu, *command, name)


@pytest.mark.parametrize(
    "subformat", ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]
)
def test_descriptor_images_converted(made_by_qemu: Path, tmp_path: Path, subformat: str) -> None:
    """convert reads every extent; compare finds the copy equal (qemu-img as well)."""
    source = made_by_qemu / f"{subformat}.vmdk"
    ours, theirs = run_both_in(tmp_path, "convert", "-O", "qcow2", source, "copy.qcow2")
    assert ours.returncode == theirs.returncode == 0, (ours.stderr, theirs.stderr)
    assert qemu_img("compare", source, tmp_path / "copy.qcow2").returncode == 0
    assert_same_in(tmp_path, "compare", source, "copy.qcow2")


def _descriptor(create_type: str, extent_lines: str, extra: str = "") -> str:
    return (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'{extra}createType="{create_type}"\n\n# Extent description\n{extent_lines}\n\n'
        '# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n'
    )


@pytest.mark.parametrize(
    "text",
    [
        _descriptor("vmfs", 'RW 4096 VMFS "esx-flat.vmdk"'),  # (ESXi: disk.vmdk beside it)
        _descriptor("monolithicFlat", 'RW 2048 FLAT "esx-flat.vmdk" 2048'),
        _descriptor("monolithicFlat", 'RW 8192 FLAT "esx-flat.vmdk" 0'),  # past its end
        _descriptor("monolithicFlat", 'RW 2048 FLAT "esx-flat.vmdk" 8192'),  # all past it
        _descriptor(
            "twoGbMaxExtentFlat",
            'RDONLY 2048 FLAT "esx-flat.vmdk" 0\nRW 1024 ZERO\n'  # (lines QEMU skips)
            'RW 1024 FLAT "esx-flat.vmdk" 1024\nRW 2048 FLAT "esx-flat.vmdk" 0',
        ),
        _descriptor("monolithicFlat", 'RW 2048 FLAT "esx-flat.vmdk" 0\r'),
        _descriptor("vmfs", 'RW 4096 VMFS "esx-flat.vmdk" 5'),  # refused lines
        _descriptor("monolithicFlat", 'RW 2048 FLAT "esx-flat.vmdk"'),
        _descriptor("monolithicFlat", 'RW 2048 FLAT "esx-flat.vmdk" -1'),
        _descriptor("monolithicFlat", 'RW 2048 SPARSE "esx-flat.vmdk" 0'),
        _descriptor("monolithicFlat", 'RW 2048 FLAT "missing-flat.vmdk" 0'),
        _descriptor("twoGbMaxExtentSparse", 'RW 4192256 SPARSE "esx-flat.vmdk"'),  # not sparse
        _descriptor("streamOptimized", 'RW 2048 FLAT "esx-flat.vmdk" 0'),  # not from a file
        _descriptor("monolithicFlat", "").replace('createType="monolithicFlat"', ""),
    ],
    ids=repr,
)
@pytest.mark.parametrize("command", [["info"], ["map", "--output=json"], ["check"]], ids=" ".join)
def test_handwritten_descriptors_read_or_refused_as_qemu_img_does(
    tmp_path: Path, text: str, command: list[str]
) -> None:
    flat = bytearray(2 * MiB)
    flat[600000:600002] = b"AB"
    flat[1536 * 1024 : 1536 * 1024 + 4096] = b"\x5a" * 4096
    (tmp_path / "esx-flat.vmdk").write_bytes(flat)
    (tmp_path / "disk.vmdk").write_text(text, "latin-1", newline="")
    assert_same_in(tmp_path, *command, "-f", "vmdk", "disk.vmdk")


def test_descriptor_image_through_the_api(tmp_path: Path) -> None:
    """Reads follow the extents into their files (bytes past a flat file's end read as
    zeros); the image opens read-only, and a write is refused."""
    flat = bytes(range(256)) * (4 * 4096)  # 4 MiB
    (tmp_path / "a-flat.vmdk").write_bytes(flat)
    (tmp_path / "b-flat.vmdk").write_bytes(flat[: MiB // 2])
    descriptor = tmp_path / "disk.vmdk"
    descriptor.write_text(
        _descriptor(
            "twoGbMaxExtentFlat", 'RW 2048 FLAT "a-flat.vmdk" 4\nRW 2048 FLAT "b-flat.vmdk" 0'
        )
    )
    with qcow2lib.open(str(descriptor)) as image:
        assert image.format == "vmdk" and image.size == 2 * MiB
        assert image.read(0, MiB) == flat[2048 : 2048 + MiB]
        assert image.read(MiB - 10, 20) == flat[2048 + MiB - 10 : 2048 + MiB] + flat[:10]
        assert image.read(MiB + MiB // 2, 4096) == bytes(4096)
        with pytest.raises(qcow2lib.ReadOnlyError):
            image.write(0, b"x")
    with pytest.raises(UnsupportedFeatureError, match="read-only"):
        qcow2lib.open(str(descriptor), "r+")
    assert qemu_img("compare", descriptor, tmp_path / "a-flat.vmdk", check=False).returncode == 1


@pytest.fixture(scope="module")
def with_parents(tmp_path_factory) -> Path:
    """VMware-style chains qemu-img makes: a monolithicSparse base, a sparse child of it
    and a grandchild, and a twoGbMaxExtentSparse child; each writes over part of what is
    below."""
    directory = tmp_path_factory.mktemp("vmdk-parents")
    base, mid, top, split = (directory / f"{n}.vmdk" for n in ("base", "mid", "top", "split"))
    qemu_img("create", "-q", "-f", "vmdk", base, "100M")
    qemu_io(base, "write -P 1 0 1M", "write -P 2 10M 1M")
    # (each child after its parent's last write: a write gives an image a new CID, which
    # its children's parentCID would no longer match)
    steps = (
        (mid, base, [], ["write -P 3 512k 64k", "write -P 4 50M 4k"]),
        (top, mid, [], ["write -P 5 10M 64k"]),
        (split, base, ["-o", "subformat=twoGbMaxExtentSparse"], ["write -P 6 1M 1M"]),
    )
    for child, parent, options, writes in steps:
        qemu_img("create", "-q", "-f", "vmdk", *options, "-b", parent.name, "-F", "vmdk", child)
        qemu_io(child, *writes)
    return directory


@pytest.mark.parametrize("image", ["mid", "top", "split"])
@pytest.mark.parametrize(
    "command",
    [*COMMANDS, ["info", "--backing-chain"], ["info", "--backing-chain", "--output=json"]],
    ids=" ".join,
)
def test_parent_images_read_as_qemu_img_reads_them(
    with_parents: Path, image: str, command: list[str]
) -> None:
    """parentFileNameHint names the backing file (VMDK, relative to the image's
    directory): info shows it, map reports the parent's data one level deeper, and
    convert reads through the chain."""
    assert_same_in(with_parents, *command, f"{image}.vmdk")


@pytest.mark.parametrize("image", ["top", "split"])
def test_parent_images_converted(with_parents: Path, tmp_path: Path, image: str) -> None:
    source = with_parents / f"{image}.vmdk"
    ours, theirs = run_both_in(tmp_path, "convert", "-O", "raw", source, "copy.raw")
    assert ours.returncode == theirs.returncode == 0, (ours.stderr, theirs.stderr)
    assert qemu_img("compare", source, tmp_path / "copy.raw").returncode == 0
    with qcow2lib.open(str(source)) as device:
        assert device.read(0, 2 * MiB) == (tmp_path / "copy.raw").read_bytes()[: 2 * MiB]
    with pytest.raises(UnsupportedFeatureError, match="read-only"):
        qcow2lib.open(str(source), "r+")


def test_changed_parent_refused_as_qemu_img_refuses_it(with_parents: Path, tmp_path: Path) -> None:
    """A parent whose CID is no longer the parentCID its child records has changed since:
    reads of what the child leaves to it fail with EINVAL, as in QEMU."""
    for name in ("base.vmdk", "mid.vmdk"):
        (tmp_path / name).write_bytes((with_parents / name).read_bytes())
    data = bytearray((tmp_path / "base.vmdk").read_bytes())
    cid = data.find(b"\nCID=") + 5
    data[cid : cid + 8] = b"12345678"
    (tmp_path / "base.vmdk").write_bytes(data)
    for command in (
        ["compare", "mid.vmdk", "mid.vmdk"],
        ["map", "mid.vmdk"],
        ["dd", "if=mid.vmdk", "of=out", "count=1"],
    ):
        assert_same_in(tmp_path, *command)
    with qcow2lib.open(str(tmp_path / "mid.vmdk")) as device:
        assert device.read(512 * 1024, 4096) == b"\x03" * 4096  # (its own grains read)
        with pytest.raises(qcow2lib.Qcow2IOError, match="parentCID"):
            device.read(0, 4096)


def test_missing_parent_as_qemu_img_reports_it(tmp_path: Path) -> None:
    """info shows the parent a descriptor names without opening it; what reads through
    it fails as qemu-img fails."""
    (tmp_path / "esx-flat.vmdk").write_bytes(bytes(MiB))
    parent = 'parentFileNameHint="base.vmdk"\n'
    text = _descriptor("monolithicFlat", 'RW 2048 FLAT "esx-flat.vmdk" 0', parent)
    (tmp_path / "disk.vmdk").write_text(text)
    for command in (["info"], ["map"], ["check"]):
        assert_same_in(tmp_path, *command, "disk.vmdk")


def test_untrusted_descriptor_files_refused(tmp_path: Path, monkeypatch) -> None:
    """A descriptor may name any host file as an extent (here one outside its directory):
    an untrusted image is refused as soon as it turns out to be a descriptor file, before
    any extent is opened; a VMDK parent is not a qcow2 backing file, refused as well."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"s" * MiB)
    inside_dir = tmp_path / "inside"
    inside_dir.mkdir()
    descriptor = inside_dir / "disk.vmdk"
    descriptor.write_text(_descriptor("monolithicFlat", f'RW 2048 FLAT "{secret}" 0'))
    with qcow2lib.open(str(descriptor)) as trusted:  # (as qemu-img opens it)
        assert trusted.read(0, 4) == b"ssss"
    for fmt in (None, "vmdk"):
        with pytest.raises(qcow2lib.UntrustedImageError, match="descriptor file"):
            qcow2lib.open(str(descriptor), fmt=fmt, untrusted=True)
    monkeypatch.setenv("QIMG_UNTRUSTED", "1")
    ours = run_qimg_in(inside_dir, "convert", "-O", "raw", "disk.vmdk", "out.raw")
    assert ours.returncode == 1 and "descriptor file" in ours.stderr
    assert not (inside_dir / "out.raw").exists()
    child = inside_dir / "child.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", inside_dir / "base.vmdk", "1M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    with pytest.raises(qcow2lib.UntrustedImageError):
        qcow2lib.open(str(child), untrusted=True)


def test_sparse_extents_grain_directories_bounded_in_all(tmp_path: Path) -> None:
    """One sparse extent's grain directory may hold QEMU's limit of 32M entries (128 MiB,
    loaded on opening); a descriptor naming many such extents would multiply that. The
    extents of one image share the limit: the one that would pass it is refused before
    its directory is read."""
    extent = tmp_path / "big.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", extent, "1G")
    entries = 20 << 20  # (80 MiB of directory: two of them pass the limit)
    with open(extent, "r+b") as f:
        header = f.read(512)
        gd_offset = struct.unpack_from("<Q", header, 4 + 52)[0]
        f.seek(4 + 8)
        f.write(struct.pack("<Q", entries * 512 * 128))  # capacity, in sectors
        f.truncate(gd_offset * 512 + entries * 4 + MiB)
    lines = 'RW 10000 SPARSE "big.vmdk"\nRW 10000 SPARSE "big.vmdk"'
    (tmp_path / "disk.vmdk").write_text(_descriptor("twoGbMaxExtentSparse", lines))
    with pytest.raises(qcow2lib.CorruptImageError, match="grain directories"):
        qcow2lib.open(str(tmp_path / "disk.vmdk"))
    (tmp_path / "one.vmdk").write_text(_descriptor("twoGbMaxExtentSparse", lines.split("\n")[0]))
    with qcow2lib.open(str(tmp_path / "one.vmdk")) as image:
        assert image.size == entries * 512 * 128 * 512


_LINE_PARTS = {
    "access": st.sampled_from(["RW", "RDONLY", "NOACCESS", "rw", "RWX", ""]),
    "sectors": st.sampled_from(["2048", "1", "0", "-5", "+64", "x", "99999999999999999999", ""]),
    "kind": st.sampled_from([*EXTENT_TYPES, "ZERO", "flat", "FLATTER", ""]),
    "name": st.sampled_from(['"f.vmdk"', '"s.vmdk"', '"missing"', '""', '"f.vmdk', "f.vmdk"]),
    "offset": st.sampled_from(["", " 0", " 4", " -1", " 2048", " x", " 99999999999999999999"]),
    "gap": st.sampled_from([" ", "  ", "\t", " \r", "\n"]),
    "end": st.sampled_from(["\n", "\r\n", "\r", ""]),
}


@st.composite
def _descriptor_texts(draw) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        part = {key: draw(strategy) for key, strategy in _LINE_PARTS.items()}
        gap = part["gap"]
        lines.append(
            f"{part['access']}{gap}{part['sectors']}{gap}{part['kind']}{gap}{part['name']}"
            f"{part['offset']}{part['end']}"
        )
    create_type = draw(st.sampled_from([*DESCRIPTOR_FILE_TYPES, "streamOptimized", "foo"]))
    return _descriptor(create_type, "".join(lines))


@pytest.fixture(scope="module")
def extent_files(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vmdk-extent-files")
    flat = bytearray(MiB)
    flat[4096:8192] = b"\x42" * 4096
    (directory / "f.vmdk").write_bytes(flat)
    qemu_img("create", "-q", "-f", "vmdk", directory / "s.vmdk", "1M")
    qemu_io(directory / "s.vmdk", "write -P 7 64k 64k")
    return directory


@settings(
    max_examples=int(os.environ.get("VMDK_EXAMPLES", "200")),
    deadline=None,
    derandomize=not os.environ.get("VMDK_RANDOM"),
)
@given(text=_descriptor_texts())
def test_random_descriptors_read_as_qemu_img_reads_them(extent_files: Path, text: str) -> None:
    """Descriptors made of extent lines QEMU takes, skips or refuses, in any mix: qimg's
    info is qemu-img's (what opens, its extents and size, or the same error), and what
    opens reads its whole disk without any error but a Qcow2Error."""
    (extent_files / "disk.vmdk").write_text(text, "latin-1", newline="")
    args = ("info", "--output=json", "-f", "vmdk", "disk.vmdk")
    ours, theirs = run_both_in(extent_files, *args)
    # (qemu-img's output is read in text mode, whose newlines are "\n" only: qimg's too)
    ours.stderr = ours.stderr.replace("\r\n", "\n").replace("\r", "\n")
    if "Assertion `s->num_extents' failed" not in theirs.stderr:  # (QEMU aborts on none)
        assert_same_result(ours, theirs, text)
    try:
        image = qcow2lib.open(str(extent_files / "disk.vmdk"), fmt="vmdk")
    except qcow2lib.Qcow2Error:
        return
    with image:
        image.extents()
        if image.size <= 8 * MiB:
            image.read(0, image.size)
