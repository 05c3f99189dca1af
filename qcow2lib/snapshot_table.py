"""The snapshot table on disk: its entries (Snapshot), parsed and packed as QEMU writes
them, and the L2 table offset an L1 entry gives. Below both the snapshot operations
(snapshots.py) and the reference walk (rebuild.py), which read snapshots' L1 tables;
listing an image's snapshots (info, snapshot -l) needs nothing more, and none of the
table machinery snapshots.py loads."""

from __future__ import annotations

import struct

from . import structs as S
from .errors import CorruptImageError, InvalidArgumentError
from .records import record

ICOUNT_DISABLED = (1 << 64) - 1  # icount -1: record/replay was off


@record
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
    disk_size: int | None = None  # None: the entry predates the field (the image's size)
    icount: int | None = None  # None: the entry predates the field (-1, disabled)

    @property
    def date(self) -> float:
        """Creation time, seconds since the epoch."""
        return self.date_sec + self.date_nsec / 1e9


# --- the snapshot table ---------------------------------------------------------------------


def read_snapshot_table(
    file, offset: int, count: int, file_size: int
) -> tuple[list[Snapshot], int]:
    """Parse `count` entries at `offset`; returns them and the table's size in bytes."""
    snapshots: list[Snapshot] = []
    pos = offset

    def read(length: int, at: int) -> bytes:
        """As QEMU reads it: what lies past the end of the file reads as zeros (the
        table's size is bounded below, so this is too)."""
        inside = max(0, min(length, file_size - at))
        return (file.pread(inside, at) if inside else b"") + bytes(length - inside)

    for index in range(count):
        (
            l1_table_offset,
            l1_size,
            id_str_size,
            name_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            extra_data_size,
        ) = S.SNAPSHOT_ENTRY_HEADER_FORMAT.unpack(read(S.SNAPSHOT_ENTRY_HEADER_SIZE, pos))
        if extra_data_size > S.MAX_SNAPSHOT_EXTRA_DATA:
            raise CorruptImageError(
                f"Snapshot {index}: extra_data_size {extra_data_size} too large",
                qemu_message=f"Too much extra metadata in snapshot table entry {index}",
                qemu_hint="You can force-remove this extra metadata with qemu-img check -r all\n",
            )
        body_size = extra_data_size + id_str_size + name_size
        body_start = pos + S.SNAPSHOT_ENTRY_HEADER_SIZE
        body = read(body_size, body_start)
        extra = body[:extra_data_size]
        ident = body[extra_data_size : extra_data_size + id_str_size]
        name = body[extra_data_size + id_str_size :]
        # QEMU keeps ID and name as C strings: everything from a NUL byte on is lost.
        snap = Snapshot(
            ident.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
            name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"),
            l1_table_offset,
            l1_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            extra,
        )
        if len(extra) >= 8:  # present, the 64-bit size replaces the 32-bit one (even if 0)
            snap.vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        if len(extra) >= 16:
            snap.disk_size = struct.unpack_from(">Q", extra, 8)[0]
        if len(extra) >= 24:
            snap.icount = struct.unpack_from(">Q", extra, 16)[0]
        snapshots.append(snap)
        pos = body_start + body_size
        pos += -(pos - offset) % 8
        if pos - offset > S.MAX_SNAPSHOT_TABLE_BYTES:
            raise CorruptImageError(
                f"Snapshot table too large (nb_snapshots {count})",
                qemu_message="Snapshot table is too big",
                qemu_hint=f"You can force-remove all {count - index} overhanging snapshots "
                f"with qemu-img check -r all\n",
            )
    return snapshots, pos - offset


def pack_snapshot_entry(snap: Snapshot, default_disk_size: int) -> bytes:
    """One table entry as QEMU writes it: at least 24 bytes of extra data, unknown extra
    data kept, the 32-bit VM state size only where the size fits."""
    ident = snap.id.encode("utf-8", "surrogateescape")
    name = snap.name.encode("utf-8", "surrogateescape")
    disk_size = default_disk_size if snap.disk_size is None else snap.disk_size
    icount = ICOUNT_DISABLED if snap.icount is None else snap.icount
    extra = struct.pack(">QQQ", snap.vm_state_size, disk_size, icount) + snap.extra_data[24:]
    head = S.SNAPSHOT_ENTRY_HEADER_FORMAT.pack(
        snap.l1_table_offset,
        snap.l1_size,
        len(ident),
        len(name),
        snap.date_sec,
        snap.date_nsec,
        snap.vm_clock_nsec,
        snap.vm_state_size if snap.vm_state_size <= 0xFFFFFFFF else 0,
        len(extra),
    )
    return head + extra + ident + name


def pack_snapshot_table(snapshots: list[Snapshot], default_disk_size: int) -> bytes:
    out = bytearray()
    for snap in snapshots:
        out += bytes(-len(out) % 8)
        out += pack_snapshot_entry(snap, default_disk_size)
    if len(out) > S.MAX_SNAPSHOT_TABLE_BYTES:
        raise InvalidArgumentError(
            f"Snapshot table too large ({len(out)} bytes, limit {S.MAX_SNAPSHOT_TABLE_BYTES})"
        )
    return bytes(out)


def l2_table_offset(entry: int, index: int, cluster_size: int) -> int:
    """The L2 table offset of L1 entry `index` (0: none), refused if malformed."""
    offset = entry & S.L1E_OFFSET_MASK
    if entry & S.L1E_RESERVED_MASK:
        raise CorruptImageError(f"L1 entry {index} has reserved bits set (0x{entry:016x})")
    if offset % cluster_size:
        raise CorruptImageError(
            f"L2 table offset 0x{offset:x} (L1 entry {index}) is not "
            f"aligned to the cluster size {cluster_size}"
        )
    return offset


# --- the table an image's header names (parsed once; what listing a snapshot needs) -------


def cached_table(image) -> tuple[list[Snapshot], int]:
    """The parsed snapshot table and its size in bytes, parsed once for each table the
    header points at (65536 entries take a while; lookups must not parse it again)."""
    hdr = image.header
    key = (hdr.snapshots_offset, hdr.nb_snapshots)
    cached = getattr(image, "_snapshot_table", None)
    if cached is None or cached[:2] != key:
        snapshots, table_bytes = (
            read_snapshot_table(
                image.file,
                hdr.snapshots_offset,
                hdr.nb_snapshots,
                image.file.size(),
            )
            if hdr.nb_snapshots
            else ([], 0)
        )
        cached = image._snapshot_table = (*key, snapshots, table_bytes)
    return cached[2], cached[3]


def require_qcow2(image) -> None:
    """Refuse an image without internal snapshots: anything but a Qcow2Image (a device's
    format name alone does not make it one)."""
    if getattr(image, "format", None) != "qcow2" or not hasattr(image, "load_tables"):
        raise InvalidArgumentError(
            f"internal snapshots need a qcow2 image ('{getattr(image, 'filename', image)}' is "
            f"{getattr(image, 'format', type(image).__name__)})"
        )


def list_snapshots(image) -> list[Snapshot]:
    """The image's snapshots, in table order."""
    require_qcow2(image)
    with image._lock:
        return list(cached_table(image)[0])
