"""The first steps of QEMU's ssh block driver: its options checked and the server reached.

qcow2lib speaks no SSH. It still takes an ssh image's options as qemu-img does (host,
port as a number, path, user, host-key-check, or server.host/server.port) and makes the
TCP connection, so that a wrong option or an unreachable server fails with qemu-img's
message; a server that answers is refused with a message saying SSH is not supported.
"""

from __future__ import annotations

import errno
import os
import socket

from ..errors import InvalidArgumentError, Qcow2IOError, UnsupportedFeatureError

SSH_PORT = 22
_KNOWN: tuple[str, ...] = ("host", "port", "path", "user", "host_key_check", "host-key-check")
_KNOWN += ("server.host", "server.port", "filename")
CONNECT_TIMEOUT = 10.0


def ssh_open_check(options: dict[str, str]) -> None:
    """Validate the options, connect; raise the error qemu-img would report (and, once
    connected, UnsupportedFeatureError)."""
    for key in options:
        if key not in _KNOWN:
            raise InvalidArgumentError(f"Block protocol 'ssh' doesn't support the option '{key}'")
    host = options.get("server.host", options.get("host"))
    port_text = options.get("server.port", options.get("port", str(SSH_PORT)))
    if not port_text.isdigit():
        raise InvalidArgumentError("Parameter 'port' expects a number")
    if options.get("path") is None:
        raise InvalidArgumentError("Parameter 'path' is missing")
    if host is None:
        raise InvalidArgumentError("Parameter 'server.host' is missing")
    port = int(port_text)
    where = f"'{host}:{port}'"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Qcow2IOError(
            errno.EINVAL, f"address resolution failed for {host}:{port}: {exc.args[-1]}"
        ) from None
    last_error = errno.ECONNREFUSED
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(address)
            except OSError as exc:
                last_error = exc.errno or errno.ECONNREFUSED
                continue
        raise UnsupportedFeatureError(
            f"The server at {where} answered, but qimg does not speak the SSH protocol"
        )
    raise Qcow2IOError(last_error, f"Failed to connect to {where}: {os.strerror(last_error)}")
