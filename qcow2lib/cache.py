"""The metadata table cache shared by L2 tables and refcount blocks.

Tables are kept decoded (native-endian arrays) and written back only when the image
flushes, in the order the image dictates: the cache tracks what is dirty, the image
decides when it may reach the disk. Clean tables are evicted least recently used first;
dirty ones stay until written back, so a crash never sees a half-ordered update.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable

_NATIVE_LITTLE = sys.byteorder == "little"


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
        self._tables: OrderedDict[int, object] = OrderedDict()
        self.dirty: set[int] = set()

    def get(self, offset: int):
        table = self._tables.get(offset)
        if table is None:
            table = self._load(offset)
            self._tables[offset] = table
            self._evict()
        else:
            self._tables.move_to_end(offset)
        return table

    def peek(self, offset: int):
        """The table if cached (None if not), without loading it or changing the order of
        eviction."""
        return self._tables.get(offset)

    def put(self, offset: int, table, dirty: bool = True) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
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
