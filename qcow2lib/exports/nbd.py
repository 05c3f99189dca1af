"""An NBD server over any `BlockDevice`.

    server = NBDServer(device, unix_path="/run/disk.sock")
    server.start()
    server.serve_forever()          # another thread or a signal handler calls shutdown()

Fixed newstyle handshake (EXPORT_NAME, GO, INFO, LIST, ABORT, STRUCTURED_REPLY and the
metadata contexts `base:allocation` and `qemu:allocation-depth`), then every request of
the transmission phase. Each connection has one thread reading requests, which serves reads
and small writes itself (a hand-off would cost more than they do), and a small pool of
workers for the rest, so replies go out as requests finish, in any order, one at a time
under the connection's send lock. A read-only device's data goes from its host files to
the socket by sendfile, without passing through the process. Every connection shares one
device, whose flush covers every connection: the server offers CAN_MULTI_CONN when it
takes several clients.

What a client may make the server hold is bounded: option data (64 KiB), requests in
flight and the bytes they buffer, and a read or write payload (32 MiB, advertised as the
maximum block size). A client that breaks the protocol in a way that cannot be answered
is disconnected; any request that can be answered gets an NBD error, never a write outside
the export.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

from ..blockdev import BlockDevice, Extent
from ..errors import InvalidArgumentError, Qcow2Error, Qcow2IOError, ReadOnlyError
from ..hostfile import io_buffer
from . import nbd_protocol as P

__all__ = ["NBDExport", "NBDServer", "serve", "nbd_error_for", "DEFAULT_PORT"]

log = logging.getLogger("qcow2lib.exports.nbd")

DEFAULT_PORT = 10809
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = P.MAX_PAYLOAD
MAX_OPTION_LENGTH = 64 << 10  # larger option data is skipped and refused (TOO_BIG)
MAX_OPTION_DRAIN = 32 << 20  # past this, skipping is not worth it: disconnect
MAX_STATUS_DESCRIPTORS = 1 << 16  # per context in one BLOCK_STATUS reply
CACHE_READ_SIZE = 1 << 20
SHUTDOWN_GRACE = 5.0  # seconds in-flight requests get to reply on shutdown

_CONTEXT_IDS = {P.CONTEXT_BASE_ALLOCATION: 0, P.CONTEXT_ALLOCATION_DEPTH: 1}
_WRITING_COMMANDS = (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES)
_ALLOWED_FLAGS = {  # request flags each command takes (any other command: FUA only)
    P.CMD_READ: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
}
# Reads, and writes up to INLINE_MAX, run on the connection's reader thread: a hand-off to
# a worker costs more than the request itself (a page-cache copy and a send), under the GIL
# and with two cores. A read not sent from the host file is read into the connection's one
# reused buffer, free again once sendmsg returns (the kernel has copied it). Larger writes,
# which may allocate clusters and wait on metadata, and every other command go to the pool.
INLINE_MAX = 64 * 1024
READ_BUFFER_KEPT = 4 << 20  # a larger read gets a buffer of its own, not kept afterwards
# A structured read this short is answered with one data chunk, zeros included: looking up
# its holes (a second walk of the mapping) would cost more than sending their zeros.
DATA_ONLY_READ_MAX = 64 * 1024
_RECV_AHEAD = 64 * 1024  # bytes the reader asks the socket for at a time
_SEND_BUFFER = 4 << 20  # bytes, asked of the kernel (it caps at net.core.wmem_max)
_SEND_BATCH = 512  # buffers per sendmsg, below every IOV_MAX


@dataclass(frozen=True)
class NBDExport:
    """One export: a device under a name. A read-only device is always exported read-only."""

    device: BlockDevice
    name: str = ""
    description: str = ""
    read_only: bool = False

    @property
    def writable(self) -> bool:
        return not (self.read_only or self.device.read_only)


class _ClientGone(Exception):
    """The peer closed or reset the connection."""


class _ProtocolViolation(Exception):
    """The client broke the protocol in a way no reply can answer: hard disconnect."""


class _RequestError(Exception):
    """A request the server refuses, with the NBD error value to send back."""

    def __init__(self, error: int, message: str):
        super().__init__(message)
        self.error = error


class _BadOption(Exception):
    """Option data that does not parse: NBD_REP_ERR_INVALID."""


class _Request(NamedTuple):
    flags: int
    command: int
    handle: int
    offset: int
    length: int
    payload: bytearray | None
    payload_dropped: bool


def nbd_error_for(exc: BaseException) -> int:
    """The NBD error value for an exception a device raised."""
    if isinstance(exc, ReadOnlyError):
        return P.EPERM
    if isinstance(exc, InvalidArgumentError):
        return P.EINVAL
    if isinstance(exc, OSError) and exc.errno is not None:
        return {
            errno.ENOSPC: P.ENOSPC,
            errno.EDQUOT: P.ENOSPC,
            errno.EFBIG: P.ENOSPC,
            errno.EPERM: P.EPERM,
            errno.EACCES: P.EPERM,
            errno.EROFS: P.EPERM,
            errno.EINVAL: P.EINVAL,
        }.get(exc.errno, P.EIO)
    return P.EIO


def _check_string(what: str, value: str) -> None:
    """Names and descriptions go on the wire as protocol strings: UTF-8, no NUL, 4 KiB."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a string, not {type(value).__name__}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        size = -1
    if not 0 <= size <= P.MAX_STRING or "\0" in value:
        raise InvalidArgumentError(
            f"{what} {value[:64]!r} must be at most {P.MAX_STRING} bytes of UTF-8 without NUL"
        )


class _OptionData:
    """A cursor over one option's data; running short is NBD_REP_ERR_INVALID."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, count: int, what: str) -> bytes:
        if count > len(self.data) - self.pos:
            raise _BadOption(
                f"{what} of {count} bytes runs past the option data ({len(self.data)} bytes)"
            )
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "big")

    def string(self, what: str) -> str:
        length = self.u32(f"length of {what}")
        if length > P.MAX_STRING:
            raise _BadOption(f"{what} is {length} bytes, more than {P.MAX_STRING}")
        try:
            return self.take(length, what).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadOption(f"{what} is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _BadOption(f"{len(self.data) - self.pos} bytes of option data left over")


class _Budget:
    """Requests in flight on one connection and the bytes they buffer, both bounded."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self.cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self.cond:
            while self.requests and (
                self.requests >= self.max_requests or self.bytes + nbytes > self.max_bytes
            ):
                self.cond.wait()
            self.requests += 1
            self.bytes += nbytes

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.requests -= 1
            self.bytes -= nbytes
            self.cond.notify_all()


def _base_allocation(ext: Extent) -> int:
    return (0 if ext.is_data else P.STATE_HOLE) | (P.STATE_ZERO if ext.is_zero else 0)


def _allocation_depth(ext: Extent) -> int:
    """QEMU's numbering: 0 unallocated in the whole chain, 1 the top image, 2 its backing..."""
    return ext.depth + 1 if ext.present else 0


_STATUS_OF = {
    P.CONTEXT_BASE_ALLOCATION: _base_allocation,
    P.CONTEXT_ALLOCATION_DEPTH: _allocation_depth,
}


class _Connection:
    """One client: the handshake, then a reader thread feeding a worker pool."""

    def __init__(self, server: "NBDServer", sock: socket.socket, peer: str):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.send_lock = threading.Lock()
        self._pending = bytearray()  # received, not yet consumed (only the reader thread)
        self._scratch = memoryview(io_buffer(_RECV_AHEAD))
        self._read_buffer = memoryview(bytearray(0))  # (only the reader thread)
        self.deadline: float | None = None
        self.no_zeroes = False
        self.structured = False
        self.contexts: dict[int, str] = {}
        self.contexts_export: NBDExport | None = None
        self.export: NBDExport | None = None
        self.requests = 0
        self.budget = _Budget(server.max_requests_in_flight, server.max_buffered_bytes)
        self.thread = threading.Thread(target=self.run, name=f"nbd-client-{peer}", daemon=True)

    # --- life cycle ----------------------------------------------------------------------

    def run(self) -> None:
        level, outcome = logging.INFO, "client disconnected"
        try:
            if self._negotiate():
                outcome = self._transmit()
            else:
                outcome = "client ended the handshake"
        except _ClientGone as exc:
            outcome = "server shut down" if self.server.stopping else f"connection lost ({exc})"
        except _ProtocolViolation as exc:
            level, outcome = logging.WARNING, f"dropped: {exc}"
        except Exception:
            level, outcome = logging.ERROR, "dropped after an internal error"
            log.exception("NBD client %s: internal error", self.peer)
        finally:
            try:
                self.sock.close()
            finally:
                name = self.export.name if self.export else None
                log.log(
                    level,
                    "NBD client %s: export %s, %d requests: %s",
                    self.peer,
                    "(none)" if name is None else repr(name),
                    self.requests,
                    outcome,
                )
                self.server._connection_done(self)

    def stop(self, how: int) -> None:
        """Called by the server: SHUT_RD lets in-flight requests reply, SHUT_RDWR does not."""
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    # --- socket I/O ----------------------------------------------------------------------

    def _recv_some(self, view: memoryview) -> int:
        """One recv into `view` (at least one byte), within the handshake's deadline."""
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise _ProtocolViolation(
                    f"handshake not finished within {self.server.handshake_timeout} s"
                )
            self.sock.settimeout(remaining)
        try:
            count = self.sock.recv_into(view)
        except socket.timeout:
            raise _ProtocolViolation(
                f"handshake not finished within {self.server.handshake_timeout} s"
            ) from None
        except OSError as exc:
            raise _ClientGone(exc.strerror or str(exc)) from None
        if count == 0:
            raise _ClientGone("end of stream")
        return count

    def _recv(self, count: int) -> bytearray:
        """The next `count` bytes of the stream. Small reads come from a read-ahead buffer,
        so a pipelined client's requests cost one recv for several; a large payload goes
        straight into its own buffer."""
        pending = self._pending
        if len(pending) >= count:
            data = pending[:count]
            del pending[:count]
            return data
        if count - len(pending) >= _RECV_AHEAD:
            data = bytearray(count)
            view = memoryview(data)
            have = len(pending)
            view[:have] = pending
            pending.clear()
            while have < count:
                have += self._recv_some(view[have:])
            return data
        scratch = self._scratch
        while len(pending) < count:
            pending += scratch[: self._recv_some(scratch)]
        data = pending[:count]
        del pending[:count]
        return data

    def _drain(self, count: int) -> None:
        """Read and drop `count` bytes without holding them."""
        pending = self._pending
        dropped = min(count, len(pending))
        del pending[:dropped]
        count -= dropped
        scratch = self._scratch
        while count:
            count -= self._recv_some(scratch[: min(count, len(scratch))])

    def _send(self, *buffers) -> None:
        """Send the buffers (bytes-like, one byte per item) in order, as one message: under
        the send lock, so replies never interleave. Usually one sendmsg takes them all."""
        with self.send_lock:
            self._send_locked(buffers)

    def _send_locked(self, buffers: Sequence) -> None:
        """_send's work, the send lock already held."""
        try:
            sent = self.sock.sendmsg(buffers) if len(buffers) <= _SEND_BATCH else 0
            if sent == sum(map(len, buffers)):
                return
            views = [memoryview(b).cast("B") for b in buffers if len(b)]
            while True:
                while sent:  # drop what the kernel took
                    if sent >= len(views[0]):
                        sent -= len(views.pop(0))
                    else:
                        views[0] = views[0][sent:]
                        sent = 0
                if not views:
                    return
                sent = self.sock.sendmsg(views[:_SEND_BATCH])
        except OSError as exc:
            raise _ClientGone(exc.strerror or str(exc)) from None

    def _send_parts(self, parts: list) -> None:
        """As _send, where a part may also be a host file piece (fd, file_offset, length):
        its bytes go from the file to the socket by os.sendfile, never through this process.
        A file failing once its reply has begun can no longer be answered with an error:
        the connection is then dropped."""
        with self.send_lock:
            first = 0
            for index, part in enumerate(parts):
                if type(part) is tuple:
                    if first < index:
                        self._send_locked(parts[first:index])
                    self._send_file(*part)
                    first = index + 1
            if first < len(parts):
                self._send_locked(parts[first:])

    def _send_file(self, fd: int, file_offset: int, length: int) -> None:
        """One host file piece of a reply, the send lock held."""
        out = self.sock.fileno()
        while length:
            try:
                sent = os.sendfile(out, fd, file_offset, length)
            except OSError as exc:
                raise _ClientGone(f"read reply cut short: {exc.strerror or exc}") from None
            if not sent:  # the file ends here: the rest reads as zeros, as readinto has it
                while length:
                    zeros = bytes(min(length, CACHE_READ_SIZE))
                    self._send_locked([zeros])
                    length -= len(zeros)
                return
            file_offset += sent
            length -= sent

    # --- handshake -----------------------------------------------------------------------

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._send(P.OPTION_REPLY.pack(P.OPTION_REPLY_MAGIC, option, reply, len(data)), data)

    def _negotiate(self) -> bool:
        """Run the handshake; True when the client entered the transmission phase."""
        if self.server.handshake_timeout:
            self.deadline = time.monotonic() + self.server.handshake_timeout
        self._send(
            P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        (client_flags,) = P.CLIENT_FLAGS.unpack(self._recv(P.CLIENT_FLAGS.size))
        if client_flags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise _ProtocolViolation(f"unknown client flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, option, length = P.OPTION_HEADER.unpack(self._recv(P.OPTION_HEADER.size))
            if magic != P.IHAVEOPT:
                raise _ProtocolViolation(f"option magic {magic:#x} is not IHAVEOPT")
            if length > MAX_OPTION_LENGTH:
                if length > MAX_OPTION_DRAIN or option == P.OPT_EXPORT_NAME:
                    raise _ProtocolViolation(f"option {option} has {length} bytes of data")
                self._drain(length)
                self._option_reply(
                    option,
                    P.REP_ERR_TOO_BIG,
                    f"option data of {length} bytes is more than the "
                    f"{MAX_OPTION_LENGTH} this server reads".encode(),
                )
                continue
            data = bytes(self._recv(length))
            if option == P.OPT_ABORT:
                try:
                    self._option_reply(option, P.REP_ACK)
                except _ClientGone:
                    pass
                return False
            if option == P.OPT_EXPORT_NAME:
                if self.server.stopping:  # no error reply exists for this option
                    raise _ClientGone("the server is shutting down")
                self._export_name(data)
                break
            if self.server.stopping:
                self._option_reply(option, P.REP_ERR_SHUTDOWN, b"the server is shutting down")
                continue
            try:
                if self._option(option, data):
                    break
            except _BadOption as exc:
                self._option_reply(option, P.REP_ERR_INVALID, str(exc).encode())
        self.deadline = None
        self.sock.settimeout(None)
        return True

    def _option(self, option: int, data: bytes) -> bool:
        """Answer one fixed-newstyle option; True for a successful GO."""
        if option in (P.OPT_INFO, P.OPT_GO):
            return self._info_or_go(option, _OptionData(data))
        if option == P.OPT_LIST:
            if data:
                raise _BadOption("NBD_OPT_LIST takes no data")
            for export in self.server.exports.values():
                name = export.name.encode()
                self._option_reply(
                    option,
                    P.REP_SERVER,
                    len(name).to_bytes(4, "big") + name + export.description.encode(),
                )
            self._option_reply(option, P.REP_ACK)
        elif option == P.OPT_STRUCTURED_REPLY:
            if data:
                raise _BadOption("NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            self._option_reply(option, P.REP_ACK)
        elif option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self._meta_context(option, _OptionData(data))
        elif option == P.OPT_STARTTLS:
            self._option_reply(option, P.REP_ERR_POLICY, b"TLS is not offered by this server")
        else:
            self._option_reply(
                option, P.REP_ERR_UNSUP, f"option {option} is not supported".encode()
            )
        return False

    def _find_export(self, name: str) -> NBDExport | None:
        exports = self.server.exports
        if name in exports:
            return exports[name]
        if name == "" and exports:
            return next(iter(exports.values()))  # the default export
        return None

    def _transmission_flags(self, export: NBDExport) -> int:
        flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_CACHE
        if self.server.shared != 1:
            flags |= P.FLAG_CAN_MULTI_CONN  # a second connection would wait for the first
        if export.writable:
            flags |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        else:
            flags |= P.FLAG_READ_ONLY
        if self.structured:
            flags |= P.FLAG_SEND_DF
        return flags

    def _export_name(self, data: bytes) -> None:
        """NBD_OPT_EXPORT_NAME: no error reply exists, so an unknown name disconnects."""
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _ProtocolViolation("export name is not UTF-8") from None
        export = self._find_export(name)
        if export is None:
            raise _ProtocolViolation(f"unknown export {name[:256]!r}")
        self._enter(export)
        reply = P.EXPORT_NAME_REPLY.pack(export.device.size, self._transmission_flags(export))
        self._send(reply, b"" if self.no_zeroes else P.EXPORT_NAME_PADDING)

    def _info_or_go(self, option: int, data: _OptionData) -> bool:
        name = data.string("export name")
        count = data.u16("number of information requests")
        requests = {data.u16("information request") for _ in range(count)}
        data.end()
        export = self._find_export(name)
        if export is None:
            self._option_reply(
                option, P.REP_ERR_UNKNOWN, f"export {name[:256]!r} is not served here".encode()
            )
            return False
        self._option_reply(
            option,
            P.REP_INFO,
            P.INFO_EXPORT_PAYLOAD.pack(
                P.INFO_EXPORT, export.device.size, self._transmission_flags(export)
            ),
        )
        if P.INFO_NAME in requests:
            self._option_reply(
                option, P.REP_INFO, P.INFO_NAME.to_bytes(2, "big") + export.name.encode()
            )
        if P.INFO_DESCRIPTION in requests and export.description:
            self._option_reply(
                option,
                P.REP_INFO,
                P.INFO_DESCRIPTION.to_bytes(2, "big") + export.description.encode(),
            )
        self._option_reply(
            option,
            P.REP_INFO,
            P.INFO_BLOCK_SIZE_PAYLOAD.pack(
                P.INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE
            ),
        )
        self._option_reply(option, P.REP_ACK)
        if option == P.OPT_GO:
            self._enter(export)
            return True
        return False

    def _meta_context(self, option: int, data: _OptionData) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.contexts, self.contexts_export = {}, None  # replaced even when refused
        name = data.string("export name")
        count = data.u32("number of queries")
        queries = [data.string("query") for _ in range(count)]
        data.end()
        if not self.structured:
            self._option_reply(
                option, P.REP_ERR_INVALID, b"metadata contexts need structured replies first"
            )
            return
        export = self._find_export(name)
        if export is None:
            self._option_reply(
                option, P.REP_ERR_UNKNOWN, f"export {name[:256]!r} is not served here".encode()
            )
            return
        selected: list[str] = []
        if not queries and not setting:
            selected = list(_CONTEXT_IDS)
        for query in queries:
            for context in _CONTEXT_IDS:
                namespace = context.split(":", 1)[0] + ":"
                wildcard = not setting and query == namespace
                if (query == context or wildcard) and context not in selected:
                    selected.append(context)
        for context in selected:
            context_id = _CONTEXT_IDS[context] if setting else 0
            self._option_reply(
                option, P.REP_META_CONTEXT, context_id.to_bytes(4, "big") + context.encode()
            )
        if setting:
            self.contexts = {_CONTEXT_IDS[c]: c for c in selected}
            self.contexts_export = export
        self._option_reply(option, P.REP_ACK)

    def _enter(self, export: NBDExport) -> None:
        self.export = export
        if self.contexts_export is not export:
            self.contexts = {}  # contexts were negotiated for another export

    # --- transmission --------------------------------------------------------------------

    def _transmit(self) -> str:
        pool = ThreadPoolExecutor(
            max_workers=self.server.workers, thread_name_prefix=f"nbd-worker-{self.peer}"
        )
        try:
            while True:
                (magic, flags, command, handle, offset, length) = P.REQUEST.unpack(
                    self._recv(P.REQUEST.size)
                )
                if magic != P.REQUEST_MAGIC:
                    raise _ProtocolViolation(f"request magic {magic:#x} is wrong")
                if command == P.CMD_DISC:
                    return "client disconnected"
                self.requests += 1
                if command == P.CMD_READ or (command == P.CMD_WRITE and length <= INLINE_MAX):
                    payload = self._recv(length) if command == P.CMD_WRITE else None
                    self._serve(_Request(flags, command, handle, offset, length, payload, False))
                    continue
                payload, dropped, cost = None, False, 0
                if command == P.CMD_WRITE and length > MAX_BLOCK_SIZE:
                    self._drain(length)
                    dropped = True
                elif command == P.CMD_WRITE:
                    cost = length
                self.budget.acquire(cost)
                try:
                    if command == P.CMD_WRITE and not dropped:
                        payload = self._recv(length)
                    request = _Request(flags, command, handle, offset, length, payload, dropped)
                    pool.submit(self._serve_pooled, request, cost)
                except BaseException:
                    self.budget.release(cost)
                    raise
        finally:
            pool.shutdown(wait=True)

    def _serve_pooled(self, request: _Request, cost: int) -> None:
        """A worker's request: its share of the budget is returned once it has replied."""
        try:
            self._serve(request)
        finally:
            self.budget.release(cost)

    def _serve(self, request: _Request) -> None:
        try:
            try:
                self._execute(request)
            except _RequestError as exc:
                self._send_error(request, exc.error, str(exc))
            except (Qcow2Error, OSError) as exc:
                self._send_error(request, nbd_error_for(exc), str(exc))
            except _ClientGone:
                raise
            except Exception as exc:
                log.exception(
                    "NBD client %s: %s request failed",
                    self.peer,
                    P.COMMAND_NAMES.get(request.command, request.command),
                )
                self._send_error(request, P.EIO, f"internal error: {type(exc).__name__}")
        except _ClientGone:
            self.stop(socket.SHUT_RDWR)  # replies cannot reach the client: end the reader

    def _reply_ok(self, request: _Request) -> None:
        self._send(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, request.handle))

    def _send_error(self, request: _Request, error: int, message: str) -> None:
        if not self.structured:
            self._send(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, error, request.handle))
            return
        text = message.encode("utf-8")[: P.MAX_STRING].decode("utf-8", "ignore").encode()
        payload = P.ERROR_PAYLOAD.pack(error, len(text)) + text
        self._send(
            P.CHUNK_HEADER.pack(
                P.STRUCTURED_REPLY_MAGIC,
                P.REPLY_FLAG_DONE,
                P.REPLY_TYPE_ERROR,
                request.handle,
                len(payload),
            ),
            payload,
        )

    def _execute(self, request: _Request) -> None:
        flags, command, offset, length = (
            request.flags,
            request.command,
            request.offset,
            request.length,
        )
        name = P.COMMAND_NAMES.get(command)
        if name is None:
            raise _RequestError(P.EINVAL, f"unknown command {command}")
        if flags:
            allowed = _ALLOWED_FLAGS.get(command, P.CMD_FLAG_FUA)
            if command == P.CMD_READ and not self.structured:
                allowed = P.CMD_FLAG_FUA  # DF is for structured replies only
            if flags & ~allowed:
                raise _RequestError(P.EINVAL, f"flags {flags:#x} are not valid for {name}")
        export = self.export
        assert export is not None  # (requests follow the negotiation, which chose it)
        if command in _WRITING_COMMANDS and not export.writable:
            raise _RequestError(P.EPERM, f"{name} refused: the export is read-only")
        if request.payload_dropped or (
            command in (P.CMD_READ, P.CMD_WRITE, P.CMD_CACHE) and length > MAX_BLOCK_SIZE
        ):
            raise _RequestError(
                P.EINVAL,
                f"{name} of {length} bytes is more than the maximum block size {MAX_BLOCK_SIZE}",
            )
        size = export.device.size
        if command != P.CMD_FLUSH and offset + length > size:
            error = P.ENOSPC if command in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            raise _RequestError(
                error,
                f"{name} at offset {offset} length {length} passes the "
                f"end of the export ({size} bytes)",
            )
        device = export.device
        if command == P.CMD_READ:
            self._read(request, device)
            return
        if command == P.CMD_BLOCK_STATUS:
            self._block_status(request, device)
            return
        if command == P.CMD_WRITE:
            device.write(offset, request.payload)
        elif command == P.CMD_TRIM:
            if length:
                device.discard(offset, length)
        elif command == P.CMD_WRITE_ZEROES:
            may_unmap = not flags & P.CMD_FLAG_NO_HOLE
            if flags & P.CMD_FLAG_FAST_ZERO and not device.can_zero_fast(offset, length, may_unmap):
                raise _RequestError(
                    P.ENOTSUP, "zeroing this range would not be faster than writing zeros"
                )
            if length:
                device.write_zeroes(offset, length, may_unmap)
        elif command == P.CMD_CACHE:
            self._cache(device, offset, length)
        if command == P.CMD_FLUSH or (flags & P.CMD_FLAG_FUA and command in _WRITING_COMMANDS):
            device.flush()
        self._reply_ok(request)

    def _read(self, request: _Request, device: BlockDevice) -> None:
        offset, length, handle = request.offset, request.length, request.handle
        if not self.structured:
            parts = [P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle)]
            if length:
                parts += self._content(device, offset, length, 0, length)
            self._send_parts(parts)
            return
        if not length:
            self._send(
                P.CHUNK_HEADER.pack(
                    P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, handle, 0
                )
            )
            return
        runs: list[list] = []  # [start, stop, reads_zero]
        if length <= DATA_ONLY_READ_MAX:
            runs.append([offset, offset + length, False])
        else:
            for ext in device.extents(offset, length):
                if runs and runs[-1][2] == ext.is_zero:
                    runs[-1][1] = ext.offset + ext.length
                else:
                    runs.append([ext.offset, ext.offset + ext.length, ext.is_zero])
        if request.flags & P.CMD_FLAG_DF and len(runs) > 1:
            runs = [[offset, offset + length, False]]  # one content chunk, zeros included
        buffers: list = []
        for index, (start, stop, zero) in enumerate(runs):
            done = P.REPLY_FLAG_DONE if index == len(runs) - 1 else 0
            if zero:
                buffers += [
                    P.CHUNK_HEADER.pack(
                        P.STRUCTURED_REPLY_MAGIC,
                        done,
                        P.REPLY_TYPE_OFFSET_HOLE,
                        handle,
                        P.OFFSET_HOLE_PAYLOAD.size,
                    ),
                    P.OFFSET_HOLE_PAYLOAD.pack(start, stop - start),
                ]
                continue
            buffers.append(
                P.OFFSET_DATA_HEADER.pack(
                    P.STRUCTURED_REPLY_MAGIC,
                    done,
                    P.REPLY_TYPE_OFFSET_DATA,
                    handle,
                    8 + stop - start,
                    start,
                )
            )
            buffers += self._content(device, start, stop - start, start - offset, length)
        self._send_parts(buffers)

    def _content(
        self, device: BlockDevice, offset: int, length: int, within: int, total: int
    ) -> list:
        """The reply parts carrying `length` bytes at `offset`: the host file pieces holding
        them when the device is read-only and names them (sent without passing through this
        process), else a buffer they are read into, at `within` in a reply of `total` bytes:
        the reader thread's reused buffer, or for a reply above READ_BUFFER_KEPT, its own."""
        if device.read_only:
            pieces = device.host_pieces(offset, length)
            if pieces is not None:
                return pieces
        if total > READ_BUFFER_KEPT:
            part = memoryview(bytearray(length))
        else:
            if total > len(self._read_buffer):  # (the first part of a reply, if ever)
                grown = max(total, min(READ_BUFFER_KEPT, 2 * len(self._read_buffer)))
                self._read_buffer = memoryview(io_buffer(grown))
            part = self._read_buffer[within : within + length]
        device.readinto(offset, part)
        return [part]

    def _block_status(self, request: _Request, device: BlockDevice) -> None:
        if not self.contexts:
            raise _RequestError(
                P.EINVAL,
                "block-status needs a metadata context negotiated with NBD_OPT_SET_META_CONTEXT",
            )
        if not request.length:
            raise _RequestError(P.EINVAL, "block-status of 0 bytes")
        extents = device.extents(request.offset, request.length)
        one = request.flags & P.CMD_FLAG_REQ_ONE
        buffers: list = []
        for index, (context_id, context) in enumerate(sorted(self.contexts.items())):
            status_of = _STATUS_OF[context]
            descriptors: list[list[int]] = []
            for ext in extents:
                status = status_of(ext)
                if descriptors and descriptors[-1][1] == status:
                    descriptors[-1][0] += ext.length
                elif (one and descriptors) or len(descriptors) == MAX_STATUS_DESCRIPTORS:
                    break
                else:
                    descriptors.append([ext.length, status])
            payload = bytearray(context_id.to_bytes(4, "big"))
            for ext_length, status in descriptors:
                payload += ext_length.to_bytes(4, "big") + status.to_bytes(4, "big")
            done = P.REPLY_FLAG_DONE if index == len(self.contexts) - 1 else 0
            buffers += [
                P.CHUNK_HEADER.pack(
                    P.STRUCTURED_REPLY_MAGIC,
                    done,
                    P.REPLY_TYPE_BLOCK_STATUS,
                    request.handle,
                    len(payload),
                ),
                payload,
            ]
        self._send(*buffers)

    @staticmethod
    def _cache(device: BlockDevice, offset: int, length: int) -> None:
        """Read the range's data once (metadata and host pages come into the caches)."""
        if not length:
            return
        scratch = memoryview(bytearray(min(length, CACHE_READ_SIZE)))
        for ext in device.extents(offset, length):
            if ext.is_zero:
                continue
            pos, end = ext.offset, ext.offset + ext.length
            while pos < end:
                step = min(end - pos, len(scratch))
                device.readinto(pos, scratch[:step])
                pos += step


class NBDServer:
    """Serves one or more exports on a Unix socket or a TCP port.

    `exports` is a single `BlockDevice` (exported under `export_name`, with `description`)
    or a sequence of `NBDExport`; a client asking for the empty name gets the export named
    "" or else the first one. `read_only` makes every export read-only. Without
    `persistent`, the server stops once its last client is gone (as qemu-nbd without
    --persistent); `shared` is how many clients may be connected at once (0: no limit).
    The devices stay open: the caller closes them after the server has stopped.
    """

    def __init__(
        self,
        exports: BlockDevice | Sequence[NBDExport],
        *,
        unix_path: str | os.PathLike | None = None,
        host: str | None = None,
        port: int | None = None,
        read_only: bool = False,
        export_name: str = "",
        description: str = "",
        persistent: bool = False,
        shared: int = 1,
        workers: int = 4,
        max_requests_in_flight: int = 16,
        handshake_timeout: float | None = 10.0,
    ):
        if isinstance(exports, BlockDevice):
            exports = [NBDExport(exports, export_name, description, read_only)]
        elif export_name or description:
            raise InvalidArgumentError(
                "export_name and description apply to a single device; give each NBDExport its own"
            )
        self.exports: dict[str, NBDExport] = {}
        for export in exports:
            if not isinstance(export, NBDExport):
                raise InvalidArgumentError(
                    f"exports must be NBDExport objects, not {type(export).__name__}"
                )
            _check_string("export name", export.name)
            _check_string("export description", export.description)
            if export.name in self.exports:
                raise InvalidArgumentError(f"export name {export.name!r} is given twice")
            if read_only and not export.read_only:
                export = NBDExport(export.device, export.name, export.description, True)
            self.exports[export.name] = export
        if not self.exports:
            raise InvalidArgumentError("an NBD server needs at least one export")
        if (unix_path is None) == (host is None):
            raise InvalidArgumentError(
                "give either unix_path or host (and port), not "
                f"{'both' if host is not None else 'neither'}"
            )
        if unix_path is None and port is None:
            port = DEFAULT_PORT
        if unix_path is not None and port is not None:
            raise InvalidArgumentError("port goes with host, not with unix_path")
        if port is not None and not 0 <= port <= 65535:
            raise InvalidArgumentError(f"port {port} is not between 0 and 65535")
        if shared < 0:
            raise InvalidArgumentError(f"shared {shared} must be 0 (no limit) or more")
        if workers < 1 or max_requests_in_flight < 1:
            raise InvalidArgumentError(
                f"workers ({workers}) and max_requests_in_flight "
                f"({max_requests_in_flight}) must be at least 1"
            )
        if handshake_timeout is not None and handshake_timeout <= 0:
            raise InvalidArgumentError(
                f"handshake_timeout {handshake_timeout} must be positive (or None for none)"
            )
        self.unix_path = None if unix_path is None else os.fspath(unix_path)
        self.host = host
        self.port = port
        self.persistent = persistent
        self.shared = shared
        self.workers = workers
        self.max_requests_in_flight = max_requests_in_flight
        self.max_buffered_bytes = 2 * MAX_BLOCK_SIZE
        self.handshake_timeout = handshake_timeout
        self.stopping = False
        self._listener: socket.socket | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._wake_read = self._wake_write = -1
        self._wake_lock = threading.RLock()  # reentrant: a signal handler may wake us
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._clients_seen = 0
        self._serving_thread: int | None = None
        self._served = threading.Event()
        self._closed = False

    # --- public API ----------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen; clients wait in the backlog until serve_forever() runs."""
        if self._listener is not None:
            raise InvalidArgumentError("the NBD server is already started")
        if self.unix_path is not None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where = f"unix socket '{self.unix_path}'"
            address: str | tuple = self.unix_path
        else:
            assert self.host is not None  # (the constructor requires it without unix_path)
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            where = f"{self.host} port {self.port}"
            address = (self.host, self.port)
        try:
            if self.unix_path is not None:
                self._remove_stale_socket(self.unix_path)
            listener.bind(address)
            listener.listen(16)
        except OSError as exc:
            listener.close()
            raise Qcow2IOError(
                exc.errno or errno.EIO, f"cannot listen on {where}: {exc.strerror or exc}"
            ) from None
        except (TypeError, ValueError) as exc:  # a host name socket cannot take
            listener.close()
            raise InvalidArgumentError(f"cannot listen on {where}: {exc}") from None
        listener.setblocking(False)
        if self.unix_path is None:
            self.port = listener.getsockname()[1]  # the one chosen for port 0
        else:
            info = os.stat(self.unix_path)
            self._socket_inode = (info.st_dev, info.st_ino)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._listener = listener

    @property
    def address(self) -> str | tuple[str, int]:
        """The Unix socket path, or (host, port) with the port actually bound."""
        if self.unix_path is not None:
            return self.unix_path
        assert self.host is not None and self.port is not None  # (as the constructor checked)
        return (self.host, self.port)

    def serve_forever(self) -> None:
        """Accept and serve clients until shutdown() (or, unless persistent, until the
        last client has gone). Then close every connection and flush the devices."""
        if self._listener is None:
            self.start()
        listener = self._listener
        assert listener is not None  # (start() set it)
        self._serving_thread = threading.get_ident()
        selector = selectors.DefaultSelector()
        selector.register(self._wake_read, selectors.EVENT_READ)
        accepting = False
        try:
            while not self.stopping:
                with self._lock:
                    active, seen = len(self._connections), self._clients_seen
                if not self.persistent and seen and not active:
                    break
                want = not self.shared or active < self.shared
                if want != accepting:
                    if want:
                        selector.register(listener, selectors.EVENT_READ)
                    else:
                        selector.unregister(listener)
                    accepting = want
                for key, _ in selector.select():
                    if key.fileobj == self._wake_read:
                        self._drain_wake()
                    else:
                        self._accept(listener)
        finally:
            selector.close()
            self._close()
            self._served.set()

    def shutdown(self) -> None:
        """Stop serving: in-flight requests may still reply, then connections close and the
        devices are flushed. Safe from a signal handler (it then returns at once and
        serve_forever finishes the work); from another thread it waits for that."""
        self.stopping = True
        self._wake()
        if self._serving_thread is None:
            self._close()
        elif self._serving_thread != threading.get_ident():
            self._served.wait()

    def __enter__(self) -> "NBDServer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # --- internals -----------------------------------------------------------------------

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_write >= 0:
                try:
                    os.write(self._wake_write, b"\0")
                except BlockingIOError:
                    pass  # a wake-up is already pending

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 256):
                pass
        except BlockingIOError:
            pass

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. EMFILE: keep serving the clients already here
            log.warning("NBD server: accept failed: %s", exc)
            time.sleep(0.1)
            return
        sock.setblocking(True)
        try:  # room for several large replies in the socket: fewer waits for the client
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        except OSError:
            pass
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            name = f"{peer[0]}:{peer[1]}"
        else:
            name = f"unix#{self._clients_seen + 1}"
        connection = _Connection(self, sock, name)
        with self._lock:
            self._connections.add(connection)
            self._clients_seen += 1
        connection.thread.start()

    def _connection_done(self, connection: _Connection) -> None:
        export = connection.export
        if export is not None and export.writable:
            try:
                export.device.flush()
            except (Qcow2Error, OSError) as exc:
                log.error("NBD client %s: flush after disconnect failed: %s", connection.peer, exc)
        with self._lock:
            self._connections.discard(connection)
        self._wake()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.stopping = True
            connections = list(self._connections)
        if self._listener is not None:
            self._listener.close()
            self._remove_socket_file()
        for connection in connections:
            connection.stop(socket.SHUT_RD)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for connection in connections:
            connection.thread.join(max(0.0, deadline - time.monotonic()))
        for connection in connections:
            if connection.thread.is_alive():
                connection.stop(socket.SHUT_RDWR)
                connection.thread.join()
        for export in self.exports.values():
            if export.writable:
                try:
                    export.device.flush()
                except (Qcow2Error, OSError) as exc:
                    log.error("NBD server: flush of export %r failed: %s", export.name, exc)
        with self._wake_lock:
            for fd in (self._wake_read, self._wake_write):
                if fd >= 0:
                    os.close(fd)
            self._wake_read = self._wake_write = -1

    def _remove_stale_socket(self, path: str) -> None:
        """A socket file nobody listens on (left by a server that died) is replaced; a live
        one, or any other kind of file, is an error."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise FileExistsError(errno.EEXIST, "the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, "another server is listening there")

    def _remove_socket_file(self) -> None:
        """Remove our socket file, unless someone replaced it meanwhile."""
        if self.unix_path is None or self._socket_inode is None:
            return
        try:
            info = os.lstat(self.unix_path)
            if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == self._socket_inode:
                os.unlink(self.unix_path)
        except OSError:
            pass


def serve(
    device: BlockDevice,
    *,
    unix_path: str | os.PathLike | None = None,
    host: str | None = None,
    port: int | None = None,
    ready: Callable[[NBDServer], None] | None = None,
    **options,
) -> None:
    """Export one device and serve in the foreground until the server stops.

    `options` are NBDServer's (read_only, export_name, description, persistent, shared,
    ...). `ready(server)` runs once the socket listens: the place to learn a TCP port
    bound as port 0, or to hook server.shutdown to a signal.
    """
    server = NBDServer(device, unix_path=unix_path, host=host, port=port, **options)
    server.start()
    try:
        if ready is not None:
            ready(server)
        server.serve_forever()
    finally:
        server.shutdown()
