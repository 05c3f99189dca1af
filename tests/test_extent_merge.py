"""Joining extents a batch at a time (blockdev.merged_batches, behind map, convert and
iter_extents): the same extents as joining them one by one, whether a batch takes the
whole-batch way (neighbours alternating between data and not) or the one-by-one way,
and the same end when the batches fail part-way."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qcow2lib.blockdev import Extent, iter_merged, merged_batches
from qcow2lib.errors import CorruptImageError


def merged_one_by_one(extents: list[Extent]) -> list[Extent]:
    """The reference: each extent joined to the one before when it continues it saying
    the same thing, empty ones dropped."""
    out: list[Extent] = []
    for ext in extents:
        if not ext.length:
            continue
        if out:
            last = out[-1]
            same = (last.is_data, last.is_zero, last.depth, last.present) == (
                ext.is_data,
                ext.is_zero,
                ext.depth,
                ext.present,
            )
            hosts_continue = (last.host_offset is None and ext.host_offset is None) or (
                last.host_offset is not None
                and ext.host_offset is not None
                and last.host_offset + last.length == ext.host_offset
            )
            if last.offset + last.length == ext.offset and same and hosts_continue:
                out[-1] = Extent(
                    last.offset,
                    last.length + ext.length,
                    last.is_data,
                    last.is_zero,
                    last.depth,
                    last.host_offset,
                    last.present,
                )
                continue
        out.append(ext)
    return out


@st.composite
def extent_batches(draw) -> list[list[Extent]]:
    """Contiguous extents cut into batches. Most batches alternate between data and holes
    (the whole-batch way), with hosts that sometimes continue across a batch boundary;
    others mix every field, empty extents included."""
    batches = []
    offset, host = 0, 1 << 20
    for _ in range(draw(st.integers(0, 6))):
        alternating = draw(st.booleans())
        is_data = draw(st.booleans())
        batch = []
        for _ in range(draw(st.integers(0, 12))):
            length = draw(st.sampled_from([0, 512, 4096, 65536])) if not alternating else 4096
            if alternating:
                data, zero, depth = is_data, not is_data, 0
                is_data = not is_data
            else:
                data, zero, depth = (
                    draw(st.booleans()),
                    draw(st.booleans()),
                    draw(st.integers(0, 1)),
                )
            if data and draw(st.integers(0, 3)):
                host_offset = host if draw(st.booleans()) else host + 65536
            else:
                host_offset = None
            present = data if alternating else draw(st.booleans())
            batch.append(Extent(offset, length, data, zero, depth, host_offset, present))
            offset += length
            if host_offset is not None:
                host = host_offset + length
        batches.append(batch)
    return batches


@settings(max_examples=400, deadline=None)
@given(extent_batches())
def test_merged_batches_join_as_one_by_one(batches):
    flat = [ext for batch in batches for ext in batch]
    expected = merged_one_by_one(flat)
    got = list(merged_batches(iter(batches)))
    assert all(got)  # (no empty list)
    assert [ext for batch in got for ext in batch] == expected
    assert list(iter_merged(iter(batches))) == expected


@settings(max_examples=200, deadline=None)
@given(extent_batches(), st.booleans())
def test_a_failure_drops_or_gives_the_extent_held_back(batches, pending_on_error):
    def failing():
        yield from batches
        raise CorruptImageError("table broken")

    flat = [ext for batch in batches for ext in batch]
    expected = merged_one_by_one(flat)
    if expected and not pending_on_error:
        expected = expected[:-1]  # (the last one was still held back for joining)
    got: list[Extent] = []
    try:
        for batch in merged_batches(failing(), pending_on_error):
            got += batch
    except CorruptImageError:
        pass
    else:
        raise AssertionError("the failure was not passed on")
    assert got == expected


def test_an_alternating_batch_joins_the_held_extent_only_at_its_head():
    first = [Extent(0, 4096, True, False, 0, 8192, True), Extent(4096, 4096, False, True, 0)]
    # continues the hole held back, then data, hole, data
    second = [
        Extent(8192, 4096, False, True, 0),
        Extent(12288, 4096, True, False, 0, 65536, True),
        Extent(16384, 4096, False, True, 0),
        Extent(20480, 4096, True, False, 0, 69632, True),
    ]
    got = list(merged_batches(iter([first, second])))
    assert got == [
        [Extent(0, 4096, True, False, 0, 8192, True)],
        [Extent(4096, 8192, False, True, 0), *second[1:3]],
        [second[3]],
    ]
