"""Runs of evenly spaced 64-bit entries in a table, found at C speed.

The hot metadata walks (check, snapshot reference counting) handle an L2 table run by run
of contiguous host clusters instead of entry by entry: a fully allocated table is usually
one run, a sparse one a few.
"""

from __future__ import annotations

import struct
import sys
from array import array
from itertools import accumulate, compress, groupby
from operator import add, itemgetter, ne, sub

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence
    from typing import Literal

_BE64 = struct.Struct(">Q")


class RunFinder:
    """Runs in a table of big-endian 64-bit entries, found with whole-table integer
    arithmetic: read as one integer, the table shifted by one entry and XORed with itself
    plus `step` in every entry is zero exactly in the entries that continue the one before
    (no carry crosses an entry while every entry stays below 2**64 - step), and OR-ing the
    8 byte columns of that gives one byte per entry, non-zero where a run ends. A table
    costs a few whole-table operations at C speed, not a Python step per entry, and then
    one step per run."""

    def __init__(self) -> None:
        self._ones: dict[int, int] = {}  # entries: the integer with 1 in each entry
        self._ramps: dict[tuple[int, int], int] = {}  # (entries, step): 0, step, 2 step...
        self._masks: dict[tuple[int, int], tuple[int, int, int, int]] = {}  # _lane_masks

    def runs(self, raw: bytearray, step: int) -> list[tuple[int, int, int]]:
        """(first index, end index, first entry) of each maximal run in which every entry
        is `step` past the one before."""
        entries = len(raw) // 8
        if entries < 2:
            return [(0, 1, _BE64.unpack_from(raw)[0])] if entries else []
        if raw[0::8].translate(None, _BELOW_TOP[step.bit_length() > 56]):
            return _runs_by_entry(raw, step)  # (an entry near 2**64: adding may carry)
        ones = self._ones.get(entries)
        if ones is None:
            if len(self._ones) >= 4:
                self._ones.clear()
            ones = self._ones[entries] = int.from_bytes(b"\0\0\0\0\0\0\0\1" * entries, "big")
        first = _BE64.unpack_from(raw)[0]
        table = None
        if _BE64.unpack_from(raw, 8 * entries - 8)[0] - first == (entries - 1) * step:
            # (one run, often all: for 64 KiB steps told by bytes, every top byte the first's)
            one_run = (
                is_64k_cluster_run(raw, entries, raw[0:1] * entries, "big")
                if step == 1 << 16
                else None
            )
            if one_run is None:
                table = int.from_bytes(raw, "big")
                one_run = table == first * ones + self._ramp(entries, step)
            if one_run:
                return [(0, entries, first)]
        if table is None:
            table = int.from_bytes(raw, "big")
        all_ones, steps, top_bits, below_top_bits = self._lane_masks(entries, step)
        # entry i of `moved` is entry i + 1 of the table (the first dropped, zero last)
        moved = (table << 64) & all_ones
        differ = moved ^ (table + steps)
        if step < 1 << 62 and not raw[0::8].translate(None, _BELOW_2_62):
            # Every entry of `differ` is below 2**63: adding 2**63 - 1 to each sets its top
            # bit exactly where it is not zero, without a carry out of it.
            flagged = (differ + below_top_bits) & top_bits
            ends = flagged.to_bytes(8 * entries, "big")[0 : 8 * entries - 8 : 8]
        else:  # (OR-ing the entries' 8 byte columns)
            differ_bytes = differ.to_bytes(8 * entries, "big")
            columns = 0
            for column in range(8):
                columns |= int.from_bytes(differ_bytes[column::8], "big")
            ends = columns.to_bytes(entries, "big")[:-1]
        ends = ends.translate(_NONZERO_TO_ONE)
        starts = [0, *one_positions(ends, 1)]
        stops = starts[1:]
        stops.append(entries)
        if len(starts) < 8:
            unpack = _BE64.unpack_from
            return [(start, stop, unpack(raw, 8 * start)[0]) for start, stop in zip(starts, stops)]
        words = array("Q", raw)  # (the runs' first entries picked at C speed: a table of
        if sys.byteorder == "little":  # a fragmented image has hundreds of runs)
            words.byteswap()
        return list(zip(starts, stops, itemgetter(*starts)(words)))

    def _lane_masks(self, entries: int, step: int) -> tuple[int, int, int, int]:
        """The integers of `entries` entries each: all bits set; `step` in each entry;
        2**63 in each; 2**63 - 1 in each (made once for a table size)."""
        masks = self._masks.get((entries, step))
        if masks is None:
            if len(self._masks) >= 4:
                self._masks.clear()
            ones = self._ones[entries]
            top_bits = int.from_bytes(b"\x80\0\0\0\0\0\0\0" * entries, "big")
            masks = self._masks[entries, step] = (
                (1 << (64 * entries)) - 1,
                step * ones,
                top_bits,
                top_bits - ones,
            )
        return masks

    def _ramp(self, entries: int, step: int) -> int:
        """The integer whose big-endian entry i is i * step."""
        if not step:
            return 0
        ramp = self._ramps.get((entries, step))
        if ramp is None:
            if len(self._ramps) >= 4:
                self._ramps.clear()
            words = array("Q", range(0, entries * step, step))
            if sys.byteorder == "little":
                words.byteswap()
            ramp = self._ramps[entries, step] = int.from_bytes(words.tobytes(), "big")
        return ramp


_NONZERO_TO_ONE = bytes((0, *(1,) * 255))
# Top bytes of entries to which adding a step (below 2**56, or any) cannot carry out.
_BELOW_TOP = (bytes(range(255)), bytes(range(128)))
_BELOW_2_62 = bytes(range(64))  # (top bytes of entries below 2**62)


def _runs_by_entry(raw: bytearray, step: int) -> list[tuple[int, int, int]]:
    """RunFinder.runs entry by entry, for entries where the arithmetic might carry."""
    entries = array("Q", raw)
    if sys.byteorder == "little":
        entries.byteswap()
    runs: list[tuple[int, int, int]] = []
    start = 0
    for index in range(1, len(entries) + 1):
        if index == len(entries) or entries[index] != entries[index - 1] + step:
            runs.append((start, index, entries[start]))
            start = index
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


def nonzero_entries(table: array) -> array:
    """The non-zero entries of a table of 64-bit words, in order. Iterating a table makes
    an integer object per entry (0.06 us for an L2 entry with flags), so it is avoided
    where the bytes say enough: a table without a zero entry is copied whole, a sparse
    one is looked at only in its stretches of 64 entries that are not all zeros, and in
    any other each run of non-zero entries is copied as a slice (or, when the runs are
    many, the entries picked by one C-level pass)."""
    raw = table.tobytes()
    if _ZERO_ENTRY not in raw:  # (8 zero bytes anywhere, aligned or not)
        return array("Q", table)
    busy_stretches = _busy_stretches(raw)
    if busy_stretches is not None:  # (their bytes joined, then taken as a dense table)
        width = len(_ZERO_STRETCH)
        raw = b"".join([raw[8 * first : 8 * first + width] for first in busy_stretches])
        table = array("Q")
        table.frombytes(raw)
        if _ZERO_ENTRY not in raw:
            return table
    flags = column_flags(raw)
    starts = flags.count(b"\0\1") + flags[0]
    if starts > len(flags) // 16:
        return array("Q", compress(table, flags))
    used = array("Q")
    for start, stop in _flag_runs(flags):
        used += table[start:stop]
    return used


def nonzero_positions(table: array, raw: bytes | None = None) -> list[int]:
    """The indices of the non-zero entries of a table of 64-bit words (as nonzero_entries
    finds them); `raw` is the table's bytes, when the caller has them already."""
    if raw is None:
        raw = table.tobytes()
    if _ZERO_ENTRY not in raw:
        return list(range(len(table)))
    busy_stretches = _busy_stretches(raw)
    if busy_stretches is not None:
        return _positions_in(table, busy_stretches)
    return one_positions(column_flags(raw))


def _positions_in(table: array, busy_stretches: list[int]) -> list[int]:
    positions: list[int] = []
    for first in busy_stretches:
        stop = min(first + _STRETCH, len(table))
        positions.extend(compress(range(first, stop), table[first:stop]))
    return positions


_STRETCH = 64  # entries compared with zeros at once
_ZERO_STRETCH = bytes(8 * _STRETCH)


_SPAN = 8 * _STRETCH  # entries a first look compares with zeros at once
_ZERO_SPAN = bytes(8 * _SPAN)


def _busy_stretches(raw: bytes) -> list[int] | None:
    """First entry of each stretch of `raw` (64 entries, the last maybe fewer) that is not
    all zeros, when at most half of them are (a sparse table, where looking at these
    alone costs least); None for a denser table, whose entries are better looked at all
    at once, at C speed. Spans of 512 entries are looked at first, then the stretches of
    the busy spans (of all of them when most spans hold entries: a few in each, maybe);
    each is compared with zeros where it lies, nothing copied."""
    stretch, span = len(_ZERO_STRETCH), len(_ZERO_SPAN)
    zero_stretch, zero_span = _ZERO_STRETCH, _ZERO_SPAN
    at = raw.startswith
    busy_spans = [offset for offset in range(0, len(raw), span) if not at(zero_span, offset)]
    spans = (
        busy_spans if len(busy_spans) * 2 * span <= len(raw) + span else range(0, len(raw), span)
    )
    busy = [
        offset >> 3
        for first in spans
        for offset in range(first, min(first + span, len(raw)), stretch)
        if not at(zero_stretch, offset)
    ]
    return busy if len(busy) * 2 * stretch <= len(raw) + stretch else None


def used_entry_runs(raw: bytes, limit: int) -> list[tuple[int, int]] | None:
    """[first, end) entry indices of each run of non-zero 64-bit entries of the table
    `raw` (in either byte order: a zero entry is zero in both, so the table is not
    decoded), found in the stretches where a sparse table holds entries; None for a
    denser table (see _busy_stretches) or one of more than `limit` runs (where a look at
    each would cost more than decoding the table whole)."""
    entries = len(raw) // 8
    if _ZERO_ENTRY not in raw:
        return [(0, entries)]
    stretches = _busy_stretches(raw)
    if stretches is None:
        return None
    # (each group of neighbouring busy stretches holds a run at least: too many groups,
    # too many runs, known before any stretch is looked into)
    if 1 + sum(after - first != _STRETCH for first, after in zip(stretches, stretches[1:])) > limit:
        return None
    found: list[tuple[int, int]] = []
    for first in stretches:
        chunk = raw[8 * first : 8 * (first + _STRETCH)]
        # The entries from the first non-zero byte's to the last's: one run when no 8 zero
        # bytes lie between (as usual), else the stretch is looked at entry by entry.
        start = (len(chunk) - len(chunk.lstrip(b"\0"))) >> 3
        stop = (len(chunk.rstrip(b"\0")) + 7) >> 3
        if _ZERO_ENTRY not in chunk[8 * start : 8 * stop]:
            stretch_runs: Iterable[tuple[int, int]] = ((start, stop),)
        else:
            stretch_runs = _flag_runs(bytes(map(bool, array("Q", chunk))))
        for start, stop in stretch_runs:
            if found and found[-1][1] == first + start:  # (continues across stretches)
                found[-1] = (found[-1][0], first + stop)
            elif len(found) < limit:
                found.append((first + start, first + stop))
            else:
                return None
    return found


def _flag_runs(flags: bytes) -> Iterator[tuple[int, int]]:
    """[start, end) of each run of 1s of a 0/1 flag string."""
    start = flags.find(1)
    while start >= 0:
        stop = flags.find(0, start)
        if stop < 0:
            stop = len(flags)
        yield start, stop
        start = flags.find(1, stop)


def differing_entries(old: bytes, new: bytes, limit: int) -> list[int] | None:
    """The indices of the 64-bit entries in which two tables of the same size differ, in
    order; None when more than `limit` do. Stretches of 64 entries are compared where
    they lie (a memcmp each), and only those that differ entry by entry: two copies of a
    table that differ in a few entries cost a few microseconds, not a pass over both as
    integers."""
    if old == new:
        return []
    old_view = memoryview(old)
    found: list[int] = []
    stretch = 8 * _STRETCH
    for offset in range(0, len(new), stretch):
        if new.startswith(old_view[offset : offset + stretch], offset):
            continue
        first = offset >> 3
        old_words = array("Q", old[offset : offset + stretch])
        new_words = array("Q", new[offset : offset + stretch])
        found += compress(range(first, first + len(new_words)), map(ne, old_words, new_words))
        if len(found) > limit:
            return None
    return found


def used_runs(
    finder: RunFinder, raw: bytes, step: int, clean: Callable[[bytearray], None]
) -> list[tuple[int, int, bytes]]:
    """(first offset, entries, their top bytes) of each run of the non-zero entries of the
    table `raw` (big-endian, as stored) whose offsets, once `clean` clears the flag bits
    of the packed entries, are each `step` past the one before, in table order. Zero
    entries are taken out first (at C speed; an entry is zero in either byte order, so
    the table is not decoded), so that clusters allocated one after the other form one
    run however the guest maps them; so are entries that only flags made non-zero."""
    return runs_of_used(finder, nonzero_entries(array("Q", raw)).tobytes(), step, clean)


def runs_of_used(
    finder: RunFinder, used: bytes, step: int, clean: Callable[[bytearray], None]
) -> list[tuple[int, int, bytes]]:
    """used_runs for a table whose zero entries are already taken out."""
    packed = bytearray(used)
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
        for first, count, _ in used_runs(finder, packed, 1 << cluster_bits, _offset_only)
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


def column_flags(raw: bytes, columns: range = range(8)) -> bytes:
    """One byte per 64-bit entry of `raw`: 1 where any of the entry's bytes at `columns`
    (positions in the entry as stored) is non-zero, else 0; found with one integer OR per
    column, at C speed."""
    entries = len(raw) // 8
    combined = 0
    for column in columns:
        combined |= int.from_bytes(raw[column::8], "little")
    return combined.to_bytes(entries, "little").translate(_NONZERO_TO_ONE)


_ALLOWED_BYTES: dict[int, list[tuple[int, bytes]]] = {}


def allowed_bytes(unusual: int) -> list[tuple[int, bytes]]:
    """For each byte of a native little-endian 64-bit entry in which `unusual` has bits:
    (its index, the values without them), for `bytes.translate(None, values)` to find an
    entry with any of those bits at C speed, a byte column of a table at a time."""
    columns = _ALLOWED_BYTES.get(unusual)
    if columns is None:
        if len(_ALLOWED_BYTES) >= 16:
            _ALLOWED_BYTES.clear()
        columns = _ALLOWED_BYTES[unusual] = [
            (column, bytes(value for value in range(256) if not value & mask))
            for column in range(8)
            if (mask := (unusual >> (8 * column)) & 0xFF)
        ]
    return columns


_LANE_ONES: dict[int, int] = {}


def lane_ones(lanes: int) -> int:
    """The integer with 1 in each of `lanes` little-endian 64-bit lanes (for arithmetic on
    every entry of a table at once, as one integer)."""
    ones = _LANE_ONES.get(lanes)
    if ones is None:
        if len(_LANE_ONES) >= 16:
            _LANE_ONES.clear()
        ones = _LANE_ONES[lanes] = int.from_bytes(b"\1\0\0\0\0\0\0\0" * lanes, "little")
    return ones


_LANES: dict[tuple[int, int], int] = {}
_LANE_RAMPS: dict[tuple[int, int], int] = {}


def lanes(value: int, count: int) -> int:
    """The integer with `value` in each of `count` little-endian 64-bit lanes, kept: the
    same few (a cluster's size, bounds of the file and of its metadata) are asked for
    table after table, and each costs a multiplication of the table's size."""
    key = (value, count)
    found = _LANES.get(key)
    if found is None:
        if len(_LANES) >= 32:
            _LANES.clear()
        found = _LANES[key] = value * lane_ones(count)
    return found


def lane_ramp(count: int, step: int) -> int:
    """The integer with k * step in its little-endian 64-bit lane k (of `count`)."""
    key = (count, step)
    ramp = _LANE_RAMPS.get(key)
    if ramp is None:
        if len(_LANE_RAMPS) >= 16:
            _LANE_RAMPS.clear()
        entries = array("Q", range(0, count * step, step))
        ramp = _LANE_RAMPS[key] = int.from_bytes(entries.tobytes(), "little")
    return ramp


_OFFSET_BITS = (1 << 56) - 1
_COUNTER_BYTES: list[bytes] = []  # (low, high): the bytes of 0, 1, 2 ... as 16-bit counts


def is_64k_cluster_run(
    raw: bytes | bytearray,
    count: int,
    tops: bytes | bytearray,
    byteorder: Literal["little", "big"] = "little",
) -> bool | None:
    """Whether bits 0-55 of the `count` (at most 8192) 64-bit words in `byteorder` that make
    up `raw` (`tops`: their top bytes, as raw[7::8] or raw[0::8] finds them) are w,
    w + 64 KiB, w + 2 * 64 KiB... (w: the first word's), with byte copies and one
    comparison (20 us a full table, where the whole-table integer test takes 100).
    Bits 16-31 of the words count up from w's, so their two byte columns are slices of
    two fixed patterns; bits 32-55 are w's until those wrap, then one more; bits 0-15 are
    w's throughout. None where the last would carry past bit 55 (no offset does), or
    for more words than a table of 64 KiB has."""
    if count > 8192:
        return None
    if not _COUNTER_BYTES:  # (made at first use: 200 KiB that most commands never need)
        _COUNTER_BYTES.append(bytes(range(256)) * 288)
        _COUNTER_BYTES.append(b"".join(bytes((value,)) * 256 for value in range(256)) * 2)
    low_column, high_column = _COUNTER_BYTES
    first = int.from_bytes(raw[:8], byteorder) & _OFFSET_BITS
    counter = (first >> 16) & 0xFFFF
    upper = first >> 32
    before_wrap = 0x10000 - counter
    if count > before_wrap and upper + 1 > _OFFSET_BITS >> 32:
        return None
    word = first & ~0xFFFF0000  # (bits 16-31 are written below, column by column)
    expected = bytearray(word.to_bytes(8, byteorder))
    if before_wrap >= count:
        expected *= count
    else:
        expected *= before_wrap
        expected += (word + (1 << 32)).to_bytes(8, byteorder) * (count - before_wrap)
    low, high, top = (2, 3, 7) if byteorder == "little" else (5, 4, 0)
    expected[low::8] = low_column[counter : counter + count]
    expected[high::8] = high_column[counter : counter + count]
    expected[top::8] = tops  # (bits 56-63 are not compared)
    return expected == raw


def consecutive_runs(numbers: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first number, count, index of the first) of each run of consecutive numbers of
    `numbers`, in their order."""
    if numbers and numbers[-1] - numbers[0] == len(numbers) - 1:
        if numbers == list(range(numbers[0], numbers[-1] + 1)):  # (one run: at C speed)
            return [(numbers[0], len(numbers), 0)]
    runs = []
    index = 0
    # number - index is the same for every number of a run
    for key, run in groupby(map(sub, numbers, range(len(numbers)))):
        length = len(list(run))
        runs.append((key + index, length, index))
        index += length
    return runs


def one_positions(flags: bytes, offset: int = 0) -> list[int]:
    """The positions (plus `offset`) of the 1 bytes of a 0/1 flag string, at C speed: from
    the lengths of the runs of zeros between them while they are a fifth of the flags or
    fewer (a split, then running sums), else by one pass over all the flags."""
    if flags.count(1) > len(flags) // 5:
        return list(compress(range(offset, offset + len(flags)), flags))
    gaps = list(map(len, flags.split(b"\1")))
    gaps.pop()  # (the zeros after the last 1)
    if not gaps:
        return []
    gaps[0] += offset
    # the k-th 1 lies past the first k + 1 gaps and the k ones before it
    return list(map(add, accumulate(gaps), range(len(gaps))))
