"""Many threads doing small random reads and writes on one image, checked against a model
and then by the real QEMU; the page-cache read path of a lone thread
(HostFile.readinto_cached) falling back to ordinary reads, and the reads of threads that
hold no lock while they read.

In the threaded test each 4 KiB block is owned by one thread, which alone writes it, so the
model of every block is exact however the threads interleave. Blocks of different owners
share clusters (and subclusters), so allocations of one cluster race between threads.
Reads of foreign blocks are checked too: every 8-byte word is the block's original content
or a tag naming that very block (a read served from another block's cluster would show).
"""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import hostfile
from qcow2lib.errors import Qcow2IOError
from qcow2lib.hostfile import HostFile
from qcow2lib.mapping import DATA

from qemutools import assert_clean, qemu_compare, qemu_create, qemu_io

KiB = 1024
MiB = 1024 * KiB
BLOCK = 4 * KiB
THREADS = 8
TAG_MAGIC = 0x5EED


def tag_bytes(block: int, version: int, length: int) -> bytes:
    """Data for a write inside `block`: 8-byte words naming the block and the write."""
    word = struct.pack("<IHH", block, TAG_MAGIC, version & 0xFFFF)
    return word * (length // 8)


def words_belong(got: bytes, original: bytes, block: int) -> bool:
    """Whether each 8-byte word of a foreign block read is original or tagged with `block`."""
    for pos in range(0, len(got), 8):
        word = got[pos : pos + 8]
        if word == original[pos : pos + 8]:
            continue
        number, magic, _ = struct.unpack("<IHH", word)
        if number != block or magic != TAG_MAGIC:
            return False
    return True


def build_image(tmp_path: Path, size: int, options: dict, backing: bool) -> tuple[Path, bytes]:
    """A fresh image (with a backing file holding data in its first half if asked) and
    the guest bytes it starts with."""
    path = tmp_path / "img.qcow2"
    original = bytearray(size)
    if backing:
        base = tmp_path / "base.qcow2"
        qemu_create(base, size, options={"cluster_size": 65536})
        rng = random.Random(7)
        raw = tmp_path / "base.raw"
        content = rng.randbytes(size // 2)
        raw.write_bytes(content)
        qemu_io(base, f"write -s {raw} 0 {len(content)}")
        original[: len(content)] = content
        qemu_create(path, size, options=options, backing=str(base), backing_fmt="qcow2")
    else:
        qemu_create(path, size, options=options)
    return path, bytes(original)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "options, backing",
    [
        ({"cluster_size": 16384}, False),
        ({"cluster_size": 16384}, True),
        ({"cluster_size": 65536, "extended_l2": "on"}, True),
        ({"cluster_size": 65536, "extended_l2": "on"}, False),
    ],
    ids=["16k", "16k-backing", "extl2-backing", "extl2"],
)
def test_threads_read_and_write_one_image(tmp_path, options, backing):
    size = 40 * MiB  # more than one L2 table's span with 16 KiB clusters (32 MiB)
    path, original = build_image(tmp_path, size, options, backing)
    blocks = size // BLOCK
    model = bytearray(original)
    lock = threading.Lock()  # guards the model's bytes, not the image
    errors: list[str] = []
    image = qcow2lib.open(str(path), "r+")
    start = threading.Barrier(THREADS + 1)

    def check_read(offset: int, got: bytes, owner: int, who: str) -> bool:
        for block in range(offset // BLOCK, (offset + len(got) - 1) // BLOCK + 1):
            lo = max(offset, block * BLOCK)
            hi = min(offset + len(got), (block + 1) * BLOCK)
            piece = got[lo - offset : hi - offset]
            if block % THREADS == owner:
                with lock:
                    expected = bytes(model[lo:hi])
                if piece != expected:
                    errors.append(f"{who}: own block {block} reads wrong ({lo}..{hi})")
                    return False
            elif lo % 8 == 0 and not words_belong(piece, original[lo:hi], block):
                errors.append(f"{who}: foreign block {block} holds another block's data")
                return False
        return True

    def worker(owner: int) -> None:
        rng = random.Random(1000 + owner)
        mine = list(range(owner, blocks, THREADS))
        buf = bytearray(64 * KiB)
        who = f"thread {owner}"
        try:
            start.wait()
            for version in range(350):
                action = rng.random()
                if action < 0.45:  # a write inside one of my blocks
                    block = rng.choice(mine)
                    inside = rng.randrange(0, BLOCK, 512)
                    length = rng.choice([BLOCK - inside, 512, 8 * rng.randint(1, 64)])
                    length = min(length, BLOCK - inside)
                    offset = block * BLOCK + inside
                    data = tag_bytes(block, version, length)
                    image.write(offset, data)
                    with lock:
                        model[offset : offset + length] = data
                elif action < 0.8:  # a 4 KiB read (the fast path), own or foreign
                    offset = rng.randrange(blocks) * BLOCK
                    view = memoryview(buf)[:BLOCK]
                    image.readinto(offset, view)
                    if not check_read(offset, bytes(view), owner, who):
                        return
                elif action < 0.95:  # a bigger or unaligned read (the general path)
                    offset = rng.randrange(0, size - 64 * KiB, 8)
                    length = rng.choice([512, 24 * KiB, 64 * KiB])
                    if not check_read(offset, image.read(offset, length), owner, who):
                        return
                else:
                    image.flush()
        except Exception as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(f"{who}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        start.wait()
        for thread in threads:
            thread.join(timeout=200)
        assert not any(thread.is_alive() for thread in threads), "a thread hung"
        assert not errors, errors[:5]
        assert image._io_active == 0 and not image._inflight
        for offset in range(0, size, MiB):
            assert image.read(offset, MiB) == bytes(model[offset : offset + MiB]), offset
    finally:
        image.close()
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert qemu_compare(str(path), str(raw), fmt_a="qcow2", fmt_b="raw") == 0
    assert_clean(path)


@pytest.fixture
def data_image(tmp_path) -> tuple[Path, bytes]:
    """An image with 2 MiB of data written by QEMU, and those bytes."""
    path = tmp_path / "data.qcow2"
    qemu_create(path, 4 * MiB)
    content = random.Random(3).randbytes(2 * MiB)
    raw = tmp_path / "data.raw"
    raw.write_bytes(content)
    qemu_io(path, f"write -s {raw} 0 {len(content)}")
    return path, content


def run_threads(target, count: int, timeout: float) -> list[threading.Thread]:
    """target(0) .. target(count - 1), each in a thread of its own, started together and
    joined (each for at most `timeout` seconds); the threads, to check none hung."""
    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    return threads


def read_all_small(image, content: bytes, threads: int = 4) -> None:
    """4 KiB reads of every block of `content` from several threads, each checked."""
    errors: list[str] = []

    def run(first: int) -> None:
        buf = bytearray(BLOCK)
        for offset in range(first * BLOCK, len(content), threads * BLOCK):
            image.readinto(offset, buf)
            if buf != content[offset : offset + BLOCK]:
                errors.append(f"wrong data at {offset}")

    run_threads(run, threads, timeout=60)
    assert not errors, errors[:3]


def read_all_alone(image, content: bytes, monkeypatch) -> None:
    """4 KiB reads of every block of `content` from this thread as if no other ran (the
    page-cache path of a writable image: a test runner may have threads of its own), each
    checked."""
    monkeypatch.setattr(hostfile, "_other_threads", lambda: 0)
    buf = bytearray(BLOCK)
    for offset in range(0, len(content), BLOCK):
        image.readinto(offset, buf)
        assert buf == content[offset : offset + BLOCK], offset


def test_uncached_reads_fall_back(data_image, monkeypatch):
    """Every non-blocking read refused (EAGAIN, as for pages not in the cache): the reads
    go the ordinary way, outside the lock and counted in flight, and return the data."""
    path, content = data_image
    real_preadv = os.preadv
    calls = {"nowait": 0, "blocking": 0}

    def refusing_preadv(fd, buffers, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            calls["nowait"] += 1
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        calls["blocking"] += 1
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(hostfile.os, "preadv", refusing_preadv)
    with qcow2lib.open(str(path), "r+") as image:  # (read-only images read another way)
        read_all_alone(image, content, monkeypatch)
        assert image.file.nowait_reads  # EAGAIN is no reason to stop asking
        assert image._io_active == 0
    blocks = len(content) // BLOCK
    assert calls["nowait"] == blocks and calls["blocking"] >= blocks


def test_unsupported_nowait_turns_off(data_image, monkeypatch):
    """A file that refuses the flag (EOPNOTSUPP) is not asked again."""
    path, content = data_image
    real_preadv = os.preadv
    refused = []

    def unsupported_preadv(fd, buffers, offset, flags=0):
        if flags:
            refused.append(offset)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(hostfile.os, "preadv", unsupported_preadv)
    with qcow2lib.open(str(path), "r+") as image:
        read_all_alone(image, content, monkeypatch)
        assert not image.file.nowait_reads
    assert len(refused) == 1


def refuse_held_reads(monkeypatch, refused: list, errno_value: int = errno.EAGAIN) -> None:
    """Every read that keeps the GIL (threads running) answers -errno_value, as for pages
    not in the cache; the offsets asked, and whether the image lock was held, go in
    `refused`."""
    monkeypatch.setattr(hostfile, "_held_read_call", [lambda fd, buf, offset: -errno_value])
    real = HostFile.readinto_cached

    def recording(self, buf, offset):
        refused.append(offset)
        return real(self, buf, offset)

    monkeypatch.setattr(HostFile, "readinto_cached", recording)


def test_read_only_image_reads_a_miss_outside_the_lock(data_image, monkeypatch):
    """A read-only image looks a small read up under the lock; what the page cache cannot
    give is read after letting go (nothing can free its cluster), with no in-flight count;
    the data is right."""
    path, content = data_image
    real_preadv = os.preadv
    held: list[bool] = []
    asked: list[int] = []
    image = qcow2lib.open(str(path))

    def watching_preadv(fd, buffers, offset, flags=0):
        if fd == image.file.fd:
            held.append(image._lock._is_owned())
            assert image._io_active == 0 and not flags
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(hostfile.os, "preadv", watching_preadv)
    refuse_held_reads(monkeypatch, asked)
    with image:
        read_all_small(image, content)
    blocks = len(content) // BLOCK
    assert len(held) >= blocks and not any(held) and len(asked) == blocks


def test_threaded_cached_reads_keep_the_gil_and_the_lock(data_image, monkeypatch):
    """With other threads running, a small read of cached data is one read that keeps the
    GIL (no os.preadv, which lets it go), made under the image lock; the data is right."""
    path, content = data_image
    real_held = hostfile._held_read()
    assert real_held is not None  # (glibc has preadv2)
    locked: list[bool] = []
    images: list = []

    def watching_held(fd, buf, offset):
        locked.append(images[0]._lock._is_owned())
        return real_held(fd, buf, offset)

    def no_preadv(fd, buffers, offset, flags=0):
        raise AssertionError("read that lets the GIL go")

    with qcow2lib.open(str(path), "r+") as image:
        images.append(image)
        image.read(0, len(content))  # (brings the data into the page cache)
        monkeypatch.setattr(hostfile, "_held_read_call", [watching_held])
        monkeypatch.setattr(hostfile.os, "preadv", no_preadv)
        read_all_small(image, content)
        assert image._io_active == 0
    assert len(locked) == len(content) // BLOCK and all(locked)


def test_threaded_unsupported_nowait_turns_off(data_image, monkeypatch):
    """A file that refuses the flag to a read keeping the GIL (EOPNOTSUPP) is not asked
    again; its reads go the ordinary way and return the data."""
    path, content = data_image
    asked: list[int] = []
    refuse_held_reads(monkeypatch, asked, errno.EOPNOTSUPP)
    with qcow2lib.open(str(path), "r+") as image:
        read_all_small(image, content)
        assert not image.file.nowait_reads
        assert image._io_active == 0
    assert len(asked) == len(content) // BLOCK  # (each asked; the flag is off after one)


def test_page_cache_miss_is_reported(data_image):
    """On this host: pages dropped from the cache are not read without waiting (False),
    the ordinary read brings them back, and then the cached read serves them."""
    path, content = data_image
    file = HostFile(str(path))
    try:
        host = 2 * MiB  # the qcow2 data of a fully written image lies well inside the file
        size = file.size()
        assert size > host + BLOCK
        os.fsync(file.fd)  # (the kernel drops clean pages only: written back first)
        os.posix_fadvise(file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = memoryview(bytearray(BLOCK))
        assert not file.readinto_cached(buf, host)
        file.readinto(buf, host)
        expected = bytes(buf)
        buf[:] = bytes(BLOCK)
        assert file.readinto_cached(buf, host) and bytes(buf) == expected
        # the same through the read that keeps the GIL (what threads use)
        held_read = hostfile._held_read()
        os.posix_fadvise(file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert held_read(file.fd, buf, host) == -errno.EAGAIN
        file.readinto(buf, host)
        buf[:] = bytes(BLOCK)
        assert held_read(file.fd, buf, host) == BLOCK and bytes(buf) == expected
        file.readinto(memoryview(bytearray(100)), size - 100)
        assert held_read(file.fd, buf, size - 100) == 100  # (a short read at the end)
        for offset in (-1, 1 << 63, 1 << 64):  # (refused, not wrapped round to 0)
            assert held_read(file.fd, buf, offset) == -errno.EOVERFLOW
    finally:
        file.close()


def test_a_threaded_read_does_not_hold_the_lock(data_image, monkeypatch):
    """With other threads running, a small read the page cache cannot give is looked up
    under the image lock and read after dropping it, counted in flight: another thread
    writes (allocating) and reads while it is inside its read."""
    path, content = data_image
    real_preadv = os.preadv
    entered, release = threading.Event(), threading.Event()
    nowait: list[int] = []
    refuse_held_reads(monkeypatch, [])

    def slow_preadv(fd, buffers, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            nowait.append(offset)
        if threading.current_thread() is reader and not release.is_set():
            entered.set()
            assert release.wait(30)
        return real_preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(hostfile.os, "preadv", slow_preadv)
    with qcow2lib.open(str(path), "r+") as image:
        got = bytearray(BLOCK)
        reader = threading.Thread(target=image.readinto, args=(0, got))
        reader.start()
        assert entered.wait(30)
        image.write(3 * MiB, b"\x5a" * BLOCK)  # allocates a cluster: needs the lock
        assert image.read(3 * MiB, BLOCK) == b"\x5a" * BLOCK
        assert image.read(BLOCK, BLOCK) == content[BLOCK : 2 * BLOCK]
        assert image._io_active == 1  # the waiting read is counted in flight
        release.set()
        reader.join(30)
        assert not reader.is_alive()
        assert got == content[:BLOCK]
        assert image._io_active == 0
    assert not nowait
    assert_clean(path)


def host_of(image, guest_offset: int) -> int:
    """Where the image keeps a guest byte (which must be allocated)."""
    [segment] = image.map.lookup(guest_offset, 1)
    assert segment.kind == DATA and segment.host_offset is not None
    return segment.host_offset


def test_fresh_cluster_gets_only_its_data(tmp_path, monkeypatch):
    """A 4 KiB write into a new cluster past the end of the file writes those 4 KiB and no
    zero fill: the cluster is allocated in the file (fallocate, as QEMU zeroes it, so the
    file ends where QEMU's does) and reads as zeros around the data, for us and for QEMU."""
    written: list[tuple[int, int]] = []
    allocated: list[tuple[int, int]] = []
    real_pwritev, real_allocate = HostFile.pwritev, HostFile.allocate

    def recording_pwritev(self, buffers, offset, length=None):
        written.append((offset, sum(len(memoryview(b)) for b in buffers)))
        real_pwritev(self, buffers, offset, length)

    def recording_allocate(self, offset, length):
        allocated.append((offset, length))
        real_allocate(self, offset, length)

    monkeypatch.setattr(HostFile, "pwritev", recording_pwritev)
    monkeypatch.setattr(HostFile, "allocate", recording_allocate)
    path = tmp_path / "fresh.qcow2"
    qemu_create(path, 4 * MiB)
    data = b"\x3c" * BLOCK
    cluster = 64 * KiB
    with qcow2lib.open(str(path), "r+") as image:
        image.write(cluster + 8 * KiB, data)
        host = host_of(image, cluster + 8 * KiB) - 8 * KiB
        assert written == [(host + 8 * KiB, BLOCK)] and allocated == [(host, cluster)]
        assert os.path.getsize(path) == host + cluster
        assert image.read(cluster, cluster) == bytes(8 * KiB) + data + bytes(52 * KiB)
    qemu_io(path, "read -P 0 64k 8k", "read -P 0x3c 72k 4k", "read -P 0 76k 52k")
    assert_clean(path)


@pytest.mark.parametrize("depth", [1, 2], ids=["backing file", "backing chain"])
def test_fresh_cluster_over_a_backing_hole_gets_only_its_data(tmp_path, monkeypatch, depth):
    """Where the backing chain reads zeros (a hole, a zero cluster), a first 4 KiB write
    into the overlay writes its 4 KiB and allocates the cluster as zeros, as QEMU's
    is_zero_cow lets it; where any layer below has data there, the fill is that data."""
    written: list[tuple[int, int]] = []
    real_pwritev = HostFile.pwritev

    def recording_pwritev(self, buffers, offset, length=None):
        if Path(self.path).name == "top.qcow2":
            written.append((offset, sum(len(memoryview(b)) for b in buffers)))
        real_pwritev(self, buffers, offset, length)

    cluster = 64 * KiB
    base = tmp_path / "base.qcow2"
    qemu_create(base, 4 * MiB)
    qemu_io(base, "write -P 0x11 0 64k", "write -z 128k 64k")  # data, a zero cluster
    below = base
    if depth == 2:  # (the data lies two layers down; the middle layer has none there)
        below = tmp_path / "mid.qcow2"
        qemu_create(below, 4 * MiB, backing=base, backing_fmt="qcow2")
        qemu_io(below, "write -P 0x22 256k 64k")
    top = tmp_path / "top.qcow2"
    qemu_create(top, 4 * MiB, backing=below, backing_fmt="qcow2")
    monkeypatch.setattr(HostFile, "pwritev", recording_pwritev)
    data = b"\x3c" * BLOCK
    with qcow2lib.open(str(top), "r+") as image:
        for guest in (cluster, 2 * cluster, 3 * cluster):  # hole, zero cluster, beyond data
            written.clear()
            image.write(guest + 8 * KiB, data)
            host = host_of(image, guest + 8 * KiB) - 8 * KiB
            assert written == [(host + 8 * KiB, BLOCK)], guest
            assert image.read(guest, cluster) == bytes(8 * KiB) + data + bytes(52 * KiB)
        written.clear()
        image.write(8 * KiB, data)  # over the base's data: the fill is its data
        assert sum(length for _, length in written) == cluster
        expected = b"\x11" * 8 * KiB + data + b"\x11" * 52 * KiB
        assert image.read(0, cluster) == expected
        if depth == 2:
            written.clear()
            image.write(4 * cluster + 8 * KiB, data)  # over the middle layer's data
            assert sum(length for _, length in written) == cluster
    qemu_io(top, "read -P 0x11 0 8k", "read -P 0x3c 8k 4k", "read -P 0x11 12k 52k")
    for guest in (64, 128, 192):
        qemu_io(
            top,
            f"read -P 0 {guest}k 8k",
            f"read -P 0x3c {guest + 8}k 4k",
            f"read -P 0 {guest + 12}k 52k",
        )
    assert_clean(top)


def test_reused_cluster_still_gets_its_fill(tmp_path, monkeypatch):
    """A freed cluster that still holds old bytes (a file system that cannot punch holes)
    and is allocated again gets its zeros written: old data never shows through."""
    monkeypatch.setattr(HostFile, "punch_hole", lambda self, offset, length: False)
    path = tmp_path / "reuse.qcow2"
    qemu_create(path, 4 * MiB)
    cluster = 64 * KiB
    with qcow2lib.open(str(path), "r+") as image:
        image.write(0, b"\xaa" * cluster)
        image.flush()
        old_host = host_of(image, 0)
        image.discard(0, cluster)
        image.flush()
        assert Path(path).read_bytes()[old_host : old_host + 8] == b"\xaa" * 8
        image.write(5 * cluster + BLOCK, b"\x55" * BLOCK)
        assert host_of(image, 5 * cluster + BLOCK) == old_host + BLOCK  # taken again
        assert image.read(5 * cluster, cluster) == bytes(BLOCK) + b"\x55" * BLOCK + bytes(
            cluster - 2 * BLOCK
        )
    qemu_io(path, "read -P 0 320k 4k", "read -P 0x55 324k 4k", "read -P 0 328k 56k")
    assert_clean(path)


def test_fresh_cluster_without_fallocate_gets_its_zeros(tmp_path, monkeypatch):
    """A file system that cannot allocate zeroed space: the new cluster's zero fill is
    written after all, and the cluster reads as zeros around the data."""

    def refuse(self, offset, length):
        raise Qcow2IOError(errno.EOPNOTSUPP, "fallocate failed: Operation not supported")

    monkeypatch.setattr(HostFile, "allocate", refuse)
    path = tmp_path / "nofalloc.qcow2"
    qemu_create(path, 4 * MiB)
    cluster = 64 * KiB
    with qcow2lib.open(str(path), "r+") as image:
        image.write(cluster + 8 * KiB, b"\x3c" * BLOCK)
        host = host_of(image, cluster)
        assert os.path.getsize(path) == host + cluster  # the fill was written
        assert image.read(cluster, cluster) == bytes(8 * KiB) + b"\x3c" * BLOCK + bytes(52 * KiB)
    qemu_io(path, "read -P 0 64k 8k", "read -P 0x3c 72k 4k", "read -P 0 76k 52k")
    assert_clean(path)


def test_threads_allocate_in_one_table_and_across_refcount_blocks(tmp_path):
    """Eight threads allocating at once, each cluster's first write smaller than the
    cluster: with 512-byte clusters every L2 table (64 entries) is filled by all threads
    together, and the allocator's cursor runs through many refcount blocks (256 clusters
    each) and across the ranges that have none yet. A second write into each cluster then
    takes the in-place path; flushes midway write back what is dirty so far. QEMU finds
    the image clean and equal to a copy qemu-io wrote."""
    size = 2 * MiB
    cluster = 512
    clusters = size // cluster
    path = tmp_path / "ours.qcow2"
    twin = tmp_path / "qemu.qcow2"
    for image_path in (path, twin):
        qemu_create(image_path, size, options={"cluster_size": cluster})

    def pieces(index: int) -> list[tuple[int, int, int]]:
        """(guest offset, length, byte) of the two writes into cluster `index`."""
        first = index * cluster + (index * 64) % 384
        second = index * cluster + 448
        return [(first, 64, 1 + index % 251), (second, 32, 1 + (index * 7) % 251)]

    errors: list[str] = []
    start = threading.Barrier(THREADS)
    with qcow2lib.open(str(path), "r+") as image:

        def worker(owner: int) -> None:
            try:
                start.wait()
                for step in range(2):
                    for index in range(owner, clusters, THREADS):
                        offset, length, byte = pieces(index)[step]
                        image.write(offset, bytes([byte]) * length)
                        if index % 200 == owner:  # metadata written back midway, too
                            image.flush()
            except Exception as exc:  # noqa: BLE001 (reported by the main thread)
                errors.append(f"thread {owner}: {type(exc).__name__}: {exc}")

        threads = run_threads(worker, THREADS, timeout=100)
        assert not any(thread.is_alive() for thread in threads), "a thread hung"
        assert not errors, errors[:5]
        assert image._io_active == 0 and not image._inflight
        blocks = sum(1 for entry in image.refcounts.table if entry)
        assert blocks >= clusters // 256  # the data alone spans that many refcount blocks
    assert_clean(path)
    commands = [
        f"write -P {byte} {offset} {length}"
        for index in range(clusters)
        for offset, length, byte in pieces(index)
    ]
    for chunk in range(0, len(commands), 1024):
        qemu_io(twin, *commands[chunk : chunk + 1024])
    assert qemu_compare(str(path), str(twin), fmt_a="qcow2", fmt_b="qcow2") == 0


def test_hole_reads_under_zero_l1_entries_skip_the_lock(tmp_path):
    """A small read under an L1 entry of zero reads as zeros without the image lock (a
    thread holding it does not delay it), unless a backing file shows through there: an
    overlay over a shorter backing file reads the backing's bytes below its end and
    zeros past it, as QEMU reads them."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_create(base, 1 * MiB)
    qemu_io(base, "write -P 0x6b 0 1M")
    qemu_create(top, 64 * MiB, backing=str(base), backing_fmt="qcow2")
    held, release = threading.Event(), threading.Event()
    with qcow2lib.open(str(top)) as image:

        def hold_lock() -> None:
            with image._lock:
                held.set()
                release.wait(20)

        holder = threading.Thread(target=hold_lock)
        holder.start()
        try:
            assert held.wait(10)
            buf = bytearray(b"\xff" * BLOCK)
            started = time.monotonic()
            for offset in (2 * MiB, 40 * MiB + 60 * KiB, 64 * MiB - BLOCK):
                image.readinto(offset, buf)  # (would wait for the holder if it took the lock)
                assert buf == bytes(BLOCK), offset
                buf[:] = b"\xff" * BLOCK
            assert time.monotonic() - started < 10, "the hole reads waited for the lock"
        finally:
            release.set()
            holder.join()
        for offset in (0, 1 * MiB - BLOCK):
            image.readinto(offset, buf)
            assert buf == b"\x6b" * BLOCK, offset
        image.readinto(1 * MiB, buf)
        assert buf == bytes(BLOCK)
    qemu_io(top, "read -P 0x6b 0 1M", "read -P 0 1M 63M")


def test_vm_state_writes_beside_allocating_guest_writes(tmp_path):
    """Writing VM state holds the image while it writes through the engine's write path;
    allocating guest writes from other threads take turns on their own lock meanwhile.
    The two locks are always taken in one order: nothing hangs, and both land."""
    from qcow2lib.snapshots import create_snapshot, read_vmstate, write_vmstate

    path = tmp_path / "img.qcow2"
    qemu_create(path, "64M")
    state = random.Random(5).randbytes(256 * 1024)
    with qcow2lib.open(str(path), "r+") as image:

        def run(index: int) -> None:
            if index == 0:
                for round_ in range(20):
                    write_vmstate(image, round_ * len(state), state)
                return
            rng = random.Random(index)
            for _ in range(200):
                block = rng.randrange(64 * 1024 * 1024 // BLOCK)
                image.write(block * BLOCK, bytes([index]) * BLOCK)

        threads = run_threads(run, 5, timeout=120)
        assert not any(thread.is_alive() for thread in threads), "a thread hung"
        create_snapshot(image, "vm", vm_state_size=20 * len(state))
        assert read_vmstate(image, "vm", 19 * len(state), len(state)) == state
    assert_clean(path)
