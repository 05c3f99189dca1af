"""`amend -o refcount_bits=N`: a refcount structure of another width, and QEMU's progress.

qcow2lib builds the new structure in one pass (rebuild.py) and switches to it with one
header write. QEMU walks the old refcount table several times instead: allocation walks
repeat until one allocates nothing (each allocation may need a new refcount block, the new
refcount table too), then one walk writes the blocks. `amend -p` reports progress per old
refcount table entry and walk, so the number of walks shows (progress goes back when a
fourth walk turns out necessary). `qemu_walks` models QEMU's first-fit allocator over the
image as it stands to count those walks, so qimg's progress line is qemu-img's.
"""

from __future__ import annotations

import heapq

from .. import structs as S
from ..errors import AmendError

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

    Status = Callable[[int, int], None]

# Progress is reported at every old refcount table entry up to this many entries per walk
# (8192 for a one-cluster table of 64 KiB clusters); larger tables report at a stride.
_MAX_STATUS_CALLS_PER_WALK = 1 << 16


def change_refcount_width(image, bits: int, status: Status | None = None) -> None:
    """Rewrite the refcount structure with `bits`-bit entries, its counts carried over.
    `status(done, total)` follows QEMU's walks over the old refcount table."""
    from ..rebuild import current_refcounts, rebuild_refcounts

    image.flush()
    table_size = len(image.refcounts.table)
    if bits < image.refcount_bits:
        found = _first_refcount_above(image, (1 << bits) - 1)
        if found is not None:
            cluster, value = found
            if status is not None:  # QEMU stops in its first walk, at that table entry
                _report_walk(status, 0, 3, table_size, cluster // image.refcounts.block_entries)
            raise AmendError(
                f"Cannot decrease refcount entry width to {bits} bits: Cluster at "
                f"offset {cluster << image.cluster_bits:#x} has a refcount of "
                f"{value}"
            )
    if status is not None:
        allocation_walks = qemu_walks(image, bits) - 1
        for walk_index in range(allocation_walks):
            _report_walk(status, walk_index, max(walk_index + 2, 3), table_size)
    counts = current_refcounts(image)
    old_order = image.header.refcount_order
    image.header.refcount_order = bits.bit_length() - 1
    try:
        # (switches the header with _write_header_fields)
        rebuild_refcounts(image, counts, _QEMU_STEPS)
    except BaseException:
        image.header.refcount_order = old_order
        raise
    image.refcount_bits = bits
    if status is not None:  # the walk that writes the blocks, the last of all
        _report_walk(status, allocation_walks, allocation_walks + 1, table_size)


# How qcow2_change_refcount_order words a write of the new structure that fails.
_QEMU_STEPS = {
    "refblock": "Failed to write refblock",
    "reftable": "Failed to write the new reftable",
    "flush": "Failed to flush the refblock cache",
    "header": "Failed to update the qcow2 header",
}


def _report_walk(
    status: Status, walk_index: int, total_walks: int, table_size: int, stop: int | None = None
) -> None:
    """QEMU's status calls of one walk: one per old refcount table entry, then its end
    (none when the walk stops at entry `stop`)."""
    stride = max(1, table_size // _MAX_STATUS_CALLS_PER_WALK)
    total = total_walks * table_size
    base = walk_index * table_size
    last = table_size - 1 if stop is None else stop
    for entry in range(0, last + 1, stride):
        status(base + entry, total)
    if stop is None:
        status(base + table_size, total)


def _first_refcount_above(image, limit: int) -> tuple[int, int] | None:
    """(cluster, refcount) of the first cluster whose refcount exceeds `limit`."""
    refs = image.refcounts
    for block_index, block in refs.allocated_blocks():
        values = block.values
        if block.order >= 3:
            if max(values) <= limit:
                continue
            for i, value in enumerate(values):
                if value > limit:
                    return block_index * refs.block_entries + i, value
        else:
            for i in range(refs.block_entries):
                value = block.get(i)
                if value > limit:
                    return block_index * refs.block_entries + i, value
    return None


def qemu_walks(image, bits: int) -> int:
    """How many walks over the old refcount table QEMU's change to `bits`-bit refcounts
    makes on this image, opened afresh: the allocation walks plus the writing walk.

    An allocation walk visits the new blocks in order and allocates a cluster (first fit
    from QEMU's free-cluster cursor, which starts at 0 and goes back on a free) for each
    one that holds a non-zero count and has none yet; an allocated cluster may land in a
    range the walk has passed, which the next walk then finds. After a walk that allocated,
    the new refcount table is allocated afresh (the previous one freed)."""
    refs = image.refcounts
    cs = image.cluster_size
    old_entries = refs.block_entries
    new_entries = cs * 8 >> (bits.bit_length() - 1)
    covered = len(refs.table) * old_entries  # the clusters a walk goes over
    nonempty = _nonempty_new_blocks(image, bits)
    taken: set[int] = set()  # clusters the modelled walks allocated
    taken_per_block: dict[int, int] = {}
    old_blocks_added: set[int] = set()
    fresh: list[int] = []  # new blocks of the clusters allocated since the caller looked
    cursor = 0

    def allocate(count: int) -> int:
        """QEMU's qcow2_alloc_clusters: the first free run from the cursor."""
        nonlocal cursor
        candidate = cursor
        while True:
            start = refs._next_free_run(candidate, count)
            busy = [c for c in range(start, start + count) if c in taken]
            if not busy:
                break
            candidate = busy[-1] + 1
        cursor = start + count
        for cluster in range(start, start + count):
            taken.add(cluster)
            new_block = cluster // new_entries
            taken_per_block[new_block] = taken_per_block.get(new_block, 0) + 1
            fresh.append(new_block)
        old_block = start // old_entries
        has_old_block = old_block < len(refs.table) and refs.table[old_block] & S.REFT_OFFSET_MASK
        if not has_old_block and old_block not in old_blocks_added:
            old_blocks_added.add(old_block)  # QEMU adds an old-width block to count it
            allocate(1)
        return start

    def free(start: int, count: int) -> None:
        nonlocal cursor
        for cluster in range(start, start + count):
            taken.discard(cluster)
            taken_per_block[cluster // new_entries] -= 1
        cursor = min(cursor, start)

    new_table: dict[int, int] = {}  # new block index -> its cluster
    new_table_entries = 0
    new_table_run: tuple[int, int] | None = None
    walks = 0
    while True:
        allocated = False
        pending = sorted(nonempty | {k for k, n in taken_per_block.items() if n})
        heapq.heapify(pending)
        visited: set[int] = set()
        while pending:
            block_index = heapq.heappop(pending)
            if block_index in visited or block_index * new_entries >= covered:
                continue
            visited.add(block_index)
            if block_index not in nonempty and not taken_per_block.get(block_index):
                continue
            if block_index >= new_table_entries:
                per_cluster = cs // 8
                new_table_entries = -(-(block_index + 1) // per_cluster) * per_cluster
                if new_table_entries * 8 > S.MAX_REFTABLE_BYTES:
                    raise AmendError(
                        "This operation would make the refcount table grow beyond the "
                        "maximum size supported by QEMU, aborting"
                    )
            if block_index not in new_table:
                fresh.clear()
                new_table[block_index] = allocate(1)
                allocated = True
                for later in fresh:  # ranges still ahead of this walk see the allocation
                    if later > block_index:
                        heapq.heappush(pending, later)
        walks += 1
        if not allocated:
            return walks + 1
        if new_table_run is not None:
            free(*new_table_run)
        clusters = -(-new_table_entries * 8 // cs)
        new_table_run = (allocate(clusters), clusters)


def _nonempty_new_blocks(image, bits: int) -> set[int]:
    """Indexes of the blocks of a `bits`-bit structure that hold a non-zero count now."""
    refs = image.refcounts
    cs = image.cluster_size
    old_entries = refs.block_entries
    new_entries = cs * 8 >> (bits.bit_length() - 1)
    # bytes of an old block per new block (at least 8: 512-byte clusters, 64 bits wide)
    old_bits = 1 << refs.order
    slice_bytes = new_entries * old_bits // 8
    found: set[int] = set()
    for block_index, block in refs.allocated_blocks():
        raw = block.to_bytes()
        first = block_index * old_entries
        if slice_bytes >= cs:
            if raw.count(0) != cs:
                found.add(first // new_entries)
            continue
        zeros = bytes(slice_bytes)
        for start in range(0, cs, slice_bytes):
            if raw[start : start + slice_bytes] != zeros:
                found.add((first + start * 8 // old_bits) // new_entries)
    return found
