"""The only place that touches file descriptors.

Everything above works in offsets and buffers; this layer turns them into positional,
vectored system calls, durable flushes and hole punching, and maps OSError onto
Qcow2IOError. Tests swap in a subclass that records or fails chosen operations.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from _thread import _count as _other_threads
from _thread import _local as _thread_local

from .errors import Qcow2IOError, preallocation_failure

_FALLOC_FL_KEEP_SIZE = 0x01
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_FALLOC_FL_PUNCH_HOLE = 0x02
# preadv2's "fail with EAGAIN rather than wait for the disk" flag (0: not on this system)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _c_type(code: str):
    """The ctypes simple type of a struct-style code ("i", "q", "c"...), from `_ctypes`."""
    import _ctypes

    return type(f"c_{code}", (_ctypes._SimpleCData,), {"_type_": code})


def _libc_function(name: str, restype: str, argtypes: str | None, keep_gil: bool = False):
    """libc's function `name` called through `_ctypes`, the C module beneath the ctypes
    package (which takes 2 ms more to import), or None where libc has no such function.
    Types are struct-style codes ("i", "q", "l"); argtypes None: arguments converted as
    ctypes does without declared types (ints as C ints, bytes as their address), which
    costs less a call. keep_gil: the call keeps the GIL (FUNCFLAG_PYTHONAPI). The symbols
    of the running process include libc's, so no library search is needed; errno is kept
    for `_ctypes.get_errno`."""
    import _ctypes

    flags = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    if keep_gil:
        flags |= _ctypes.FUNCFLAG_PYTHONAPI
    members = {"_flags_": flags, "_restype_": _c_type(restype)}
    if argtypes is not None:
        members["_argtypes_"] = tuple(map(_c_type, argtypes))
    function_type = type(f"libc_{name}", (_ctypes.CFuncPtr,), members)
    try:
        return function_type(_ctypes.dlsym(_ctypes.dlopen(None), name))  # type: ignore[arg-type]
    except OSError:  # pragma: no cover - libcs without it
        return None


_fallocate_calls: dict = {}  # keep_gil -> libc's fallocate or None


def _fallocate(keep_gil: bool = False):
    """libc's fallocate(2), which takes the flags os.posix_fallocate does not, or None.
    Loaded on the first hole punched (every snapshot deletion punches holes), or on the
    first cluster a write allocates while other threads run (keep_gil: the call keeps
    the GIL, see HostFile.allocate)."""
    if keep_gil not in _fallocate_calls:
        _fallocate_calls[keep_gil] = _libc_function("fallocate", "i", "iiqq", keep_gil)
    return _fallocate_calls[keep_gil]


_OFFSET_END = 1 << 63  # (off_t's)
_held_read_call: list = []  # [a reader that keeps the GIL, or None], filled on first use


def _held_read():
    """A page-cache read that keeps the GIL: read(fd, buf, offset) -> bytes read or -errno
    (-EAGAIN: not all of it cached), or None where the system has no preadv2.

    os.preadv lets the GIL go for the call, and with other Python threads waiting that
    costs more than the read: each thread must be woken in turn to take the GIL back (8
    threads of 4 KiB cached reads: 4.5 times as long as one thread doing them all). A
    cached read (RWF_NOWAIT: it never waits for the disk) is a copy of a page, so it is
    made holding the GIL, through libc's preadv2 with no argument types declared (2.1 us a
    call; 2.9 with them; os.preadv 1.5, which is why a lone thread does not use it).
    Loaded on the first such read.
    """
    if not _held_read_call:
        import _ctypes

        preadv2 = _libc_function("preadv2", "l", None, keep_gil=True)
        read = None
        if preadv2 is not None:
            int64 = _c_type("q")
            address = _ctypes.addressof
            from_buffer = _c_type("c").from_buffer
            iovec = struct.Struct("PN").pack  # (struct iovec: base, length)
            get_errno = _ctypes.get_errno

            def read(fd: int, buf: memoryview, offset: int) -> int:
                if not 0 <= offset < _OFFSET_END:  # (ctypes would wrap it round)
                    return -errno.EOVERFLOW
                done = preadv2(
                    fd, iovec(address(from_buffer(buf)), len(buf)), 1, int64(offset), _RWF_NOWAIT
                )
                return done if done >= 0 else -get_errno()

        _held_read_call.append(read)
    return _held_read_call[0]


_HELD_WRITE_MAX = 64 << 10  # the largest write that may keep the GIL
_HELD_ALLOCATE_MAX = 2 << 20  # the largest reservation that may keep it (a 2 MiB cluster)
_PAGE_SIZE = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096
_held_write_call: list = []  # [writer, vectored writer], or [None]: filled on first use
_dirty_allowance_value: list = []  # [bytes], filled on first use
_probe_byte = memoryview(bytearray(1))  # (where a page's cache probe reads to: unread)


def _held_write():
    """Writes that keep the GIL: (write(fd, data, offset), writev(fd, views, offset)) ->
    bytes written or -errno, or None where the system has no pwritev. `data` is bytes or a
    writable byte view, `views` writable byte views (a read-only one has no address
    ctypes can take).

    os.pwrite lets the GIL go for the call, and with other threads waiting a write into
    the page cache costs less than the hand-over (20000 writes of 4 KiB in place from 8
    threads: 0.69-0.82 s, where one thread takes 0.22-0.26). HostFile keeps it only for
    writes that do not wait for the disk (see HostFile._write_keeps_gil). Loaded on
    first use.
    """
    if not _held_write_call:
        import _ctypes

        pwrite = _libc_function("pwrite", "l", None, keep_gil=True)
        pwritev = _libc_function("pwritev", "l", None, keep_gil=True)
        if pwrite is None or pwritev is None:
            _held_write_call.append(None)
            return None
        int64, size, pointer = _c_type("q"), _c_type("L"), _c_type("P")
        address = _ctypes.addressof
        from_buffer = _c_type("c").from_buffer
        iovec = struct.Struct("PN").pack
        get_errno = _ctypes.get_errno

        def write(fd: int, data, offset: int) -> int:
            if not 0 <= offset < _OFFSET_END:  # (ctypes would wrap it round)
                return -errno.EOVERFLOW
            where = data if type(data) is bytes else pointer(address(from_buffer(data)))
            done = pwrite(fd, where, size(len(data)), int64(offset))
            return done if done >= 0 else -get_errno()

        def writev(fd: int, views: list, offset: int) -> int:
            if not 0 <= offset < _OFFSET_END:
                return -errno.EOVERFLOW
            vector = b"".join([iovec(address(from_buffer(view)), len(view)) for view in views])
            done = pwritev(fd, vector, len(views), int64(offset))
            return done if done >= 0 else -get_errno()

        _held_write_call.append((write, writev))
    return _held_write_call[0]


def _addressable(view: memoryview):
    """What a held write can take `view`'s bytes from: the bytes object it shows whole,
    or the view itself if writable; None otherwise (a part of a read-only buffer)."""
    if not view.readonly:
        return view
    whole = view.obj
    return whole if type(whole) is bytes and len(whole) == view.nbytes else None


def _writable_bytes(buffer) -> bool:
    """Whether ctypes can take the address of `buffer`'s bytes (a writable, non-empty one)."""
    view = memoryview(buffer)
    return not view.readonly and view.nbytes > 0


def _dirty_allowance() -> int:
    """How many bytes a file may have written since its last flush and still have its
    small writes keep the GIL (see dirty_allowance). Read on first use."""
    if not _dirty_allowance_value:
        _dirty_allowance_value.append(dirty_allowance("/proc"))
    return _dirty_allowance_value[0]


def dirty_allowance(proc: str) -> int:
    """A quarter of the kernel's background writeback threshold (dirty_background_bytes,
    or dirty_background_ratio percent of the available memory), as the /proc at `proc`
    gives them: well below where the kernel makes writers wait (half-way between that
    threshold and dirty_ratio's). 0 (no write keeps the GIL) where they cannot be read."""
    try:
        with open(f"{proc}/sys/vm/dirty_background_bytes", "rb") as source:
            threshold = int(source.read())
        if not threshold:
            with open(f"{proc}/sys/vm/dirty_background_ratio", "rb") as source:
                ratio = int(source.read())
            with open(f"{proc}/meminfo", "rb") as source:
                fields = dict(line.split(b":", 1) for line in source.read().splitlines())
            threshold = int(fields[b"MemAvailable"].split()[0]) * 1024 * ratio // 100
    except (OSError, ValueError, KeyError, IndexError):
        threshold = 0
    return max(threshold, 0) // 4


# QEMU's image locking: byte 100+i is held by whoever uses permission i, byte 200+i by
# whoever does not let others have it (open file description locks, so they work across
# processes and between threads of one process alike).
PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE = 1, 2, 4, 8
PERM_ALL = 0x0F  # what a writer does not take: WRITE_UNCHANGED (QEMU leaves byte 102 alone)
_PERM_NAMES = {1: "consistent read", 2: "write", 4: "write unchanged", 8: "resize"}
_LOCK_PERM_BASE, _LOCK_SHARED_BASE = 100, 200


def _flock(kind: int, start: int) -> bytes:
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


def special_file_kind(mode: int, char_devices: bool = True) -> str | None:
    """What a file is when no image should use it: reading a FIFO or socket waits for a
    writer that may never come, and a character device is a stream, not a disk. Regular
    files and block devices (None) are fine. Character devices open as files when named
    directly (as qemu-img allows); named by an image (char_devices) they are refused."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if char_devices and stat.S_ISCHR(mode):
        return "a character device"
    return None


def refuse_special_file(
    path: str, role: str, named_by: str | None, mode: int | None = None
) -> None:
    """Refuse a FIFO, socket or character device that an image names as its `role`
    (backing file, external data file), before it is opened (`mode` from os.stat), or
    once it is (the opened file's mode: the name may have changed in between)."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except (OSError, ValueError):
            return  # opening it reports why it cannot be used
    kind = special_file_kind(mode)
    if kind:
        raise Qcow2IOError(
            errno.EINVAL,
            f"The {role} '{path}' named by '{named_by}' is {kind}, "
            f"not a regular file or block device",
            path,
        )


def io_buffer(size: int) -> bytearray:
    """A zero-filled bytearray of `size` bytes to read into and write from, again and
    again. glibc places a large allocation 16 bytes into fresh pages, and the kernel
    copies to and from a buffer that starts 8 to 24 bytes into a page about 1.5 times
    slower (a 1 GiB read from the page cache in 2 MiB preadv calls: 157 ms, against
    98 ms at 0 or 32 bytes and beyond); the data here starts 16 bytes later."""
    buffer = bytearray(size + 16)
    del buffer[:16]  # (a bytearray moves the start of its data, not the data)
    return buffer


_memory_calls: list = []  # [(a one-byte C type's from_buffer, addressof)]


def _memory() -> tuple:
    """from_buffer of a one-byte C type, and addressof, loaded on first use from
    `_ctypes`, the C module beneath the ctypes package (which takes 2 ms more to import,
    for what is not needed here: convert paid it on every run)."""
    if not _memory_calls:
        import _ctypes

        class _Byte(_ctypes._SimpleCData):
            _type_ = "B"

        _memory_calls.append((_Byte.from_buffer, _ctypes.addressof))
    return _memory_calls[0]


def _address(view: memoryview) -> int | None:
    """Where a writable byte view's memory starts, or None if it has no plain address
    (read-only, or not contiguous)."""
    from_buffer, addressof = _memory()
    try:
        return addressof(from_buffer(view))
    except (TypeError, ValueError, BufferError):
        return None


# Zeros are written by struct's packing of pad bytes: packing clears the whole struct
# with memset first, and "x" packs nothing over it. That is libc's memset on the view's
# memory, twice the speed of a copy from a zero block (it only writes), without ctypes
# (2.5 ms to import). Long views go a MiB at a time, so only two formats are ever made.
_ZERO_PIECE = 1 << 20
_ZERO_MIB = struct.Struct(f"{_ZERO_PIECE}x")
_ZERO_BLOCK = memoryview(bytes(_ZERO_PIECE))


def fill_zeros(view: memoryview) -> None:
    """Zero a writable byte view (a read-only one is refused with TypeError)."""
    length = len(view)
    if view.readonly:
        raise TypeError("fill_zeros: the view is read-only")
    if not view.contiguous:  # (struct packs into contiguous memory only: slice copies)
        for start in range(0, length, _ZERO_PIECE):
            chunk = view[start : start + _ZERO_PIECE]
            chunk[:] = _ZERO_BLOCK[: len(chunk)]
        return
    whole = length - length % _ZERO_PIECE
    for start in range(0, whole, _ZERO_PIECE):
        _ZERO_MIB.pack_into(view, start)
    if whole < length:
        struct.pack_into(f"{length - whole}x", view, whole)


# The kernel copies file data into memory 1.4 to 3.5 times slower when the destination
# lies 1 to 31 bytes past the source within a page (a 1 GiB read in 1 MiB preadv calls:
# 150-400 ms against 105-130), as it does for a bytearray of 128 KiB or more from glibc
# (16 bytes into a page) read from a page-aligned file offset. Reads of at least
# _BOUNCE_MIN bytes into such memory go through a buffer of this thread's placed to
# match the source, then a copy (glibc's copy does not mind): 145 -> 103 ms per GiB.
_BOUNCE_MIN = 256 << 10
_BOUNCE_SIZE = 1 << 20  # (smaller pieces lose most of the gain: 256 KiB, 135 ms per GiB)
_bounce = _thread_local()


def _slow_destination(view: memoryview, offset: int) -> bool:
    address = _address(view)
    return address is not None and 0 < (address - offset) % 4096 < 32


def _bounce_view() -> tuple[memoryview, int]:
    """This thread's bounce buffer, a page longer than it is used, and its address."""
    held = getattr(_bounce, "held", None)
    if held is None:
        view = memoryview(bytearray(_BOUNCE_SIZE + 4096))
        address = _address(view)
        assert address is not None  # (a bytearray's memory always has one)
        held = _bounce.held = (view, address)
    return held


def _drop_front(views: list[memoryview], count: int) -> None:
    """Take the first `count` bytes off a list of byte views (what a short preadv or
    pwritev did), slicing the view the cut falls in."""
    while count and views:
        if count >= len(views[0]):
            count -= len(views.pop(0))
        else:
            views[0] = views[0][count:]
            count = 0


class HostFile:
    """A file opened for positional I/O; safe to share between threads."""

    def __init__(self, path: str, writable: bool = False, create: bool = False):
        self.path = path
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:  # not O_TRUNC: the caller truncates once it holds the image lock
            flags |= os.O_CREAT
        flags |= getattr(os, "O_CLOEXEC", 0)
        verb = "create" if create else "open"
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
            self.fd = os.open(path, flags | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise Qcow2IOError(
                exc.errno, f"Could not {verb} '{path}': {exc.strerror}", path
            ) from None
        except ValueError:  # a NUL byte: no file can have this name
            raise Qcow2IOError(
                errno.EINVAL, f"Could not {verb} '{path!r}': file name contains a NUL byte", None
            ) from None
        self.st_mode = os.fstat(self.fd).st_mode
        special = special_file_kind(self.st_mode, char_devices=False)
        if stat.S_ISDIR(self.st_mode) or special:
            os.close(self.fd)
            raise Qcow2IOError(
                errno.EINVAL,
                f"'file' driver requires '{path}' to be a regular "
                f"file" + (f"; it is {special}" if special else ""),
                path,
            )
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        # A block or character device (QEMU's host_device): its size is the device's, not
        # st_size (0), and it cannot be truncated.
        self.is_device = stat.S_ISBLK(self.st_mode) or stat.S_ISCHR(self.st_mode)
        self._closed = False
        # Whether reads may ask for cached pages only (cleared once the file refuses).
        self.nowait_reads = bool(_RWF_NOWAIT)
        self._flush_error: Qcow2IOError | None = None
        # cache=unsafe (qemu-img convert's default for its target): writes are never
        # made durable; for copies that are thrown away if the machine goes down.
        self.no_flush = False
        # Whether anything was written since the last flush (a writer going around this
        # object, as copy_file_range does, sets it): a flush with nothing to make durable
        # is skipped, as QEMU's block layer skips it (write_gen == flushed_gen).
        self.unflushed = True
        # Bytes written through pwrite and pwritev since the last flush began (an upper
        # bound of what they left dirty in the page cache: see _write_keeps_gil).
        self.written_since_flush = 0

    def _fail(self, exc: OSError | OverflowError, what: str) -> Qcow2IOError:
        if isinstance(exc, OverflowError):  # an offset or length no file can have
            return Qcow2IOError(
                errno.EFBIG,
                f"{what} failed on '{self.path}': offset or length too large",
                self.path,
            )
        return Qcow2IOError(
            exc.errno or errno.EIO, f"{what} failed on '{self.path}': {exc.strerror}", self.path
        )

    def size(self) -> int:
        try:
            if self.is_device:
                return os.lseek(self.fd, 0, os.SEEK_END)
            return os.fstat(self.fd).st_size
        except (OSError, OverflowError) as exc:
            raise self._fail(exc, "fstat") from None

    def data_run(self, offset: int, end: int) -> tuple[bool, int]:
        """Whether the bytes at `offset` hold data, and where that state ends (at most `end`).

        Asked with SEEK_DATA/SEEK_HOLE; where those are not supported (a block device, a
        filesystem without them) everything is data, as QEMU reports it.
        """
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
                return False, end
            return True, end
        if data > offset:
            return False, min(data, end)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            return True, end
        return True, min(max(hole, offset + 1), end)

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on disk (qemu-img's 'disk size')."""
        return os.fstat(self.fd).st_blocks * 512

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly length bytes; bytes past end of file read as zeros. One os.pread
        into the returned bytes (no zero-filled buffer, no copy) when the file has them."""
        try:
            data = os.pread(self.fd, length, offset)
        except (OSError, OverflowError) as exc:
            raise self._fail(exc, "read") from None
        if len(data) == length:
            return data
        pieces = [data]
        done = len(data)
        while done < length:
            try:
                more = os.pread(self.fd, length - done, offset + done)
            except (OSError, OverflowError) as exc:
                raise self._fail(exc, "read") from None
            if not more:
                pieces.append(bytes(length - done))
                break
            pieces.append(more)
            done += len(more)
        return b"".join(pieces)

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill buf from offset; a short read past end of file leaves zeros."""
        if len(buf) >= _BOUNCE_MIN and _slow_destination(buf, offset):
            self._readinto_bounced(buf, offset)
            return
        done = 0
        total = len(buf)
        while done < total:
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except (OSError, OverflowError) as exc:
                raise self._fail(exc, "read") from None
            if n == 0:
                buf[done:] = bytes(total - done)
                return
            done += n

    def _readinto_bounced(self, buf: memoryview, offset: int) -> None:
        """readinto through this thread's bounce buffer, a piece at a time, each read to
        the same place within a page as its source (see _BOUNCE_MIN)."""
        bounce, address = _bounce_view()
        start = (offset - address) % 4096
        for done in range(0, len(buf), _BOUNCE_SIZE):
            piece = bounce[start : start + min(_BOUNCE_SIZE, len(buf) - done)]
            self.readinto(piece, offset + done)
            buf[done : done + len(piece)] = piece

    def preadv(self, views: list[memoryview], offset: int, length: int | None = None) -> None:
        """Fill byte views (format "B") back to back from offset with as few syscalls as
        possible (a scatter read straight into the caller's memory); past the end of the
        file they read as zeros, as readinto does. `length`, their total when the caller
        knows it, lets the common case (up to IOV_MAX views, read whole) be one call."""
        if length is not None and len(views) <= _IOV_MAX:
            try:
                n = os.preadv(self.fd, views, offset)
            except (OSError, OverflowError) as exc:
                raise self._fail(exc, "read") from None
            if n == length:
                return
            views = list(views)
            _drop_front(views, n)
            offset += n
            if n == 0:  # end of file: the rest reads as zeros
                for view in views:
                    view[:] = bytes(len(view))
                return
        while views:
            batch = views[:_IOV_MAX]
            views = views[_IOV_MAX:]
            left = sum(map(len, batch))
            while left:
                try:
                    n = os.preadv(self.fd, batch, offset)
                except (OSError, OverflowError) as exc:
                    raise self._fail(exc, "read") from None
                if n == 0:  # end of file: the rest reads as zeros
                    for view in batch + views:
                        view[:] = bytes(len(view))
                    return
                offset += n
                left -= n
                if left:  # a short read: retry the rest
                    _drop_front(batch, n)

    def readinto_cached(self, buf: memoryview, offset: int) -> bool:
        """Fill buf from the page cache alone, never waiting for the disk: True when it
        did, False when some of it is not cached (or the system cannot read that way),
        and the caller then reads with readinto. A caller holding a lock reads a cache
        hit without releasing it, and drops it only for reads that wait for the disk.
        Errors are left to readinto, which reports them."""
        if not self.nowait_reads:
            return False
        if _other_threads():  # (the caller may hold a lock they wait for: keep the GIL)
            held_read = _held_read()
            if held_read is None:
                return False
            done = held_read(self.fd, buf, offset)
            if done >= 0:
                return done == len(buf)
            if -done in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait_reads = False  # this file (or kernel) does not take the flag
            return False
        try:
            return os.preadv(self.fd, [buf], offset, _RWF_NOWAIT) == len(buf)
        except BlockingIOError:
            return False
        except (OSError, OverflowError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait_reads = False  # this file (or kernel) does not take the flag
            return False

    def _write_keeps_gil(self, offset: int, length: int) -> bool:
        """Whether a small write of [offset, offset + length), with other threads about,
        is made keeping the GIL: only when it cannot wait for the disk in any usual way.
        Each page it writes only part of is in the page cache (a cached-only read of one
        byte of it succeeds), so no page is read in; and the bytes this file has written
        since its last flush stay below _dirty_allowance, so the kernel has no reason to
        make the writer wait for writeback. (A page written whole is not read.)"""
        if self.written_since_flush + length > _dirty_allowance():
            return False
        end = offset + length
        first_page = offset - offset % _PAGE_SIZE
        last_page = (end - 1) - (end - 1) % _PAGE_SIZE
        if (offset != first_page or end < first_page + _PAGE_SIZE) and not self._page_cached(
            first_page
        ):
            return False
        return last_page == first_page or not end % _PAGE_SIZE or self._page_cached(last_page)

    def _page_cached(self, page_offset: int) -> bool:
        if not self.nowait_reads:
            return False
        held_read = _held_read()
        return held_read is not None and held_read(self.fd, _probe_byte, page_offset) == 1

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        if 0 < len(view) <= _HELD_WRITE_MAX and _other_threads():
            source = _addressable(view)
            if source is not None and self._write_keeps_gil(offset, len(view)):
                held = _held_write()
                if held is not None:  # (an error: the loop below tries again and reports it)
                    done = max(held[0](self.fd, source, offset), 0)
        self.written_since_flush += len(view)
        try:
            while done < len(view):
                try:
                    n = os.pwrite(self.fd, view[done:], offset + done)
                except (OSError, OverflowError) as exc:
                    raise self._fail(exc, "write") from None
                done += n
        finally:  # (set once the bytes are in: a flush begun before may not cover them)
            self.unflushed = True

    def pwritev(self, buffers: list, offset: int, length: int | None = None) -> None:
        """Write several buffers back to back at offset with as few syscalls as possible.
        `length`: their total, when the caller knows it and every buffer is a byte view
        (format "B"); then up to IOV_MAX of them written whole take one call."""
        try:
            self._pwritev(buffers, offset, length)
        finally:
            self.unflushed = True

    def _pwritev(self, buffers: list, offset: int, length: int | None) -> None:
        if length is not None:
            keeps_gil = (
                0 < length <= _HELD_WRITE_MAX
                and len(buffers) <= _IOV_MAX
                and _other_threads()
                and all(map(_writable_bytes, buffers))
                and self._write_keeps_gil(offset, length)
            )
            self.written_since_flush += length
            held = _held_write() if keeps_gil else None
            if held is not None:
                done = held[1](self.fd, buffers, offset)
                if done == length:
                    return
                if done > 0:  # (a short write: the rest the usual way)
                    buffers = list(buffers)
                    _drop_front(buffers, done)
                    offset += done
                    length -= done
        if length is not None and len(buffers) <= _IOV_MAX:
            try:
                n = os.pwritev(self.fd, buffers, offset)
            except (OSError, OverflowError) as exc:
                raise self._fail(exc, "write") from None
            if n == length:
                return
            buffers = list(buffers)
            _drop_front(buffers, n)  # (a short write: the rest the usual way)
            offset += n
        views = [memoryview(b).cast("B") for b in buffers]
        if length is None:
            self.written_since_flush += sum(map(len, views))
        while views:
            batch = views[:_IOV_MAX]
            views = views[_IOV_MAX:]
            total = sum(len(v) for v in batch)
            done = 0
            while done < total:
                try:
                    n = os.pwritev(self.fd, batch, offset + done)
                except (OSError, OverflowError) as exc:
                    raise self._fail(exc, "write") from None
                done += n
                _drop_front(batch, n)  # (a short write: retry the rest)
            offset += total

    def flush(self) -> None:
        """Make every completed write durable.

        A failed flush may have lost writes the kernel then forgets about, so every later
        flush of this file fails too: nothing is reported durable that may not be.
        """
        if self._flush_error is not None:
            raise self._flush_error
        if self.no_flush or not self.unflushed:
            return
        self.unflushed = False
        self.written_since_flush = 0
        try:
            os.fdatasync(self.fd)
        except (OSError, OverflowError) as exc:
            if self.is_device and isinstance(exc, OSError) and exc.errno == errno.EINVAL:
                return  # a device that keeps nothing to sync (/dev/null), as QEMU takes it
            self._flush_error = self._fail(exc, "flush")
            raise self._flush_error from None

    def truncate(self, length: int) -> None:
        """Set the file's length. A device keeps its size: shrinking is a no-op (as QEMU's
        host_device driver, the space past `length` is simply unused), growing fails."""
        if self.is_device:
            if length > self.size():
                raise Qcow2IOError(errno.EINVAL, "Cannot grow device files", self.path)
            return
        try:
            os.ftruncate(self.fd, length)
        except (OSError, OverflowError) as exc:
            raise self._fail(exc, "truncate") from None
        finally:
            self.unflushed = True

    def allocate(self, offset: int, length: int) -> None:
        """Reserve blocks (preallocation=falloc, a cluster a write allocates) without
        changing data. While other threads run, up to _HELD_ALLOCATE_MAX bytes are reserved
        by libc's fallocate keeping the GIL: a write's new cluster is a short change of the
        file's block map, and with other threads waiting, taking the GIL back after it
        costs more than the call (as for the writes that keep it). Anything else, and a
        failure of that call, goes through os.posix_fallocate, which reports the error or
        writes zeros where the file system cannot reserve."""
        try:
            if 0 < length <= _HELD_ALLOCATE_MAX and 0 <= offset < _OFFSET_END - length:
                fallocate = _fallocate(keep_gil=True) if _other_threads() else None
                if fallocate is not None and fallocate(self.fd, 0, offset, length) == 0:
                    return
            os.posix_fallocate(self.fd, offset, length)
        except (OSError, OverflowError) as exc:
            raise self._fail(exc, "fallocate") from None
        finally:
            self.unflushed = True

    def punch_hole(self, offset: int, length: int) -> bool:
        """Give the blocks back to the filesystem; the range then reads as zeros.

        Returns False where the filesystem cannot punch holes (the data stays).
        """
        fallocate = _fallocate()
        if fallocate is None or length <= 0:
            return False
        if offset < 0 or offset + length >= 1 << 63:
            raise Qcow2IOError(
                errno.EFBIG,
                f"punch hole failed on '{self.path}': offset or length too large",
                self.path,
            )
        try:
            result = fallocate(
                self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
            )
        finally:
            self.unflushed = True
        if result != 0:
            import _ctypes

            err = _ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise Qcow2IOError(
                err, f"punch hole failed on '{self.path}': {os.strerror(err)}", self.path
            )
        return True

    def lock(self, perm: int, shared: int) -> None:
        """Take QEMU-compatible locks for using `perm` while letting others have `shared`.

        ImageLockedError names the first permission another process holds against us.
        """
        from .errors import ImageLockedError

        def conflicts(byte: int) -> bool:
            probe = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
            return struct.unpack("@hhqqi4x", probe)[0] != fcntl.F_UNLCK

        for bit, name in _PERM_NAMES.items():
            if perm & bit and conflicts(_LOCK_SHARED_BASE + bit.bit_length() - 1):
                raise ImageLockedError(f'Failed to get "{name}" lock')
        for bit, name in _PERM_NAMES.items():
            if not shared & bit and conflicts(_LOCK_PERM_BASE + bit.bit_length() - 1):
                raise ImageLockedError(f'Failed to get shared "{name}" lock')
        for bit in _PERM_NAMES:
            index = bit.bit_length() - 1
            for held, base in (
                (perm & bit, _LOCK_PERM_BASE),
                (not shared & bit, _LOCK_SHARED_BASE),
            ):
                if held:
                    try:
                        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, base + index))
                    except OSError as exc:
                        raise ImageLockedError(
                            f"Failed to lock byte {base + index}: {exc.strerror}"
                        ) from None

    def lock_for_use(self, force_share: bool = False) -> None:
        """Lock as qemu-img does: writers share only reads; readers refuse writers unless
        force_share (qemu-img -U) lets them look at an image in use."""
        if self.writable:
            if force_share:
                from .errors import InvalidArgumentError

                raise InvalidArgumentError("force-share=on can only be used with read-only images")
            self.lock(
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            )
        elif force_share:
            self.lock(PERM_CONSISTENT_READ, PERM_ALL)
        else:
            self.lock(PERM_CONSISTENT_READ, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


# The class every image opens its files with. Crash and fault tests swap in a subclass
# that records or fails chosen operations; nothing else should change it.
host_file_class: type[HostFile] = HostFile


def open_host_file(
    path: str,
    writable: bool = False,
    create: bool = False,
    role: str | None = None,
    named_by: str | None = None,
) -> HostFile:
    """Open a file; with `role` and `named_by`, one an image names (see
    refuse_special_file), refused if special before and after it is opened."""
    if role is not None:
        refuse_special_file(path, role, named_by)
    file = host_file_class(path, writable=writable, create=create)
    if role is not None:
        try:
            refuse_special_file(path, role, named_by, file.st_mode)
        except BaseException:
            file.close()
            raise
    return file


def create_host_file(path: str) -> HostFile:
    """Create (or empty) a file for a new image, only once no one else is using it."""
    file = host_file_class(path, writable=True, create=True)
    try:
        file.lock_for_use()
        file.truncate(0)
    except BaseException:
        file.close()
        raise
    return file


class DeviceFile:
    """A BlockDevice as the container of an image's bytes (a data file given as a node, an
    NBD export beneath a qcow2 image): HostFile's interface over it. Like a block device
    it has a fixed size (it cannot grow) and no locks of its own (the device took its own
    when it opened, a server decides who writes); bytes past its end read as zeros."""

    is_device = True
    what = "data file node"  # what messages call it

    def __init__(self, device) -> None:
        self.device = device
        self.path = device.filename  # QEMU's name of the node, which map shows
        self.writable = not device.read_only
        self.no_flush = False

    def size(self) -> int:
        return self.device.size

    def allocated_bytes(self) -> int:
        return 0

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def readinto(self, buf: memoryview, offset: int) -> None:
        inside = max(0, min(len(buf), self.device.size - offset))
        if inside:
            self.device.readinto(offset, buf[:inside])
        if inside < len(buf):
            buf[inside:] = bytes(len(buf) - inside)

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        if offset + len(view) > self.device.size:
            raise Qcow2IOError(
                errno.ENOSPC,
                f"write of {len(view)} bytes at {offset} passes the end of the {self.what} "
                f"'{self.path}' ({self.device.size} bytes)",
                self.path,
            )
        self.device.write(offset, view)

    def pwritev(self, buffers: list, offset: int) -> None:
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            self.pwrite(view, offset)
            offset += len(view)

    def flush(self) -> None:
        if not self.no_flush:
            self.device.flush()

    def truncate(self, length: int) -> None:
        if length > self.device.size:
            raise Qcow2IOError(
                errno.EINVAL,
                f"Cannot grow the {self.what} '{self.path}' ({self.device.size} bytes) "
                f"to {length} bytes",
                self.path,
            )

    def allocate(self, offset: int, length: int) -> None:
        self.truncate(offset + length)

    def punch_hole(self, offset: int, length: int) -> bool:
        length = min(length, self.device.size - offset)
        if length <= 0:
            return False
        self.device.write_zeroes(offset, length, may_unmap=True)
        return True

    def data_run(self, offset: int, end: int) -> tuple[bool, int]:
        """Data unless the device says the bytes read as zeros."""
        end = min(end, self.device.size)
        if offset >= end:
            return False, max(offset + 1, end)
        first = next(iter(self.device.extents(offset, end - offset)))
        return not first.is_zero, first.offset + first.length

    def lock_for_use(self, force_share: bool = False) -> None:
        """The device locked what it opened (an export has no byte-range locks)."""

    def close(self) -> None:
        self.device.close()


class HostFileFilter:
    """A host file seen through a filter node beneath an image (blkdebug, throttle): the
    wrapped HostFile's interface, with the requests a subclass overrides passing the
    filter first and everything else (size, locking, paths) going straight through."""

    def __init__(self, file) -> None:
        self._file = file

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    @property
    def no_flush(self) -> bool:
        return self._file.no_flush

    @no_flush.setter
    def no_flush(self, value: bool) -> None:
        self._file.no_flush = value


TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Protocol

    class GrowableFile(Protocol):
        """What preallocate() needs of a container: HostFile, DeviceFile and the
        blkdebug and quorum files an image may sit on."""

        def allocate(self, offset: int, length: int) -> None: ...

        def pwrite(self, data, offset: int) -> None: ...


def preallocate(file: GrowableFile, offset: int, length: int, mode: str) -> None:
    """New bytes [offset, +length) of a file reserved ("falloc") or written as zeros
    ("full"), as QEMU's file driver preallocates them; a failure is worded as QEMU words
    it."""
    try:
        if mode == "falloc" and length:
            file.allocate(offset, length)
        elif mode == "full":
            chunk = memoryview(bytes(min(length, 1 << 20)))
            for pos in range(offset, offset + length, len(chunk) or 1):
                file.pwrite(chunk[: min(len(chunk), offset + length - pos)], pos)
    except Qcow2IOError as exc:
        raise preallocation_failure(exc, mode) from None
