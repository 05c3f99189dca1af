"""The internal snapshot table: reading and validating its entries.

Each snapshot owns an L1 table; the clusters it shares with the active image are
counted in the refcounts, which is what keeps copy-on-write correct.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from . import structs as S
from .errors import CorruptImageError


@dataclass
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    extra_data: bytes = b""
    disk_size: int | None = None
    icount: int | None = None


def read_snapshot_table(file, offset: int, count: int, cluster_size: int,
                        file_size: int) -> tuple[list[Snapshot], int]:
    """Parse `count` entries at `offset`; returns them and the table's size in bytes."""
    snapshots: list[Snapshot] = []
    pos = offset
    for index in range(count):
        if pos + S.SNAPSHOT_ENTRY_HEADER_SIZE > file_size:
            raise CorruptImageError(
                f"Snapshot table entry {index} at offset {pos} lies past the end of the file")
        entry = S.SnapshotEntryHeader.parse(file.pread(S.SNAPSHOT_ENTRY_HEADER_SIZE, pos))
        if entry.extra_data_size > S.MAX_SNAPSHOT_EXTRA_DATA:
            raise CorruptImageError(
                f"Snapshot {index}: extra_data_size {entry.extra_data_size} too large")
        body_size = entry.extra_data_size + entry.id_str_size + entry.name_size
        body_start = pos + S.SNAPSHOT_ENTRY_HEADER_SIZE
        if body_start + body_size > file_size:
            raise CorruptImageError(f"Snapshot {index}: entry runs past the end of the file")
        body = file.pread(body_size, body_start)
        extra = body[:entry.extra_data_size]
        ident = body[entry.extra_data_size:entry.extra_data_size + entry.id_str_size]
        name = body[entry.extra_data_size + entry.id_str_size:]
        if entry.l1_table_offset % cluster_size:
            raise CorruptImageError(
                f"Snapshot {index}: L1 table offset 0x{entry.l1_table_offset:x} is not aligned "
                f"(l1_table_offset)")
        if entry.l1_size * 8 > S.MAX_L1_BYTES:
            raise CorruptImageError(f"Snapshot {index}: L1 table too large (l1_size {entry.l1_size})")
        if entry.l1_size and entry.l1_table_offset + entry.l1_size * 8 > file_size:
            raise CorruptImageError(
                f"Snapshot {index}: L1 table (l1_table_offset 0x{entry.l1_table_offset:x}, "
                f"l1_size {entry.l1_size}) lies past the end of the file")
        snap = Snapshot(ident.decode("utf-8", "replace"), name.decode("utf-8", "replace"),
                        entry.l1_table_offset, entry.l1_size, entry.date_sec, entry.date_nsec,
                        entry.vm_clock_nsec, entry.vm_state_size, extra)
        if len(extra) >= 8:
            snap.vm_state_size = struct.unpack_from(">Q", extra, 0)[0] or snap.vm_state_size
        if len(extra) >= 16:
            snap.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            snap.icount = struct.unpack_from(">Q", extra, 16)[0]
        snapshots.append(snap)
        pos = body_start + body_size
        pos += -(pos - offset) % 8
        if pos - offset > S.MAX_SNAPSHOT_TABLE_BYTES:
            raise CorruptImageError(f"Snapshot table too large (nb_snapshots {count})")
    return snapshots, pos - offset
