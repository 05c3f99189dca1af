"""qcow2lib.runs, the run finder behind check's and the snapshots' reference counting,
against an entry-by-entry reading of the same L2 tables."""

from __future__ import annotations

import random
import sys
from array import array

import pytest

from qcow2lib import structs as S
from qcow2lib.runs import (
    differing_entries,
    used_entry_runs,
    NativeRunLength,
    RunFinder,
    consecutive_runs,
    host_runs,
    is_64k_cluster_run,
    nonzero_entries,
    nonzero_positions,
    one_positions,
)

CLUSTER_BITS = 16


def reference_runs(entries: array, cluster_bits: int) -> list[tuple[int, int]] | None:
    """What host_runs must give: clusters of the entries with an offset, grouped while
    each follows the one before in the file; None for compressed or misaligned entries."""
    clusters = []
    for entry in entries:
        if entry & S.OFLAG_COMPRESSED:
            return None
        host = entry & S.L2E_OFFSET_MASK
        if host & ((1 << cluster_bits) - 1):
            return None
        if host:
            clusters.append(host >> cluster_bits)
    runs: list[tuple[int, int]] = []
    for cluster in clusters:
        if runs and runs[-1][0] + runs[-1][1] == cluster:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((cluster, 1))
    return runs


def random_table(rng: random.Random, entries: int) -> array:
    """Runs of contiguous clusters of many lengths (past the 64- and 256-entry windows),
    holes, jumps back, flags (COPIED, zero, reserved bits) and entries of flags only."""
    table = array("Q")
    cluster = rng.randrange(1, 1 << 20)
    while len(table) < entries:
        kind = rng.random()
        length = rng.choice([1, 2, 63, 64, 65, 255, 256, 257, 1000])
        if kind < 0.3:
            table.extend([0] * length)
            continue
        if kind < 0.4:
            cluster = rng.randrange(1, 1 << 20)
        for _ in range(length):
            flags = rng.choice([0, S.OFLAG_COPIED, S.OFLAG_COPIED | S.OFLAG_ZERO, 1 << 5])
            table.append(flags | (cluster << CLUSTER_BITS) if rng.random() > 0.01 else flags)
            cluster += 1
    del table[entries:]
    return table


@pytest.mark.parametrize("seed", range(40))
def test_host_runs_match_an_entry_by_entry_reading(seed: int) -> None:
    rng = random.Random(seed)
    finder = RunFinder()
    for entries in (1, 7, 512, 8192):
        table = random_table(rng, entries)
        assert host_runs(table, CLUSTER_BITS, finder) == reference_runs(table, CLUSTER_BITS)


def test_host_runs_refuse_compressed_and_misaligned_entries() -> None:
    finder = RunFinder()
    plain = array("Q", [(5 + index) << CLUSTER_BITS for index in range(100)])
    assert host_runs(plain, CLUSTER_BITS, finder) == [(5, 100)]
    compressed = array("Q", plain)
    compressed[50] |= S.OFLAG_COMPRESSED
    assert host_runs(compressed, CLUSTER_BITS, finder) is None
    misaligned = array("Q", plain)
    misaligned[99] += 1 << 12
    assert host_runs(misaligned, CLUSTER_BITS, finder) is None
    assert host_runs(array("Q", bytes(8 * 64)), CLUSTER_BITS, finder) == []
    # 512-byte clusters: every offset bit is a cluster bit, nothing can be misaligned.
    small = array("Q", [(9 + index) << 9 | S.OFLAG_COPIED for index in range(10)])
    assert host_runs(small, 9, finder) == [(9, 10)]


@pytest.mark.parametrize("seed", range(20))
def test_native_run_length_matches_counting_entry_by_entry(seed: int) -> None:
    rng = random.Random(seed)
    run_length = NativeRunLength()
    for _ in range(50):
        table = random_table(rng, rng.choice([2, 100, 8192]))
        index = rng.randrange(len(table) - 1)
        first = table[index]
        step = rng.choice([0, 1 << CLUSTER_BITS, 1 << 9])
        limit = rng.randint(1, len(table) - index)
        expected = 0
        while expected < limit and table[index + expected] == first + expected * step:
            expected += 1
        assert run_length(table, index, limit, first, step) == expected


def test_native_run_length_across_its_growing_windows() -> None:
    run_length = NativeRunLength()
    step = 1 << CLUSTER_BITS
    table = array("Q", [S.OFLAG_COPIED | (7 + index) << CLUSTER_BITS for index in range(8192)])
    assert run_length(table, 0, 8192, table[0], step) == 8192
    for broken in (1, 63, 64, 65, 300, 5000, 8191):
        damaged = array("Q", table)
        damaged[broken] ^= 1 << 9
        assert run_length(damaged, 0, 8192, table[0], step) == broken
        assert run_length(damaged, 0, broken, table[0], step) == broken
    assert run_length(array("Q", bytes(8 * 700)), 0, 700, 0, 0) == 700


@pytest.mark.parametrize("seed", range(40))
def test_nonzero_entries_and_positions_skip_only_zeros(seed):
    """Dense tables (copied whole), tables with short gaps (filtered) and sparse ones
    (zero stretches skipped), of lengths around the 64-entry stretch, give exactly the
    non-zero entries and their indices."""
    rng = random.Random(seed)
    length = rng.choice([1, 7, 63, 64, 65, 127, 200, 512, 8192])
    density = rng.choice([0.0, 0.01, 0.3, 0.9, 1.0])
    table = array("Q", bytes(8 * length))
    for index in range(length):
        if rng.random() < density:
            table[index] = rng.choice(
                [1, 1 << 63, 256, 1 << rng.randrange(64), rng.getrandbits(64) | 1]
            )
    if rng.random() < 0.3:  # runs of allocated clusters between long holes
        start = rng.randrange(length)
        for index in range(start, min(length, start + rng.randrange(1, 40))):
            table[index] = S.OFLAG_COPIED | (index + 5) << CLUSTER_BITS
    expected = [index for index, entry in enumerate(table) if entry]
    assert nonzero_positions(table) == expected
    assert list(nonzero_entries(table)) == [table[index] for index in expected]


@pytest.mark.parametrize("seed", range(20))
def test_consecutive_runs_match_a_number_by_number_reading(seed: int) -> None:
    """Runs of numbers each one past the one before, in the order given (a number lower
    than or equal to the one before starts a run too): one run when all follow."""
    rng = random.Random(seed)
    numbers: list[int] = []
    for _ in range(rng.randrange(0, 12)):
        start = rng.choice([rng.randrange(1 << 40), numbers[-1] + 1 if numbers else 0, 0])
        numbers.extend(range(start, start + rng.randrange(1, 50)))
    expected = []
    for index, number in enumerate(numbers):
        if index and number == numbers[index - 1] + 1:
            first, count, at = expected[-1]
            expected[-1] = (first, count + 1, at)
        else:
            expected.append((number, 1, index))
    assert consecutive_runs(numbers) == expected


def assert_runs_as_entry_by_entry(finder: RunFinder, values: list[int], step: int) -> None:
    """The finder's runs of `values` stored big-endian are those read entry by entry."""
    raw = array("Q", values)
    if sys.byteorder == "little":
        raw.byteswap()
    assert finder.runs(bytearray(raw.tobytes()), step) == entry_by_entry_runs(values, step)


def entry_by_entry_runs(entries: list[int], step: int) -> list[tuple[int, int, int]]:
    runs, start = [], 0
    for index in range(1, len(entries) + 1):
        if index == len(entries) or entries[index] != entries[index - 1] + step:
            runs.append((start, index, entries[start]))
            start = index
    return runs


@pytest.mark.parametrize("seed", range(20))
def test_run_finder_matches_an_entry_by_entry_reading(seed: int) -> None:
    """Runs of big-endian entries stepping by `step`, entries near 2**64 included (where
    adding the step to every entry at once would carry into the next)."""
    rng = random.Random(seed)
    finder = RunFinder()
    for entries in (0, 1, 2, 3, 65, 1000, 8192):
        step = rng.choice([0, 512, 1 << CLUSTER_BITS, 1 << 21])
        values, value = [], rng.randrange(1 << 40)
        for _ in range(entries):
            roll = rng.random()
            if roll < 0.05:
                value = rng.randrange(1 << rng.choice([8, 40, 63, 64]))
            elif roll < 0.06 and seed % 2:
                value = (1 << 64) - 1 - rng.randrange(3) * step
            elif value + step < 1 << 64:
                value += step
            values.append(value)
        assert_runs_as_entry_by_entry(finder, values, step)


@pytest.mark.parametrize("seed", range(12))
def test_run_finder_below_2_62_matches_an_entry_by_entry_reading(seed: int) -> None:
    """Entries all below 2**62 (every L2 table's, flags cleared) take the top-bit test of
    each entry's difference; those just below 2**62, and runs that cross 2**56, included."""
    rng = random.Random(seed)
    finder = RunFinder()
    for entries in (2, 9, 300, 8192):
        step = rng.choice([512, 1 << CLUSTER_BITS, 1 << 21])
        top = (1 << 62) - 1 - entries * step
        value = rng.choice([rng.randrange(1 << 40), top, (1 << 56) - 3 * step])
        values = []
        for _ in range(entries):
            roll = rng.random()
            if roll < 0.1:
                value = rng.choice([0, rng.randrange(1 << 62), top, value + 2 * step])
            elif roll < 0.15:
                value = max(value - step, 0)
            else:
                value = min(value + step, (1 << 62) - 1)
            values.append(value)
        assert_runs_as_entry_by_entry(finder, values, step)


@pytest.mark.parametrize("seed", range(8))
def test_one_positions_match_a_byte_by_byte_reading(seed: int) -> None:
    rng = random.Random(seed)
    for length in (0, 1, 7, 100, 4992):
        density = rng.choice([0, 0.01, 0.1, 0.19, 0.21, 0.5, 1])
        flags = bytes(int(rng.random() < density) for _ in range(length))
        offset = rng.choice([0, 1, 4096])
        assert one_positions(flags, offset) == [i + offset for i, f in enumerate(flags) if f]


@pytest.mark.parametrize(
    "swap", [None, (1, 2), (3, 900), (0, 8191), "top byte", "into the top byte", "wrap"]
)
def test_run_finder_tells_one_run_from_entries_that_only_end_as_one(swap) -> None:
    """A table of one run is found with one comparison once its ends are one run apart;
    entries swapped inside (the ends kept), or one whose top byte differs, are not one
    run; a run carrying into the top byte, or wrapping bits 16-31, is one."""
    step = 1 << CLUSTER_BITS
    base = 7 << 30
    if swap == "into the top byte":
        base = (1 << 56) - 4000 * step
    elif swap == "wrap":
        base = (0x1234 << 32) | (0xFFFF - 100) << 16
    values = [base + index * step for index in range(8192)]
    if swap == "top byte":
        values[4000] |= 1 << 63
    elif isinstance(swap, tuple):
        first, second = swap
        values[first], values[second] = values[second], values[first]
    raw = array("Q", values)
    if sys.byteorder == "little":
        raw.byteswap()
    found = RunFinder().runs(bytearray(raw.tobytes()), step)
    assert found == entry_by_entry_runs(values, step)
    assert (len(found) == 1) == (swap in (None, "into the top byte", "wrap"))


def reference_64k_run(words: array) -> bool:
    """Bits 0-55 of each word are the first's plus 64 KiB times its index."""
    low = (1 << 56) - 1
    base = words[0] & low
    return all(word & low == base + index * 65536 for index, word in enumerate(words))


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("seed", range(40))
def test_64k_cluster_runs_match_a_word_by_word_reading(seed: int, byteorder: str) -> None:
    """Runs starting anywhere (bits 16-31 wrapping inside the run or not), with top bytes
    that differ, and with one word off in any byte: as the word-by-word reading says."""
    rng = random.Random(seed)
    count = rng.choice([1, 2, 255, 256, 257, 4096, 8192])
    first = rng.choice(
        [
            rng.randrange(1 << 40) << 16,
            (0xFFFF - rng.randrange(count)) << 16 | rng.randrange(1 << 24) << 32,
            rng.randrange(1 << 56),  # (not cluster aligned: the low bits still follow)
        ]
    )
    if first + count * 65536 >= 1 << 56:
        first = 65536
    words = array("Q", [first + index * 65536 for index in range(count)])
    for index in rng.sample(range(count), min(count, 3)):
        words[index] |= rng.choice([0x80, 0x81, 0x00, 0x3F]) << 56
    if seed % 2:
        index = rng.randrange(count)
        words[index] ^= 1 << rng.choice([0, 9, 16, 23, 24, 31, 32, 40, 55])
    if byteorder != sys.byteorder:
        words.byteswap()
    raw = words.tobytes()
    if byteorder != sys.byteorder:
        words.byteswap()
    tops = raw[7::8] if byteorder == "little" else raw[0::8]
    assert is_64k_cluster_run(raw, count, tops, byteorder) == reference_64k_run(words)


def test_64k_cluster_run_past_bit_55_is_not_told() -> None:
    """A run whose bits 32-55 would wrap is not told apart (no offset reaches there)."""
    first = ((1 << 24) - 1) << 32 | 0xFFFF << 16
    words = array("Q", [first + index * 65536 for index in range(1)])
    raw = words.tobytes()
    assert is_64k_cluster_run(raw, 1, raw[7::8]) is True
    words = array("Q", [first, (first + 65536) & ((1 << 56) - 1)])
    raw = words.tobytes()
    assert is_64k_cluster_run(raw, 2, raw[7::8]) is None


@pytest.mark.parametrize("limit", [64, 4])
def test_used_entry_runs_finds_every_run_of_a_sparse_table(limit: int) -> None:
    """runs.used_entry_runs against a look at each entry, on random sparse tables (runs
    across stretches, entries whose bytes are mostly zero, entries in most spans of 512),
    with its limit on runs."""
    rng = random.Random(5)
    for _ in range(300):
        entries = [0] * 8192
        for _ in range(rng.randrange(0, 40)):
            first = rng.randrange(8192)
            for index in range(first, min(8192, first + rng.choice([1, 2, 16, 70, 300]))):
                entries[index] = rng.choice([1, 1 << 63, 0x50000, rng.getrandbits(64) | 1])
        raw = array("Q", entries)
        if sys.byteorder == "little":
            raw.byteswap()
        raw = raw.tobytes()
        expected = []
        for index, entry in enumerate(entries):
            if entry:
                if expected and expected[-1][1] == index:
                    expected[-1] = (expected[-1][0], index + 1)
                else:
                    expected.append((index, index + 1))
        found = used_entry_runs(raw, limit)
        if found is None:  # (more runs than the limit, or a denser table: entries in
            # over half of its stretches of 64)
            stretches = {index // 64 for index, entry in enumerate(entries) if entry}
            assert len(expected) > limit or len(stretches) > 64
        else:
            assert found == expected


@pytest.mark.parametrize("seed", range(4))
def test_differing_entries_match_an_entry_by_entry_comparison(seed: int) -> None:
    """runs.differing_entries against a comparison of each entry: no, one, a few and many
    entries changed, at either end of a stretch of 64 and anywhere, with its limit."""
    rng = random.Random(seed)
    for _ in range(200):
        count = rng.choice([8192, 512, 64, 70])
        old = [rng.choice([0, 1 << 63 | rng.randrange(1, 1 << 40) << 16]) for _ in range(count)]
        new = list(old)
        for _ in range(rng.choice([0, 1, 2, 5, 70, 400])):
            index = rng.choice([0, 63, 64, count - 1, rng.randrange(count)]) % count
            new[index] = rng.choice([0, new[index] ^ 1 << rng.randrange(64)])
        expected = [index for index in range(count) if old[index] != new[index]]
        found = differing_entries(array("Q", old).tobytes(), array("Q", new).tobytes(), 64)
        assert found == (expected if len(expected) <= 64 else None)
