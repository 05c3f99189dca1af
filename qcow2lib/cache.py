"""The metadata table cache shared by L2 tables and refcount blocks.

Tables are kept decoded (native-endian arrays) and written back only when the image
flushes, in the order the image dictates: the cache tracks what is dirty, the image
decides when it may reach the disk. Clean tables are evicted least recently used first;
dirty ones stay until written back, so a crash never sees a half-ordered update.
"""

from __future__ import annotations

import sys
from array import array

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

_NATIVE_LITTLE = sys.byteorder == "little"


_freed_memory_kept: list[bool] = []


def keep_freed_memory() -> None:
    """Keep the memory tables and their temporaries free at the top of glibc's heap for
    the next table, once per process. glibc gives it back to the kernel once 128 KiB lie
    there, so a walk over many tables, each decoded and dropped in turn, takes fresh pages
    table after table, page faults and all (12000 faults, 30 ms, in a snapshot of a
    100 GiB image with every cluster allocated). Freeing one block big enough for mmap
    raises that threshold to twice its size (glibc's dynamic mmap threshold, mallopt(3));
    the block is never touched: two system calls. Walks over tables ask for it; not
    every command (convert's buffers then come from the heap: 10% more CPU)."""
    if not _freed_memory_kept:
        _freed_memory_kept.append(True)
        bytes(8 << 20)


def decode_be64(data: bytes) -> array:
    """Big-endian 64-bit entries to a native array."""
    table = array("Q")
    table.frombytes(data)
    if _NATIVE_LITTLE:
        table.byteswap()
    return table


def encode_be64(table: array) -> bytes:
    if _NATIVE_LITTLE:
        swapped = array("Q", table)
        swapped.byteswap()
        return swapped.tobytes()
    return table.tobytes()


class TableCache:
    """offset -> decoded table, with dirty tracking and a bound on clean entries."""

    def __init__(self, load: Callable[[int], object], max_entries: int):
        self._load = load
        self.max_entries = max(4, max_entries)
        self._tables: dict[int, object] = {}  # (in order of use: the last used last)
        self.dirty: set[int] = set()

    def get(self, offset: int):
        table = self._tables.get(offset)
        if table is None:
            table = self._load(offset)
            self._tables[offset] = table
            self._evict()
        else:
            self._tables[offset] = self._tables.pop(offset)  # (now the last used)
        return table

    def peek(self, offset: int):
        """The table if cached (None if not), without loading it or changing the order of
        eviction."""
        return self._tables.get(offset)

    def put(self, offset: int, table, dirty: bool = True) -> None:
        self._tables.pop(offset, None)
        self._tables[offset] = table
        if dirty:
            self.dirty.add(offset)
        self._evict()

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def drop(self, offset: int) -> None:
        """Forget a table whose cluster was freed (its content no longer matters)."""
        self._tables.pop(offset, None)
        self.dirty.discard(offset)

    def write_back(self, write) -> bool:
        """Write each dirty table with write(offset, table), in offset order; a table
        counts as clean only once its write returned, so a failed write leaves it (and
        those after it) dirty for the next attempt. Returns whether anything was written."""
        offsets = sorted(self.dirty)
        for offset in offsets:
            write(offset, self._tables[offset])
            self.dirty.discard(offset)
        self._evict()
        return bool(offsets)

    def clear(self) -> None:
        self._tables.clear()
        self.dirty.clear()

    def __len__(self) -> int:
        return len(self._tables)

    def _evict(self) -> None:
        """Drop clean tables, least recently used first, never the one just used (the
        caller is about to change it)."""
        if len(self._tables) <= self.max_entries or len(self._tables) == len(self.dirty):
            return
        newest = next(reversed(self._tables))
        for offset in list(self._tables):
            if len(self._tables) <= self.max_entries:
                break
            if offset not in self.dirty and offset != newest:
                del self._tables[offset]
