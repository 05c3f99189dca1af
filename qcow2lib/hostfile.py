"""The only place that touches file descriptors.

Everything above works in offsets and buffers; this layer turns them into positional,
vectored system calls, durable flushes and hole punching, and maps OSError onto
Qcow2IOError. Tests swap in a subclass that records or fails chosen operations.
"""
from __future__ import annotations

import errno
import os

from .errors import Qcow2IOError

_FALLOC_FL_KEEP_SIZE = 0x01
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_FALLOC_FL_PUNCH_HOLE = 0x02

try:  # punch_hole needs fallocate(2) with flags, which os does not expose.
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate = _libc.fallocate
except (OSError, AttributeError):  # pragma: no cover - non-glibc hosts
    _fallocate = None


class HostFile:
    """A file opened for positional I/O; safe to share between threads."""

    def __init__(self, path: str, writable: bool = False, create: bool = False):
        self.path = path
        self.writable = writable
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise Qcow2IOError(exc.errno, f"Could not open '{path}': {exc.strerror}", path) from None
        self._closed = False

    def _fail(self, exc: OSError, what: str) -> Qcow2IOError:
        return Qcow2IOError(exc.errno or errno.EIO, f"{what} failed on '{self.path}': {exc.strerror}",
                            self.path)

    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as exc:
            raise self._fail(exc, "fstat") from None

    def allocated_bytes(self) -> int:
        """Bytes the file occupies on disk (qemu-img's 'disk size')."""
        return os.fstat(self.fd).st_blocks * 512

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly length bytes; bytes past end of file read as zeros."""
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill buf from offset; a short read past end of file leaves zeros."""
        done = 0
        total = len(buf)
        while done < total:
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as exc:
                raise self._fail(exc, "read") from None
            if n == 0:
                buf[done:] = bytes(total - done)
                return
            done += n

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise self._fail(exc, "write") from None
            done += n

    def pwritev(self, buffers: list, offset: int) -> None:
        """Write several buffers back to back at offset with as few syscalls as possible."""
        views = [memoryview(b).cast("B") for b in buffers]
        while views:
            batch = views[:_IOV_MAX]
            views = views[_IOV_MAX:]
            total = sum(len(v) for v in batch)
            done = 0
            while done < total:
                try:
                    n = os.pwritev(self.fd, batch, offset + done)
                except OSError as exc:
                    raise self._fail(exc, "write") from None
                done += n
                while n and batch:  # drop what was written; retry the rest
                    if n >= len(batch[0]):
                        n -= len(batch[0])
                        batch.pop(0)
                    else:
                        batch[0] = batch[0][n:]
                        n = 0
            offset += total

    def flush(self) -> None:
        """Make every completed write durable."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise self._fail(exc, "flush") from None

    def truncate(self, length: int) -> None:
        try:
            os.ftruncate(self.fd, length)
        except OSError as exc:
            raise self._fail(exc, "truncate") from None

    def allocate(self, offset: int, length: int) -> None:
        """Reserve blocks (preallocation=falloc) without changing data."""
        try:
            os.posix_fallocate(self.fd, offset, length)
        except OSError as exc:
            raise self._fail(exc, "fallocate") from None

    def punch_hole(self, offset: int, length: int) -> bool:
        """Give the blocks back to the filesystem; the range then reads as zeros.

        Returns False where the filesystem cannot punch holes (the data stays).
        """
        if _fallocate is None or length <= 0:
            return False
        if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise Qcow2IOError(err, f"punch hole failed on '{self.path}': {os.strerror(err)}",
                               self.path)
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)
