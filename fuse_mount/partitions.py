"""MBR and GPT partition tables read from a disk image, validated like untrusted input.

`scan()` reads through a callback, so it works on any BlockDevice (or a bytes buffer in
tests). Every size and offset read from the disk is checked against the disk's size and
fixed bounds before anything is read or allocated: a hostile table yields fewer
partitions (or none), never an exception, a loop or a large allocation. The scan also
returns the byte ranges it looked at, so a caller can rescan when one of them is written.

Numbering follows Linux: MBR primary slots are 1-4 (empty slots keep their number),
logical partitions of extended ones count from 5; GPT entries are numbered by their
index in the entry array, from 1. Extended (container) partitions are not listed.
Tables are read with 512-byte sectors (what sfdisk and fdisk use on an image file); a
GPT written for 4096-byte sectors is not found.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Callable

SECTOR = 512
MBR_SIGNATURE = b"\x55\xaa"
MBR_TABLE_OFFSET = 446
GPT_PROTECTIVE_TYPE = 0xEE
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER = struct.Struct("<8sIII4xQQQQ16sQIII")  # 92 bytes, the fields of revision 1.0
MAX_GPT_ENTRY_ARRAY = 1 << 20  # bytes; the spec's minimum array is 16 KiB, 128 entries
MAX_GPT_ENTRY_SIZE = 4096
MAX_LOGICAL_PARTITIONS = 251  # Linux allows 256 minors per disk, 1-4 primaries + extended

Reader = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Partition:
    """One partition: its number (the name under partitions/) and its bytes on the disk."""

    number: int
    offset: int
    length: int
    table: str  # "mbr" or "gpt"


@dataclass(frozen=True)
class Scan:
    """The partitions found, and the (offset, length) ranges of the disk the scan read."""

    partitions: tuple[Partition, ...]
    ranges_read: tuple[tuple[int, int], ...]

    def touches(self, offset: int, length: int) -> bool:
        """True when a write of `length` bytes at `offset` may change the table."""
        return any(
            offset < start + size and start < offset + length for start, size in self.ranges_read
        )


class _Disk:
    """Reads of whole ranges inside the disk, each one remembered."""

    def __init__(self, read: Reader, size: int):
        self.read_at = read
        self.size = size
        self.ranges: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes | None:
        if offset < 0 or length <= 0 or offset + length > self.size:
            return None
        self.ranges.append((offset, length))
        return self.read_at(offset, length)


def scan(read: Reader, disk_size: int) -> Scan:
    """The partitions of a disk of `disk_size` bytes whose bytes `read(offset, length)` gives."""
    disk = _Disk(read, disk_size)
    partitions = _scan_mbr(disk)
    return Scan(tuple(partitions), tuple(disk.ranges))


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]] | None:
    """(status, type, first LBA, sectors) of the four slots, or None without a valid MBR.

    A boot sector without a partition table (a FAT volume's, say) also ends in 55 AA;
    as Linux does, only status bytes 0x00 and 0x80 are taken as a table.
    """
    if len(sector) != SECTOR or sector[510:512] != MBR_SIGNATURE:
        return None
    entries = []
    for slot in range(4):
        raw = sector[MBR_TABLE_OFFSET + 16 * slot : MBR_TABLE_OFFSET + 16 * (slot + 1)]
        status, ptype = raw[0], raw[4]
        first_lba, sectors = struct.unpack_from("<II", raw, 8)
        if status not in (0x00, 0x80):
            return None
        entries.append((status, ptype, first_lba, sectors))
    return entries


def _within(disk: _Disk, number: int, first_lba: int, sectors: int, table: str) -> Partition | None:
    """The partition, its end clipped to the disk (as Linux does); None if it starts past it."""
    offset = first_lba * SECTOR
    if sectors <= 0 or offset >= disk.size:
        return None
    return Partition(number, offset, min(sectors * SECTOR, disk.size - offset), table)


def _scan_mbr(disk: _Disk) -> list[Partition]:
    sector = disk.read(0, SECTOR)
    entries = _mbr_entries(sector) if sector is not None else None
    if entries is None:
        return []
    if any(ptype == GPT_PROTECTIVE_TYPE for _, ptype, _, sectors in entries if sectors):
        return _scan_gpt(disk)
    partitions: list[Partition] = []
    logicals: list[Partition] = []
    for slot, (_, ptype, first_lba, sectors) in enumerate(entries):
        if ptype == 0 or sectors == 0:
            continue
        if ptype in EXTENDED_TYPES:
            logicals += _scan_extended(disk, first_lba, sectors, 5 + len(logicals))
            continue
        part = _within(disk, slot + 1, first_lba, sectors, "mbr")
        if part is not None:
            partitions.append(part)
    return partitions + logicals


def _scan_extended(
    disk: _Disk, ext_lba: int, ext_sectors: int, first_number: int
) -> list[Partition]:
    """Logical partitions: a chain of EBRs, each inside the extended partition, no loops."""
    found: list[Partition] = []
    seen: set[int] = set()
    ebr_lba = ext_lba
    number = first_number
    while (
        ebr_lba not in seen
        and ext_lba <= ebr_lba < ext_lba + ext_sectors
        and number < first_number + MAX_LOGICAL_PARTITIONS
    ):
        seen.add(ebr_lba)
        sector = disk.read(ebr_lba * SECTOR, SECTOR)
        entries = _mbr_entries(sector) if sector is not None else None
        if entries is None:
            break
        _, ptype, rel_lba, sectors = entries[0]
        if ptype != 0 and sectors and ptype not in EXTENDED_TYPES:
            part = _within(disk, number, ebr_lba + rel_lba, sectors, "mbr")
            if part is not None:
                found.append(part)
                number += 1
        _, next_type, next_rel, next_sectors = entries[1]
        if next_type not in EXTENDED_TYPES or not next_sectors:
            break
        ebr_lba = ext_lba + next_rel
    return found


def _gpt_header(disk: _Disk, lba: int) -> tuple | None:
    """The header at `lba` if its signature, size, CRC and own LBA are right."""
    sector = disk.read(lba * SECTOR, SECTOR)
    if sector is None:
        return None
    fields = GPT_HEADER.unpack_from(sector)
    signature, _revision, header_size, header_crc, my_lba = fields[:5]
    if signature != GPT_SIGNATURE or not GPT_HEADER.size <= header_size <= SECTOR:
        return None
    zeroed = sector[:16] + b"\0\0\0\0" + sector[20:header_size]
    if zlib.crc32(zeroed) != header_crc or my_lba != lba:
        return None
    return fields


def _gpt_entries(disk: _Disk, header: tuple) -> list[Partition] | None:
    entries_lba, count, entry_size, entries_crc = header[-4:]
    if entry_size < 128 or entry_size % 8 or entry_size > MAX_GPT_ENTRY_SIZE:
        return None
    array_size = count * entry_size
    if array_size > MAX_GPT_ENTRY_ARRAY:
        return None
    array = disk.read(entries_lba * SECTOR, array_size) if array_size else b""
    if array is None or zlib.crc32(array) != entries_crc:
        return None
    sectors_on_disk = disk.size // SECTOR
    partitions = []
    for index in range(count):
        entry = array[index * entry_size : index * entry_size + 128]
        if entry[:16] == bytes(16):
            continue  # an unused entry
        first_lba, last_lba = struct.unpack_from("<QQ", entry, 32)
        if first_lba > last_lba or last_lba >= sectors_on_disk:
            continue
        partitions.append(
            Partition(index + 1, first_lba * SECTOR, (last_lba - first_lba + 1) * SECTOR, "gpt")
        )
    return partitions


def _scan_gpt(disk: _Disk) -> list[Partition]:
    """The primary GPT (LBA 1), or the backup in the disk's last sector if it is damaged."""
    for lba in (1, disk.size // SECTOR - 1):
        header = _gpt_header(disk, lba) if lba >= 1 else None
        if header is not None:
            partitions = _gpt_entries(disk, header)
            if partitions is not None:
                return partitions
    return []
