"""The back-end side of the vhost-user protocol (QEMU's docs/interop/vhost-user.rst).

A front-end (QEMU) connects to our Unix socket and hands us, message by message, its
guest's memory (as file descriptors passed with SCM_RIGHTS), the place and size of each
virtqueue, and eventfds to be kicked by and to call. `VhostUserConnection` speaks that
protocol for any `VirtioBackend`; each started ring gets a thread that waits for kicks,
takes chains off the ring and serves them itself, one after the other: handing a request
to another thread costs more than a read from the page cache. A request that is slow
(real disk I/O, a blocked device) must not hold up the others, so a `Rescuer` watches
the rings and, when a ring's thread has been on one request for `RESCUE_AFTER`, hands the
rest of its batch and whatever the driver queues meanwhile to a shared worker pool: then
requests of one queue run concurrently and complete in any order.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from concurrent.futures import Executor
from typing import Protocol

from ..errors import Qcow2Error
from .virtqueue import (
    DescriptorChain,
    GuestMemory,
    GuestMemoryError,
    SplitVirtqueue,
    VirtqueueError,
    signal_eventfd,
)

# message types sent by the front-end
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25

MESSAGE_NAMES = {
    value: name
    for name, value in globals().items()
    if name.isupper() and isinstance(value, int) and not name.startswith("_")
}

# header flags
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

# feature bits
F_RING_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 32

# protocol feature bits
PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
SUPPORTED_PROTOCOL_FEATURES = (
    (1 << PROTOCOL_F_MQ) | (1 << PROTOCOL_F_REPLY_ACK) | (1 << PROTOCOL_F_CONFIG)
)

HEADER = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
MEMORY_HEADER = struct.Struct("<II")  # nregions, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest_phys_addr, size, user_addr, mmap_offset
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags

MAX_PAYLOAD = 4096  # the largest message we accept (a full memory table is 264)
MAX_REGIONS = 8
MAX_FDS = 8
MAX_CONFIG_SIZE = 256
RESCUE_AFTER = 0.01  # a request taking longer than this lets the ring's others go to workers
RESCUER_LINGER = 0.05  # the rescuer sleeps for good after rings were idle this long
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8


class VhostUserError(Qcow2Error):
    """The front-end sent a message we cannot honour (the request fails, REPLY_ACK says so)."""


class ProtocolError(Qcow2Error):
    """The front-end broke the message framing: the connection is closed."""


class VirtioBackend(Protocol):
    """What a device (virtio-blk) gives the protocol layer."""

    features: int  # virtio feature bits offered, ring features included
    num_queues: int

    def config(self) -> bytes:
        """The device's configuration space."""

    def handle(self, memory: GuestMemory, chain: DescriptorChain) -> int:
        """Serve one request (called on a worker thread); return the bytes written."""

    def disconnected(self) -> None:
        """The front-end went away: make what it wrote durable."""


class Vring:
    """One virtqueue as the front-end configured it, and the thread that serves it."""

    def __init__(self, index: int, connection: "VhostUserConnection"):
        self.index = index
        self.connection = connection
        self.log = connection.log
        self.lock = threading.Lock()
        self.drained = threading.Condition(self.lock)
        self.size = 0
        self.addresses: tuple[int, int, int] | None = None  # desc, avail, used (front-end VAs)
        self.base = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.polling = False
        self.enabled = False
        self.queue: SplitVirtqueue | None = None
        self.broken = False
        self.in_flight = 0
        self.completed = 0
        # the ring thread's batch not yet started, as (memory, chain); the rescuer may take it
        self.backlog: deque[tuple[GuestMemory, DescriptorChain]] = deque()
        self.busy_since = 0.0  # when the ring thread began its current request, or 0
        self.owed_call = False  # a completion asked for a call, deferred to the batch's end
        self.thread: threading.Thread | None = None
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False

    # -- configuration --
    def replace_fd(self, name: str, fd: int | None) -> None:
        old = getattr(self, name)
        setattr(self, name, fd)
        if old is not None:
            os.close(old)

    def start(self) -> None:
        """The kick fd arrived: map the ring and start serving it."""
        self.stop()
        memory = self.connection.memory
        if memory is None or self.addresses is None or not self.size:
            raise VhostUserError(
                f"vring {self.index} started before its memory table, addresses and size were set"
            )
        self.queue = self._map(memory)
        if not self.connection.protocol_features_acked:
            self.enabled = True
        self.broken = False
        self.stopping = False
        self.thread = threading.Thread(
            target=self._serve, name=f"vhost-user vring {self.index}", daemon=True
        )
        self.thread.start()

    def _map(self, memory: GuestMemory) -> SplitVirtqueue:
        features = self.connection.acked_features
        assert self.addresses is not None  # (a ring is mapped only once they are set)
        try:
            desc, avail, used = (memory.user_to_guest(addr) for addr in self.addresses)
            return SplitVirtqueue(
                memory,
                self.size,
                desc,
                avail,
                used,
                self.base,
                event_idx=bool(features >> F_RING_EVENT_IDX & 1),
                indirect=bool(features >> F_RING_INDIRECT_DESC & 1),
            )
        except (GuestMemoryError, VirtqueueError) as exc:
            raise VhostUserError(f"vring {self.index}: {exc}") from None

    def remap(self, memory: GuestMemory) -> None:
        """A new memory table replaced the old one while the ring runs."""
        with self.lock:
            if self.queue is not None:
                queue = self._map(memory)
                queue.last_avail_idx = self.queue.last_avail_idx
                queue.used_idx = self.queue.used_idx
                self.queue = queue
        self.wake()

    def stop(self) -> int:
        """Stop the thread, wait for requests in flight; return the next avail index."""
        if self.thread is not None:
            self.stopping = True
            self.wake()
            self.thread.join()
            self.thread = None
        with self.lock:
            while self.in_flight:
                self.drained.wait()
            if self.queue is not None:
                self.base = self.queue.last_avail_idx
            self.queue = None
        return self.base

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self.wake_write, b"w")
        except BlockingIOError:  # already woken many times over
            pass

    def close(self) -> None:
        self.stop()
        for name in ("kick_fd", "call_fd", "err_fd"):
            self.replace_fd(name, None)
        os.close(self.wake_read)
        os.close(self.wake_write)

    # -- serving --
    def _serve(self) -> None:
        try:
            self._wait_for_kicks()
        except Exception:  # a bug here stops this ring, never the process
            self.broken = True
            self.log.exception("vhost-user vring %d stopped", self.index)

    def _wait_for_kicks(self) -> None:
        while not self.stopping:
            watched = [self.wake_read] + ([self.kick_fd] if self.kick_fd is not None else [])
            ready, _, _ = select.select(watched, [], [], 0.001 if self.polling else None)
            if self.wake_read in ready:
                try:
                    os.read(self.wake_read, 4096)
                except BlockingIOError:
                    pass
            if self.kick_fd is not None and self.kick_fd in ready:
                try:
                    os.eventfd_read(self.kick_fd)
                except BlockingIOError:
                    pass
            if self.enabled and not self.stopping:
                self._take_available()

    def _take_available(self) -> None:
        """Serve every chain the driver made available, on this thread, in order; the
        driver is called once for the whole batch (as it is kicked once for it)."""
        backlog = self.backlog
        backlog.extend(self._take_chains())
        watch = self.connection.rescuer.watch
        while backlog:
            try:
                memory, chain = backlog.popleft()
            except IndexError:  # the rescuer took the rest
                break
            self.busy_since = time.monotonic()
            watch()
            self._run(memory, chain, defer_call=bool(backlog))
        self.busy_since = 0.0
        if self.owed_call:
            with self.lock:
                self._call_if_owed()

    def _take_chains(self) -> list[tuple[GuestMemory, DescriptorChain]]:
        """Take every available chain off the ring, each with a use of the memory table."""
        with self.lock:
            queue = self.queue
            if queue is None or self.broken or not self.enabled or self.stopping:
                return []
            chains: list[DescriptorChain] = []
            try:
                while True:
                    chain = queue.pop()
                    if chain is None:
                        queue.publish_avail_event()
                        if not queue.pending():  # nothing slipped in meanwhile
                            break
                        continue
                    chains.append(chain)
            except (VirtqueueError, GuestMemoryError, ValueError) as exc:
                self.broken = True
                self.log.warning("vhost-user vring %d stopped: %s", self.index, exc)
                signal_eventfd(self.err_fd)
            memory = queue.memory
            accepted: list[tuple[GuestMemory, DescriptorChain]] = []
            for chain in chains:
                if not memory.acquire():
                    break
                self.in_flight += 1
                accepted.append((memory, chain))
        return accepted

    def rescue(self) -> None:
        """The ring thread has been on one request too long: the rest of its batch, and
        every chain the driver has made available since, go to the worker pool."""
        while True:
            try:
                memory, chain = self.backlog.popleft()
            except IndexError:
                break
            self._hand_over(memory, chain)
        if self.owed_call:  # completions before the slow one are not held back
            with self.lock:
                self._call_if_owed()
        for memory, chain in self._take_chains():
            self._hand_over(memory, chain)

    def _hand_over(self, memory: GuestMemory, chain: DescriptorChain) -> None:
        """To a worker; a chain taken is always served, even if the pool is gone."""
        try:
            self.connection.executor.submit(self._run, memory, chain)
        except RuntimeError:  # the pool was shut down
            self._run(memory, chain)

    def _call_if_owed(self) -> None:
        """Under the lock (SET_VRING_CALL may replace the fd)."""
        if self.owed_call:
            self.owed_call = False
            signal_eventfd(self.call_fd)

    def _run(self, memory: GuestMemory, chain: DescriptorChain, defer_call: bool = False) -> None:
        written = 0
        try:
            written = self.connection.backend.handle(memory, chain)
        except Exception:  # a worker must never die: the ring would hang
            self.log.exception("vhost-user vring %d: request %d failed", self.index, chain.head)
        finally:
            memory.release()
        with self.lock:
            try:
                if self.queue is not None:  # the current mapping of this same ring
                    if self.queue.push(chain.head, written):
                        self.owed_call = True
                    self.completed += 1
            except ValueError:  # memory unmapped under us: the front-end is gone
                pass
            self.in_flight -= 1
            if not self.in_flight:
                self.drained.notify_all()
            if not defer_call:
                self._call_if_owed()


class Rescuer:
    """One thread per connection that keeps rings moving while their thread is stuck in a
    slow request (see `Vring.rescue`). It polls only while some ring is serving, and
    sleeps on a condition once they have been idle for RESCUER_LINGER: an idle device
    costs no CPU, a busy one a wake-up per RESCUE_AFTER / 2, none per request (each
    wake-up takes the GIL from the thread serving requests, so they are kept few)."""

    def __init__(self, vrings: list[Vring], log: logging.Logger):
        self.vrings = vrings
        self.log = log
        self.cond = threading.Condition()
        self.idle = True
        self.stopping = False
        self.thread: threading.Thread | None = None

    def watch(self) -> None:
        """A ring thread began a request: make sure the rescuer is polling."""
        if self.idle:
            with self.cond:
                if self.idle and not self.stopping:
                    self.idle = False
                    if self.thread is None:
                        self.thread = threading.Thread(
                            target=self._serve, name="vhost-user rescuer", daemon=True
                        )
                        self.thread.start()
                    self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _serve(self) -> None:
        try:
            self._poll()
        except Exception:  # a bug here must not stop the process; rings still serve
            self.log.exception("vhost-user rescuer stopped")

    def _poll(self) -> None:
        last_busy = time.monotonic()
        while True:
            with self.cond:
                while self.idle and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
            time.sleep(RESCUE_AFTER / 2)
            now = time.monotonic()
            if self._check(now):
                last_busy = now
            elif now - last_busy > RESCUER_LINGER:
                with self.cond:
                    self.idle = True
                if self._check(now):  # a ring began meanwhile and saw us still awake
                    with self.cond:
                        self.idle = False
                last_busy = now

    def _check(self, now: float) -> bool:
        """Rescue the rings stuck too long; whether any ring is serving."""
        busy = False
        for vring in self.vrings:
            since = vring.busy_since
            if since and not vring.stopping:
                busy = True
                if now - since >= RESCUE_AFTER:
                    vring.rescue()
        return busy


class VhostUserConnection:
    """One front-end on one accepted socket: the message loop and its rings."""

    def __init__(
        self, sock: socket.socket, backend: VirtioBackend, executor: Executor, log: logging.Logger
    ):
        self.sock = sock
        self.backend = backend
        self.executor = executor
        self.log = log
        self.acked_features = 0
        self.protocol_features = 0
        self.memory: GuestMemory | None = None
        self.vrings = [Vring(i, self) for i in range(backend.num_queues)]
        self.rescuer = Rescuer(self.vrings, log)

    @property
    def protocol_features_acked(self) -> bool:
        return bool(self.acked_features >> F_PROTOCOL_FEATURES & 1)

    def run(self) -> None:
        """Serve messages until the front-end disconnects or breaks the protocol."""
        try:
            while True:
                message = self._receive()
                if message is None:
                    return
                self._dispatch(*message)
        except ProtocolError as exc:
            self.log.warning("vhost-user front-end dropped: %s", exc)
        except OSError as exc:
            self.log.warning("vhost-user connection failed: %s", exc)
        except Exception:  # whatever a front-end sends, the server must go on
            self.log.exception("vhost-user front-end dropped after an unexpected error")
        finally:
            self.reset()

    def reset(self) -> None:
        """Forget everything the front-end set up: stop rings, unmap memory, close fds."""
        self.rescuer.stop()
        for vring in self.vrings:
            vring.close()
        if self.memory is not None:
            self.memory.retire()
            self.memory = None
        try:
            self.backend.disconnected()
        except Exception:
            self.log.exception("vhost-user: flushing after disconnect failed")

    # -- framing --
    def _receive_exact(self, length: int) -> bytes:
        data = b""
        while len(data) < length:
            chunk = self.sock.recv(length - len(data))
            if not chunk:
                raise ProtocolError(
                    f"connection closed inside a message ({len(data)} of {length} bytes)"
                )
            data += chunk
        return data

    def _receive(self) -> tuple[int, int, bytes, list[int]] | None:
        fds = array.array("i")
        data, ancillary, flags, _ = self.sock.recvmsg(
            HEADER.size, socket.CMSG_SPACE(MAX_FDS * fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        fd_list = list(fds)
        try:
            if not data:
                for fd in fd_list:
                    os.close(fd)
                return None
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors in one message")
            data += self._receive_exact(HEADER.size - len(data))
            request, header_flags, size = HEADER.unpack(data)
            if header_flags & VERSION_MASK != VERSION:
                raise ProtocolError(
                    f"message version {header_flags & VERSION_MASK} in flags "
                    f"{header_flags:#x} is not {VERSION}"
                )
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"message {request} payload size {size} exceeds {MAX_PAYLOAD}")
            payload = self._receive_exact(size)
        except BaseException:
            for fd in fd_list:
                os.close(fd)
            raise
        return request, header_flags, payload, fd_list

    def _send(self, request: int, payload: bytes) -> None:
        self.sock.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)

    # -- dispatch --
    def _dispatch(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        name = MESSAGE_NAMES.get(request, str(request))
        handler = getattr(self, f"_on_{name.lower()}", None)
        self.log.debug(
            "vhost-user message %s flags %#x size %d fds %d", name, flags, len(payload), len(fds)
        )
        reply: bytes | None = None
        failed = False
        try:
            if handler is None:
                raise VhostUserError(f"unsupported vhost-user message {name}")
            reply = handler(payload, fds)
        except VhostUserError as exc:
            failed = True
            self.log.warning("vhost-user %s refused: %s", name, exc)
        finally:
            for fd in fds:  # handlers take what they keep (setting it to -1)
                if fd >= 0:
                    os.close(fd)
        if reply is not None:
            self._send(request, reply)
        elif flags & FLAG_NEED_REPLY and self.protocol_features >> PROTOCOL_F_REPLY_ACK & 1:
            self._send(request, U64.pack(1 if failed else 0))
        elif failed and request in REPLYING:
            raise ProtocolError(f"cannot answer {name}")

    def _unpack(self, layout: struct.Struct, payload: bytes, name: str) -> tuple:
        if len(payload) < layout.size:
            raise VhostUserError(
                f"{name} payload of {len(payload)} bytes is shorter than {layout.size}"
            )
        return layout.unpack_from(payload)

    def _vring(self, index: int) -> Vring:
        if index >= len(self.vrings):
            raise VhostUserError(
                f"vring index {index} is not below the queue count {len(self.vrings)}"
            )
        return self.vrings[index]

    def _take_fd(self, fds: list[int], flagged_none: bool, name: str) -> int | None:
        if flagged_none:
            return None
        if len(fds) != 1:
            raise VhostUserError(f"{name} came with {len(fds)} file descriptors, not 1")
        fd, fds[0] = fds[0], -1
        return fd

    # -- handlers: each returns a reply payload or None --
    def _on_get_features(self, payload, fds):
        return U64.pack(self.backend.features | 1 << F_PROTOCOL_FEATURES)

    def _on_set_features(self, payload, fds):
        (features,) = self._unpack(U64, payload, "SET_FEATURES")
        offered = self.backend.features | 1 << F_PROTOCOL_FEATURES
        if features & ~offered:
            raise VhostUserError(
                f"features {features:#x} include bits {features & ~offered:#x} never offered"
            )
        self.acked_features = features

    def _on_get_protocol_features(self, payload, fds):
        return U64.pack(SUPPORTED_PROTOCOL_FEATURES)

    def _on_set_protocol_features(self, payload, fds):
        (features,) = self._unpack(U64, payload, "SET_PROTOCOL_FEATURES")
        if features & ~SUPPORTED_PROTOCOL_FEATURES:
            raise VhostUserError(f"protocol features {features:#x} include bits never offered")
        self.protocol_features = features

    def _on_set_owner(self, payload, fds):
        return None

    def _on_reset_owner(self, payload, fds):
        for vring in self.vrings:
            vring.stop()
            vring.enabled = False
        self.acked_features = 0

    def _on_get_queue_num(self, payload, fds):
        return U64.pack(self.backend.num_queues)

    def _on_set_mem_table(self, payload, fds):
        nregions, _ = self._unpack(MEMORY_HEADER, payload, "SET_MEM_TABLE")
        if not 1 <= nregions <= MAX_REGIONS or nregions != len(fds):
            raise VhostUserError(
                f"memory table with {nregions} regions and {len(fds)} file "
                f"descriptors (1 to {MAX_REGIONS}, one each)"
            )
        if len(payload) < MEMORY_HEADER.size + nregions * MEMORY_REGION.size:
            raise VhostUserError(f"memory table of {nregions} regions in {len(payload)} bytes")
        descriptions = [
            MEMORY_REGION.unpack_from(payload, MEMORY_HEADER.size + i * MEMORY_REGION.size)
            for i in range(nregions)
        ]
        try:
            memory = GuestMemory.map_regions(descriptions, fds)
        except GuestMemoryError as exc:
            raise VhostUserError(str(exc)) from None
        old, self.memory = self.memory, memory
        for vring in self.vrings:
            try:
                vring.remap(memory)
            except VhostUserError as exc:
                vring.broken = True
                self.log.warning("vhost-user vring %d stopped: %s", vring.index, exc)
        if old is not None:
            old.retire()

    def _on_set_vring_num(self, payload, fds):
        index, num = self._unpack(VRING_STATE, payload, "SET_VRING_NUM")
        if not 1 <= num <= 32768 or num & (num - 1):
            raise VhostUserError(f"vring {index} size {num} is not a power of two up to 32768")
        self._vring(index).size = num

    def _on_set_vring_addr(self, payload, fds):
        index, _, desc, used, avail, _ = self._unpack(VRING_ADDR, payload, "SET_VRING_ADDR")
        self._vring(index).addresses = (desc, avail, used)

    def _on_set_vring_base(self, payload, fds):
        index, base = self._unpack(VRING_STATE, payload, "SET_VRING_BASE")
        if base > 0xFFFF:
            raise VhostUserError(f"vring {index} base {base} does not fit a split ring index")
        self._vring(index).base = base

    def _on_get_vring_base(self, payload, fds):
        index, _ = self._unpack(VRING_STATE, payload, "GET_VRING_BASE")
        vring = self._vring(index)
        base = vring.stop()
        vring.enabled = False
        vring.replace_fd("kick_fd", None)
        return VRING_STATE.pack(index, base)

    def _vring_fd(self, payload, fds, name):
        (value,) = self._unpack(U64, payload, name)
        vring = self._vring(value & VRING_INDEX_MASK)
        return vring, self._take_fd(fds, bool(value & VRING_NOFD_MASK), name)

    def _on_set_vring_kick(self, payload, fds):
        vring, fd = self._vring_fd(payload, fds, "SET_VRING_KICK")
        vring.stop()
        vring.replace_fd("kick_fd", fd)
        vring.polling = fd is None
        vring.start()

    def _on_set_vring_call(self, payload, fds):
        vring, fd = self._vring_fd(payload, fds, "SET_VRING_CALL")
        with vring.lock:
            vring.replace_fd("call_fd", fd)

    def _on_set_vring_err(self, payload, fds):
        vring, fd = self._vring_fd(payload, fds, "SET_VRING_ERR")
        with vring.lock:
            vring.replace_fd("err_fd", fd)

    def _on_set_vring_enable(self, payload, fds):
        index, enable = self._unpack(VRING_STATE, payload, "SET_VRING_ENABLE")
        self._vring(index).set_enabled(bool(enable))

    def _on_get_config(self, payload, fds):
        offset, size, _ = self._unpack(CONFIG_HEADER, payload, "GET_CONFIG")
        if offset + size > MAX_CONFIG_SIZE:
            raise ProtocolError(
                f"GET_CONFIG offset {offset} size {size} passes {MAX_CONFIG_SIZE} bytes"
            )
        config = self.backend.config().ljust(MAX_CONFIG_SIZE, b"\0")
        return payload[: CONFIG_HEADER.size] + config[offset : offset + size]

    def _on_set_config(self, payload, fds):
        raise VhostUserError("the configuration space is read-only")


REPLYING = {GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_VRING_BASE, GET_CONFIG}
