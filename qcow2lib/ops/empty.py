"""Emptying an image after commit the way qemu-img does it when it can: a fresh start.

For a version 3 image without snapshots, bitmaps, LUKS or an external data file (whose
L1 table and first three clusters fit one refcount block) qemu-img does not release the
clusters one by one: it marks the image dirty, zeroes the L1 table and the clusters that
will hold the new refcount table, refcount block and L1 table, points the header at them,
counts the clusters in use and cuts the file after them. The result is QEMU's layout
byte for byte: header, refcount table in cluster 1, refcount block in cluster 2, L1
table from cluster 3. If a step fails the image stays dirty (QEMU's lazy refcount
repair then puts it right on the next writable open, as for a crash) and is not used
again. The engine's events (blkdebug) are reported where qemu-img reports them.
"""

from __future__ import annotations

import struct

from .. import structs as S
from ..refcount import RefcountBlock

_L1_TABLE_OFFSET_FIELD = 40  # l1_table_offset, refcount_table_offset, refcount_table_clusters
_INCOMPAT_FIELD = 72
_CRYPT_LUKS = 2
_ZERO_CHUNK = 1 << 20


def can_start_afresh(image) -> bool:
    """Whether emptying `image` may rebuild it from scratch (see the module docstring)."""
    hdr = image.header
    cluster_size = image.cluster_size
    l1_clusters = -(-hdr.l1_size * 8 // cluster_size)
    refblock_entries = cluster_size * 8 >> hdr.refcount_order
    return (
        hdr.version >= 3
        and not hdr.nb_snapshots
        and not getattr(image, "_bitmap_entries", None)
        and hdr.crypt_method != _CRYPT_LUKS
        and not image.has_data_file
        and 3 + l1_clusters <= refblock_entries
    )


def start_afresh(image) -> None:
    """Empty `image` in place as qemu-img does (call can_start_afresh first). The image
    object is finished afterwards: it only closes, without writing anything again."""
    image.flush()  # nothing of the old state is left to write back over the new one
    image.read_only = True  # close() must not write the old metadata back
    file = image.file
    blkdebug = getattr(file, "blkdebug", None)

    def event(name: str) -> None:
        if blkdebug is not None:
            blkdebug.event(name)

    hdr = image.header
    cluster_size = image.cluster_size
    l1_clusters = -(-hdr.l1_size * 8 // cluster_size)
    incompat = hdr.incompatible_features
    file.pwrite(struct.pack(">Q", incompat | S.INCOMPAT_DIRTY), _INCOMPAT_FIELD)
    file.flush()
    event("l1_update")
    _zero(file, hdr.l1_table_offset, l1_clusters * cluster_size)
    event("empty_image_prepare")
    _zero(file, cluster_size, (2 + l1_clusters) * cluster_size)
    event("l1_update")
    event("reftable_update")
    fields = struct.pack(">QQI", 3 * cluster_size, cluster_size, 1)
    file.pwrite(fields, _L1_TABLE_OFFSET_FIELD)
    file.flush()
    event("refblock_alloc")
    file.pwrite(struct.pack(">Q", 2 * cluster_size), cluster_size)
    file.flush()
    block = RefcountBlock(hdr.refcount_order, bytes(cluster_size))
    for cluster in range(3 + l1_clusters):
        block.set(cluster, 1)
    file.pwrite(block.to_bytes(), 2 * cluster_size)
    file.flush()
    file.pwrite(struct.pack(">Q", incompat & ~S.INCOMPAT_DIRTY), _INCOMPAT_FIELD)
    file.flush()
    file.truncate((3 + l1_clusters) * cluster_size)


def _zero(file, offset: int, length: int) -> None:
    chunk = memoryview(bytes(min(length, _ZERO_CHUNK)))
    end = offset + length
    while offset < end:
        n = min(len(chunk), end - offset)
        file.pwrite(chunk[:n], offset)
        offset += n
