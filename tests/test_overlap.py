"""The pre-write overlap check against QEMU's (`overlap-check=cached`, its default).

Each test builds an image with qemu-img and qemu-io, bends one pointer or refcount so a
write would land on metadata, and makes the same write through qcow2lib and through
qemu-io on identical copies. Both must refuse it with EIO and QEMU's message, mark the
image corrupt (qemu-img info says so), and leave the two files byte-identical: the
metadata the write aimed at is unharmed. qemu-img check and check -r all must then see
the two images alike.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import struct
import subprocess

import pytest
from qemutools import QEMU_IO, qemu_img, qemu_io

import qcow2lib
from qcow2lib.check import check_path, format_check_json, format_check_stderr
from qcow2lib.errors import Qcow2IOError, ReadOnlyError
from qcow2lib.overlap import (
    ACTIVE_L1,
    ACTIVE_L2,
    HEADER,
    REFCOUNT_BLOCK,
    SNAPSHOT_TABLE,
    OverlapMap,
)

COPIED = 1 << 63
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00


class Layout:
    """Offsets of an image's structures, read from its header, to aim pointers at."""

    def __init__(self, path):
        self.path = str(path)
        raw = self.read(0, 104)
        (
            _,
            _,
            _,
            _,
            cluster_bits,
            _,
            _,
            self.l1_size,
            self.l1_offset,
            self.reftable_offset,
            _,
            self.nb_snapshots,
            self.snapshots_offset,
        ) = struct.unpack(">IIQIIQIIQQIIQ", raw[:72])
        self.cluster_size = 1 << cluster_bits
        self.refcount_bits = 1 << struct.unpack(">I", raw[96:100])[0]
        self.entry_size = 16 if struct.unpack(">Q", raw[72:80])[0] & 16 else 8  # extended L2
        self.refblock_offset = self.r64(self.reftable_offset) & L1E_OFFSET_MASK

    def read(self, offset, length):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def r64(self, offset):
        return struct.unpack(">Q", self.read(offset, 8))[0]

    def w64(self, offset, value):
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">Q", value))

    def l2_offset(self, l1_index=0):
        return self.r64(self.l1_offset + 8 * l1_index) & L1E_OFFSET_MASK

    def set_l2_entry(self, index, value, l1_index=0, bitmap=None):
        self.w64(self.l2_offset(l1_index) + self.entry_size * index, value)
        if bitmap is not None:
            self.w64(self.l2_offset(l1_index) + self.entry_size * index + 8, bitmap)

    def zero_refcount(self, cluster):
        """Set a cluster's refcount to 0 (16-bit refcounts, the first refcount block)."""
        assert self.refcount_bits == 16
        with open(self.path, "r+b") as f:
            f.seek(self.refblock_offset + 2 * cluster)
            f.write(b"\0\0")

    def snapshot_l1_offset(self):
        """The first snapshot's L1 table offset (the first field of its table entry)."""
        return self.r64(self.snapshots_offset)


def base_image(tmp_path, size="1G", snapshot=False, options="cluster_size=64k"):
    """Guest clusters 0 and 512M (two L2 tables, 64 KiB clusters) written by qemu-io.
    With a snapshot, cluster 0 is written again after it, so the first L2 table belongs
    to the active state alone (as the table of a COPIED entry does)."""
    path = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", options, path, size)
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x12 512M 64k")
    if snapshot:
        qemu_img("snapshot", "-c", "snap1", path)
        qemu_io(path, "write -P 0x13 0 64k")
    return path


def qemu_info(path) -> dict:
    return json.loads(qemu_img("info", "--output=json", "-U", path).stdout)


def file_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def is_corrupt(path) -> bool:
    return qemu_info(path)["format-specific"]["data"]["corrupt"]


def write_both(path, offset, length, tmp_path):
    """The same write through qcow2lib (on `path`) and qemu-io (on a copy): returns our
    exception and qemu-io's stderr and the copy's path."""
    theirs = tmp_path / "qemu.qcow2"
    shutil.copy(path, theirs)
    with qcow2lib.open(str(path), "r+") as image, pytest.raises(Qcow2IOError) as caught:
        image.write(offset, b"\x5a" * length)
    qemu = subprocess.run(
        [QEMU_IO, "-c", f"write -P 0x5a {offset} {length}", str(theirs)],
        capture_output=True,
        text=True,
        check=False,
    )
    return caught.value, qemu, theirs


def assert_refused_like_qemu(path, offset, length, tmp_path, name, same_file=True):
    before = Layout(path)
    metadata = {
        off: before.read(off, before.cluster_size)
        for off in (
            0,
            before.l1_offset,
            before.reftable_offset,
            before.refblock_offset,
            before.l2_offset(0),
            before.l2_offset(1),
        )
    }
    error, qemu, theirs = write_both(path, offset, length, tmp_path)
    message = (
        f"qcow2: Marking image as corrupt: Preventing invalid write on metadata "
        f"(overlaps with {name}); further corruption events will be suppressed"
    )
    assert error.errno == errno.EIO
    assert error.strerror == message
    assert qemu.stderr.splitlines()[0] == message
    assert "write failed: Input/output error" in qemu.stdout + qemu.stderr
    assert is_corrupt(path) and is_corrupt(theirs)
    if same_file:
        assert file_bytes(path) == file_bytes(theirs)
    after = Layout(path)
    for off, content in metadata.items():
        if off == 0:  # the header gained the corrupt bit, nothing else
            content = (
                content[:72]
                + struct.pack(">Q", struct.unpack(">Q", content[72:80])[0] | 2)
                + content[80:]
            )
        assert after.read(off, before.cluster_size) == content, hex(off)
    return theirs


# --- the allocator hands out a cluster whose refcount is wrongly 0 ------------------------


@pytest.mark.timeout(60)
def test_allocator_refuses_active_l2_table_with_refcount_zero(tmp_path):
    path = base_image(tmp_path)
    layout = Layout(path)
    layout.zero_refcount(layout.l2_offset(0) // layout.cluster_size)
    assert_refused_like_qemu(path, 1 << 20, 65536, tmp_path, "active L2 table")


@pytest.mark.timeout(60)
def test_allocator_refuses_header_with_refcount_zero(tmp_path):
    path = base_image(tmp_path)
    Layout(path).zero_refcount(0)
    assert_refused_like_qemu(path, 1 << 20, 4096, tmp_path, "qcow2_header")


@pytest.mark.timeout(60)
def test_allocator_refuses_refcount_block_with_refcount_zero(tmp_path):
    """The first free cluster is the refcount block: a new L2 table (guest offset 1.5G
    has none) would go there. QEMU reports the same overlap, but only after its new L2
    table has overwritten the refcount block; here the block is unharmed (checked by
    assert_refused_like_qemu), so the two files differ."""
    path = base_image(tmp_path, size="2G")
    layout = Layout(path)
    layout.zero_refcount(layout.refblock_offset // layout.cluster_size)
    assert_refused_like_qemu(path, 1536 << 20, 4096, tmp_path, "refcount block", same_file=False)


# --- an L2 entry flagged COPIED points at metadata -----------------------------------------

TARGETS = {
    "refcount block": lambda layout: layout.refblock_offset,
    "active L1 table": lambda layout: layout.l1_offset,
    "refcount table": lambda layout: layout.reftable_offset,
    "active L2 table": lambda layout: layout.l2_offset(1),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("length", [4096, 65536 + 4096])
def test_copied_entry_pointing_at_metadata(tmp_path, name, length):
    """A small write (the in-place path) and one that also allocates the next cluster
    (the general path)."""
    path = base_image(tmp_path)
    layout = Layout(path)
    layout.set_l2_entry(0, COPIED | TARGETS[name](layout))
    assert_refused_like_qemu(path, 0, length, tmp_path, name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "start, name",
    [("refcount table", "refcount table"), ("refcount block", "active L1 table")],
)
def test_copied_run_pointing_at_metadata(tmp_path, start, name):
    """Two COPIED entries in one host run starting at metadata (the refcount table, then
    the refcount block; the refcount block, then the L1 table): the in-place path of a
    write over both clusters checks the run at once and names what QEMU names, the
    structure of its check order's first kind met."""
    path = base_image(tmp_path)
    layout = Layout(path)
    target = TARGETS[start](layout)
    layout.set_l2_entry(0, COPIED | target)
    layout.set_l2_entry(1, COPIED | (target + layout.cluster_size))
    assert_refused_like_qemu(path, 4096, 2 * 65536 - 8192, tmp_path, name)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "offset, length, bitmap",
    [
        (0, 4096, None),  # allocated subclusters: written in place
        (4096, 512, 1),  # subcluster 2 unallocated (only 0 is): allocated inside the cluster
    ],
)
def test_copied_extended_l2_entry_pointing_at_refcount_block(tmp_path, offset, length, bitmap):
    path = base_image(tmp_path, options="extended_l2=on")
    layout = Layout(path)
    layout.set_l2_entry(0, COPIED | layout.refblock_offset, bitmap=bitmap)
    assert_refused_like_qemu(path, offset, length, tmp_path, "refcount block")


@pytest.mark.timeout(60)
def test_version_2_image_refuses_without_a_corrupt_bit(tmp_path):
    """compat=0.10 has no incompatible features to mark: the write is refused with the
    same message and nothing else is written, as in QEMU; this session writes no more."""
    path = base_image(tmp_path, options="compat=0.10")
    layout = Layout(path)
    layout.set_l2_entry(0, COPIED | layout.refblock_offset)
    theirs = tmp_path / "qemu.qcow2"
    shutil.copy(path, theirs)
    with qcow2lib.open(str(path), "r+") as image:
        with pytest.raises(Qcow2IOError) as caught:
            image.write(0, b"\x5a" * 4096)
        with pytest.raises(ReadOnlyError):
            image.write(512 << 20, b"\x5a" * 4096)
    qemu = subprocess.run(
        [QEMU_IO, "-c", "write -P 0x5a 0 4k", str(theirs)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert caught.value.errno == errno.EIO
    assert qemu.stderr.splitlines()[0] == caught.value.strerror
    assert "overlaps with refcount block" in caught.value.strerror
    assert file_bytes(path) == file_bytes(theirs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["snapshot table", "inactive L1 table"])
def test_copied_entry_pointing_at_snapshot_metadata(tmp_path, name):
    path = base_image(tmp_path, snapshot=True)
    layout = Layout(path)
    target = layout.snapshots_offset if name == "snapshot table" else layout.snapshot_l1_offset()
    assert target % layout.cluster_size == 0
    layout.set_l2_entry(0, COPIED | target)
    assert_refused_like_qemu(path, 4096, 512, tmp_path, name)


DAMAGES = {  # name: (bend the image, guest offset of the write, what it would overwrite)
    "copied_on_refblock": (
        lambda layout: layout.set_l2_entry(0, COPIED | layout.refblock_offset),
        0,
        "refcount block",
    ),
    "copied_on_l1": (
        lambda layout: layout.set_l2_entry(0, COPIED | layout.l1_offset),
        0,
        "active L1 table",
    ),
    "l2_refcount_zero": (
        lambda layout: layout.zero_refcount(layout.l2_offset(0) >> 16),
        1 << 20,
        "active L2 table",
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_refused_image_reads_and_checks_like_qemu(tmp_path, damage):
    """After the refusal: the image opens read-only (not read-write), and qemu-img check
    and check -r all treat both copies alike (the repair is not blocked)."""
    path = base_image(tmp_path)
    bend, offset, name = DAMAGES[damage]
    bend(Layout(path))
    theirs = assert_refused_like_qemu(path, offset, 4096, tmp_path, name)
    with qcow2lib.open(str(path), "r") as image:
        assert image.read(512 << 20, 4) == b"\x12" * 4
        with pytest.raises(ReadOnlyError):
            image.write(512 << 20, b"x")
    with pytest.raises(qcow2lib.Qcow2Error, match="corrupt"):
        qcow2lib.open(str(path), "r+")
    for repair in (None, "all"):
        ours = check_path(str(path), repair)
        result = qemu_img(
            "check", "--output=json", *(["-r", repair] if repair else []), theirs, check=False
        )
        assert ours.exit_code == result.returncode
        data = json.loads(format_check_json(ours))
        data["filename"] = str(theirs)
        assert data == json.loads(result.stdout)
        assert format_check_stderr(ours).replace(str(path), str(theirs)) == result.stderr
        assert file_bytes(path) == file_bytes(theirs)
    assert not is_corrupt(path)
    with qcow2lib.open(str(path), "r+") as image:  # repaired: writable again
        image.write(512 << 20, b"\x77" * 4096)
    assert qemu_img("check", path, check=False).returncode == 0


# --- metadata written back onto other metadata -----------------------------------------------


@pytest.mark.timeout(60)
def test_refcount_block_written_back_over_active_l2_table(tmp_path):
    """An L1 entry points at the refcount block. With 64-bit refcounts the block's
    entries (1 each) read as valid zero-flagged L2 entries, so a write under that L1 entry
    allocates a cluster: its refcount increment makes the block dirty, and writing it
    back (checked against everything but refcount blocks) would overwrite an active L2
    table. The data reached its new cluster; the write-back is refused, as in QEMU."""
    path = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=64", path, "1G")
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x12 512M 64k")
    layout = Layout(path)
    layout.w64(layout.l1_offset + 8, COPIED | layout.refblock_offset)
    block = layout.read(layout.refblock_offset, layout.cluster_size)
    theirs = tmp_path / "qemu.qcow2"
    shutil.copy(path, theirs)
    image = qcow2lib.open(str(path), "r+")
    image.write(513 << 20, b"\x5a" * 4096)
    with pytest.raises(Qcow2IOError) as caught:
        image.flush()
    with pytest.raises(Qcow2IOError):  # what flush could not write back, close cannot either
        image.close()
    qemu = subprocess.run(
        [QEMU_IO, "-c", "write -P 0x5a 513M 4k", str(theirs)],
        capture_output=True,
        text=True,
        check=False,
    )
    message = (
        "qcow2: Marking image as corrupt: Preventing invalid write on metadata "
        "(overlaps with active L2 table); further corruption events will be suppressed"
    )
    assert caught.value.errno == errno.EIO and caught.value.strerror == message
    assert qemu.stderr.splitlines()[0] == message
    assert is_corrupt(path) and is_corrupt(theirs)
    assert file_bytes(path) == file_bytes(theirs)
    assert Layout(path).read(layout.refblock_offset, layout.cluster_size) == block


def bitmap_directory_offset(layout: Layout) -> int:
    """Where the bitmap directory lies, from the bitmaps header extension."""
    header = layout.read(0, layout.cluster_size)
    pos = struct.unpack(">I", header[100:104])[0]
    while True:
        kind, length = struct.unpack(">II", header[pos : pos + 8])
        assert kind, "no bitmaps extension"
        if kind == 0x23852875:
            return struct.unpack(">Q", header[pos + 24 : pos + 32])[0]
        pos += 8 + (length + 7 & ~7)


def bitmap_table_offset(layout: Layout) -> int:
    """The first bitmap's table offset, the first field of its directory entry."""
    return layout.r64(bitmap_directory_offset(layout))


@pytest.mark.timeout(60)
def test_bitmap_table_entry_pointing_at_l1_table(tmp_path):
    """The bitmap's only data cluster is bent to the L1 table. A write marks the bitmap;
    storing it at the flush would overwrite the L1 table, and is refused.

    QEMU differs here: it stores bitmaps into new clusters and frees the old ones, so it
    frees the L1 table's cluster and loses the whole mapping (qemu-img check then finds
    cluster 3 referenced with refcount 0); the L1 table is kept here."""
    path = tmp_path / "bitmap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_img("bitmap", "--add", path, "b0")
    qemu_io(path, "write -P 0x11 0 64k")
    layout = Layout(path)
    table = bitmap_table_offset(layout)
    assert layout.r64(table) & L1E_OFFSET_MASK  # the bitmap has a data cluster
    layout.w64(table, layout.l1_offset)
    l1_table = layout.read(layout.l1_offset, layout.cluster_size)
    image = qcow2lib.open(str(path), "r+")
    image.write(1 << 20, b"\x5a" * 4096)
    with pytest.raises(Qcow2IOError) as caught:
        image.flush()
    with pytest.raises(Qcow2IOError):  # what flush could not write back, close cannot either
        image.close()
    assert caught.value.errno == errno.EIO
    assert caught.value.strerror == (
        "qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps "
        "with active L1 table); further corruption events will be suppressed"
    )
    assert is_corrupt(path)
    assert layout.read(layout.l1_offset, layout.cluster_size) == l1_table
    with qcow2lib.open(str(path), "r") as image:
        assert image.read(0, 65536) == b"\x11" * 65536
        assert image.read(1 << 20, 4096) == b"\x5a" * 4096


@pytest.mark.timeout(60)
@pytest.mark.parametrize("structure", ["bitmap directory", "bitmap table"])
def test_allocator_refuses_bitmap_metadata_with_refcount_zero(tmp_path, structure):
    """A bitmap directory or bitmap table whose refcount is wrongly 0: guest writes
    allocate clusters until the allocator reaches it, and that write is refused (EIO,
    QEMU's words, the corrupt bit) rather than given the cluster; the structure is
    unharmed and what was written before reads back. (QEMU checks the directory, at its
    own later point, and not the tables, which guest data may then overwrite.)"""
    path = tmp_path / "bitmaps.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_img("bitmap", "--add", path, "b0")
    qemu_io(path, "write -P 0x11 0 64k")
    qemu_img("bitmap", "--add", path, "b1")  # b0's table is now stored
    layout = Layout(path)
    if structure == "bitmap directory":
        target = bitmap_directory_offset(layout)
    else:
        target = bitmap_table_offset(layout)
    content = layout.read(target, layout.cluster_size)
    layout.zero_refcount(target // layout.cluster_size)
    image = qcow2lib.open(str(path), "r+")
    written = []
    with pytest.raises(Qcow2IOError) as caught:
        for index in range(1, 64):
            image.write(index << 20, bytes([index]) * 4096)
            written.append(index)
    with pytest.raises(Qcow2IOError):
        image.close()
    assert caught.value.errno == errno.EIO
    assert caught.value.strerror == (
        f"qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps "
        f"with {structure}); further corruption events will be suppressed"
    )
    assert is_corrupt(path)
    if structure == "bitmap table":
        assert layout.read(target, layout.cluster_size) == content
    else:  # only the in-use flags (a read-write open sets them) changed
        bitmaps = qemu_info(path)["format-specific"]["data"]["bitmaps"]
        assert [(b["name"], b["flags"]) for b in bitmaps] == [
            ("b0", ["in-use", "auto"]),
            ("b1", ["in-use", "auto"]),
        ]
        after = bytearray(layout.read(target, layout.cluster_size))
        for entry in (0, 24 + -(-len("b0") // 8) * 8):  # each entry's flags word
            after[entry + 12 : entry + 16] = content[entry + 12 : entry + 16]
        assert after == content
    with qcow2lib.open(str(path), "r") as image:
        assert image.read(0, 65536) == b"\x11" * 65536
        for index in written:
            assert image.read(index << 20, 4096) == bytes([index]) * 4096, index


# --- the map kept up to date incrementally --------------------------------------------------


def map_state(overlaps):
    return dict(overlaps._clusters), dict(overlaps._counts), sorted(overlaps._wide)


def assert_map_current(image):
    """The map the image keeps (when it is the one in use) equals one built afresh."""
    assert image._overlaps_for is image.map.l1
    kept = map_state(image.overlaps)
    image._build_overlaps()
    assert map_state(image.overlaps) == kept


@pytest.mark.timeout(120)
def test_map_follows_allocations_snapshots_and_releases(tmp_path):
    """512-byte clusters: every 32 KiB of guest disk has its own L2 table and every
    128 KiB of file its own refcount block, and the refcount table (64 entries) must move
    once the file passes 8 MiB. The map must follow, without a rebuild, the L2 tables and
    refcount blocks allocated, the table's move, L2 tables copied away from a snapshot,
    compressed writes and L2 tables released."""
    from qcow2lib.ops.resize import resize
    from qcow2lib.snapshots import create_snapshot, delete_snapshot

    path = tmp_path / "small.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "64M")
    rng = random.Random(7)
    with qcow2lib.open(str(path), "r+") as image:
        image.write(0, b"\1" * 512)
        table_offset = image.refcounts.table_offset
        for _ in range(300):
            image.write(rng.randrange(0, 64 << 20, 512), b"\2" * 32768)
            assert_map_current(image)
        image.flush()
        assert image.refcounts.table_offset != table_offset  # the table moved
        assert_map_current(image)
        create_snapshot(image, "s1")
        for _ in range(50):
            image.write(rng.randrange(0, 64 << 20, 512), b"\3" * 4096)
            image.write_compressed(rng.randrange(0, 64 << 20, 512), b"\4" * 512)
            assert_map_current(image)
        image.resize_drop_clusters(0, 4096)  # the first 2 MiB: 64 whole L2 tables
        assert_map_current(image)
        image.flush()
        delete_snapshot(image, "s1")
        image.write(5 << 20, b"\5" * 65536)
        assert_map_current(image)
        resize(image, 256 << 20)  # a larger L1 table
        image.write(200 << 20, b"\6" * 65536)
        assert_map_current(image)
    assert qemu_img("check", path, check=False).returncode == 0


def test_map_kinds_counts_and_qemu_order():
    """Unit behaviour: whole clusters, a structure recorded twice needs two removals, wide
    structures are intervals, and a range over several kinds is named in QEMU's order
    (header, active L1, refcount table, snapshot table, inactive L1, active L2, ...)."""
    overlaps = OverlapMap(16)
    overlaps.add(HEADER, 0, 65536)
    overlaps.add(ACTIVE_L2, 0x40000, 65536)
    overlaps.add(ACTIVE_L2, 0x40000, 65536)  # two L1 entries on one table
    overlaps.add(REFCOUNT_BLOCK, 0x50000, 65536)
    overlaps.add(SNAPSHOT_TABLE, 0x100000, 20 * 65536)  # wide: an interval
    assert overlaps.find(0xFFFF, 1) == HEADER
    assert overlaps.find(0x10000, 0x30000) == 0
    assert overlaps.find(0x4FFFF, 2) == ACTIVE_L2  # touches both: active L2 comes first
    assert overlaps.find(0x4FFFF, 2, ignore=ACTIVE_L2) == REFCOUNT_BLOCK
    assert overlaps.find(0x3FFFF, 0x20000) == ACTIVE_L2
    assert overlaps.find(0x100000 + 19 * 65536 + 100, 1) == SNAPSHOT_TABLE
    assert overlaps.find(0x100000 + 20 * 65536, 65536) == 0
    assert overlaps.find(0x40000, 0x200000) == SNAPSHOT_TABLE  # before active L2
    overlaps.remove(ACTIVE_L2, 0x40000, 65536)
    assert overlaps.find(0x40000, 1) == ACTIVE_L2
    overlaps.remove(ACTIVE_L2, 0x40000, 65536)
    assert overlaps.find(0x40000, 1) == 0
    overlaps.add(ACTIVE_L1, 0x40000, 8)
    overlaps.remove(SNAPSHOT_TABLE, 0x100000, 20 * 65536)
    assert overlaps.find(0, 1 << 30) == HEADER
    assert overlaps.find(65536, 1 << 30) == ACTIVE_L1
    assert overlaps.find(0x100000, 1 << 30) == 0
    assert overlaps.find(0x40000, 0) == 0
    assert overlaps.find(100, 0) == 0  # an empty range touches nothing
