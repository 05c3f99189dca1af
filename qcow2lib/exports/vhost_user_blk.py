"""A vhost-user-blk back-end: any `BlockDevice` as a QEMU guest's virtio-blk disk.

    server = VhostUserBlkServer(device, "/run/disk.sock", num_queues=2)
    server.start()          # QEMU: -chardev socket,id=c,path=/run/disk.sock
    ...                     #       -device vhost-user-blk-pci,chardev=c,num-queues=2
    server.shutdown()

The server listens on a Unix socket and serves one front-end at a time; when it
disconnects (QEMU quit, or will reconnect) the device is flushed and the server waits for
the next one. Requests are virtio-blk's (read, write, flush, get-id, discard, write
zeroes), served in order by each queue's thread; once one is slow, the others go to a
worker pool, so several run at once and finish in any order (vhost_user.py). Reads go
straight into the guest's pages (`BlockDevice.readv`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext

from ..blockdev import BlockDevice
from ..errors import InvalidArgumentError, Qcow2Error
from .stop_signals import hold_stop_signals, stop_on_signals
from .vhost_user import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, VhostUserConnection
from .virtqueue import DescriptorChain, GuestMemory, GuestMemoryError, Segment

SECTOR = 512

# virtio-blk feature bits
BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14

# request types and status values
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

REQUEST_HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
RANGE_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
RANGE_F_UNMAP = 1
ID_BYTES = 20

# limits we announce in the configuration space
SIZE_MAX = 1 << 20  # largest single buffer
# Buffers per request: the largest queue QEMU's vhost-user-blk-pci takes (1024) less header
# and status. Linux then sends a 1 MiB read of 4 KiB pages as one request, not three (each
# request has a fixed cost here), and a request's buffers stay within IOV_MAX for preadv.
SEG_MAX = 1022
MAX_RANGE_SECTORS = 1 << 22  # 2 GiB per discard / write-zeroes segment
MAX_RANGE_SEGMENTS = 16
IO_CHUNK = 1 << 20  # a request's data moves through buffers this big at most

# struct virtio_blk_config, up to write_zeroes_may_unmap and its padding (60 bytes)
BLK_CONFIG = struct.Struct("<QII HBB I BBHI BBH III IIB3x")


class VirtioBlk:
    """The virtio-blk device model: features, configuration space and requests."""

    def __init__(
        self,
        device: BlockDevice,
        read_only: bool,
        num_queues: int,
        serial: str,
        log: logging.Logger,
    ):
        self.device = device
        self.read_only = read_only or device.read_only
        self.num_queues = num_queues
        self.serial = serial.encode("utf-8")[:ID_BYTES]
        self.log = log
        features = [
            F_VERSION_1,
            F_RING_INDIRECT_DESC,
            F_RING_EVENT_IDX,
            BLK_F_SIZE_MAX,
            BLK_F_SEG_MAX,
            BLK_F_BLK_SIZE,
            BLK_F_FLUSH,
            BLK_F_TOPOLOGY,
            BLK_F_MQ,
        ]
        features += [BLK_F_RO] if self.read_only else [BLK_F_DISCARD, BLK_F_WRITE_ZEROES]
        self.features = sum(1 << bit for bit in features)

    def config(self) -> bytes:
        return BLK_CONFIG.pack(
            self.device.size // SECTOR,
            SIZE_MAX,
            SEG_MAX,
            0,
            0,
            0,  # no geometry
            SECTOR,  # blk_size
            0,
            0,
            1,
            0,  # topology: 512-byte blocks, no hint
            0,
            0,
            self.num_queues,  # writeback, unused, num_queues
            MAX_RANGE_SECTORS,
            MAX_RANGE_SEGMENTS,
            1,  # discard
            MAX_RANGE_SECTORS,
            MAX_RANGE_SEGMENTS,
            1,
        )  # write zeroes, may unmap

    def disconnected(self) -> None:
        if not self.read_only:
            self.device.flush()

    def handle(self, memory: GuestMemory, chain: DescriptorChain) -> int:
        """Serve one request; the status byte is the last byte the driver let us write."""
        if chain.addrs is not None:
            written = self._handle_in_order(memory, chain)
            if written >= 0:
                return written
        writable = chain.writable
        if not writable or writable[-1][1] == 0:
            self.log.warning("virtio-blk request %d has no status byte", chain.head)
            return 0
        last_addr, last_length = writable[-1]
        try:
            status_byte = memory.locate_view(last_addr + last_length - 1, 1)
        except GuestMemoryError as exc:  # the outcome could not be told: do nothing
            self.log.warning("virtio-blk request %d: status byte: %s", chain.head, exc)
            return 0
        if last_length == 1:  # (Linux gives the status byte a descriptor of its own)
            into_guest = writable[:-1]
        else:
            into_guest = writable[:-1] + [(last_addr, last_length - 1)]
        readable = chain.readable
        written = 0
        try:
            if readable and readable[0][1] == REQUEST_HEADER.size:  # the header alone
                header: bytes | memoryview = _view_or_gather(memory, readable[0])
                out = readable[1:]
            else:
                header = _gather(memory, readable, 0, REQUEST_HEADER.size)
                out = _skip(readable, REQUEST_HEADER.size)
            if len(header) < REQUEST_HEADER.size:
                status = S_IOERR
            else:
                kind, _, sector = REQUEST_HEADER.unpack(header)
                status, written = self._serve(kind, sector, memory, out, into_guest)
        except GuestMemoryError as exc:
            self.log.warning("virtio-blk request %d: %s", chain.head, exc)
            status, written = S_IOERR, 0
        status_byte[0] = status
        return written + 1

    def _handle_in_order(self, memory: GuestMemory, chain: DescriptorChain) -> int:
        """handle() of the common chain, read from an in-order table: the header alone,
        the data buffers, the status byte alone. -1 for anything else, and for buffers
        outside guest memory (handle() then serves it, and says what is wrong)."""
        addrs, lengths = chain.addrs, chain.lengths
        assert addrs is not None and lengths is not None  # (the caller checked)
        last = len(addrs) - 1
        if last < 1 or lengths[0] != REQUEST_HEADER.size or lengths[last] != 1:
            return -1
        try:
            status_byte = memory.locate_view(addrs[last], 1)
            header = memory.locate_view(addrs[0], REQUEST_HEADER.size)
            kind, _, sector = REQUEST_HEADER.unpack(header)
            if chain.readable_count != (1 if kind == T_IN else last if kind == T_OUT else -1):
                return -1
            views = memory.resolve_lists(addrs[1:last], lengths[1:last])
        except GuestMemoryError:
            return -1
        total = sum(lengths) - REQUEST_HEADER.size - 1
        status, written = self._transfer(kind, sector, views, total)
        status_byte[0] = status
        return written + 1

    def _transfer(
        self, kind: int, sector: int, views: list[memoryview], total: int
    ) -> tuple[int, int]:
        """(status, bytes written into the guest) of a read (T_IN) into or a write (T_OUT)
        from the guest's byte views `views`, `total` bytes in all."""
        try:
            if kind == T_IN:
                return self._read(sector, views, total)
            return self._write(sector, views, total), 0
        except (Qcow2Error, OSError) as exc:
            self.log.warning(
                "virtio-blk request type %d at sector %d failed: %s", kind, sector, exc
            )
            return S_IOERR, 0

    def _serve(
        self, kind: int, sector: int, memory: GuestMemory, out: list[Segment], into: list[Segment]
    ) -> tuple[int, int]:
        """(status, bytes written into the guest) for one request."""
        try:
            if kind in (T_IN, T_OUT):
                views = memory.resolve(into if kind == T_IN else out)  # all checked first
                return self._transfer(kind, sector, views, sum(map(len, views)))
            if kind == T_FLUSH:
                if not self.read_only:
                    self.device.flush()
                return S_OK, 0
            if kind == T_GET_ID:
                space = sum(length for _, length in into)
                ident = self.serial.ljust(ID_BYTES, b"\0")[: min(space, ID_BYTES)]
                _scatter(memory, into, ident)
                return S_OK, len(ident)
            if kind in (T_DISCARD, T_WRITE_ZEROES):
                return self._ranges(kind, memory, out), 0
            return S_UNSUPP, 0
        except (Qcow2Error, OSError) as exc:
            self.log.warning(
                "virtio-blk request type %d at sector %d failed: %s", kind, sector, exc
            )
            return S_IOERR, 0

    def _span(self, sector: int, length: int) -> int | None:
        """The byte offset of a request, or None when it is misaligned or outside the disk."""
        offset = sector * SECTOR
        if length % SECTOR or offset + length > self.device.size:
            return None
        return offset

    def _read(self, sector: int, views: list[memoryview], total: int) -> tuple[int, int]:
        """Straight into the guest's pages (BlockDevice.readv): no buffer in between."""
        offset = self._span(sector, total)
        if offset is None:
            return S_IOERR, 0
        for batch, size in _batches(views, total):
            self.device.readv(offset, batch, size)
            offset += size
        return S_OK, total

    def _write(self, sector: int, views: list[memoryview], total: int) -> int:
        offset = self._span(sector, total)
        if self.read_only or offset is None:
            return S_IOERR
        for batch, size in _batches(views, total):
            # straight from the guest's pages: it leaves them alone until we complete
            self.device.writev(offset, batch, size)
            offset += size
        return S_OK

    def _ranges(self, kind: int, memory: GuestMemory, out: list[Segment]) -> int:
        """DISCARD or WRITE_ZEROES: a list of (sector, num_sectors, flags) segments."""
        if self.read_only:
            return S_IOERR
        total = sum(length for _, length in out)
        if (
            total % RANGE_SEGMENT.size
            or not total
            or total > MAX_RANGE_SEGMENTS * RANGE_SEGMENT.size
        ):
            return S_IOERR
        data = _gather(memory, out, 0, total)
        ranges = [RANGE_SEGMENT.unpack_from(data, i) for i in range(0, total, RANGE_SEGMENT.size)]
        for sector, count, flags in ranges:
            if flags & ~RANGE_F_UNMAP or (kind == T_DISCARD and flags & RANGE_F_UNMAP):
                return S_UNSUPP
            if count > MAX_RANGE_SECTORS or self._span(sector, count * SECTOR) is None:
                return S_IOERR
        for sector, count, flags in ranges:
            if kind == T_DISCARD:
                self.device.discard(sector * SECTOR, count * SECTOR)
            else:
                self.device.write_zeroes(
                    sector * SECTOR, count * SECTOR, may_unmap=bool(flags & RANGE_F_UNMAP)
                )
        return S_OK


def _skip(segments: list[Segment], skip: int) -> list[Segment]:
    """The segments that follow the first `skip` bytes (only a segment cut in two is new)."""
    for index, (guest_addr, length) in enumerate(segments):
        if skip < length:
            if not skip:
                return segments[index:]
            return [(guest_addr + skip, length - skip)] + segments[index + 1 :]
        skip -= length
    return []


def _view_or_gather(memory: GuestMemory, segment: Segment) -> bytes | memoryview:
    """The bytes of one buffer: a view where it lies in one memory region."""
    try:
        return memory.locate_view(*segment)
    except GuestMemoryError:  # across regions, or outside memory (which _gather names)
        return _gather(memory, [segment], 0, segment[1])


def _gather(memory: GuestMemory, segments: list[Segment], skip: int, length: int) -> bytes:
    """Up to `length` bytes of the buffers, after `skip` bytes."""
    parts = []
    for guest_addr, segment_length in _skip(segments, skip):
        if length <= 0:
            break
        n = min(length, segment_length)
        parts.append(memory.read(guest_addr, n))
        length -= n
    return b"".join(parts)


def _scatter(memory: GuestMemory, segments: list[Segment], data: bytes) -> None:
    done = 0
    for guest_addr, length in segments:
        if done >= len(data):
            break
        n = min(length, len(data) - done)
        memory.write(guest_addr, data[done : done + n])
        done += n


def _batches(views: list[memoryview], total: int):
    """(views, bytes) batches of at most IO_CHUNK bytes in all, in order, of views
    `total` bytes long: a request of many small buffers becomes few device calls, a huge
    one no huge buffer."""
    if total <= IO_CHUNK:  # the common case: the whole request at once
        yield views, total
        return
    batch: list[memoryview] = []
    size = 0
    for view in views:
        while view:
            n = min(len(view), IO_CHUNK - size)
            batch.append(view[:n])
            size += n
            view = view[n:]
            if size == IO_CHUNK:
                yield batch, size
                batch, size = [], 0
    if batch:
        yield batch, size


class VhostUserBlkServer:
    """Listens on `socket_path` and serves `device` to one vhost-user front-end at a time.

    `start()` binds the socket (it exists when start returns) and serves on a thread;
    `shutdown()` disconnects the front-end, waits for requests in flight, flushes and
    removes the socket. The device stays open: its owner closes it."""

    def __init__(
        self,
        device: BlockDevice,
        socket_path: str,
        *,
        read_only: bool = False,
        num_queues: int = 1,
        workers: int | None = None,
        serial: str | None = None,
        logger: logging.Logger | None = None,
    ):
        if not 1 <= num_queues <= 64:
            raise InvalidArgumentError(f"num_queues {num_queues} is not between 1 and 64")
        if workers is not None and workers < 1:
            raise InvalidArgumentError(f"workers {workers} is not at least 1")
        self.log = logger or logging.getLogger("qcow2lib.exports.vhost_user_blk")
        self.socket_path = os.fspath(socket_path)
        if serial is None:
            serial = os.path.basename(device.filename or "qcow2lib")
        self.blk = VirtioBlk(device, read_only, num_queues, serial, self.log)
        self.workers = workers or min(32, 4 * num_queues)
        self.connections = 0
        self.completed_per_queue = [0] * num_queues
        self._listener: socket.socket | None = None
        self._connection: VhostUserConnection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._wake_read = self._wake_write = -1
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._listener is not None or self._stop.is_set():
            raise InvalidArgumentError(f"the server on '{self.socket_path}' was already started")
        try:
            if stat.S_ISSOCK(os.stat(self.socket_path).st_mode):
                os.unlink(self.socket_path)  # an earlier server's, as QEMU replaces it
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(self.socket_path)
            listener.listen(1)
        except OSError as exc:
            listener.close()
            raise InvalidArgumentError(
                f"cannot listen on socket '{self.socket_path}': {exc.strerror or exc}"
            ) from None
        self._listener = listener
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC)
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="vhost-user-blk")
        self._thread = threading.Thread(
            target=self._accept_loop, name="vhost-user-blk server", daemon=True
        )
        self._thread.start()

    def _accept_loop(self) -> None:
        listener, executor = self._listener, self._executor
        assert listener is not None and executor is not None  # (set before this thread starts)
        watched: list[socket.socket | int] = [listener, self._wake_read]
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(watched, [], [])
                if self._stop.is_set():
                    break
                if listener not in ready:
                    continue
                try:
                    sock, _ = listener.accept()
                except OSError as exc:  # out of fds, or the peer gave up: try again
                    self.log.warning(
                        "vhost-user-blk: accept on %s failed: %s", self.socket_path, exc
                    )
                    self._stop.wait(0.1)
                    continue
                with self._lock:
                    if self._stop.is_set():
                        sock.close()
                        break
                    self.connections += 1
                    connection = VhostUserConnection(sock, self.blk, executor, self.log)
                    self._connection = connection
                self.log.info(
                    "vhost-user-blk: front-end %d connected on %s (%d bytes, %d queues%s)",
                    self.connections,
                    self.socket_path,
                    self.blk.device.size,
                    self.blk.num_queues,
                    ", read-only" if self.blk.read_only else "",
                )
                try:
                    connection.run()
                finally:
                    with self._lock:
                        for vring in connection.vrings:
                            self.completed_per_queue[vring.index] += vring.completed
                        self._connection = None
                    sock.close()
        finally:
            self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False on timeout."""
        return self._stopped.wait(timeout)

    def shutdown(self) -> None:
        """Stop serving: disconnect the front-end, drain, flush, remove the socket."""
        with self._lock:
            if self._stop.is_set():
                return
            self._stop.set()
        if self._wake_write >= 0:
            os.write(self._wake_write, b"s")
        with self._lock:
            if self._connection is not None:
                try:
                    self._connection.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self._wake_read >= 0:
            os.close(self._wake_read)
            os.close(self._wake_write)
        self._stopped.set()

    def __enter__(self) -> "VhostUserBlkServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def serve(
    device: BlockDevice,
    socket_path: str,
    *,
    read_only: bool = False,
    num_queues: int = 1,
    workers: int | None = None,
    serial: str | None = None,
    logger: logging.Logger | None = None,
) -> None:
    """Serve `device` until SIGINT or SIGTERM (called from the main thread, where Python
    runs signal handlers; from another, until the process ends). The server always stops
    cleanly (front-end disconnected, requests drained, device flushed, socket removed)
    before this returns: a signal while it starts waits until it can stop it."""
    server = VhostUserBlkServer(
        device,
        socket_path,
        read_only=read_only,
        num_queues=num_queues,
        workers=workers,
        serial=serial,
        logger=logger,
    )
    in_main_thread = threading.current_thread() is threading.main_thread()
    with ExitStack() as cleanup:
        if in_main_thread:
            hold_stop_signals(cleanup)
        server.start()
        cleanup.callback(server.shutdown)
        with stop_on_signals(server.shutdown) if in_main_thread else nullcontext():
            server.wait()
