"""The FUSE filesystem over a BlockDevice: the disk, its snapshots and partitions as files.

    /disk.raw                the guest-visible disk (virtual size)
    /info.json               `qimg info --output=json` of the image
    /snapshots/<name>.raw    each internal snapshot whose name is a usable file name
    /snapshots/id-<ID>.raw   each internal snapshot, always
    /partitions/<n>.raw      each MBR/GPT partition found on the disk

Everything goes through the engine's BlockDevice interface; FUSE calls arrive on several
threads, which BlockDevice allows. Partition files are slices of the disk; the table is
read again after any write that touches a sector the last scan read.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

import mfusepy

from qcow2lib.blockdev import BlockDevice, Extent
from qcow2lib.errors import InvalidArgumentError, Qcow2Error, ReadOnlyError

from . import partitions as partition_tables

if TYPE_CHECKING:
    from qcow2lib.snapshot_table import Snapshot

DISK_FILE = "disk.raw"
INFO_FILE = "info.json"
SNAPSHOT_DIR = "snapshots"
PARTITION_DIR = "partitions"
FILE_SUFFIX = ".raw"
NAME_MAX = 255
SEEK_DATA, SEEK_HOLE = 3, 4
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
MAX_IO = 1 << 20  # the largest request libfuse 3 accepts (256 pages)
# ioctl _IOR('q', 1, u64) on the mount's root: the serving process's pid
SERVER_PID_IOCTL = (2 << 30) | (8 << 16) | (ord("q") << 8) | 1
# SEEK_DATA/SEEK_HOLE look at the disk's extents this much at first, twice as far at each
# next step, and at most EXTENT_WINDOW a step: the answer is usually near (the end of the
# run cp just copied). cp's lseeks over a 100 GiB disk holding 1024 runs of data took 179
# us each in-process with 1 GiB steps (4 MiB first: 92 us, 16 MiB: 73); through the
# mount, 266-294 us each, a quarter of cp's time.
FIRST_EXTENT_WINDOW = 16 << 20
EXTENT_WINDOW = 1 << 30


class DiskSlice(BlockDevice):
    """`length` bytes of a device from `offset` on: a partition as a device of its own."""

    def __init__(self, device: BlockDevice, offset: int, length: int, read_only: bool):
        self.device = device
        self.offset = offset
        self.size = length
        self.read_only = read_only or device.read_only
        self.format = "raw"
        self.filename = device.filename

    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        return self.device.readinto(self.offset + offset, view)

    def write(self, offset: int, data) -> None:
        self.check_request(offset, len(data), write=True)
        self.device.write(self.offset + offset, data)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        self.device.write_zeroes(self.offset + offset, length, may_unmap)

    def discard(self, offset: int, length: int) -> None:
        self.check_request(offset, length, write=True)
        self.device.discard(self.offset + offset, length)

    def flush(self) -> None:
        self.device.flush()

    def extents(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        if length is None:
            length = self.size - offset
        self.check_request(offset, length)
        return [
            ext._replace(offset=ext.offset - self.offset)
            for ext in self.device.extents(self.offset + offset, length)
        ]

    def close(self) -> None:
        """The slice owns nothing: the disk is closed by its owner."""


def snapshot_file_names(snapshots: list[Snapshot]) -> dict[str, Snapshot]:
    """File name -> snapshot: `id-<ID>.raw` for every snapshot with a unique usable ID,
    `<name>.raw` where the name is a usable file name no other entry claims.

    Usable: not empty, not '.' or '..', no '/' or NUL, short enough for NAME_MAX.
    """

    def usable(text: str) -> bool:
        name = text + FILE_SUFFIX
        return (
            text not in ("", ".", "..")
            and "/" not in text
            and "\0" not in text
            and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
        )

    files: dict[str, Snapshot] = {}
    id_counts: dict[str, int] = {}
    name_counts: dict[str, int] = {}
    for snap in snapshots:
        id_counts[snap.id] = id_counts.get(snap.id, 0) + 1
        name_counts[snap.name] = name_counts.get(snap.name, 0) + 1
    for snap in snapshots:
        if id_counts[snap.id] == 1 and usable("id-" + snap.id):
            files[f"id-{snap.id}{FILE_SUFFIX}"] = snap
    for snap in snapshots:
        name = snap.name + FILE_SUFFIX
        if name_counts[snap.name] == 1 and usable(snap.name) and name not in files:
            files[name] = snap
    return files


class _Partitions:
    """The disk's partition table, scanned lazily and again after a write touches it."""

    def __init__(self, disk: BlockDevice):
        self.disk = disk
        self.lock = threading.Lock()
        self.scan: partition_tables.Scan | None = None
        self.slices: dict[str, DiskSlice] = {}

    def files(self) -> dict[str, DiskSlice]:
        with self.lock:
            if self.scan is None:
                self.scan = partition_tables.scan(self.disk.read, self.disk.size)
                self.slices = {
                    f"{part.number}{FILE_SUFFIX}": DiskSlice(
                        self.disk, part.offset, part.length, self.disk.read_only
                    )
                    for part in self.scan.partitions
                }
            return self.slices

    def written(self, offset: int, length: int) -> None:
        """Forget the table when a write lands on a sector it was read from."""
        with self.lock:
            if self.scan is not None and self.scan.touches(offset, length):
                self.scan = None


def _fuse_errors(method):
    """Engine errors become the errno a program expects; the message goes to stderr."""

    def wrapper(self, *args):
        try:
            return method(self, *args)
        except ReadOnlyError as exc:
            raise mfusepy.FuseOSError(errno.EROFS) from exc
        except InvalidArgumentError as exc:
            raise mfusepy.FuseOSError(errno.EINVAL) from exc
        except Qcow2Error as exc:
            print(f"{self.prog}: {method.__name__} {args[0]}: {exc}", file=sys.stderr, flush=True)
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
            raise mfusepy.FuseOSError(code) from exc

    wrapper.__name__ = method.__name__
    return wrapper


class DiskFilesystem(mfusepy.Operations):
    """The tree described in the module docstring, over `device` (the image's disk).

    `snapshot_source` is the qcow2 image whose internal snapshots are listed (None for
    none); `info_text` renders info.json afresh on each open; `on_ready` runs once the
    kernel has the filesystem (what a daemonizing parent waits for).
    """

    use_ns = True

    def __init__(
        self,
        device: BlockDevice,
        *,
        snapshot_source=None,
        info_text: Callable[[], str] | None = None,
        on_ready: Callable[[], None] | None = None,
        prog: str = "fuse_mount",
    ):
        self.device = device
        self.prog = prog
        self.info_text = info_text
        self.on_ready = on_ready
        self.read_only = device.read_only
        self.image_path = os.path.abspath(device.filename)  # the server may chdir("/")
        self.mounted_at = time.time_ns()
        self.partitions = _Partitions(device)
        self.snapshot_files: dict[str, Snapshot] = {}
        self.snapshot_views: dict[str, BlockDevice] = {}
        self._snapshot_lock = threading.Lock()
        self.snapshot_source = snapshot_source
        if snapshot_source is not None:
            from qcow2lib.snapshots import list_snapshots

            self.snapshot_files = snapshot_file_names(list_snapshots(snapshot_source))
        self._info_lock = threading.Lock()
        self._info: dict[int, bytes] = {}
        self._seek_window: tuple | None = None  # (device, start, end, extents): lseek's last
        self._next_fh = 1

    # -- the tree --
    def _split(self, path: str) -> tuple[str, str]:
        head, _, name = path[1:].partition("/")
        return head, name

    def _device(self, path: str) -> BlockDevice:
        head, name = self._split(path)
        if head == DISK_FILE and not name:
            return self.device
        if head == SNAPSHOT_DIR and name in self.snapshot_files:
            return self._snapshot_view(name)
        if head == PARTITION_DIR and name:
            part = self.partitions.files().get(name)
            if part is not None:
                return part
        raise mfusepy.FuseOSError(errno.ENOENT)

    def _snapshot_view(self, name: str) -> BlockDevice:
        from qcow2lib.snapshots import SnapshotView

        with self._snapshot_lock:
            view = self.snapshot_views.get(name)
            if view is None:
                snap = self.snapshot_files[name]
                view = SnapshotView(self.snapshot_source, id=snap.id, name=snap.name)
                self.snapshot_views[name] = view
            return view

    def _dir_entries(self, path: str) -> list[str] | None:
        if path == "/":
            return [
                DISK_FILE,
                *([INFO_FILE] if self.info_text else []),
                SNAPSHOT_DIR,
                PARTITION_DIR,
            ]
        if path == f"/{SNAPSHOT_DIR}":
            return list(self.snapshot_files)
        if path == f"/{PARTITION_DIR}":
            return sorted(self.partitions.files(), key=lambda name: int(name.split(".")[0]))
        return None

    def _times(self) -> dict:
        return {
            "st_atime": self.mounted_at,
            "st_mtime": self.mounted_at,
            "st_ctime": self.mounted_at,
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
        }

    # -- FUSE operations --
    def init_with_config(self, conn_info, config_3) -> None:
        if conn_info is not None:
            conn_info.max_write = MAX_IO
            conn_info.max_read = MAX_IO
            conn_info.max_readahead = MAX_IO
        if self.on_ready is not None:
            self.on_ready()

    @_fuse_errors
    def getattr(self, path: str, fh=None) -> dict:
        entries = self._dir_entries(path)
        if entries is not None:
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, **self._times()}
        if path == f"/{INFO_FILE}" and self.info_text:
            with self._info_lock:
                opened = self._info.get(fh.fh) if fh is not None else None
            size = len(opened if opened is not None else self.info_text().encode())
            return {
                "st_mode": stat.S_IFREG | 0o444,
                "st_nlink": 1,
                "st_size": size,
                **self._times(),
            }
        device = self._device(path)
        writable = not device.read_only
        allocated = device.size
        if device is self.device:  # what du shows: the image file's share of the disk
            allocated = min(allocated, self._image_allocation())
        return {
            "st_mode": stat.S_IFREG | (0o644 if writable else 0o444),
            "st_nlink": 1,
            "st_size": device.size,
            "st_blksize": 65536,
            "st_blocks": (allocated + 511) // 512,
            **self._times(),
        }

    def _image_allocation(self) -> int:
        """Bytes the image file takes on the host (its backing files not counted)."""
        try:
            return os.stat(self.image_path).st_blocks * 512
        except OSError:
            return 0

    @_fuse_errors
    def readdir(self, path: str, fh):
        entries = self._dir_entries(path)
        if entries is None:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", *entries]

    @_fuse_errors
    def open(self, path: str, fi) -> int:
        writing = fi.flags & os.O_ACCMODE != os.O_RDONLY
        if path == f"/{INFO_FILE}" and self.info_text:
            if writing:
                raise mfusepy.FuseOSError(errno.EACCES)
            text = self.info_text().encode()
            with self._info_lock:
                fi.fh = self._next_fh
                self._next_fh += 1
                self._info[fi.fh] = text
            fi.direct_io = 1  # its size changes as the image grows
            return 0
        device = self._device(path)
        if writing and device.read_only:
            raise mfusepy.FuseOSError(errno.EROFS)
        if fi.flags & os.O_TRUNC and device.size:
            raise mfusepy.FuseOSError(errno.EPERM)
        fi.fh = 0
        fi.keep_cache = int(self.read_only)  # nothing can change a read-only mount's data
        return 0

    def release(self, path: str, fi) -> int:
        with self._info_lock:
            self._info.pop(fi.fh, None)
        return 0

    @_fuse_errors
    def read(self, path: str, buffer: memoryview, offset: int, fi) -> int:  # type: ignore[override]
        """Read into `buffer`, libfuse's reply buffer (see _Fuse.read): the bytes are made
        where they are sent from, without a bytes object and a copy of it."""
        if fi.fh:
            with self._info_lock:
                data = self._info[fi.fh][offset : offset + len(buffer)]
            buffer[: len(data)] = data
            return len(data)
        device = self._device(path)
        size = max(0, min(len(buffer), device.size - offset))
        return device.readinto(offset, buffer[:size]) if size else 0

    def _written(self, path: str, device: BlockDevice, offset: int, length: int) -> None:
        disk_offset = offset + (device.offset if isinstance(device, DiskSlice) else 0)
        self.partitions.written(disk_offset, length)

    @_fuse_errors
    def write(self, path: str, data: memoryview, offset: int, fi) -> int:  # type: ignore[override]
        device = self._device(path)
        if device.read_only:
            raise mfusepy.FuseOSError(errno.EROFS)
        if offset >= device.size and data:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        data = data[: device.size - offset]  # a short write at the end, then ENOSPC
        device.write(offset, data)
        self._written(path, device, offset, len(data))
        return len(data)

    @_fuse_errors
    def truncate(self, path: str, length: int, fh=None) -> None:
        device = self._device(path)
        if length != device.size:  # the disk's size is the image's, not the file's to change
            raise mfusepy.FuseOSError(errno.EPERM)

    def _refuse_tree_change(self, path: str, *args) -> None:
        """The tree is the image's: no file is made, removed, renamed or linked, and no
        mode, owner or time changes (EROFS on a read-only mount, else EPERM; left
        undefined, libfuse would answer ENOSYS, 'Function not implemented')."""
        raise mfusepy.FuseOSError(errno.EROFS if self.read_only else errno.EPERM)

    chmod = chown = utimens = _refuse_tree_change
    create = mknod = mkdir = symlink = link = _refuse_tree_change
    unlink = rmdir = rename = _refuse_tree_change

    @_fuse_errors
    def fsync(self, path: str, datasync, fi) -> None:
        device = self._device(path)
        if not device.read_only:
            device.flush()

    @_fuse_errors
    def fallocate(self, path: str, mode: int, offset: int, length: int, fi) -> None:
        """Punching a hole or zeroing a range: the engine's discard-backed zero writes.
        Other modes (allocating, changing the size) are not offered."""
        device = self._device(path)
        if device.read_only:
            raise mfusepy.FuseOSError(errno.EROFS)
        if mode not in (
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_ZERO_RANGE,
            FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
        ):
            raise mfusepy.FuseOSError(errno.EOPNOTSUPP)
        length = min(length, device.size - offset)
        if offset < 0 or length < 0:
            raise mfusepy.FuseOSError(errno.EINVAL)
        if length == 0:
            return
        device.write_zeroes(offset, length, may_unmap=bool(mode & FALLOC_FL_PUNCH_HOLE))
        self._written(path, device, offset, length)

    @_fuse_errors
    def lseek(self, path: str, offset: int, whence: int, fi) -> int:
        """SEEK_DATA / SEEK_HOLE from the device's extents: holes read as zeros and hold
        no data (unallocated, or zero clusters)."""
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise mfusepy.FuseOSError(errno.EINVAL)
        if fi.fh:  # info.json: all data (ENOSYS would end lseek for the whole mount)
            with self._info_lock:
                size = len(self._info[fi.fh])
            if offset < 0 or offset >= size:
                raise mfusepy.FuseOSError(errno.ENXIO)
            return offset if whence == SEEK_DATA else size
        device = self._device(path)
        if offset < 0 or offset >= device.size:
            raise mfusepy.FuseOSError(errno.ENXIO)
        want_data = whence == SEEK_DATA
        position, window = offset, FIRST_EXTENT_WINDOW
        while position < device.size:
            span = min(window, device.size - position)
            extents, position = self._window_extents(device, position, span)
            for ext in extents:
                if ext.offset + ext.length <= offset:
                    continue  # (a kept window that starts before the offset)
                is_hole = ext.is_zero and not ext.is_data
                if is_hole != want_data:
                    return max(ext.offset, offset)
            window = min(2 * window, EXTENT_WINDOW)
        if want_data:
            raise mfusepy.FuseOSError(errno.ENXIO)
        return device.size

    def _window_extents(self, device: BlockDevice, position: int, span: int) -> tuple[list, int]:
        """The extents of a window of `device` holding `position` (from it, `span` long,
        if none is kept) and the window's end. A read-only device's last window is kept:
        cp asks SEEK_HOLE where the SEEK_DATA before it found data, inside the window that
        answer came from (its lseeks over a 100 GiB disk of 1024 runs: half the walks)."""
        kept = self._seek_window
        if kept is not None and kept[0] is device and kept[1] <= position < kept[2]:
            return kept[3], kept[2]
        extents = device.extents(position, span)
        if device.read_only:  # (nothing changes its extents)
            self._seek_window = (device, position, position + span, extents)
        return extents, position + span

    # No getxattr: libfuse answers ENOSYS, after which the kernel asks no more. While a
    # filesystem has one, the kernel asks it for security.capability before every write
    # (to clear it), a second round trip per write (4 KiB direct writes: 1.6x the time).

    def ioctl(self, path: str, cmd: int, arg, fh, flags: int, data) -> int:
        """SERVER_PID_IOCTL on the root names the serving process, so that an unmount
        can wait until it has closed the image."""
        if path == "/" and cmd == SERVER_PID_IOCTL:
            ctypes.memmove(data, os.getpid().to_bytes(8, sys.byteorder), 8)
            return 0
        raise mfusepy.FuseOSError(errno.ENOTTY)

    def statfs(self, path: str) -> dict:
        """Sized like the disk, 'used' what the image file takes on the host: df shows
        how much of the virtual disk the image has allocated."""
        block = 4096
        total = (self.device.size + block - 1) // block
        used = self._image_allocation() // block
        free = max(0, total - used)
        return {
            "f_bsize": block,
            "f_frsize": block,
            "f_blocks": total,
            "f_bfree": free,
            "f_bavail": free,
            "f_files": 0,
            "f_ffree": 0,
            "f_namemax": NAME_MAX,
        }

    def destroy(self, path: str) -> None:
        for view in self.snapshot_views.values():
            view.close()
        if not self.device.read_only:
            self.device.flush()


# Set in each libfuse thread whose Python thread state is kept (see _Fuse._wrapper).
_kept_state = threading.local()
# A writable memoryview of C memory (libfuse's request and reply buffers), from CPython.
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PYBUF_WRITE = 0x200


class _Fuse(mfusepy.FUSE):
    """mfusepy's FUSE with the libfuse 3 lseek callback, which mfusepy declares but does
    not forward (SEEK_DATA/SEEK_HOLE, so sparse copies keep their holes); reads and writes
    hand libfuse's buffers to the filesystem as memoryviews (mfusepy copies each request's
    data into a bytes object, and each reply's out of one: dd of a whole disk in 1 MiB
    reads, 1.21 -> 1.12 s a GiB); and the Python thread state of each of libfuse's threads
    kept between requests."""

    def _wrapper(self, func, *args, **kwargs):
        """ctypes runs a callback on a thread Python did not start in a thread state made
        for that call and freed after it: each request then began afresh (per-thread
        buffers and decoders made again, the thread registered again). One more
        PyGILState_Ensure, never released, keeps the state for the thread's life (4 KiB
        direct reads, 8 at a time, 16 threads: 3.55 -> 2.26 s per 20000)."""
        if not getattr(_kept_state, "kept", False):
            ctypes.pythonapi.PyGILState_Ensure()
            _kept_state.kept = True
        return super()._wrapper(func, *args, **kwargs)

    def read(self, path: bytes | None, buf, size: int, offset: int, fip) -> int:
        name = None if path is None else path.decode(self.encoding, self.errors)
        reply = _memory_view(buf, size, _PYBUF_WRITE)
        return self.operations.read(name, reply, offset, fip.contents)

    def write(self, path: bytes | None, buf, size: int, offset: int, fip) -> int:
        name = None if path is None else path.decode(self.encoding, self.errors)
        request = _memory_view(buf, size, _PYBUF_WRITE)
        return self.operations.write(name, request, offset, fip.contents)

    def lseek(self, path: bytes | None, offset: int, whence: int, fip) -> int:
        name = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.lseek(name, offset, whence, fip.contents)


def server_pid(mountpoint: str) -> int:
    """The pid of the process serving the fuse_mount at `mountpoint` (OSError if none:
    another filesystem answers ENOTTY). Asked of the server itself: a stopped one never
    answers."""
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        answer = bytearray(8)
        fcntl.ioctl(fd, SERVER_PID_IOCTL, answer, True)
    finally:
        os.close(fd)
    return int.from_bytes(answer, sys.byteorder)


def serve(
    filesystem: DiskFilesystem, mountpoint: str, *, allow_other: bool = False, max_threads: int = 2
) -> int:
    """Mount and serve until unmounted or signalled; libfuse's return code (0: unmounted,
    8: its loop ended, which a SIGINT/SIGTERM/SIGHUP does).

    Requests run their Python one at a time (the GIL): two threads let one request wait on
    the disk while another is served; more only hand the GIL to each other (4 KiB direct
    reads, 8 at a time, 20000 of them, medians of 7: 1.30 s with 2 threads, 1.64 with 4,
    2.3 with 16; from a cold page cache 2 and 4 threads alike, a third faster than one)."""
    options = {
        "fsname": "qcow2lib",
        "subtype": "qcow2lib",
        "max_threads": max_threads,
        "max_idle_threads": max_threads,
        "max_read": MAX_IO,
        "ro": filesystem.read_only,
        "allow_other": allow_other,
        "default_permissions": True,
        "kernel_cache": filesystem.read_only,
    }
    try:
        _Fuse(
            filesystem,
            mountpoint,
            raw_fi=True,
            foreground=True,
            nothreads=False,
            **{key: value for key, value in options.items() if value is not False},
        )
    except RuntimeError as exc:
        if exc.args and isinstance(exc.args[0], int):
            return exc.args[0]
        raise
    return 0
