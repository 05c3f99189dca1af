"""Where the image's metadata lies, so no write lands on it (QEMU's overlap check).

A hostile or damaged image can steer a write onto its own metadata: an L2 entry flagged
COPIED that points at a refcount block, a table whose cluster has refcount 0 and is
handed out again by the allocator, a bitmap table entry pointing at the L1 table. Before
any write of guest data or metadata the image asks `OverlapMap.find` whether the host
range touches a structure; if it does, the write is refused and the image is marked
corrupt, as QEMU does with its default "cached" checks.

The map covers the structures QEMU's cached mode knows without reading L2 tables: the
header cluster, the active L1 table, the active L2 tables (one cluster per L1 entry),
the refcount table and its blocks, the snapshot table, the snapshots' L1 tables, and,
while the bitmaps' autoclear bit is set, the bitmap directory and the bitmap tables.
Like QEMU, it works in whole clusters.

The image keeps it up to date incrementally as L2 tables and refcount blocks come and go;
a structural switch (a new L1 table, refcount structure, snapshot table or bitmap
directory) rebuilds it. A lookup is a dict probe per cluster written (a write rarely
spans more than a few) plus a scan of the few structures wider than `_WIDE` clusters.
"""

from __future__ import annotations

# Kinds are bits, as in QEMU's ign mask; the names are the ones QEMU reports.
HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
BITMAP_DIRECTORY = 1 << 8
BITMAP_TABLE = 1 << 9  # QEMU does not check these; a write over one loses a whole bitmap

NAMES = {
    HEADER: "qcow2_header",
    ACTIVE_L1: "active L1 table",
    ACTIVE_L2: "active L2 table",
    REFCOUNT_TABLE: "refcount table",
    REFCOUNT_BLOCK: "refcount block",
    SNAPSHOT_TABLE: "snapshot table",
    INACTIVE_L1: "inactive L1 table",
    BITMAP_DIRECTORY: "bitmap directory",
    BITMAP_TABLE: "bitmap table",
}

# The order QEMU tests the structures in: a range over several is named after the first.
_ORDER = (
    HEADER,
    ACTIVE_L1,
    REFCOUNT_TABLE,
    SNAPSHOT_TABLE,
    INACTIVE_L1,
    ACTIVE_L2,
    REFCOUNT_BLOCK,
    BITMAP_DIRECTORY,
    BITMAP_TABLE,
)

_WIDE = 8  # structures over more clusters than this are kept as intervals


def overlap_message(kind: int) -> str:
    """QEMU's reason for refusing a write onto `kind`."""
    return f"Preventing invalid write on metadata (overlaps with {NAMES[kind]})"


class OverlapMap:
    """Host clusters holding metadata, by kind.

    `_clusters` maps a cluster index to the union of the kinds on it; `_counts` counts
    how many structures of one kind sit on one cluster (a damaged L1 table may point
    at one L2 table twice), so removing one leaves the others. Structures wider than
    `_WIDE` clusters are (first, stop, kind) intervals in `_wide`.
    """

    def __init__(self, cluster_bits: int):
        self.cluster_bits = cluster_bits
        self._clusters: dict[int, int] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._wide: list[tuple[int, int, int]] = []

    def clear(self) -> None:
        self._clusters.clear()
        self._counts.clear()
        self._wide.clear()

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        return offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1

    def add(self, kind: int, offset: int, length: int) -> None:
        """Record a structure of `kind` at host bytes [offset, offset + length)."""
        if length <= 0:
            return
        first, stop = self._span(offset, length)
        if stop - first > _WIDE:
            self._wide.append((first, stop, kind))
            return
        for cluster in range(first, stop):
            key = (cluster, kind)
            self._counts[key] = self._counts.get(key, 0) + 1
            self._clusters[cluster] = self._clusters.get(cluster, 0) | kind

    def remove(self, kind: int, offset: int, length: int) -> None:
        """Forget one structure recorded by `add` with the same arguments."""
        if length <= 0:
            return
        first, stop = self._span(offset, length)
        if stop - first > _WIDE:
            try:
                self._wide.remove((first, stop, kind))
            except ValueError:
                pass
            return
        for cluster in range(first, stop):
            key = (cluster, kind)
            count = self._counts.get(key, 0)
            if count > 1:
                self._counts[key] = count - 1
                continue
            if count:
                del self._counts[key]
                left = self._clusters[cluster] & ~kind
                if left:
                    self._clusters[cluster] = left
                else:
                    del self._clusters[cluster]

    def move(self, kind: int, old_offset: int, old_length: int, offset: int, length: int) -> None:
        """A structure moved (the refcount table, grown into new clusters)."""
        self.remove(kind, old_offset, old_length)
        self.add(kind, offset, length)

    def find(self, offset: int, length: int, ignore: int = 0) -> int:
        """The kind of the first structure (in QEMU's order) that host bytes
        [offset, offset + length) touch, other than kinds in `ignore`; 0 if none."""
        if length <= 0:
            return 0
        bits = self.cluster_bits
        first = offset >> bits
        stop = ((offset + length - 1) >> bits) + 1
        if stop - first == 1 and not self._wide:  # the common case: one cluster
            hits = self._clusters.get(first, 0) & ~ignore
            return _first_kind(hits) if hits else 0
        return self._find_span(first, stop, ignore)

    def _find_span(self, first: int, stop: int, ignore: int) -> int:
        clusters = self._clusters
        hits = 0
        if stop - first <= len(clusters):
            for cluster in range(first, stop):
                hits |= clusters.get(cluster, 0)
        else:
            for cluster, kinds in clusters.items():
                if first <= cluster < stop:
                    hits |= kinds
        for wide_first, wide_stop, kind in self._wide:
            if wide_first < stop and first < wide_stop:
                hits |= kind
        hits &= ~ignore
        return _first_kind(hits) if hits else 0


def _first_kind(hits: int) -> int:
    return next(kind for kind in _ORDER if hits & kind)
