"""Small writes made keeping the GIL while other threads run (HostFile.pwrite and
pwritev through libc, see hostfile._held_write): which writes may (none that could wait
for the disk: a partly written page not in the page cache, more than the dirty allowance
written since the last flush), that the data lands, and that errors and short writes end
as those of os.pwrite do. Whether other threads run is set by each test (a test runner
may have threads of its own)."""

from __future__ import annotations

import errno
import mmap
import os
import time

import pytest

import qcow2lib
from qcow2lib import hostfile
from qcow2lib.errors import Qcow2IOError
from qcow2lib.hostfile import HostFile

from qemutools import assert_clean

PAGE = os.sysconf("SC_PAGESIZE")


@pytest.fixture
def watched(tmp_path, monkeypatch):
    """A writable 1 MiB file of 0x11 bytes, with other threads said to run, and the
    writes made each way recorded: calls["held"] (offset, length) of writes keeping the
    GIL, calls["released"] those through os.pwrite/os.pwritev."""
    path = tmp_path / "file"
    path.write_bytes(b"\x11" * (1 << 20))
    calls: dict[str, list] = {"held": [], "released": []}
    write, writev = hostfile._held_write()
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def held_write(fd, data, offset):
        calls["held"].append((offset, len(memoryview(data))))
        return write(fd, data, offset)

    def held_writev(fd, views, offset):
        calls["held"].append((offset, sum(map(len, views))))
        return writev(fd, views, offset)

    def released_pwrite(fd, data, offset):
        calls["released"].append((offset, len(memoryview(data))))
        return real_pwrite(fd, data, offset)

    def released_pwritev(fd, buffers, offset, *flags):
        calls["released"].append((offset, sum(memoryview(b).nbytes for b in buffers)))
        return real_pwritev(fd, buffers, offset, *flags)

    monkeypatch.setattr(hostfile, "_held_write_call", [(held_write, held_writev)])
    monkeypatch.setattr(hostfile.os, "pwrite", released_pwrite)
    monkeypatch.setattr(hostfile.os, "pwritev", released_pwritev)
    monkeypatch.setattr(hostfile, "_other_threads", lambda: 1)
    file = HostFile(str(path), writable=True)
    yield file, path, calls
    file.close()


def resident_pages(file: HostFile, pages: int) -> int:
    """How many of the file's first pages are in the page cache, asked of mincore(2)
    through a mapping of them: unlike a cached-only read, which starts reading the page
    in when it is not there, this reads nothing."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with mmap.mmap(file.fd, pages * PAGE) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        flags = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(ctypes.byref(start), ctypes.c_size_t(pages * PAGE), flags) == 0
        finally:
            del start
    return sum(flag & 1 for flag in flags)


def evict(file: HostFile) -> None:
    """Drop the file's pages from the page cache (clean ones only: written back first),
    as mincore tells."""
    os.fsync(file.fd)
    for _ in range(50):  # (pages still on a CPU's list of new pages stay: tried again)
        os.posix_fadvise(file.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not resident_pages(file, 256):
            return
        time.sleep(0.01)
    raise AssertionError("the page cache kept the file's pages")


def test_cached_and_whole_page_writes_keep_the_gil(watched):
    """Cached pages, written in part or whole, and pages not cached but written whole (no
    page is read in) are written keeping the GIL, from bytes, bytearrays and writable
    views, one buffer or several; the data lands."""
    file, path, calls = watched
    file.pwrite(b"\x22" * 100, 10)  # (part of the first page, cached since written)
    file.pwrite(bytearray(b"\x33" * 3 * PAGE), PAGE)
    file.pwrite(memoryview(b"\x88" * 200), 2 * PAGE + 300)  # (a read-only view of bytes)
    evict(file)
    file.pwrite(memoryview(bytearray(b"\x44" * PAGE)), 8 * PAGE)  # (a whole page)
    file.pwritev([memoryview(bytearray(b"\x55" * 50)), memoryview(bytearray(b"\x66" * 70))], 5)
    file.pwritev([memoryview(bytearray(b"\x77" * PAGE))] * 2, 16 * PAGE, 2 * PAGE)
    assert calls["released"] == [(5, 120)]  # (pwritev without a length: see below)
    assert calls["held"] == [
        (10, 100),
        (PAGE, 3 * PAGE),
        (2 * PAGE + 300, 200),
        (8 * PAGE, PAGE),
        (16 * PAGE, 2 * PAGE),
    ]  # (pwritev without a length does not try: its buffers are not known byte views)
    data = path.read_bytes()
    assert data[:5] == b"\x11" * 5 and data[5:55] == b"\x55" * 50
    assert data[55:125] == b"\x66" * 70 and data[125:PAGE] == b"\x11" * (PAGE - 125)
    assert data[PAGE : 4 * PAGE] == (
        b"\x33" * (PAGE + 300) + b"\x88" * 200 + b"\x33" * (2 * PAGE - 500)
    )
    assert data[8 * PAGE : 9 * PAGE] == b"\x44" * PAGE
    assert data[16 * PAGE : 18 * PAGE] == b"\x77" * 2 * PAGE


def test_the_cache_probe_answers_from_the_page_cache(watched):
    """A page just written is cached; an evicted one is reported cached only if the probe
    itself read it in (a fast disk can answer within the probe)."""
    file, _, _ = watched
    file.pwrite(b"\x22" * 10, 0)
    assert file._page_cached(0) and resident_pages(file, 1) == 1
    evict(file)
    assert not file._page_cached(0) or resident_pages(file, 1) == 1


def test_writes_that_could_wait_let_the_gil_go(watched, monkeypatch):
    """A page written in part and not in the cache (its first or its last), a write over
    64 KiB, a read-only buffer, no other thread, and writes beyond the dirty allowance go
    through os.pwrite; a flush restores the allowance. The cache probe answers "not
    cached" here: evicting pages is not enough, as on a fast disk the kernel may read a
    page in during the probe itself and answer from it (the probe's own answers are
    checked against the page cache in the test above)."""
    file, path, calls = watched
    probed: list[int] = []

    def not_cached(page_offset: int) -> bool:
        probed.append(page_offset)
        return False

    monkeypatch.setattr(file, "_page_cached", not_cached)
    file.pwrite(b"\x22" * PAGE, 100)  # the first page partly written, not cached
    file.pwrite(b"\x22" * 100, 4 * PAGE)  # (its first page: whole at the start, then not)
    file.pwrite(b"\x22" * (PAGE + 100), 6 * PAGE)  # the last page partly written
    file.pwritev([memoryview(bytearray(PAGE + 100))], 10 * PAGE, PAGE + 100)
    assert probed == [0, 4 * PAGE, 7 * PAGE, 11 * PAGE]  # (a page written whole is not)
    file.pwrite(b"\x22" * (64 * 1024 + 1), 32 * PAGE)
    file.pwrite(memoryview(b"\x22" * PAGE)[1:], 0)  # (read-only, part of its bytes)
    file.pwritev([memoryview(b"\x22" * PAGE)], 0, PAGE)
    monkeypatch.setattr(hostfile, "_other_threads", lambda: 0)
    file.pwrite(b"\x22" * PAGE, 0)
    assert calls["held"] == []
    assert len(calls["released"]) == 8

    monkeypatch.setattr(hostfile, "_other_threads", lambda: 1)
    file.flush()
    monkeypatch.setattr(hostfile, "_dirty_allowance_value", [2 * PAGE])
    file.pwrite(b"\x33" * PAGE, 0)
    file.pwritev([memoryview(bytearray(PAGE))], PAGE, PAGE)
    file.pwrite(b"\x33" * PAGE, 2 * PAGE)  # (3 pages since the flush: beyond it)
    assert calls["held"] == [(0, PAGE), (PAGE, PAGE)]
    assert calls["released"][-1] == (2 * PAGE, PAGE)
    file.flush()
    file.pwrite(b"\x44" * PAGE, 3 * PAGE)
    assert calls["held"][-1] == (3 * PAGE, PAGE)
    data = path.read_bytes()
    assert data[: 3 * PAGE] == b"\x33" * PAGE + bytes(PAGE) + b"\x33" * PAGE
    assert data[3 * PAGE : 4 * PAGE] == b"\x44" * PAGE


def test_held_write_errors_and_short_writes(watched, tmp_path, monkeypatch):
    """A held write that fails leaves the write to os.pwrite, which reports it as it does
    without threads; one that writes part leaves the rest to it; the offsets ctypes would
    wrap round are refused."""
    file, path, calls = watched
    write, writev = hostfile._held_write()
    assert write(file.fd, b"x", -1) == writev(file.fd, [bytearray(1)], 1 << 63) == -errno.EOVERFLOW
    calls["held"].clear()
    reader_path = tmp_path / "read-only"
    reader_path.write_bytes(bytes(PAGE))
    reader = HostFile(str(reader_path))
    try:
        messages = []
        for threads in (1, 0):
            monkeypatch.setattr(hostfile, "_other_threads", lambda threads=threads: threads)
            with pytest.raises(Qcow2IOError) as raised:
                reader.pwrite(b"\x22" * PAGE, 0)
            messages.append((raised.value.errno, str(raised.value)))
        assert messages[0] == messages[1] and messages[0][0] == errno.EBADF
        assert calls["held"] == [(0, PAGE)]  # (tried once, with threads)
    finally:
        reader.close()

    monkeypatch.setattr(hostfile, "_other_threads", lambda: 1)

    def half_write(fd, data, offset):
        return write(fd, bytes(memoryview(data)[: len(data) // 2]), offset)

    def half_writev(fd, views, offset):
        return writev(fd, [views[0][: len(views[0]) // 2]], offset)

    monkeypatch.setattr(hostfile, "_held_write_call", [(half_write, half_writev)])
    calls["released"].clear()
    file.pwrite(b"\x55" * PAGE, 0)
    file.pwritev(
        [memoryview(bytearray(b"\x66" * PAGE)), memoryview(bytearray(b"\x77" * 8))], PAGE, PAGE + 8
    )
    assert calls["released"] == [(PAGE // 2, PAGE // 2), (PAGE + PAGE // 2, PAGE // 2 + 8)]
    data = path.read_bytes()
    assert data[: 2 * PAGE + 8] == b"\x55" * PAGE + b"\x66" * PAGE + b"\x77" * 8


def test_threaded_in_place_writes_stay_consistent(tmp_path, monkeypatch):
    """In-place 4 KiB writes of a qcow2 image with other threads said to run take the
    held path for data and the image stays clean, its data as written."""
    path = tmp_path / "image.qcow2"
    qcow2lib.create(str(path), 4 << 20)
    held: list[int] = []
    write, writev = hostfile._held_write()

    def counting(fd, data, offset):
        held.append(offset)
        return write(fd, data, offset)

    with qcow2lib.open(str(path), "r+") as image:
        image.write(0, b"\x01" * (4 << 20))  # (allocates every cluster, alone)
        image.flush()
        monkeypatch.setattr(hostfile, "_held_write_call", [(counting, writev)])
        monkeypatch.setattr(hostfile, "_other_threads", lambda: 1)
        for index in range(0, 1024, 3):
            image.write(index * 4096, bytes([index % 251 + 2]) * 4096)
        assert len(held) >= 342
        expected = bytearray(b"\x01" * (4 << 20))
        for index in range(0, 1024, 3):
            expected[index * 4096 : (index + 1) * 4096] = bytes([index % 251 + 2]) * 4096
        assert image.read(0, 4 << 20) == expected
    assert_clean(path)


def test_dirty_allowance_from_proc(tmp_path):
    """A quarter of dirty_background_bytes, or of dirty_background_ratio percent of
    MemAvailable when that is 0; 0 where /proc does not say."""
    vm = tmp_path / "sys" / "vm"
    vm.mkdir(parents=True)
    assert hostfile.dirty_allowance(str(tmp_path)) == 0
    (vm / "dirty_background_bytes").write_text("4000000\n")
    assert hostfile.dirty_allowance(str(tmp_path)) == 1000000
    (vm / "dirty_background_bytes").write_text("0\n")
    (vm / "dirty_background_ratio").write_text("10\n")
    assert hostfile.dirty_allowance(str(tmp_path)) == 0  # (no meminfo)
    (tmp_path / "meminfo").write_text(
        "MemTotal:        8000000 kB\nMemFree:          100 kB\nMemAvailable:    2000000 kB\n"
    )
    assert hostfile.dirty_allowance(str(tmp_path)) == 2000000 * 1024 * 10 // 100 // 4
    (tmp_path / "meminfo").write_text("MemTotal: 8000000 kB\n")
    assert hostfile.dirty_allowance(str(tmp_path)) == 0
    assert hostfile.dirty_allowance("/proc") > 0  # (this host's)


def test_reservations_keep_the_gil_while_threads_run(tmp_path, monkeypatch):
    """A reservation (a new cluster's fallocate) of up to 2 MiB, with other threads said to
    run, goes through libc's fallocate keeping the GIL and reserves the blocks; alone, or
    larger, or when that call fails, through os.posix_fallocate, which reports the error
    as before."""
    path = tmp_path / "file"
    path.write_bytes(b"")
    made: dict[str, list] = {"held": [], "released": []}
    held = hostfile._fallocate(keep_gil=True)
    real_posix_fallocate = os.posix_fallocate
    outcome: list[int] = []  # (a held call's forced result, if any)

    def held_fallocate(fd, mode, offset, length):
        made["held"].append((offset, length))
        return outcome[0] if outcome else held(fd, mode, offset, length)

    def released(fd, offset, length):
        made["released"].append((offset, length))
        return real_posix_fallocate(fd, offset, length)

    monkeypatch.setitem(hostfile._fallocate_calls, True, held_fallocate)
    monkeypatch.setattr(hostfile.os, "posix_fallocate", released)
    file = HostFile(str(path), writable=True)
    try:
        monkeypatch.setattr(hostfile, "_other_threads", lambda: 0)
        file.allocate(0, 65536)
        monkeypatch.setattr(hostfile, "_other_threads", lambda: 1)
        file.allocate(65536, 65536)
        file.allocate(2 << 20, 2 << 20)
        file.allocate(4 << 20, (2 << 20) + 4096)  # (over 2 MiB)
        assert made == {
            "held": [(65536, 65536), (2 << 20, 2 << 20)],
            "released": [(0, 65536), (4 << 20, (2 << 20) + 4096)],
        }
        assert os.fstat(file.fd).st_size == (6 << 20) + 4096
        reserved = 65536 + 65536 + (2 << 20) + (2 << 20) + 4096
        assert os.fstat(file.fd).st_blocks * 512 >= reserved  # (a hole between: not counted)
        assert path.read_bytes() == bytes((6 << 20) + 4096)
        made["held"].clear(), made["released"].clear()
        outcome.append(-1)  # the held call fails: posix_fallocate does it again
        file.allocate(8 << 20, 4096)
        assert made == {"held": [(8 << 20, 4096)], "released": [(8 << 20, 4096)]}
        assert os.fstat(file.fd).st_size == (8 << 20) + 4096

        def refused(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(hostfile.os, "posix_fallocate", refused)
        with pytest.raises(Qcow2IOError) as failure:
            file.allocate(9 << 20, 4096)
        assert failure.value.errno == errno.ENOSPC
    finally:
        file.close()


def test_threaded_allocating_writes_stay_consistent(tmp_path):
    """8 threads writing 4 KiB pieces into new clusters of one image, with the clusters'
    reservations and the writes keeping the GIL: every piece reads back, and qemu-img
    check finds the image clean."""
    import threading

    path = tmp_path / "disk.qcow2"
    qcow2lib.create(str(path), 64 << 20)
    pieces = [
        (index * 65536 + (index % 16) * 4096, bytes([index % 251 + 1]) * 4096)
        for index in range(1024)
    ]
    with qcow2lib.open(str(path), "r+") as image:

        def write(first: int) -> None:
            for offset, data in pieces[first::8]:
                image.write(offset, bytearray(data))

        threads = [threading.Thread(target=write, args=(first,)) for first in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for offset, data in pieces:
            assert image.read(offset, 4096) == data
            assert image.read(offset - offset % 65536, offset % 65536) == bytes(offset % 65536)
    assert_clean(path)
