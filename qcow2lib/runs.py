"""Runs of evenly spaced 64-bit entries in a table, found at C speed.

The hot metadata walks (check, snapshot reference counting) handle an L2 table run by run
of contiguous host clusters instead of entry by entry: a fully allocated table is usually
one run, a sparse one a few.
"""

from __future__ import annotations

import struct
import sys
from array import array
from itertools import compress
from collections.abc import Callable, Iterator

_BE64 = struct.Struct(">Q")


class RunFinder:
    """Runs in a table of big-endian 64-bit entries, found with whole-table integer
    arithmetic: entries [i, j) read as one integer equal `first * ones + ramp` exactly when
    they are first, first + step, first + 2 * step, ... (no carry crosses an entry, as
    every entry stays below 2**64), and the highest bit of the XOR of the two says where
    a run ends, so a run costs a few operations at C speed, not a Python step per entry.
    The integers compared have the window's size, not the table's: a table of many short
    runs costs little per run."""

    def __init__(self) -> None:
        self._step = -1
        self._ones = self._ramp = b""
        self._patterns: dict[int, tuple[int, int]] = {}  # lanes: (ones, ramp) integers

    def _pattern(self, lanes: int) -> tuple[int, int]:
        """(ones, ramp) of `lanes` entries: 1 in each, and 0, step, 2 * step, ..."""
        pattern = self._patterns.get(lanes)
        if pattern is None:
            pattern = (
                int.from_bytes(self._ones[: 8 * lanes], "big"),
                int.from_bytes(self._ramp[: 8 * lanes], "big"),
            )
            if len(self._patterns) < 64:  # (the growing windows; clipped ones vary)
                self._patterns[lanes] = pattern
        return pattern

    def runs(self, raw: bytearray, step: int) -> list[tuple[int, int, int]]:
        """(first index, end index, first entry) of each maximal run in which every entry
        is `step` past the one before."""
        entries = len(raw) // 8
        if 8 * entries > len(self._ones) or step != self._step:  # (made for the largest table)
            lanes = max(entries, len(self._ones) // 8)
            self._ones = b"\0\0\0\0\0\0\0\1" * lanes
            ramp_entries = array("Q", range(0, lanes * step, step) if step else bytes(lanes))
            if sys.byteorder == "little":
                ramp_entries.byteswap()
            self._ramp = ramp_entries.tobytes()
            self._step = step
            self._patterns.clear()
        pattern = self._pattern
        runs: list[tuple[int, int, int]] = []
        start = 0
        while start < entries:
            (first,) = _BE64.unpack_from(raw, start * 8)
            window = 64  # entries compared at once, growing while they all match
            while True:
                stop = min(entries, start + window)
                ones, ramp = pattern(stop - start)
                mismatch = int.from_bytes(raw[start * 8 : stop * 8], "big") ^ (first * ones + ramp)
                if mismatch:
                    end = stop - (mismatch.bit_length() + 63) // 64
                    break
                if stop == entries:
                    end = entries
                    break
                window *= 4
            runs.append((start, end, first))
            start = end
        return runs


class NativeRunLength:
    """The same arithmetic on an array of native little-endian entries (the L2 cache's),
    where entry 0 is the least significant lane and the lowest set bit of the XOR marks
    the first entry off the pattern."""

    def __init__(self) -> None:
        self._lanes = self._step = 0
        self._ones = self._ramp = 0

    def __call__(self, table: array, index: int, limit: int, first: int, step: int) -> int:
        """How many of the `limit` entries from `index` are first, first + step, ..."""
        if limit > self._lanes or (step and step != self._step):
            lanes = max(limit, self._lanes)
            self._ones = int.from_bytes(b"\1\0\0\0\0\0\0\0" * lanes, "little")
            ramp_step = step or self._step
            ramp = array("Q", range(0, lanes * ramp_step, ramp_step)) if ramp_step else b""
            self._ramp = int.from_bytes(ramp, "little")
            self._lanes, self._step = lanes, ramp_step
        window = 64  # entries compared at once, growing while they all match
        while True:
            count = min(limit, window)
            mask = (1 << (64 * count)) - 1
            expected = first * (self._ones & mask) + (self._ramp & mask if step else 0)
            found = int.from_bytes(table[index : index + count].tobytes(), "little")
            mismatch = found ^ expected
            if mismatch:
                return ((mismatch & -mismatch).bit_length() - 1) // 64
            if count == limit:
                return limit
            window *= 4


_ZERO_ENTRY = bytes(8)
_STRETCH = 64  # entries compared with zeros at once
_ZERO_STRETCH = bytes(8 * _STRETCH)


def nonzero_entries(table: array) -> array:
    """The non-zero entries of a table of 64-bit words, in order. Iterating a table makes
    an integer object per entry (0.06 us for an L2 entry with flags), so it is avoided
    where the bytes say enough: a table without a zero entry is copied whole, and in a
    sparse one each stretch of 64 zero entries is skipped with one comparison."""
    raw = table.tobytes()
    if _ZERO_ENTRY not in raw:  # (8 zero bytes anywhere, aligned or not)
        return array("Q", table)
    if _ZERO_STRETCH not in raw:
        return array("Q", filter(None, table))
    used = array("Q")
    for first in _busy_stretches(raw):
        used.extend(filter(None, table[first : first + _STRETCH]))
    return used


def nonzero_positions(table: array) -> list[int]:
    """The indices of the non-zero entries of a table of 64-bit words (as nonzero_entries
    finds them)."""
    raw = table.tobytes()
    if _ZERO_ENTRY not in raw:
        return list(range(len(table)))
    if _ZERO_STRETCH not in raw:
        return list(compress(range(len(table)), table))
    positions: list[int] = []
    for first in _busy_stretches(raw):
        stop = min(first + _STRETCH, len(table))
        positions.extend(compress(range(first, stop), table[first:stop]))
    return positions


def _busy_stretches(raw: bytes) -> Iterator[int]:
    """First entry of each stretch of `raw` (64 entries, the last maybe fewer) that is not
    all zeros."""
    width = len(_ZERO_STRETCH)
    for offset in range(0, len(raw), width):
        if raw[offset : offset + width] != _ZERO_STRETCH:
            yield offset >> 3


def used_runs(
    finder: RunFinder, table: array, step: int, clean: Callable[[bytearray], None]
) -> list[tuple[int, int, bytes]]:
    """(first offset, entries, their top bytes) of each run of the non-zero entries of
    `table` (native order) whose offsets, once `clean` clears the flag bits of the packed
    big-endian entries, are each `step` past the one before, in table order. Zero entries
    are taken out first (at C speed), so that clusters allocated one after the other form
    one run however the guest maps them; so are entries that only flags made non-zero."""
    used = nonzero_entries(table)
    if sys.byteorder == "little":
        used.byteswap()
    packed = bytearray(used.tobytes())
    tops = bytes(packed[0::8])
    clean(packed)
    if bytes(8) in packed:  # (maybe an entry of flags only: check entry by entry)
        offsets = array("Q", packed)
        if 0 in offsets:
            tops = bytes(compress(tops, offsets))
            packed = bytearray(array("Q", filter(None, offsets)).tobytes())
    return [
        (first, end - start, tops[start:end]) for start, end, first in finder.runs(packed, step)
    ]


def host_runs(entries: array, cluster_bits: int, finder: RunFinder) -> list[tuple[int, int]] | None:
    """(first host cluster, clusters) of each run of contiguous clusters that the L2
    entries `entries` (one word each, native order) point at, in table order, entries
    without a host offset skipped; None if any entry is compressed or its host offset is
    not aligned to a cluster (those need the entry-by-entry walk)."""
    swapped = array("Q", entries)
    if sys.byteorder == "little":
        swapped.byteswap()
    packed = swapped.tobytes()
    for position, allowed in _plain_bytes(cluster_bits):
        if packed[position::8].translate(None, allowed):
            return None
    return [
        (first >> cluster_bits, count)
        for first, count, _ in used_runs(finder, entries, 1 << cluster_bits, _offset_only)
    ]


def _offset_only(packed: bytearray) -> None:
    """Clear what is not the host offset in packed big-endian standard L2 entries."""
    entries = len(packed) // 8
    packed[0::8] = bytes(entries)  # (COPIED, compressed, reserved bits 56-61)
    packed[7::8] = bytes(entries)  # (the zero flag and reserved bits 1-7)
    packed[6::8] = packed[6::8].translate(_CLEAR_LOWEST_BIT)  # (reserved bit 8)


_CLEAR_LOWEST_BIT = bytes(value & 0xFE for value in range(256))
_PLAIN_BYTES: dict[int, list[tuple[int, bytes]]] = {}


def _plain_bytes(cluster_bits: int) -> list[tuple[int, bytes]]:
    """Per byte of a big-endian L2 entry that matters: the values it may have in an entry
    that is neither compressed nor misaligned (bits 9 to cluster_bits - 1 clear)."""
    if cluster_bits not in _PLAIN_BYTES:
        unusual = (1 << 62) | ((1 << cluster_bits) - 1) & ~0x1FF
        _PLAIN_BYTES[cluster_bits] = [
            (position, bytes(value for value in range(256) if not value & bits))
            for position in range(8)
            if (bits := (unusual >> (56 - 8 * position)) & 0xFF)
        ]
    return _PLAIN_BYTES[cluster_bits]
