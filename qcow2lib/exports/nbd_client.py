"""An NBD export opened as a `BlockDevice`: what `nbd://` names open to.

    with NBDClient(NBDAddress(export="disk", socket_path="/run/disk.sock")) as disk:
        disk.read(0, 512)

Fixed newstyle handshake (GO, falling back to EXPORT_NAME for servers without it),
structured replies, and the metadata context `base:allocation` for `extents()`. One
request is on the wire at a time (a lock covers its send and its reply), which keeps
the device safe to share between threads. Reads and writes are split at the server's
maximum block size. Every server error and a lost connection raise Qcow2IOError with
the errno the server sent (EIO when the connection is gone).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import urllib.parse
from dataclasses import dataclass

from ..chain import is_nbd_name
from ..blockdev import BlockDevice, Extent
from ..errors import InvalidArgumentError, Qcow2IOError, ReadOnlyError
from ..hostfile import DeviceFile, fill_zeros
from . import nbd_protocol as P

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["NBDAddress", "NBDClient", "is_nbd_name", "parse_nbd_name", "nbd_address_from_options"]

DEFAULT_PORT = 10809
OLDSTYLE_MAGIC = 0x00420281861253
MAX_REPLY_PAYLOAD = P.MAX_PAYLOAD + 4096  # a read's data plus its chunk header
MAX_STATUS_LENGTH = 0x80000000  # bytes asked for in one BLOCK_STATUS request
HANDSHAKE_TIMEOUT = 30.0  # seconds a server may take to negotiate
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_STATUS_DESCRIPTOR = struct.Struct(">II")


@dataclass(frozen=True)
class NBDAddress:
    """Where an export is: a Unix socket or a TCP host and port, and its name.

    `status_context` is the metadata context `extents()` reads (base:allocation unless a
    caller asks for another one, whose values are then read as base:allocation flags, as
    QEMU's x-dirty-bitmap option does).
    """

    export: str = ""
    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    status_context: str = P.CONTEXT_BASE_ALLOCATION

    def uri(self) -> str:
        """The name QEMU shows for this export (nbd+unix:///EXPORT?socket=PATH, or
        nbd://HOST:PORT/EXPORT)."""
        export = f"/{self.export}" if self.export else ""
        if self.socket_path is not None:
            return f"nbd+unix://{export}?socket={self.socket_path}"
        return f"nbd://{self.host}:{self.port}{export}"


_URI_SCHEMES = ("nbd", "nbd+tcp", "nbd+unix")


def _port(text: str, name: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgumentError(f"NBD port '{text}' in '{name}' is not a port number")
    return int(text)


def parse_nbd_name(name: str) -> NBDAddress:
    """The address an NBD filename names, in QEMU's URI or legacy "nbd:" syntax."""
    if not is_nbd_name(name):
        raise InvalidArgumentError(f"'{name}' is not an NBD name")
    if "://" in name:
        return _parse_uri(name)
    # nbd:unix:PATH[:exportname=NAME] or nbd:HOST:PORT[:exportname=NAME]
    rest = name[len("nbd:") :]
    export = ""
    marker = rest.find(":exportname=")
    if marker >= 0:
        export = rest[marker + len(":exportname=") :]
        rest = rest[:marker]
    if rest.startswith("unix:"):
        path = rest[len("unix:") :]
        if not path:
            raise InvalidArgumentError(f"No socket path in NBD name '{name}'")
        return NBDAddress(export=export, socket_path=path)
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise InvalidArgumentError(f"NBD name '{name}' has no host:port (nbd:HOST:PORT)")
    return NBDAddress(export=export, host=host.strip("[]"), port=_port(port, name))


def _parse_uri(name: str) -> NBDAddress:
    uri = urllib.parse.urlsplit(name)
    if uri.scheme not in _URI_SCHEMES:
        raise InvalidArgumentError(f"Unknown NBD URI scheme '{uri.scheme}' in '{name}'")
    export = urllib.parse.unquote(uri.path[1:] if uri.path.startswith("/") else uri.path)
    query = urllib.parse.parse_qs(uri.query, keep_blank_values=True)
    if uri.scheme == "nbd+unix":
        if uri.netloc:
            raise InvalidArgumentError(f"NBD URI '{name}' names a host for a Unix socket")
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0] or query:
            raise InvalidArgumentError(
                f"NBD URI '{name}' needs exactly one query parameter 'socket'"
            )
        return NBDAddress(export=export, socket_path=sockets[0])
    if query:
        raise InvalidArgumentError(f"NBD URI '{name}' takes no query parameters")
    if not uri.hostname:
        raise InvalidArgumentError(f"NBD URI '{name}' names no host")
    try:
        port = uri.port or DEFAULT_PORT
    except ValueError:
        raise InvalidArgumentError(f"NBD URI '{name}' has an invalid port") from None
    return NBDAddress(export=export, host=uri.hostname, port=port)


def nbd_address_from_options(options: dict[str, str], name: str) -> NBDAddress:
    """The address in QEMU's nbd driver options (flattened keys): server.type with
    server.path or server.host/server.port, or the legacy path / host / port; export;
    x-dirty-bitmap. `name` is what messages call the image. Unknown keys are refused."""
    opts = dict(options)
    export = opts.pop("export", "")
    context = opts.pop("x-dirty-bitmap", P.CONTEXT_BASE_ALLOCATION)
    server_type = opts.pop("server.type", None)
    path, host, port = (
        opts.pop("server.path", None),
        opts.pop("server.host", None),
        opts.pop("server.port", None),
    )
    legacy = opts.pop("path", None), opts.pop("host", None), opts.pop("port", None)
    if any(value is not None for value in legacy):
        if server_type or path or host or port:
            raise InvalidArgumentError("Cannot use 'server' and path/host/port at the same time")
        path, host, port = legacy
        server_type = "unix" if path is not None else "inet"
    if opts:
        raise InvalidArgumentError(f"Invalid parameter '{sorted(opts)[0]}'")
    if server_type == "unix":
        if not path:
            raise InvalidArgumentError("Parameter 'path' is missing")
        return NBDAddress(export=export, socket_path=path, status_context=context)
    if server_type == "inet":
        if not host:
            raise InvalidArgumentError("Parameter 'host' is missing")
        return NBDAddress(
            export=export,
            host=host,
            port=_port(str(port), name) if port else DEFAULT_PORT,
            status_context=context,
        )
    if server_type is None:
        raise InvalidArgumentError("NBD server address missing")
    raise InvalidArgumentError(f"Invalid parameter '{server_type}' (server.type)")


class _Refused(Exception):
    """The server answered an option with an error reply."""

    def __init__(self, reply: int, message: str):
        super().__init__(message)
        self.reply = reply
        self.message = message


class NBDClient(BlockDevice):
    """An export as a BlockDevice. read_only when asked or when the server says so."""

    def __init__(self, address: NBDAddress, read_only: bool = True, fmt: str = "raw"):
        self.address = address
        self.filename = address.uri()
        self.format = fmt
        self._lock = threading.Lock()
        self._handle = 0
        self._sock: socket.socket | None = self._connect()
        self.structured = False
        self.context_id: int | None = None
        self.min_block, self.max_block = 1, P.MAX_PAYLOAD
        try:
            self._sock.settimeout(HANDSHAKE_TIMEOUT)  # a silent peer must not hang the open
            self._handshake()
            self._sock.settimeout(None)
        except BaseException:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            raise
        self.read_only = read_only or bool(self.transmission_flags & P.FLAG_READ_ONLY)
        if not read_only and self.transmission_flags & P.FLAG_READ_ONLY:
            self.close()
            raise ReadOnlyError(f"'{self.filename}' is exported read-only")

    # -- connection and handshake --
    def _connect(self) -> socket.socket:
        address = self.address
        if address.socket_path is None:
            try:
                socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise Qcow2IOError(
                    errno.EINVAL,
                    f"address resolution failed for {address.host}:{address.port}: {exc.strerror}",
                ) from None
        try:
            if address.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(address.socket_path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((address.host, address.port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            where = (
                address.socket_path
                if address.socket_path is not None
                else f"{address.host}:{address.port}"
            )
            raise Qcow2IOError(
                exc.errno or errno.EIO, f"Failed to connect to '{where}': {exc.strerror or exc}"
            ) from None
        return sock

    def _recv(self, count: int) -> bytearray:
        sock = self._sock
        assert sock is not None  # (open until _lost() or close(), after which none is read)
        buf = bytearray(count)
        view = memoryview(buf)
        done = 0
        while done < count:
            try:
                n = sock.recv_into(view[done:])
            except OSError as exc:
                raise self._lost(exc.strerror or str(exc)) from None
            if n == 0:
                raise self._lost("the server closed the connection")
            done += n
        return buf

    def _sendall(self, *buffers) -> None:
        sock = self._sock
        assert sock is not None  # (open until _lost() or close(), after which none is sent)
        try:
            for buffer in buffers:
                sock.sendall(buffer)
        except OSError as exc:
            raise self._lost(exc.strerror or str(exc)) from None

    def _lost(self, why: str) -> Qcow2IOError:
        """The connection is unusable from now on: every later request fails at once."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        return Qcow2IOError(
            errno.EIO, f"NBD connection to '{self.filename}' lost: {why}", self.filename
        )

    def _handshake(self) -> None:
        magic, second, flags = P.GREETING.unpack(self._recv(P.GREETING.size))
        if magic != P.NBDMAGIC:
            raise Qcow2IOError(
                errno.EINVAL,
                f"'{self.filename}' is not an NBD server (magic {magic:#x})",
                self.filename,
            )
        if second == OLDSTYLE_MAGIC:
            raise Qcow2IOError(
                errno.EINVAL,
                f"The NBD server at '{self.filename}' speaks only the oldstyle protocol",
                self.filename,
            )
        if second != P.IHAVEOPT:
            raise Qcow2IOError(
                errno.EINVAL, f"Bad NBD magic {second:#x} from '{self.filename}'", self.filename
            )
        fixed = bool(flags & P.FLAG_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & P.FLAG_NO_ZEROES)
        client_flags = (P.FLAG_C_FIXED_NEWSTYLE if fixed else 0) | (
            P.FLAG_C_NO_ZEROES if self.no_zeroes else 0
        )
        self._sendall(P.CLIENT_FLAGS.pack(client_flags))
        if fixed:
            self.structured = self._simple_option(P.OPT_STRUCTURED_REPLY)
            if self.structured:
                self._set_meta_context()
            try:
                self._go()
                return
            except _Refused as refusal:
                if refusal.reply != P.REP_ERR_UNSUP:
                    raise self._refusal_error(refusal) from None
        self._export_name()

    def _refusal_error(self, refusal: _Refused) -> Qcow2IOError:
        if refusal.reply == P.REP_ERR_UNKNOWN:
            text = "Requested export not available"
        elif refusal.reply == P.REP_ERR_TLS_REQD:
            text = "TLS negotiation required before option"
        else:
            text = f"Option refused by the server (reply {refusal.reply:#x})"
        if refusal.message:
            text += f"\nserver reported: {refusal.message}"
        return Qcow2IOError(errno.EINVAL, text, self.filename)

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)), data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, echoed, reply, length = P.OPTION_REPLY.unpack(self._recv(P.OPTION_REPLY.size))
        if magic != P.OPTION_REPLY_MAGIC or echoed != option:
            raise self._lost(f"bad option reply (magic {magic:#x}, option {echoed})")
        if length > 1 << 20:
            raise self._lost(f"option reply of {length} bytes")
        data = bytes(self._recv(length))
        if reply & (1 << 31):
            raise _Refused(reply, data.decode("utf-8", "replace"))
        return reply, data

    def _simple_option(self, option: int) -> bool:
        """An option with no data that the server acknowledges or refuses."""
        self._send_option(option)
        try:
            reply, _ = self._option_reply(option)
        except _Refused:
            return False
        return reply == P.REP_ACK

    def _set_meta_context(self) -> None:
        name = self.address.export.encode()
        query = self.address.status_context.encode()
        data = _U32.pack(len(name)) + name + _U32.pack(1) + _U32.pack(len(query)) + query
        self._send_option(P.OPT_SET_META_CONTEXT, data)
        while True:
            try:
                reply, payload = self._option_reply(P.OPT_SET_META_CONTEXT)
            except _Refused:
                return
            if reply == P.REP_ACK:
                return
            if reply == P.REP_META_CONTEXT and len(payload) >= 4:
                if payload[4:].decode("utf-8", "replace") == self.address.status_context:
                    self.context_id = _U32.unpack_from(payload)[0]

    def _go(self) -> None:
        name = self.address.export.encode()
        data = _U32.pack(len(name)) + name + struct.pack(">HH", 1, P.INFO_BLOCK_SIZE)
        self._send_option(P.OPT_GO, data)
        have_export = False
        while True:
            reply, payload = self._option_reply(P.OPT_GO)
            if reply == P.REP_ACK:
                break
            if reply != P.REP_INFO or len(payload) < 2:
                continue
            kind = struct.unpack_from(">H", payload)[0]
            if kind == P.INFO_EXPORT and len(payload) == P.INFO_EXPORT_PAYLOAD.size:
                _, self.size, self.transmission_flags = P.INFO_EXPORT_PAYLOAD.unpack(payload)
                have_export = True
            elif kind == P.INFO_BLOCK_SIZE and len(payload) == P.INFO_BLOCK_SIZE_PAYLOAD.size:
                _, minimum, _, maximum = P.INFO_BLOCK_SIZE_PAYLOAD.unpack(payload)
                self.min_block = max(1, minimum)
                self.max_block = max(self.min_block, min(maximum, P.MAX_PAYLOAD))
        if not have_export:
            raise self._lost("the server sent no export size")

    def _export_name(self) -> None:
        self._send_option(P.OPT_EXPORT_NAME, self.address.export.encode())
        try:
            reply = self._recv(P.EXPORT_NAME_REPLY.size)
        except Qcow2IOError:
            raise Qcow2IOError(
                errno.EINVAL, "Requested export not available", self.filename
            ) from None
        self.size, self.transmission_flags = P.EXPORT_NAME_REPLY.unpack(reply)
        if not self.no_zeroes:
            self._recv(len(P.EXPORT_NAME_PADDING))
        self.structured = False
        self.context_id = None

    # -- transmission --
    def _request(
        self,
        command: int,
        flags: int,
        offset: int,
        length: int,
        payload=b"",
        into: memoryview | None = None,
    ) -> list[tuple[int, bytes]]:
        """Send one request and read its whole reply; returns the block status chunks'
        (context id, descriptors). A read's data lands in `into`. Call with the lock held."""
        if self._sock is None:
            raise Qcow2IOError(
                errno.EIO, f"NBD connection to '{self.filename}' is closed", self.filename
            )
        self._handle += 1
        handle = self._handle
        self._sendall(
            P.REQUEST.pack(P.REQUEST_MAGIC, flags, command, handle, offset, length), payload
        )
        magic = _U32.unpack(self._recv(4))[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, echoed = struct.unpack(">IQ", self._recv(12))
            self._check_handle(echoed, handle)
            if error:
                raise self._server_error(command, error, "")
            if command == P.CMD_READ and into is not None:
                into[:] = self._recv(len(into))
            return []
        if magic != P.STRUCTURED_REPLY_MAGIC or not self.structured:
            raise self._lost(f"bad reply magic {magic:#x}")
        return self._structured_reply(command, handle, offset, length, into)

    def _check_handle(self, echoed: int, handle: int) -> None:
        if echoed != handle:
            raise self._lost(f"reply for handle {echoed} while waiting for {handle}")

    def _structured_reply(
        self, command: int, handle: int, offset: int, length: int, into: memoryview | None
    ) -> list[tuple[int, bytes]]:
        statuses: list[tuple[int, bytes]] = []
        error: Qcow2IOError | None = None
        first = True
        while True:
            if not first:
                magic = _U32.unpack(self._recv(4))[0]
                if magic != P.STRUCTURED_REPLY_MAGIC:
                    raise self._lost(f"bad reply magic {magic:#x}")
            first = False
            flags, kind, echoed, size = struct.unpack(">HHQI", self._recv(16))
            self._check_handle(echoed, handle)
            if size > MAX_REPLY_PAYLOAD:
                raise self._lost(f"reply chunk of {size} bytes")
            if (
                kind == P.REPLY_TYPE_OFFSET_DATA
                and command == P.CMD_READ
                and into is not None  # (a read always has it)
                and size >= 8
            ):
                chunk_offset = _U64.unpack(self._recv(8))[0]
                data_length = size - 8
                start = chunk_offset - offset
                if start < 0 or start + data_length > length:
                    raise self._lost(f"read data chunk at {chunk_offset} outside the request")
                into[start : start + data_length] = self._recv(data_length)
            elif (
                kind == P.REPLY_TYPE_OFFSET_HOLE
                and command == P.CMD_READ
                and into is not None
                and size == P.OFFSET_HOLE_PAYLOAD.size
            ):
                chunk_offset, hole_length = P.OFFSET_HOLE_PAYLOAD.unpack(
                    self._recv(P.OFFSET_HOLE_PAYLOAD.size)
                )
                start = chunk_offset - offset
                if start < 0 or start + hole_length > length:
                    raise self._lost(f"read hole chunk at {chunk_offset} outside the request")
                fill_zeros(into[start : start + hole_length])
            elif (
                kind == P.REPLY_TYPE_BLOCK_STATUS
                and command == P.CMD_BLOCK_STATUS
                and size >= 4
                and size % 8 == 4
            ):
                payload = bytes(self._recv(size))
                statuses.append((_U32.unpack_from(payload)[0], payload[4:]))
            elif kind in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET) and size >= 6:
                payload = bytes(self._recv(size))
                value, message_length = P.ERROR_PAYLOAD.unpack_from(payload)
                message = payload[6 : 6 + message_length].decode("utf-8", "replace")
                if error is None:
                    error = self._server_error(command, value, message)
            elif kind == P.REPLY_TYPE_NONE and size == 0:
                pass
            else:
                raise self._lost(
                    f"unexpected reply chunk type {kind} ({size} bytes) for "
                    f"{P.COMMAND_NAMES.get(command, command)}"
                )
            if flags & P.REPLY_FLAG_DONE:
                break
        if error is not None:
            raise error
        return statuses

    def _server_error(self, command: int, value: int, message: str) -> Qcow2IOError:
        code = (
            value
            if value
            in (P.EPERM, P.EIO, P.ENOMEM, P.EINVAL, P.ENOSPC, P.EOVERFLOW, P.ENOTSUP, P.ESHUTDOWN)
            else errno.EINVAL
        )
        text = (
            f"NBD {P.COMMAND_NAMES.get(command, command)} failed on '{self.filename}': "
            f"{os.strerror(code)}"
        )
        if message:
            text += f" (server reported: {message})"
        return Qcow2IOError(code, text, self.filename)

    def _chunks(self, offset: int, length: int):
        """The request's range in pieces the server takes (its maximum block size)."""
        step = self.max_block
        end = offset + length
        while offset < end:
            n = min(step, end - offset)
            yield offset, n
            offset += n

    # -- BlockDevice --
    def readinto(self, offset: int, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.check_request(offset, len(view))
        for chunk_offset, n in self._chunks(offset, len(view)):
            piece = view[chunk_offset - offset : chunk_offset - offset + n]
            with self._lock:
                self._request(P.CMD_READ, 0, chunk_offset, n, into=piece)
        return len(view)

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self.check_request(offset, len(view), write=True)
        for chunk_offset, n in self._chunks(offset, len(view)):
            with self._lock:
                self._request(
                    P.CMD_WRITE,
                    0,
                    chunk_offset,
                    n,
                    view[chunk_offset - offset : chunk_offset - offset + n],
                )

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.check_request(offset, length, write=True)
        if not self.transmission_flags & P.FLAG_SEND_WRITE_ZEROES:
            zeros = bytes(min(length, self.max_block))
            for chunk_offset, n in self._chunks(offset, length):
                self.write(chunk_offset, memoryview(zeros)[:n])
            return
        flags = 0 if may_unmap else P.CMD_FLAG_NO_HOLE
        for chunk_offset, n in self._chunks(offset, length):
            with self._lock:
                self._request(P.CMD_WRITE_ZEROES, flags, chunk_offset, n)

    def discard(self, offset: int, length: int) -> None:
        """TRIM where the server takes it; a discard is only advice otherwise."""
        self.check_request(offset, length, write=True)
        if not self.transmission_flags & P.FLAG_SEND_TRIM:
            return
        for chunk_offset, n in self._chunks(offset, length):
            with self._lock:
                self._request(P.CMD_TRIM, 0, chunk_offset, n)

    def flush(self) -> None:
        if self.read_only or not self.transmission_flags & P.FLAG_SEND_FLUSH:
            return
        with self._lock:
            self._request(P.CMD_FLUSH, 0, 0, 0)

    def extent_batches(self, offset: int, length: int) -> Iterator[list[Extent]]:
        """Allocation as the server's base:allocation reports it: HOLE is not data, ZERO
        reads as zeros; depth 0 (an export has no backing file the client sees), mapped at
        its own offset, as QEMU's nbd driver reports it, one block status reply a batch. A hole
        that is not known to read as zeros is not present (what x-dirty-bitmap shows as dirty
        or allocated)."""
        end = offset + length
        pos = offset
        while pos < end:
            if self.context_id is None:
                yield [Extent(pos, end - pos, True, False, 0, pos, True)]
                return
            result: list[Extent] = []
            ask = min(end - pos, MAX_STATUS_LENGTH)
            with self._lock:
                statuses = self._request(P.CMD_BLOCK_STATUS, 0, pos, ask)
            descriptors = next(
                (data for context, data in statuses if context == self.context_id), b""
            )
            advanced = pos
            for index in range(0, len(descriptors), _STATUS_DESCRIPTOR.size):
                run, flags = _STATUS_DESCRIPTOR.unpack_from(descriptors, index)
                run = min(run, end - advanced)
                if run == 0:
                    break
                is_data, is_zero = not flags & P.STATE_HOLE, bool(flags & P.STATE_ZERO)
                allocated = is_data or is_zero  # neither: QEMU reports it absent, unmapped
                result.append(
                    Extent(
                        advanced,
                        run,
                        is_data,
                        is_zero,
                        0,
                        advanced if allocated else None,
                        allocated,
                    )
                )
                advanced += run
            if advanced == pos:
                raise self._lost(f"block status at {pos} described no bytes")
            pos = advanced
            yield result

    def close(self) -> None:
        with self._lock:
            if self._sock is None:
                return
            try:
                self._sock.sendall(
                    P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, self._handle + 1, 0, 0)
                )
            except OSError:
                pass
            self._sock.close()
            self._sock = None


class NBDHostFile(DeviceFile):
    """An export as the file beneath a qcow2 image (hostfile.DeviceFile over an NBDClient)."""

    what = "NBD export"
