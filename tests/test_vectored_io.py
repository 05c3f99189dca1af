"""BlockDevice.readv and writev between scattered buffers and an image: a range lying in
one host run of data clusters is one preadv or pwritev straight from or into the buffers
(ClusterMap.data_run, no segment list, no joined copy); anything else takes the general
paths. Both are byte-checked against what qemu-img reads from the image afterwards."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib.hostfile import HostFile
from qcow2lib.image import Qcow2Image
from qemutools import assert_clean, qemu_create, qemu_img, qemu_io, to_raw

KIB = 1024
CLUSTER = 64 * KIB


def scattered(data: bytes, rng: random.Random) -> tuple[list[memoryview], list[bytearray]]:
    """`data` cut into uneven pieces (multiples of 512 bytes, 512 B to 12 KiB), each in a
    buffer of its own, as a guest's scattered pages: (their views, the buffers)."""
    buffers: list[bytearray] = []
    done = 0
    while done < len(data):
        n = min(len(data) - done, 512 * rng.randrange(1, 25))
        buffers.append(bytearray(data[done : done + n]))
        done += n
    return [memoryview(b) for b in buffers], buffers


@pytest.fixture
def in_place_results(monkeypatch) -> list[bool]:
    """What every Qcow2Image._write_in_place answered (True: the write went in place)."""
    results: list[bool] = []
    original = Qcow2Image._write_in_place

    def recording(self, offset, buffers, length):
        result = original(self, offset, buffers, length)
        results.append(result)
        return result

    monkeypatch.setattr(Qcow2Image, "_write_in_place", recording)
    return results


def allocated_image(tmp_path: Path, reverse: bool = False) -> Path:
    """4 MiB, 64 KiB clusters, the first 1 MiB written by qemu-io: clusters 0-15 lie in
    one host run, or (reverse) each was allocated before the one in front of it, so no
    two neighbours are neighbours in the file."""
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "4M")
    order = range(15, -1, -1) if reverse else range(16)
    qemu_io(image, *(f"write -P {0x40 + c} {c * CLUSTER} 64k" for c in order), fmt="qcow2")
    return image


@pytest.mark.parametrize("reverse", [False, True])
def test_writev_in_place_only_over_one_host_run(tmp_path, in_place_results, reverse):
    """Writes of scattered buffers over several clusters: in place (straight from the
    buffers) where the clusters form one host run, the general path where they do not;
    the image holds the same bytes either way, and a read through readv agrees."""
    image = allocated_image(tmp_path, reverse)
    expected = bytearray(to_raw(image, tmp_path / "before.raw"))
    rng = random.Random(5)
    writes = [(CLUSTER + 512, 300 * KIB), (0, CLUSTER), (5 * CLUSTER - 4096, 8192)]
    with qcow2lib.open(str(image), "r+") as device:
        for offset, length in writes:
            payload = rng.randbytes(length)
            views, _ = scattered(payload, rng)
            assert device.writev(offset, views) == length
            expected[offset : offset + length] = payload
        read_views, buffers = scattered(bytes(2 * CLUSTER + 1024), rng)
        assert device.readv(CLUSTER - 512, read_views) == 2 * CLUSTER + 1024
        assert b"".join(buffers) == expected[CLUSTER - 512 : 3 * CLUSTER + 512]
    # one cluster alone is one host run whatever the order; several are only in order
    assert in_place_results == [not reverse, True, not reverse]
    assert to_raw(image, tmp_path / "after.raw") == bytes(expected)
    assert_clean(image)


def test_writev_never_in_place_over_new_or_shared_clusters(tmp_path, in_place_results):
    """A range reaching unallocated clusters, or clusters a snapshot shares (no COPIED
    flag), is written the general way: clusters allocated, shared ones copied first, the
    snapshot's bytes untouched."""
    image = allocated_image(tmp_path)
    qemu_img("snapshot", "-c", "before", str(image))
    snapshot = to_raw(image, tmp_path / "snapshot.raw")
    expected = bytearray(snapshot)
    rng = random.Random(7)
    with qcow2lib.open(str(image), "r+") as device:
        for offset, length in ((15 * CLUSTER, 2 * CLUSTER), (3 * CLUSTER + 512, 100 * KIB)):
            payload = rng.randbytes(length)
            views, _ = scattered(payload, rng)
            device.writev(offset, views)
            expected[offset : offset + length] = payload
    assert in_place_results == [False, False]
    assert to_raw(image, tmp_path / "after.raw") == bytes(expected)
    qemu_img("convert", "-O", "raw", "-l", "snapshot.name=before", image, tmp_path / "s.raw")
    assert (tmp_path / "s.raw").read_bytes() == snapshot
    assert_clean(image)


def test_readv_one_run_and_mixed_ranges(tmp_path, monkeypatch):
    """Reads into scattered buffers: one preadv for a run of data clusters (data_run
    answers), segment by segment over zero, compressed, backing and unallocated clusters;
    byte for byte what qemu-img reads."""
    base = tmp_path / "base.qcow2"
    qemu_create(base, "2M")
    qemu_io(base, "write -P 0x31 0 2M", fmt="qcow2")
    image = tmp_path / "top.qcow2"
    qemu_create(image, "2M", backing=str(base), backing_fmt="qcow2")
    qemu_io(
        image,
        "write -P 0x42 0 256k",
        "write -z 256k 64k",
        "write -c -P 0x53 320k 64k",
        "write -P 0x64 512k 128k",
        fmt="qcow2",
    )
    expected = to_raw(image, tmp_path / "top.raw")
    answers: list[int | None] = []
    with qcow2lib.open(str(image), "r") as device:
        original = device.map.data_run

        def recording(guest_offset, length, overlap=True):
            answers.append(original(guest_offset, length, overlap))
            return answers[-1]

        monkeypatch.setattr(device.map, "data_run", recording)
        rng = random.Random(9)
        for offset, length in ((4096, 200 * KIB), (512, 1200 * KIB), (512 * KIB, 128 * KIB)):
            views, buffers = scattered(bytes(length), rng)
            assert device.readv(offset, views) == length
            assert b"".join(buffers) == expected[offset : offset + length]
    assert [answer is not None for answer in answers] == [True, False, True]


def test_raw_writev_and_readv(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(random.Random(1).randbytes(1 << 20))
    expected = bytearray(raw.read_bytes())
    payload = random.Random(2).randbytes(200 * KIB)
    with qcow2lib.open(str(raw), "r+", fmt="raw") as device:
        views, _ = scattered(payload, random.Random(3))
        assert device.writev(8192, views) == len(payload)
        read_views, buffers = scattered(bytes(300 * KIB), random.Random(4))
        device.readv(0, read_views)
    expected[8192 : 8192 + len(payload)] = payload
    assert b"".join(buffers) == expected[: 300 * KIB]
    assert raw.read_bytes() == bytes(expected)


def test_hostfile_vectored_io_with_a_known_length(tmp_path):
    """preadv/pwritev given the total: one call; a read past the end of the file leaves
    zeros, as without it."""
    path = tmp_path / "f"
    path.write_bytes(b"\x11" * 6000)
    host = HostFile(str(path), writable=True)
    try:
        host.pwritev([memoryview(b"\x22" * 1000), memoryview(b"\x33" * 3000)], 1000, 4000)
        parts = [memoryview(bytearray(b"\xff" * 5000)), memoryview(bytearray(b"\xff" * 3000))]
        host.preadv(parts, 0, 8000)
    finally:
        host.close()
    assert bytes(parts[0]) == b"\x11" * 1000 + b"\x22" * 1000 + b"\x33" * 3000
    assert bytes(parts[1]) == b"\x11" * 1000 + bytes(2000)
    assert os.path.getsize(path) == 6000


def test_io_buffer_data_starts_past_the_slow_first_bytes_of_a_page():
    """glibc maps an allocation this large afresh, its data 16 bytes into a page, where
    the kernel's copies run about 1.5x slower; io_buffer's data starts 16 bytes later, in
    a plain zero-filled bytearray of the size asked that keeps its place when written."""
    import ctypes

    from qcow2lib.hostfile import io_buffer

    size = 64 << 20  # (above glibc's largest mmap threshold: always mapped afresh)
    plain = bytearray(size)
    assert ctypes.addressof(ctypes.c_char.from_buffer(plain)) % 4096 == 16
    del plain
    buffer = io_buffer(size)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert type(buffer) is bytearray and len(buffer) == size
    assert address % 4096 == 32
    assert buffer.startswith(bytes(4096)) and buffer.endswith(bytes(4096))
    buffer[:4] = b"abcd"
    buffer[size - 4 :] = b"wxyz"
    assert ctypes.addressof(ctypes.c_char.from_buffer(buffer)) == address
    assert buffer[:4] == b"abcd" and buffer[-4:] == b"wxyz"


@pytest.mark.parametrize("length", [0, 1, 4095, (256 << 10) - 1, 256 << 10, (3 << 20) + 17])
def test_fill_zeros_zeroes_exactly_the_view(length):
    """fill_zeros clears the view it is given, in every kind of writable buffer (packed
    pad bytes a MiB at a time, slice copies for views that are not contiguous), and not
    one byte either side of it."""
    import mmap

    from qcow2lib.hostfile import fill_zeros

    total = length + 64
    with mmap.mmap(-1, total) as mapped:
        for buffer in (bytearray(b"\xaa" * total), mapped):
            buffer[:] = b"\xaa" * total
            view = memoryview(buffer)
            fill_zeros(view[32 : 32 + length])
            view.release()
            assert buffer[:32] == b"\xaa" * 32 and buffer[32 + length :] == b"\xaa" * 32
            assert buffer[32 : 32 + length] == bytes(length)
    strided = bytearray(b"\xaa" * (2 * length))
    fill_zeros(memoryview(strided)[::2])  # (not contiguous: slice copies)
    assert strided[::2] == bytes(length) and strided[1::2] == b"\xaa" * length
    with pytest.raises(TypeError):
        fill_zeros(memoryview(bytes(length + 1)))  # (read-only: refused, as a copy would be)


@pytest.mark.parametrize("place", [0, 8, 16, 24, 31, 32, 4095])
def test_readinto_fills_memory_the_kernel_copies_into_slowly(tmp_path, place, monkeypatch):
    """HostFile.readinto into memory 1 to 31 bytes past its source within a page goes
    through a bounce buffer a piece at a time (the kernel's copy is slow there); any
    place, length and file offset reads the same bytes, zeros past the end of the file."""
    import ctypes

    from qcow2lib import hostfile

    path = tmp_path / "data"
    content = random.Random(place).randbytes((3 << 20) + 1234)
    path.write_bytes(content)
    bounced: list[int] = []
    real = hostfile.HostFile._readinto_bounced

    def recording(self, buf, offset):
        bounced.append(len(buf))
        real(self, buf, offset)

    monkeypatch.setattr(hostfile.HostFile, "_readinto_bounced", recording)
    file = HostFile(str(path), writable=False)
    try:
        memory = bytearray((4 << 20) + 8192)
        base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        for offset, length in [(0, 3 << 20), (4096, 300 << 10), (100, 1 << 20), (1 << 20, 3 << 20)]:
            # the view starts `place` bytes past its source's place within a page
            start = (offset + place - base) % 4096
            view = memoryview(memory)[start : start + length]
            view[:] = b"\xee" * length
            file.readinto(view, offset)
            expected = content[offset : offset + length]
            assert bytes(view) == expected + bytes(length - len(expected))
            view.release()
    finally:
        file.close()
    assert bounced if 0 < place < 32 else not bounced


def test_punch_hole_frees_the_range_and_names_its_failure(tmp_path):
    """HostFile.punch_hole calls libc's fallocate (through _ctypes): the range reads as
    zeros and its blocks are given back, the rest is kept; a failure other than "not
    supported" is reported with the errno fallocate left (here: a descriptor opened
    read-only, EBADF)."""
    import errno

    from qcow2lib.errors import Qcow2IOError

    path = tmp_path / "file.bin"
    path.write_bytes(b"\x5a" * (1 << 20))
    before = os.stat(path).st_blocks
    writable = HostFile(str(path), writable=True)
    try:
        assert writable.punch_hole(256 << 10, 512 << 10) is True
    finally:
        writable.close()
    data = path.read_bytes()
    assert data == b"\x5a" * (256 << 10) + bytes(512 << 10) + b"\x5a" * (256 << 10)
    assert os.stat(path).st_blocks < before
    read_only = HostFile(str(path))
    try:
        with pytest.raises(Qcow2IOError) as failure:
            read_only.punch_hole(0, 4096)
    finally:
        read_only.close()
    assert failure.value.errno == errno.EBADF
    assert "punch hole failed" in str(failure.value)
