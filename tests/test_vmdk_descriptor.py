"""VMDK descriptor files (vmdk_descriptor.py): what VMware ESXi and Workstation keep, a
text descriptor naming flat or sparse extent files, read side by side with qemu-img."""

from __future__ import annotations

from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import UnsupportedFeatureError
from qemutools import assert_same_in, qemu_img, qemu_io, run_both_in

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


def test_parent_images_refused(tmp_path: Path) -> None:
    """A descriptor naming a parent (a linked clone, a Workstation snapshot) is refused
    by qimg, which opens no VMDK backing files."""
    (tmp_path / "esx-flat.vmdk").write_bytes(bytes(MiB))
    text = _descriptor(
        "monolithicFlat", 'RW 2048 FLAT "esx-flat.vmdk" 0', 'parentFileNameHint="base.vmdk"\n'
    )
    (tmp_path / "disk.vmdk").write_text(text)
    with pytest.raises(UnsupportedFeatureError, match="parentFileNameHint"):
        qcow2lib.open(str(tmp_path / "disk.vmdk"))
