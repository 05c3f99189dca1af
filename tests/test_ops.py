"""Image operations (convert, rebase, commit, resize, amend, compare, measure, map) with the
real qemu-img as the oracle, both ways: images qemu made are processed by qcow2lib and
the results are judged by qemu-img (check, compare, map), and qcow2lib's reports are
compared with qemu-img's on the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qcow2lib
from qcow2lib.convert import convert
from qcow2lib.ops.amend import amend as amend_image
from qcow2lib.ops.commit import commit as commit_image
from qcow2lib.ops.compare import compare
from qcow2lib.ops.mapping_report import map_entries, map_human_text, map_json_text
from qcow2lib.ops.measure import measure
from qcow2lib.ops.rebase import rebase as rebase_image
from qcow2lib.ops.resize import ShrinkRefusedError, resize

from qemutools import assert_clean, qemu_compare, qemu_create, qemu_img, qemu_io, qemu_map, to_raw

KiB = 1024
MiB = 1024 * KiB


# --- helpers -------------------------------------------------------------------------------


# The operations take open images; these open them by path as qemu-img would.
def rebase(path: str, new_backing: str | None, new_backing_fmt: str | None, unsafe=False) -> None:
    with qcow2lib.open(path, "r+", backing=not unsafe) as image:
        rebase_image(image, new_backing, new_backing_fmt, unsafe=unsafe)


def commit(path: str, base_name: str | None = None) -> None:
    with qcow2lib.open(path, "r+", backing=False) as top:
        commit_image(top, base_name)


def amend(path: str, **options) -> None:
    with qcow2lib.open(path, "r+") as image:
        amend_image(image, **options)


def make(
    path: Path,
    size: int,
    *writes: str,
    fmt: str = "qcow2",
    options: dict | None = None,
    backing: Path | str | None = None,
    backing_fmt: str | None = None,
) -> Path:
    """An image made by qemu-img, then written by qemu-io commands."""
    qemu_create(path, size, fmt, options, str(backing) if backing else None, backing_fmt)
    if writes:
        qemu_io(path, *writes, fmt=fmt)
    return path


def write_raw(path: Path, pieces: list[tuple[int, bytes]], size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return path


def our_convert(
    src: Path | list[Path],
    dst: Path,
    fmt: str = "qcow2",
    *,
    create_opts=None,
    target_backing: Path | None = None,
    backing_fmt: str | None = None,
    src_fmt: str | None = None,
    **kwargs,
) -> Path:
    """qcow2lib.create + convert, as the CLI will do it."""
    srcs = src if isinstance(src, list) else [src]
    devices = [qcow2lib.open(str(s), fmt=src_fmt) for s in srcs]
    try:
        size = sum(-(-d.size // 512) * 512 for d in devices)
        qcow2lib.create(
            str(dst),
            size,
            fmt=fmt,
            backing_file=str(target_backing) if target_backing else None,
            backing_fmt=backing_fmt,
            **(create_opts or {}),
        )
        tb = qcow2lib.open(str(target_backing), fmt=backing_fmt) if target_backing else None
        try:
            with qcow2lib.open(str(dst), "r+", fmt=fmt, backing=False) as target:
                convert(
                    devices if len(devices) > 1 else devices[0], target, target_backing=tb, **kwargs
                )
        finally:
            if tb is not None:
                tb.close()
    finally:
        for d in devices:
            d.close()
    return dst


def strip_offsets(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "offset"} for e in entries]


def per_cluster(entries: list[dict], cluster: int = 64 * KiB) -> list[tuple]:
    """The map as one (present, zero, data, stored plain) tuple per cluster, so layouts
    whose host offsets differ compare equal."""
    out = []
    for e in entries:
        for _ in range(0, e["length"], cluster):
            out.append((e["present"], e["zero"], e["data"], "offset" in e))
    return out


@pytest.fixture
def chain3(tmp_path):
    """raw base (4 MiB) <- qcow2 mid (6 MiB) <- qcow2 top (8 MiB), every kind of run."""
    base = make(
        tmp_path / "base.raw",
        4 * MiB,
        "write -P 0x11 0 1M",
        "write -P 0 2M 64k",
        "write -P 0x12 3M 4k",
        fmt="raw",
    )
    mid = make(
        tmp_path / "mid.qcow2",
        6 * MiB,
        "write -P 0x22 512k 1M",
        "write -z 3M 128k",
        "write -P 0x23 4608k 64k",
        backing="base.raw",
        backing_fmt="raw",
    )
    top = make(
        tmp_path / "top.qcow2",
        8 * MiB,
        "write -P 0x33 1M 64k",
        "write -c -P 0x34 5M 64k",
        "write -z 256k 64k",
        "write -P 0x35 7M 100k",
        backing="mid.qcow2",
        backing_fmt="qcow2",
    )
    return base, mid, top


@pytest.fixture
def sparse_raw(tmp_path):
    """A raw file of data with zero gaps of many sizes and alignments, and holes."""
    rnd = __import__("random").Random(7)
    pieces, pos = [], 0
    for _ in range(48):
        length = rnd.choice([512, 1536, 4096, 7000, 65536, 200000])
        pieces.append(
            (
                pos,
                bytes([rnd.randrange(1, 256)]) * length
                if rnd.random() < 0.5
                else os.urandom(length),
            )
        )
        pos += length + rnd.choice([512, 1024, 4096, 8192, 12288, 65536, 300000])
    size = -(-pos // MiB) * MiB + MiB
    return write_raw(tmp_path / "sparse.raw", pieces, size)


# --- convert --------------------------------------------------------------------------------


def test_convert_raw_qcow2_raw_round_trip(tmp_path, sparse_raw):
    ours = our_convert(sparse_raw, tmp_path / "ours.qcow2")
    assert_clean(ours)
    assert qemu_compare(sparse_raw, ours, "raw", "qcow2") == 0
    theirs = tmp_path / "theirs.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", sparse_raw, theirs)
    assert qemu_map(ours) == qemu_map(theirs)  # same layout, host offsets included
    back = our_convert(ours, tmp_path / "back.raw", "raw", copy_range=False)
    assert back.read_bytes() == sparse_raw.read_bytes()
    theirs_raw = tmp_path / "theirs.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", ours, theirs_raw)
    assert qemu_map(back) == qemu_map(theirs_raw)


def test_convert_chain_to_flat(tmp_path, chain3):
    _, _, top = chain3
    for cluster_size in (4096, 65536):
        ours = our_convert(
            top,
            tmp_path / f"flat{cluster_size}.qcow2",
            create_opts={"cluster_size": cluster_size},
            parallel=4,
        )
        assert_clean(ours)
        assert qemu_compare(top, ours) == 0
        theirs = tmp_path / f"theirs{cluster_size}.qcow2"
        qemu_img("convert", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", top, theirs)
        assert strip_offsets(qemu_map(ours)) == strip_offsets(qemu_map(theirs))


def test_convert_out_of_order_and_single_thread(tmp_path, sparse_raw):
    for kwargs in ({"out_of_order": True, "parallel": 16}, {"parallel": 1}):
        ours = our_convert(
            sparse_raw, tmp_path / f"o{len(kwargs)}{kwargs['parallel']}.qcow2", **kwargs
        )
        assert_clean(ours)
        assert qemu_compare(sparse_raw, ours, "raw") == 0


def test_convert_with_target_backing_same_as_source_backing(tmp_path, chain3):
    _, mid, top = chain3
    out = our_convert(top, tmp_path / "overlay.qcow2", target_backing=mid, backing_fmt="qcow2")
    assert_clean(out)
    assert qemu_compare(top, out) == 0
    # Only what the source's top layer allocates was written (like qemu-img convert -B).
    own = [(e["start"], e["length"]) for e in qemu_map(out) if e["depth"] == 0 and e["present"]]
    top_own = [(e["start"], e["length"]) for e in qemu_map(top) if e["depth"] == 0 and e["present"]]
    assert own == top_own
    theirs = tmp_path / "theirs.qcow2"
    qemu_img("convert", "-O", "qcow2", "-B", mid, "-F", "qcow2", top, theirs)
    assert strip_offsets(qemu_map(out)) == strip_offsets(qemu_map(theirs))


def test_convert_with_target_backing_writes_only_differences(tmp_path):
    base = make(tmp_path / "b.qcow2", 4 * MiB, "write -P 0x41 0 2M", "write -P 0x42 3M 1M")
    src = make(
        tmp_path / "src.raw",
        4 * MiB,
        "write -P 0x41 0 2M",
        "write -P 0x99 64k 64k",
        "write -P 0x42 3M 1M",
        "write -P 0 3M 64k",
        "write -P 0x43 2M 4k",
        fmt="raw",
    )
    out = our_convert(
        src, tmp_path / "o.qcow2", target_backing=base, backing_fmt="qcow2", src_fmt="raw"
    )
    assert_clean(out)
    assert qemu_compare(src, out, "raw") == 0
    own = [
        (e["start"], e["length"], e["zero"])
        for e in qemu_map(out)
        if e["depth"] == 0 and e["present"]
    ]
    assert own == [
        (64 * KiB, 64 * KiB, False),
        (2 * MiB, 64 * KiB, False),
        (3 * MiB, 64 * KiB, True),
    ]


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_convert_compressed(tmp_path, sparse_raw, ctype):
    ours = our_convert(
        sparse_raw, tmp_path / "c.qcow2", compress=True, create_opts={"compression_type": ctype}
    )
    assert_clean(ours)
    assert qemu_compare(sparse_raw, ours, "raw") == 0
    info = json.loads(qemu_img("info", "--output=json", ours).stdout)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    # Compressible clusters are stored compressed (qemu-img map: data without offset).
    assert any(e["data"] and "offset" not in e for e in qemu_map(ours))
    theirs = tmp_path / "t.qcow2"
    qemu_img(
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        f"compression_type={ctype}",
        sparse_raw,
        theirs,
    )
    # Compressed writes are not ordered, so host offsets (and merging) may differ.
    assert per_cluster(qemu_map(ours)) == per_cluster(qemu_map(theirs))


@pytest.mark.parametrize("sparse_size", [0, 512, 4096, 65536])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_convert_sparse_size_like_qemu(tmp_path, sparse_raw, sparse_size, fmt):
    ours = our_convert(
        sparse_raw, tmp_path / f"s.{fmt}", fmt, sparse_size=sparse_size, copy_range=False
    )
    theirs = tmp_path / f"t.{fmt}"
    qemu_img("convert", "-S", str(sparse_size), "-f", "raw", "-O", fmt, sparse_raw, theirs)
    assert qemu_compare(sparse_raw, ours, "raw", fmt) == 0
    assert qemu_map(ours) == qemu_map(theirs)


def test_convert_copy_range_raw_to_raw(tmp_path, sparse_raw):
    out = our_convert(sparse_raw, tmp_path / "cr.raw", "raw", copy_range=True)
    assert out.read_bytes() == sparse_raw.read_bytes()
    # Holes of the source stay holes (only data runs are copied).
    assert qemu_map(out)[-1]["zero"]


def test_convert_concatenates_sources(tmp_path, chain3):
    base, _, top = chain3
    a = make(tmp_path / "a.raw", 1 * MiB + 512, "write -P 0x55 0 4k", fmt="raw")
    ours = our_convert([a, top], tmp_path / "cat.qcow2", src_fmt=None)
    theirs = tmp_path / "cat_theirs.qcow2"
    qemu_img("convert", "-O", "qcow2", a, top, theirs)
    assert qemu_compare(ours, theirs) == 0
    assert_clean(ours)


def test_convert_progress_and_errors(tmp_path, sparse_raw):
    seen = []
    our_convert(sparse_raw, tmp_path / "p.qcow2", progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert all(d <= t for d, t in seen)
    small = make(tmp_path / "small.qcow2", 64 * KiB)
    with (
        qcow2lib.open(str(sparse_raw), fmt="raw") as src,
        qcow2lib.open(str(small), "r+") as target,
    ):
        with pytest.raises(qcow2lib.InvalidArgumentError, match="smaller than input"):
            convert(src, target)
        with pytest.raises(qcow2lib.InvalidArgumentError, match="Invalid buffer size"):
            convert(src, target, sparse_size=1000)


def test_convert_between_cluster_sizes(tmp_path):
    src = make(
        tmp_path / "src.qcow2",
        5 * MiB,
        "write -P 1 1000k 100k",
        "write -c -P 2 2M 64k",
        "write -z 3M 1M",
        "write -P 3 4M 512",
        options={"cluster_size": "512"},
    )
    for cluster_size in (512, 65536, 2 * MiB):
        ours = our_convert(
            src, tmp_path / f"o{cluster_size}.qcow2", create_opts={"cluster_size": cluster_size}
        )
        theirs = tmp_path / f"t{cluster_size}.qcow2"
        qemu_img("convert", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", src, theirs)
        assert_clean(ours)
        assert qemu_compare(src, ours) == 0
        # Same allocation; host offsets may differ where the engine places refcount blocks.
        assert per_cluster(qemu_map(ours), 512) == per_cluster(qemu_map(theirs), 512)


def test_convert_into_existing_target(tmp_path, sparse_raw):
    """Without target_is_zero, zero runs of the source overwrite old target data."""
    target = make(tmp_path / "t.qcow2", 8 * MiB, "write -P 0xee 0 8M")
    with qcow2lib.open(str(sparse_raw), fmt="raw") as src, qcow2lib.open(str(target), "r+") as dev:
        convert(src, dev)
    assert_clean(target)
    data = to_raw(target, tmp_path / "t.raw")
    expected = sparse_raw.read_bytes()
    assert data[: len(expected)] == expected
    assert data[len(expected) :] == b"\xee" * (len(data) - len(expected))
    # target_is_zero trusts the caller: nothing is zeroed.
    other = make(tmp_path / "o.qcow2", 8 * MiB, "write -P 0xee 0 8M")
    with qcow2lib.open(str(sparse_raw), fmt="raw") as src, qcow2lib.open(str(other), "r+") as dev:
        convert(src, dev, target_is_zero=True)
    assert to_raw(other, tmp_path / "o.raw")[-1:] == b"\xee"


class _FailingSource(qcow2lib.BlockDevice):
    def __init__(self, size: int, bad: int):
        self.size, self.bad, self.filename = size, bad, "failing"

    def readinto(self, offset, buffer):
        if offset <= self.bad < offset + len(memoryview(buffer)):
            raise qcow2lib.Qcow2IOError(5, "read failed on 'failing': Input/output error")
        memoryview(buffer).cast("B")[:] = b"\x01" * len(memoryview(buffer))
        return len(memoryview(buffer))

    def extents(self, offset=0, length=None):
        length = self.size - offset if length is None else length
        return [qcow2lib.Extent(offset, length, True, False, 0, offset, True)]

    def close(self):
        pass


def test_convert_read_error_stops_all_workers(tmp_path):
    from qcow2lib.convert import ConvertError

    target = make(tmp_path / "t.qcow2", 64 * MiB)
    with qcow2lib.open(str(target), "r+") as dev:
        with pytest.raises(ConvertError, match=r"error while reading at byte 33554432: "):
            convert(_FailingSource(64 * MiB, 33 * MiB), dev, parallel=8)
    assert_clean(target)


# --- rebase ---------------------------------------------------------------------------------


def test_rebase_safe_keeps_content(tmp_path, chain3):
    base, mid, top = chain3
    make(tmp_path / "other.qcow2", 3 * MiB, "write -P 0x11 0 512k", "write -P 0x77 1M 1M")
    expected = to_raw(top, tmp_path / "expected.raw")
    rebase(str(top), "other.qcow2", "qcow2")
    assert_clean(top)
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "other.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert to_raw(top, tmp_path / "after.raw") == expected
    # Rebase onto a layer of the old chain, then flatten.
    rebase(str(top), "base.raw", "raw")
    assert to_raw(top, tmp_path / "after2.raw") == expected
    rebase(str(top), "", None)
    assert_clean(top)
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert "backing-filename" not in info
    assert to_raw(top, tmp_path / "flat.raw") == expected


def test_rebase_onto_prefix_of_chain_skips_untouched(tmp_path, chain3):
    base, mid, top = chain3
    expected = to_raw(top, tmp_path / "expected.raw")
    rebase(str(top), "base.raw", "raw")
    assert to_raw(top, tmp_path / "after.raw") == expected
    # Ranges only the base provided stayed unallocated in the overlay.
    first = qemu_map(top)[0]
    assert first["start"] == 0 and first["depth"] == 1


def _naive_differing_runs(old: bytes, new: bytes, offset: int, unit: int):
    """The runs of allocation units (from multiples of `unit` in the guest, clipped to the
    buffers) holding a differing sector, as QEMU's sector-by-sector writes allocate them."""
    touched: list[int] = []  # the first guest offset of each unit with a differing sector
    for sector in range(0, len(old), 512):
        end = min(len(old), sector + 512)
        if old[sector:end] != new[sector:end]:
            start = (offset + sector) // unit * unit
            if not touched or touched[-1] != start:
                touched.append(start)
    runs: list[tuple[int, int]] = []
    for start in touched:
        piece = (max(start - offset, 0), min(start + unit - offset, len(old)))
        if runs and runs[-1][1] == piece[0]:
            runs[-1] = (runs[-1][0], piece[1])
        else:
            runs.append(piece)
    return runs


# Stretches of one byte value, zero most often, of lengths around a sector's and a
# subcluster's: units that differ in their last byte alone, or in one sector of many.
_PIECE = st.tuples(
    st.sampled_from([b"\0", b"\0", b"\x01", b"\x02"]),
    st.one_of(
        st.integers(1, 1100),
        st.sampled_from([1, 300, 511, 512, 513, 600, 1023, 1024, 2048, 32767, 32768, 40000]),
    ),
)


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(_PIECE, min_size=1, max_size=16),
    changes=st.lists(st.tuples(st.integers(0, 70000), st.integers(1, 1200)), max_size=4),
    zero_side=st.sampled_from(["old", "new", None]),
    unit=st.sampled_from([512, 2048, 65536]),
    offset=st.sampled_from([0, 512, 65536 * 3, 65536 + 1536]),
)
def test_rebase_finds_the_units_qemu_writes(pieces, changes, zero_side, unit, offset):
    """rebase's run finder against a sector-by-sector comparison widened to the units it
    touches: buffers of zero and non-zero stretches of any length (a partial last sector
    too), one side all zeros or both with data, ranges starting inside a unit."""
    from qcow2lib.ops.rebase import _Buffers, _differing_runs

    buffers = _Buffers()
    data = b"".join(pattern * count for pattern, count in pieces)[: len(buffers.old)]
    other = bytearray(data)
    for at, length in changes:
        other[at : at + length] = b"\x05" * len(other[at : at + length])
    if zero_side == "old":
        data = bytes(len(data))
    elif zero_side == "new":
        other = bytearray(len(data))
    n = len(data)
    buffers.old[:n], buffers.new[:n] = data, other
    buffers.old[n : n + 3] = b"\x09\x09\x09"  # (bytes past n are not looked at)
    found = _differing_runs(buffers.old, memoryview(buffers.new), offset, n, unit)
    assert found == _naive_differing_runs(bytes(data), bytes(other), offset, unit)


def _one_byte_at(size: int, *offsets: int) -> bytes:
    data = bytearray(size)
    for at in offsets:
        data[at] = 7
    return bytes(data)


@pytest.mark.parametrize(
    "old, new, offset, unit",
    [
        # a difference in the last byte of a unit alone, both sides with data
        (b"\x01" * 70000, b"\x01" * 65535 + b"\x02" + b"\x01" * 4464, 0, 65536),
        # the same byte when the range starts inside a unit: the next unit's first byte
        (b"\x01" * 70000, b"\x01" * 65535 + b"\x02" + b"\x01" * 4464, 512, 65536),
        # a range inside one unit: the run is the range
        (_one_byte_at(4096, 2047), bytes(4096), 1024, 65536),
        # a partial last sector, differing and not
        (_one_byte_at(1500, 1499), bytes(1500), 0, 512),
        (_one_byte_at(1500, 0), bytes(1500), 0, 512),
        # units on both sides of an equal one
        (_one_byte_at(6144, 0, 4096), bytes(6144), 0, 2048),
    ],
    ids=[
        "unit's last byte",
        "unit's last byte, range inside a unit",
        "range inside one unit",
        "non-zero partial sector",
        "zero partial sector",
        "two runs",
    ],
)
def test_rebase_differing_units_at_the_edges(old, new, offset, unit):
    from qcow2lib.ops.rebase import _Buffers, _differing_runs

    n = len(old)
    for first, second in ((old, new), (new, old)):
        buffers = _Buffers()
        buffers.old[:n], buffers.new[:n] = first, second
        found = _differing_runs(buffers.old, memoryview(buffers.new), offset, n, unit)
        assert found == _naive_differing_runs(first, second, offset, unit)


def test_rebase_unsafe_and_errors(tmp_path, chain3):
    _, _, top = chain3
    rebase(str(top), "renamed.qcow2", "qcow2", unsafe=True)
    info = json.loads(qemu_img("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "renamed.qcow2"
    rebase(str(top), "mid.qcow2", "qcow2", unsafe=True)
    assert_clean(top)
    with pytest.raises(qcow2lib.Qcow2Error) as exc:
        rebase(str(top), "base.raw", None)
    result = qemu_img("rebase", "-b", "base.raw", top, check=False)
    assert result.returncode == 1 and str(exc.value) in result.stderr
    with pytest.raises(qcow2lib.Qcow2Error) as exc:
        rebase(str(top), "missing.qcow2", "qcow2")
    result = qemu_img("rebase", "-b", "missing.qcow2", "-F", "qcow2", top, check=False)
    assert result.stderr.strip() == f"qemu-img: {exc.value}"


# --- commit ---------------------------------------------------------------------------------


def test_commit_into_backing_empties_top(tmp_path, chain3):
    base, mid, top = chain3
    expected = to_raw(top, tmp_path / "expected.raw")
    commit(str(top))
    assert_clean(top)
    assert_clean(mid)
    assert to_raw(mid, tmp_path / "mid.raw") == expected  # mid grew to the top's size
    assert to_raw(top, tmp_path / "top.raw") == expected
    assert all(e["depth"] > 0 or not e["present"] for e in qemu_map(top))


def test_commit_to_base_and_drop(tmp_path):
    base = make(tmp_path / "b.qcow2", 4 * MiB, "write -P 1 0 4M")
    make(tmp_path / "m.qcow2", 4 * MiB, "write -P 2 1M 1M", backing="b.qcow2", backing_fmt="qcow2")
    top = make(
        tmp_path / "t.qcow2",
        4 * MiB,
        "write -P 3 1536k 1M",
        "write -z 3M 64k",
        backing="m.qcow2",
        backing_fmt="qcow2",
    )
    expected = to_raw(top, tmp_path / "expected.raw")
    top_map = qemu_map(top)
    commit(str(top), str(base))  # -b implies -d: the top is kept
    assert_clean(base)
    assert to_raw(base, tmp_path / "base.raw") == expected
    assert qemu_map(top) != [] and [e for e in top_map if e["depth"] == 0] == [
        e for e in qemu_map(top) if e["depth"] == 0
    ]
    with pytest.raises(qcow2lib.Qcow2Error, match="Did not find 'nope'"):
        commit(str(top), "nope")
    with pytest.raises(qcow2lib.Qcow2Error, match="Image does not have a backing file"):
        commit(str(base))


# --- resize ---------------------------------------------------------------------------------


def _resize(path: Path, size: int, **kwargs) -> None:
    with qcow2lib.open(str(path), "r+") as image:
        resize(image, size, **kwargs)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_resize_grow_and_shrink(tmp_path, cluster_size):
    img = make(
        tmp_path / "r.qcow2",
        1 * MiB,
        "write -P 5 0 768k",
        "write -P 6 1000k 24k",
        options={"cluster_size": cluster_size},
    )
    data = to_raw(img, tmp_path / "orig.raw")
    _resize(img, 600 * MiB)  # needs a larger L1 table
    assert_clean(img)
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == 600 * MiB
    assert qemu_compare(img, write_raw(tmp_path / "grown.raw", [(0, data)], 600 * MiB)) == 0
    with pytest.raises(ShrinkRefusedError, match="Use the --shrink option"):
        _resize(img, 512 * KiB)
    _resize(img, 512 * KiB, shrink=True)
    assert_clean(img)
    assert to_raw(img, tmp_path / "shrunk.raw") == data[: 512 * KiB]
    for mode, size in (("falloc", 1 * MiB), ("full", 2 * MiB), ("metadata", 3 * MiB)):
        _resize(img, size, preallocation=mode)
        assert_clean(img)
    assert to_raw(img, tmp_path / "final.raw") == data[: 512 * KiB] + bytes(3 * MiB - 512 * KiB)


def test_resize_like_qemu(tmp_path):
    """Growing over a larger backing file zero-fills the new area, as qemu-img does."""
    make(tmp_path / "base.qcow2", 4 * MiB, "write -P 9 0 4M")
    ours = make(
        tmp_path / "ours.qcow2",
        1 * MiB,
        "write -P 1 0 64k",
        backing="base.qcow2",
        backing_fmt="qcow2",
    )
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    _resize(ours, 3 * MiB)
    qemu_img("resize", theirs, str(3 * MiB))
    assert_clean(ours)
    assert qemu_compare(ours, theirs) == 0
    raw = make(tmp_path / "r.raw", 1000, fmt="raw")
    _resize(raw, 1 * MiB, preallocation="full")
    assert raw.stat().st_size == MiB
    with pytest.raises(qcow2lib.InvalidArgumentError, match="multiple of 512"):
        _resize(ours, 4 * MiB + 1)
    with pytest.raises(qcow2lib.InvalidArgumentError, match="only be used for growing"):
        _resize(ours, 1 * MiB, preallocation="full")
    with pytest.raises(qcow2lib.InvalidArgumentError, match="must be positive"):
        _resize(ours, 0)


@pytest.mark.parametrize("mode", ["metadata", "falloc", "full"])
@pytest.mark.parametrize("extended_l2", [False, True], ids=["l2", "extended-l2"])
@pytest.mark.parametrize("old_size", [31 * 1024, 503 * 1024])
def test_resize_with_preallocation_over_a_backing_file(tmp_path, mode, extended_l2, old_size):
    """QEMU iotests 125 and 271: the guest still reads the backing file below the old size
    (also in the cluster holding the old end) and zeros above it, as after qemu-img's
    resize; falloc and full map the same clusters as qemu-img does."""
    base = make(tmp_path / "base.raw", 2 * MiB, "write -P 0xff 0 2M", fmt="raw")
    options = {"extended_l2": "on"} if extended_l2 else {}
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for path in (ours, theirs):
        qemu_create(path, old_size, options=options, backing=str(base), backing_fmt="raw")
    _resize(ours, 1013 * 1024, preallocation=mode)
    qemu_img("resize", "-q", f"--preallocation={mode}", theirs, "1013k")
    assert_clean(ours)
    assert qemu_compare(ours, theirs) == 0
    assert to_raw(ours, tmp_path / "content.raw") == b"\xff" * old_size + bytes(
        1013 * 1024 - old_size
    )
    if mode != "metadata":
        assert qemu_map(ours) == qemu_map(theirs)


@pytest.mark.parametrize("seed", [1, 2])
def test_resize_random_against_qemu(tmp_path, seed):
    """Random writes and resizes (with snapshots, every preallocation mode but metadata)
    applied to twin images: ours by qcow2lib, the twin by qemu-img resize."""
    import random

    rnd = random.Random(seed)
    for trial in range(3):
        cs = rnd.choice([512, 4096, 65536])
        compat = rnd.choice(["0.10", "1.1"])
        opts = {"cluster_size": cs, "compat": compat}
        size = rnd.randrange(1, 48) * 64 * KiB
        ours = make(tmp_path / f"o{trial}.qcow2", size, options=opts)
        twin = make(tmp_path / f"t{trial}.qcow2", size, options=opts)
        for step in range(5):
            off = rnd.randrange(0, size)
            length = min(rnd.randrange(1, 300000), size - off)
            for image in (ours, twin):
                qemu_io(image, f"write -P {step + 1} {off} {length}")
                if compat == "1.1" and step == 1:
                    qemu_img("snapshot", "-c", "s1", image)
            new = rnd.randrange(1, 4 * size // 512 + 2) * 512
            mode = "off" if new <= size else rnd.choice(["off", "falloc", "full"])
            _resize(ours, new, shrink=True, preallocation=mode)
            qemu_img("resize", "-q", "--shrink", f"--preallocation={mode}", twin, str(new))
            size = new
            assert_clean(ours)
            assert qemu_compare(ours, twin) == 0, (trial, step, opts, new, mode)


def test_header_rewrites_keep_backing_of_small_cluster_images(tmp_path):
    """QEMU writes no feature name table for clusters <= 4 KiB: field rewrites must keep
    the backing file name where QEMU put it."""
    make(tmp_path / "base.qcow2", 2 * MiB, "write -P 3 0 2M")
    img = make(
        tmp_path / "o.qcow2",
        1 * MiB,
        "write -P 4 64k 64k",
        backing="base.qcow2",
        backing_fmt="qcow2",
        options={"cluster_size": 4096},
    )
    expected = to_raw(img, tmp_path / "e.raw") + bytes(MiB)
    _resize(img, 2 * MiB)
    amend(str(img), refcount_bits=4)
    amend(str(img), lazy_refcounts=True)
    amend(str(img), lazy_refcounts=False)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["backing-filename"] == "base.qcow2"
    assert_clean(img)
    assert to_raw(img, tmp_path / "a.raw") == expected


# --- amend ----------------------------------------------------------------------------------


def _amend_image(tmp_path, name="a.qcow2", **options):
    make(tmp_path / "amb.qcow2", 4 * MiB, "write -P 0x61 0 4M")
    return make(
        tmp_path / name,
        4 * MiB,
        "write -P 1 0 1M",
        "write -z 1M 512k",
        "write -z 3M 64k",
        "write -P 3 3200k 64k",
        "write -c -P 4 2M 64k",
        backing="amb.qcow2",
        backing_fmt="qcow2",
        options=options or None,
    )


def _check_amended(img, expected, compat, refcount_bits):
    assert_clean(img)
    assert qemu_compare(img, expected, "qcow2", "raw") == 0
    data = json.loads(qemu_img("info", "--output=json", img).stdout)["format-specific"]["data"]
    assert data["compat"] == compat and data["refcount-bits"] == refcount_bits


def test_amend_compat_and_refcount_widths(tmp_path):
    img = _amend_image(tmp_path)
    expected = tmp_path / "expected.raw"
    to_raw(img, expected)
    for kwargs, compat, bits in (
        ({"compat": "0.10"}, "0.10", 16),
        ({"compat": "1.1"}, "1.1", 16),
        ({"refcount_bits": 1}, "1.1", 1),
        ({"refcount_bits": 64, "lazy_refcounts": True}, "1.1", 64),
        ({"refcount_bits": 4, "lazy_refcounts": False}, "1.1", 4),
        ({"compat": "0.10", "refcount_bits": 16}, "0.10", 16),
    ):
        amend(str(img), **kwargs)
        _check_amended(img, expected, compat, bits)


def test_amend_snapshots_and_lazy(tmp_path):
    img = make(tmp_path / "s.qcow2", 2 * MiB, "write -P 1 0 1M", options={"compat": "0.10"})
    qemu_img("snapshot", "-c", "snap1", img)
    qemu_io(img, "write -P 2 512k 64k")
    to_raw(img, tmp_path / "e.raw")
    amend(str(img), compat="1.1", lazy_refcounts=True)
    _check_amended(img, tmp_path / "e.raw", "1.1", 16)
    assert "snap1" in qemu_img("snapshot", "-l", img).stdout
    qemu_io(img, "write -z 0 64k")  # a zero cluster over data the snapshot still uses
    expected = to_raw(img, tmp_path / "e2.raw")
    amend(str(img), compat="0.10")
    _check_amended(img, tmp_path / "e2.raw", "0.10", 16)
    assert to_raw(img, tmp_path / "e3.raw") == expected
    # The snapshot's data is intact (QEMU 7.2's own downgrade would zero it here).
    snap = tmp_path / "snap.raw"
    qemu_img("convert", "-l", "snapshot.name=snap1", "-O", "raw", img, snap)
    assert snap.read_bytes()[:MiB] == b"\x01" * MiB


@pytest.mark.parametrize(
    "create_opts, kwargs",
    [
        ({"refcount_bits": 1}, {"compat": "0.10"}),
        ({}, {"compat": "foo"}),
        ({}, {"refcount_bits": 3}),
        ({}, {"compat": "0.10", "lazy_refcounts": True}),
        ({}, {"compat": "0.10", "refcount_bits": 8}),
        ({"extended_l2": "on"}, {"compat": "0.10"}),
        ({"compat": "0.10"}, {"lazy_refcounts": True}),
    ],
)
def test_amend_refusals_match_qemu(tmp_path, create_opts, kwargs):
    ours = make(tmp_path / "o.qcow2", 1 * MiB, "write -P 1 0 64k", options=create_opts or None)
    theirs = tmp_path / "t.qcow2"
    shutil.copy(ours, theirs)
    with pytest.raises(qcow2lib.Qcow2Error) as exc:
        amend(str(ours), **kwargs)
    opts = ",".join(f"{k}={'on' if v is True else v}" for k, v in kwargs.items())
    result = qemu_img("amend", "-o", opts, theirs, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"qemu-img: {exc.value}"
    assert_clean(ours)


def test_amend_zstd_downgrade(tmp_path):
    img = make(
        tmp_path / "z.qcow2", 1 * MiB, "write -P 1 0 64k", options={"compression_type": "zstd"}
    )
    expected = tmp_path / "z.raw"
    to_raw(img, expected)
    amend(str(img), compat="0.10")  # no compressed clusters: allowed, becomes zlib
    _check_amended(img, expected, "0.10", 16)


# --- compare --------------------------------------------------------------------------------


def test_compare_matches_qemu(tmp_path, chain3):
    base, mid, top = chain3
    flat = tmp_path / "flat.raw"
    to_raw(top, flat)
    changed = tmp_path / "changed.raw"
    shutil.copy(flat, changed)
    qemu_io(changed, "write -P 0x7f 1000001 1", fmt="raw")
    bigger = tmp_path / "bigger.raw"
    shutil.copy(flat, bigger)
    os.truncate(bigger, 9 * MiB)
    dirty_tail = tmp_path / "tail.raw"
    shutil.copy(bigger, dirty_tail)
    qemu_io(dirty_tail, "write -P 1 8800000 10", fmt="raw")
    plain = make(tmp_path / "plain.qcow2", 8 * MiB)
    qcow_copy = tmp_path / "copy.qcow2"
    qemu_img("convert", "-O", "qcow2", top, qcow_copy)
    pairs = [
        (top, flat),
        (top, changed),
        (flat, bigger),
        (bigger, top),
        (top, dirty_tail),
        (plain, top),
        (qcow_copy, top),
        (mid, base),
        (plain, make(tmp_path / "p2.qcow2", 8 * MiB)),
    ]
    for a, b in pairs:
        for strict in (False, True):
            args = ["compare"] + (["-s"] if strict else []) + [a, b]
            result = qemu_img(*args, check=False)
            with qcow2lib.open(str(a)) as da, qcow2lib.open(str(b)) as db:
                code, message = compare(da, db, strict=strict)
            assert (code, message) == (result.returncode, result.stdout.strip()), (a, b, strict)


def test_compare_reuses_its_buffers_without_stale_bytes(tmp_path):
    """compare reads into two buffers it keeps: a shorter read after a full one (the
    partial last sector of a raw file, read as zeros past its end; a mismatch found
    within a chunk) must not see the bytes the earlier read left there."""
    size = 2 * MiB + 1000  # (one full 2 MiB chunk, then a partial sector)
    raw = tmp_path / "ones.raw"
    raw.write_bytes(b"\x01" * size)
    same = tmp_path / "same.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, same)
    dirty_tail = tmp_path / "tail.qcow2"
    shutil.copy(same, dirty_tail)
    qemu_io(dirty_tail, "write -P 2 2098150 1")  # (past the raw file's end, in its sector)
    inside = tmp_path / "inside.qcow2"
    shutil.copy(same, inside)
    qemu_io(inside, "write -P 2 2097700 1")  # (second sector of the last chunk)
    for other in (same, dirty_tail, inside):
        for a, b in ((raw, other), (other, raw)):
            result = qemu_img("compare", a, b, check=False)
            with qcow2lib.open(str(a)) as da, qcow2lib.open(str(b)) as db:
                assert compare(da, db) == (result.returncode, result.stdout.strip()), (a, b)
    assert qemu_img("compare", raw, dirty_tail, check=False).returncode == 1
    assert qemu_img("compare", raw, inside, check=False).returncode == 1


# --- measure --------------------------------------------------------------------------------


def _qemu_measure(*args) -> dict:
    return json.loads(qemu_img("measure", "--output=json", *args).stdout)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cluster_size": "512"},
        {"cluster_size": "4k", "refcount_bits": "1"},
        {"cluster_size": "2M"},
        {"compat": "0.10"},
        {"preallocation": "full"},
        {"preallocation": "metadata", "refcount_bits": "64"},
        {"extended_l2": "on"},
        {"cluster_size": "128k", "extended_l2": "on", "preallocation": "falloc"},
    ],
)
def test_measure_size_matches_qemu(options):
    for size in (0, 1, 100 * MiB + 512, 3 * 1024 * MiB):
        opts = ["-o", ",".join(f"{k}={v}" for k, v in options.items())] if options else []
        expected = _qemu_measure("-O", "qcow2", "--size", str(size), *opts)
        assert measure(size, fmt="qcow2", options=options) == expected
    assert measure(12345, fmt="raw") == _qemu_measure("-O", "raw", "--size", "12345")


def test_measure_image_matches_qemu(tmp_path, chain3, sparse_raw):
    base, mid, top = chain3
    bitmap = make(tmp_path / "bm.qcow2", 64 * MiB, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", "-g", "64k", bitmap, "bitmap0")
    qemu_img("bitmap", "--add", "-g", "1M", bitmap, "a-longer-bitmap-name")
    v2 = make(tmp_path / "v2.qcow2", 8 * MiB, "write -P 1 0 3M", options={"compat": "0.10"})
    for image, fmt in (
        (top, None),
        (mid, None),
        (base, "raw"),
        (sparse_raw, "raw"),
        (bitmap, None),
        (v2, None),
    ):
        for options in (
            {},
            {"cluster_size": "4k"},
            {"cluster_size": "1M", "refcount_bits": "8"},
            {"backing_file": "x"},
            {"compat": "0.10"},
        ):
            opts = ["-o", ",".join(f"{k}={v}" for k, v in options.items())] if options else []
            fargs = ["-f", fmt] if fmt else []
            expected = _qemu_measure("-O", "qcow2", *fargs, *opts, image)
            with qcow2lib.open(str(image), fmt=fmt) as dev:
                assert measure(source=dev, fmt="qcow2", options=options) == expected, (
                    image,
                    options,
                )
        with qcow2lib.open(str(image), fmt=fmt) as dev:
            expected = _qemu_measure("-O", "raw", *(["-f", fmt] if fmt else []), image)
            assert measure(source=dev, fmt="raw") == expected


def test_measure_counts_each_touched_cluster_once(tmp_path):
    """The required size counts every target cluster some data extent touches, once:
    extents smaller than a target cluster and sharing one, extents that end or start
    inside a cluster the one before counted, zero clusters and discarded ones between
    them, data from a backing file, a partial last cluster, and the preallocated zeros
    (data that reads as zeros) of a metadata-preallocated image, each measured with
    target clusters smaller and larger than the source's."""
    base = make(tmp_path / "base.qcow2", 8 * MiB + 1536, "write -P 1 7M 1M", "write -P 2 8M 1k")
    writes = [f"write -P 3 {offset} 4k" for offset in range(0, 2 * MiB, 12 * KiB)]
    writes += [
        "write -P 4 2100k 70k",  # (ends inside a 64k cluster that the next one starts in)
        "write -P 5 2170k 3k",
        "write -z 2304k 128k",
        "write -P 6 2432k 8k",
        "discard 2436k 4k",
        "write -P 7 3M 1M",
        "write -z 3200k 64k",  # (zeros inside data)
        "write -P 9 5M 64k",
        "write -z 5M 64k",  # (zeros in clusters still allocated)
        "write -P 8 6100k 1k",
    ]
    top = make(
        tmp_path / "top.qcow2",
        8 * MiB + 1536,
        *writes,
        backing=base,
        backing_fmt="qcow2",
        options={"cluster_size": "4k"},
    )
    preallocated = make(
        tmp_path / "prealloc.qcow2",
        MiB,
        "write -P 9 512k 4k",
        "write -P 9 700k 1k",
        options={"cluster_size": "4k", "preallocation": "metadata"},
    )
    for options in ({}, {"cluster_size": "512"}, {"cluster_size": "4k"}, {"cluster_size": "1M"}):
        opts = ["-o", ",".join(f"{k}={v}" for k, v in options.items())] if options else []
        for image in (top, base, preallocated):
            expected = _qemu_measure("-O", "qcow2", *opts, image)
            with qcow2lib.open(str(image)) as dev:
                assert measure(source=dev, fmt="qcow2", options=options) == expected, (
                    image,
                    options,
                )


def test_measure_errors_match_qemu():
    for options in (
        {"cluster_size": "3k"},
        {"compat": "v3"},
        {"refcount_bits": "3"},
        {"compat": "0.10", "refcount_bits": "8"},
    ):
        opts = ",".join(f"{k}={v}" for k, v in options.items())
        result = qemu_img("measure", "-O", "qcow2", "--size", "1G", "-o", opts, check=False)
        with pytest.raises(qcow2lib.InvalidArgumentError) as exc:
            measure(1 << 30, options=options)
        assert result.stderr.strip() == f"qemu-img: {exc.value}"
    result = qemu_img(
        "measure", "-O", "qcow2", "--size", "100T", "-o", "cluster_size=512", check=False
    )
    with pytest.raises(qcow2lib.InvalidArgumentError) as exc:
        measure(100 << 40, options={"cluster_size": 512})
    assert result.stderr.strip() == f"qemu-img: {exc.value}"


# --- map ------------------------------------------------------------------------------------


def _check_map(images) -> None:
    for image, fmt in images:
        fargs = ["-f", fmt] if fmt else []
        result = qemu_img("map", "--output=json", *fargs, image)
        with qcow2lib.open(str(image), fmt=fmt) as dev:
            entries = map_entries(dev)
            assert entries == json.loads(result.stdout)
            assert map_json_text(entries) == result.stdout
            for start, length in ((MiB, MiB), (12345, 777), (100 * MiB, None)):
                args = ["-s", str(start)] + (["-l", str(length)] if length else [])
                expected = json.loads(qemu_img("map", "--output=json", *fargs, *args, image).stdout)
                assert map_entries(dev, start, length) == expected
        human = qemu_img("map", *fargs, image, check=False)
        with qcow2lib.open(str(image), fmt=fmt) as dev:
            text, error = map_human_text(dev)
        assert text == human.stdout
        assert (error is not None) == (human.returncode != 0)
        if error:
            assert human.stderr.strip() == f"qemu-img: {error}"


def test_map_entries_match_qemu(tmp_path, chain3, sparse_raw):
    base, mid, top = chain3
    zstd = make(
        tmp_path / "zs.qcow2",
        1 * MiB,
        "write -c -P 2 0 64k",
        "write -P 3 64k 64k",
        "write -z 128k 64k",
        "write -z -u 256k 64k",
        options={"compression_type": "zstd"},
    )
    _check_map([(top, None), (mid, None), (base, "raw"), (sparse_raw, "raw"), (zstd, None)])


def test_map_entries_extended_l2(tmp_path):
    ext = make(
        tmp_path / "ext.qcow2",
        4 * MiB,
        "write -P 1 0 100k",
        "write -z 1M 64k",
        options={"extended_l2": "on", "cluster_size": "64k"},
    )
    _check_map([(ext, None)])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_cache_unsafe_never_syncs(tmp_path, monkeypatch, fmt):
    """cache="unsafe" (qemu-img convert's default for its target) writes metadata back
    on flush() but never calls fdatasync; the default cache mode does."""
    path = str(tmp_path / "img")
    qcow2lib.create(path, 1 << 20, fmt=fmt)
    syncs = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real_fdatasync(fd)))
    for cache, expect_syncs in (("unsafe", False), ("writeback", True)):
        syncs.clear()
        with qcow2lib.open(path, "r+", fmt=fmt, cache=cache) as image:
            image.write(0, b"x" * 70000)
            image.flush()
        assert bool(syncs) == expect_syncs, cache
    with qcow2lib.open(path, fmt=fmt) as image:
        assert image.read(0, 70000) == b"x" * 70000
    with pytest.raises(qcow2lib.InvalidArgumentError, match="cache"):
        qcow2lib.open(path, fmt=fmt, cache="fast")
