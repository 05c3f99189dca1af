"""partitions/<n>.raw: MBR (with logical partitions) and GPT tables written by sfdisk through
the mount, and the parser on hostile tables."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from fuse_mount.partitions import MAX_GPT_ENTRY_ARRAY, SECTOR, scan
from fusetools import fuse_mount, is_mounted
from fusetools import mountpoints  # noqa: F401 (a fixture)
from qemutools import assert_clean, qemu_create, qemu_img

EXT4_MAGIC_OFFSET = 1024 + 56


def mount_ok(image: Path, mountpoint: Path, *options: str) -> None:
    result = fuse_mount(image, mountpoint, *options)
    assert (result.returncode, result.stderr) == (0, "")


def unmount_ok(mountpoint: Path) -> None:
    result = fuse_mount("--unmount", mountpoint)
    assert (result.returncode, result.stderr) == (0, "")
    assert not is_mounted(mountpoint)


def sfdisk(disk: Path, script: str) -> None:
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )


def sfdisk_partitions(disk: Path) -> dict[int, tuple[int, int]]:
    """number -> (offset, length) in bytes as sfdisk reads the table, extended ones left out."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(disk)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    assert table["sectorsize"] == SECTOR
    result = {}
    for part in table["partitions"]:
        if table["label"] == "dos" and part["type"] in ("5", "f", "85"):
            continue
        number = int(part["node"][len(str(disk)) :].lstrip("p"))
        result[number] = (part["start"] * SECTOR, part["size"] * SECTOR)
    return result


def listed(mnt: Path) -> dict[int, int]:
    return {
        int(name.split(".")[0]): (mnt / "partitions" / name).stat().st_size
        for name in os.listdir(mnt / "partitions")
    }


def _partition_round_trip(
    tmp_path: Path, mountpoints, script: str, numbers: set[int], formatted: int
) -> None:
    """sfdisk through disk.raw (seen at once, no remount), mkfs on one partition file,
    then the filesystem is found at sfdisk's offset in the image's raw content."""
    image = tmp_path / "img.qcow2"
    qemu_create(image, "64M")
    mnt = mountpoints()
    mount_ok(image, mnt, "--rw")
    assert listed(mnt) == {}
    sfdisk(mnt / "disk.raw", script)
    expected = sfdisk_partitions(mnt / "disk.raw")
    assert set(expected) == numbers
    assert listed(mnt) == {number: length for number, (_, length) in expected.items()}
    unmount_ok(mnt)
    mount_ok(image, mnt, "--rw")
    assert listed(mnt) == {number: length for number, (_, length) in expected.items()}
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(mnt / "partitions" / f"{formatted}.raw")],
        check=True,
        capture_output=True,
    )
    unmount_ok(mnt)
    assert_clean(image)
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-O", "raw", image, raw)
    assert sfdisk_partitions(raw) == expected  # the table survived the mkfs
    offset, length = expected[formatted]
    content = raw.read_bytes()
    assert content[offset + EXT4_MAGIC_OFFSET : offset + EXT4_MAGIC_OFFSET + 2] == b"\x53\xef"
    volume = tmp_path / "volume.raw"
    volume.write_bytes(content[offset : offset + length])
    subprocess.run(["e2fsck", "-fn", str(volume)], check=True, capture_output=True)
    mount_ok(image, mnt)
    assert (mnt / "partitions" / f"{formatted}.raw").read_bytes() == volume.read_bytes()
    with pytest.raises(OSError):  # read-only as the mount is
        open(mnt / "partitions" / f"{formatted}.raw", "r+b")
    unmount_ok(mnt)


def test_gpt_partitions(tmp_path: Path, mountpoints) -> None:
    _partition_round_trip(
        tmp_path, mountpoints, "label: gpt\nsize=10MiB\nsize=20MiB\nsize=8MiB\n", {1, 2, 3}, 1
    )


def test_mbr_with_logical_partitions(tmp_path: Path, mountpoints) -> None:
    _partition_round_trip(
        tmp_path,
        mountpoints,
        "label: dos\nsize=8MiB, type=83\nsize=40MiB, type=5\n"
        "size=4MiB, type=83\nsize=4MiB, type=83\n"  # primaries 1, 3, 4
        "size=10MiB, type=83\nsize=12MiB, type=83\n",  # logicals 5, 6
        {1, 3, 4, 5, 6},
        6,
    )


# -- the parser on crafted and hostile tables --


def table_disk(tmp_path: Path, script: str, size: int = 8 << 20) -> bytearray:
    disk = tmp_path / "table.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    sfdisk(disk, script)
    return bytearray(disk.read_bytes())


def scan_bytes(data: bytes | bytearray):
    reads = []

    def read(offset: int, length: int) -> bytes:
        assert 0 <= offset and offset + length <= len(data) and length <= MAX_GPT_ENTRY_ARRAY
        reads.append(length)
        return bytes(data[offset : offset + length])

    result = scan(read, len(data))
    assert len(reads) < 300
    return result


def offsets(result) -> dict[int, tuple[int, int]]:
    return {part.number: (part.offset, part.length) for part in result.partitions}


def _gpt_header_crc(data: bytearray, lba: int) -> None:
    header = lba * SECTOR
    size = struct.unpack_from("<I", data, header + 12)[0]
    struct.pack_into("<I", data, header + 16, 0)
    struct.pack_into("<I", data, header + 16, zlib.crc32(bytes(data[header : header + size])))


def test_gpt_damage(tmp_path: Path) -> None:
    data = table_disk(tmp_path, "label: gpt\nsize=1MiB\nsize=1MiB\n")
    good = offsets(scan_bytes(data))
    assert set(good) == {1, 2}
    primary = bytearray(data)
    primary[SECTOR + 40] ^= 0xFF  # first usable LBA: the header CRC no longer matches
    assert offsets(scan_bytes(primary)) == good  # the backup header at the end
    both = bytearray(primary)
    both[len(both) - SECTOR + 40] ^= 0xFF
    assert offsets(scan_bytes(both)) == {}
    # an entry array claimed to be 4 GiB: refused before any read of it
    huge = bytearray(data)
    struct.pack_into("<I", huge, SECTOR + 80, 0xFFFFFFFF)
    _gpt_header_crc(huge, 1)
    struct.pack_into("<I", huge, len(huge) - SECTOR + 80, 0xFFFFFFFF)
    _gpt_header_crc(huge, len(huge) // SECTOR - 1)
    assert offsets(scan_bytes(huge)) == {}
    # an entry past the end of the disk, or ending before it starts, is left out
    entries = bytearray(data)
    struct.pack_into("<QQ", entries, 2 * SECTOR + 32, 10, 1 << 40)
    struct.pack_into("<QQ", entries, 2 * SECTOR + 128 + 32, 500, 400)
    array = bytes(entries[2 * SECTOR : 2 * SECTOR + 128 * 128])
    struct.pack_into("<I", entries, SECTOR + 88, zlib.crc32(array))
    _gpt_header_crc(entries, 1)
    assert offsets(scan_bytes(entries)) == {}


def test_mbr_hostile_chains() -> None:
    disk = bytearray(4 << 20)

    def entry(sector: int, slot: int, ptype: int, first: int, count: int) -> None:
        base = sector * SECTOR + 446 + 16 * slot
        disk[base + 4] = ptype
        struct.pack_into("<II", disk, base + 8, first, count)
        disk[sector * SECTOR + 510 : sector * SECTOR + 512] = b"\x55\xaa"

    entry(0, 0, 0x83, 2048, 100)
    entry(0, 1, 0x05, 4096, 4000)
    entry(4096, 0, 0x83, 1, 10)  # logical 5
    entry(4096, 1, 0x05, 0, 1)  # the next EBR is this one again: a loop
    assert offsets(scan_bytes(disk)) == {
        1: (2048 * SECTOR, 100 * SECTOR),
        5: (4097 * SECTOR, 10 * SECTOR),
    }
    for ebr in range(4096, 4096 + 400):  # a chain longer than any disk may have
        entry(ebr, 0, 0x83, 1, 1)
        entry(ebr, 1, 0x05, ebr + 1 - 4096, 1)
    entry(0, 1, 0x05, 4096, 8190 - 4096)
    assert len(scan_bytes(disk).partitions) == 1 + 251
    entry(0, 2, 0x83, 8000, 1 << 30)  # runs past the end of the disk: clipped, as Linux does
    entry(0, 3, 0x83, 1 << 30, 10)  # starts past the end: left out
    found = offsets(scan_bytes(disk))
    assert found[3] == (8000 * SECTOR, len(disk) - 8000 * SECTOR) and 4 not in found
    disk[446] = 0x29  # a status byte no table has: a boot sector, not an MBR
    assert offsets(scan_bytes(disk)) == {}


TABLE_SCRIPTS = {
    "gpt": "label: gpt\nsize=1MiB\nsize=1MiB\nsize=2MiB\n",
    "dos": "label: dos\nsize=1MiB\nsize=5MiB, type=f\nsize=512KiB\nsize=1MiB\nsize=1MiB\n",
}  # 1, 3 and the logical 5 and 6


def test_parser_agrees_with_sfdisk(tmp_path: Path) -> None:
    for script in TABLE_SCRIPTS.values():
        data = table_disk(tmp_path, script)
        found = offsets(scan_bytes(data))
        assert found == sfdisk_partitions(tmp_path / "table.raw") and len(found) >= 3


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(TABLE_SCRIPTS)), st.data())
def test_mutated_tables_never_crash(tmp_path_factory, label, data) -> None:
    """Bytes changed anywhere the scan of a good table reads: no exception, and every
    partition found lies inside the disk."""
    cache = tmp_path_factory.getbasetemp() / f"table-{label}.raw"
    if not cache.exists():
        cache.write_bytes(table_disk(tmp_path_factory.mktemp(label), TABLE_SCRIPTS[label]))
    disk = bytearray(cache.read_bytes())
    table_bytes = [
        offset + index
        for offset, length in scan_bytes(disk).ranges_read
        for index in (range(length) if length <= 4096 else range(0, length, 7))
    ]
    mutations = data.draw(
        st.lists(
            st.tuples(st.sampled_from(table_bytes), st.integers(0, 255)), min_size=1, max_size=40
        )
    )
    for position, value in mutations:
        disk[position] = value
    for part in scan_bytes(disk).partitions:
        assert 0 <= part.offset < len(disk) and 0 < part.length <= len(disk) - part.offset
