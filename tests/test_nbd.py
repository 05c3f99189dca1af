"""The NBD server, driven by real clients: nbdinfo, nbdcopy, qemu-io, qemu-img, libnbd (its
Python binding, run with the system python3) and qemu-nbd as the oracle for block status."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib.errors import CorruptImageError, InvalidArgumentError, Qcow2IOError, ReadOnlyError
from qcow2lib.exports import nbd_protocol as P
from qcow2lib.exports.nbd import NBDExport, NBDServer, nbd_error_for, serve
from qemutools import assert_clean, qemu_compare, qemu_create, qemu_img, qemu_io, qemu_map
from qemutools import wait_for_listener

SYSTEM_PYTHON = "/usr/bin/python3"  # where python3-libnbd is installed


@contextmanager
def nbd_server(tmp_path: Path, image, fmt: str | None = None, mode: str = "r+", **options):
    """Serve an image on a Unix socket in this process; yields (server, URL)."""
    device = qcow2lib.open(str(image), mode, fmt=fmt)
    sock = tmp_path / "nbd.sock"
    options.setdefault("persistent", True)
    server = NBDServer(device, unix_path=sock, **options)
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"nbd+unix:///{options.get('export_name', '')}?socket={sock}"
    finally:
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive()
        device.close()


def run(*args, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise AssertionError(f"{args[0]} exit {result.returncode}: {result.stdout}{result.stderr}")
    return result


def libnbd(script: str, *args) -> dict:
    """Run a libnbd script with the system python3; it prints one JSON object."""
    result = run(SYSTEM_PYTHON, "-c", "import json, sys, errno, nbd\n" + script, *args)
    return json.loads(result.stdout)


def nbd_map(url: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    entries = json.loads(run("nbdinfo", "--json", f"--map={context}", url).stdout)
    return merged([(e["offset"], e["length"], e["type"]) for e in entries])


def merged(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for offset, length, kind in runs:
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == offset:
            out[-1][1] += length
        else:
            out.append([offset, length, kind])
    return [tuple(r) for r in out]


def qemu_img_allocation(image) -> list[tuple[int, int, int]]:
    """qemu-img map as base:allocation flags (hole = not data, zero)."""
    return merged(
        [
            (e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0))
            for e in qemu_map(image)
        ]
    )


def allocation_states(image) -> list[tuple]:
    """qemu-img map without host offsets: (start, length, depth, present, zero, data)."""
    out: list[list] = []
    for e in qemu_map(image):
        state = [e["depth"], e["present"], e["zero"], e["data"]]
        if out and out[-1][2:] == state and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], *state])
    return [tuple(r) for r in out]


@contextmanager
def qemu_nbd(tmp_path: Path, image, fmt: str = "qcow2"):
    """QEMU's own server, read-only with allocation depth: the block-status oracle."""
    sock = tmp_path / "qemu.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-A", "-t", "-f", fmt, "-k", str(sock), str(image)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_listener(sock, proc, 20)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)


def make_chain(tmp_path: Path, name: str = "top") -> Path:
    """base (1 MiB clusters of data, a zero run) <- top with its own data and zeros."""
    base = tmp_path / f"{name}-base.qcow2"
    top = tmp_path / f"{name}.qcow2"
    qemu_create(base, "32M")
    qemu_io(
        base,
        "write -P 0x11 0 1M",
        "write -P 0x22 5M 192k",
        "write -z 9M 128k",
        "write -P 0x23 12M 4k",
    )
    qemu_create(top, "32M", backing=base.name, backing_fmt="qcow2")
    qemu_io(
        top, "write -P 0x33 512k 1M", "write -z 5M 64k", "write -P 0x44 20M 100k", "discard 12M 64k"
    )
    return top


QEMU_IO_WORKLOAD = [
    "write -P 0x51 0 64k",
    "write -P 0x52 70000 5000",
    "write -f -P 0x53 2M 300k",
    "write -z 4M 256k",
    "write -z -u 5M 128k",
    "discard 20M 64k",
    "write -P 0x54 31M 1M",
    "aio_write -P 0x55 8M 64k",
    "aio_write -P 0x56 8300k 64k",
    "aio_flush",
    "flush",
    "read -P 0x51 0 64k",
    "read -P 0x52 70000 5000",
    "read -P 0 4M 256k",
    "read -P 0x54 31M 1M",
]


def test_nbdinfo_shows_size_flags_and_block_sizes(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "48M")
    with nbd_server(tmp_path, image, export_name="disk", description="test disk") as (_, url):
        info = json.loads(run("nbdinfo", "--json", url).stdout)
    [export] = info["exports"]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert export["export-name"] == "disk" and export["description"] == "test disk"
    assert export["export-size"] == 48 << 20
    assert export["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    for flag in (
        "can_cache",
        "can_df",
        "can_fast_zero",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
    ):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert export["can_multi_conn"] is False  # one client at a time (shared=1)
    assert (
        export["block_size_minimum"],
        export["block_size_preferred"],
        export["block_size_maximum"],
    ) == (1, 4096, 32 << 20)


def test_block_status_matches_qemu_nbd_and_qemu_img_map(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    with nbd_server(tmp_path, top, mode="r") as (_, url):
        ours = nbd_map(url)
        ours_depth = nbd_map(url, "qemu:allocation-depth")
    with qemu_nbd(tmp_path, top) as qemu_url:
        theirs = nbd_map(qemu_url)
        theirs_depth = nbd_map(qemu_url, "qemu:allocation-depth")
    assert ours == theirs
    assert ours_depth == theirs_depth
    assert {kind for _, _, kind in ours_depth} == {0, 1, 2}
    assert ours == qemu_img_allocation(top)


def test_nbdcopy_and_qemu_img_convert_read_the_chain(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", top, expected)
    copied = tmp_path / "copied.raw"
    converted = tmp_path / "converted.qcow2"
    with nbd_server(tmp_path, top, mode="r", shared=4) as (_, url):
        assert json.loads(run("nbdinfo", "--json", url).stdout)["exports"][0]["can_multi_conn"]
        run("nbdcopy", "--connections=4", url, copied)
        qemu_img("convert", "-f", "raw", "-O", "qcow2", url, converted)
    assert copied.read_bytes() == expected.read_bytes()
    assert qemu_compare(converted, top) == 0


def test_qemu_io_writes_through_nbd_equal_direct_writes(tmp_path: Path) -> None:
    ours = make_chain(tmp_path, "ours")
    twin = make_chain(tmp_path, "twin")
    with nbd_server(tmp_path, ours) as (_, url):
        qemu_io(url, *QEMU_IO_WORKLOAD, fmt="raw")
    qemu_io(twin, *QEMU_IO_WORKLOAD)
    assert_clean(ours)
    assert qemu_compare(ours, twin) == 0
    # NO_HOLE and unmapping came through: the same clusters are allocated, zero or absent
    assert allocation_states(ours) == allocation_states(twin)


def test_raw_image_export(tmp_path: Path) -> None:
    ours, twin = tmp_path / "ours.raw", tmp_path / "twin.raw"
    for image in (ours, twin):
        qemu_create(image, "32M", fmt="raw")
        qemu_io(image, "write -P 0x61 1M 1M", fmt="raw")
    with nbd_server(tmp_path, ours, fmt="raw") as (_, url):
        qemu_io(url, *QEMU_IO_WORKLOAD, fmt="raw")
        before_map = nbd_map(url)
    qemu_io(twin, *QEMU_IO_WORKLOAD, fmt="raw")
    assert ours.read_bytes() == twin.read_bytes()
    assert before_map == qemu_img_allocation(ours)


def test_read_only_export_refuses_writes_with_eperm(tmp_path: Path) -> None:
    image = make_chain(tmp_path)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    with nbd_server(tmp_path, image, read_only=True) as (_, url):
        export = json.loads(run("nbdinfo", "--json", url).stdout)["exports"][0]
        assert export["is_read_only"] is True
        assert not export["can_trim"] and not export["can_zero"]
        qemu_io(url, "read -P 0x33 512k 1M", "read -P 0x11 0 512k", fmt="raw", extra=["-r"])
        result = libnbd(
            """
h = nbd.NBD()
h.set_strict_mode(0)   # send the writes anyway: the server must refuse them
h.connect_uri(sys.argv[1])
errors = {}
for name, call in (("write", lambda: h.pwrite(b"x" * 4096, 0)),
                   ("zero", lambda: h.zero(4096, 0)),
                   ("trim", lambda: h.trim(4096, 0))):
    try:
        call()
        errors[name] = 0
    except nbd.Error as exc:
        errors[name] = exc.errnum
h.flush()
print(json.dumps({"errors": errors, "data": h.pread(4, 512 * 1024).hex()}))
""",
            url,
        )
    assert result["errors"] == {"write": errno.EPERM, "zero": errno.EPERM, "trim": errno.EPERM}
    assert result["data"] == "33333333"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


LIBNBD_FEATURES = r"""
url = sys.argv[1]
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(url)
out = {}

chunks = []
def chunk(buf, offset, status, err):
    chunks.append([offset, len(buf), status, buf[:1].hex()])
    return 0
# data at 0..64k, a hole from 64k (the image is fresh past what the test wrote)
h.pread_structured(256 * 1024, 0, chunk)
out["chunks"] = chunks
out["read_data"] = nbd.READ_DATA
out["read_hole"] = nbd.READ_HOLE
# a short read is one data chunk, the hole's zeros included
short = []
h.pread_structured(8192, 61440, lambda b, o, s, e: short.append([o, len(b), s, b.hex()]) or 0)
out["chunks_short"] = short
chunks_df = []
h.pread_structured(256 * 1024, 0, lambda b, o, s, e: chunks_df.append([o, len(b), s]) or 0,
                   nbd.CMD_FLAG_DF)
out["chunks_df"] = chunks_df

status = {}
def extent(context, offset, entries, err):
    status.setdefault(context, []).append(entries)
    return 0
h.block_status(4 << 20, 0, extent)
out["status"] = status
one = {}
h.block_status(4 << 20, 0, lambda c, o, e, err: one.setdefault(c, e) and 0,
               nbd.CMD_FLAG_REQ_ONE)
out["status_one"] = one

# several requests in flight at once, completed in any order
buffers = []
for i in range(24):
    data = bytearray([0x70 + i]) * 65536
    h.aio_pwrite(nbd.Buffer.from_bytearray(data), (1 << 20) + i * 65536)
while h.aio_in_flight():
    h.poll(-1)
h.aio_flush()
reads = []
for i in range(24):
    buf = nbd.Buffer(65536)
    reads.append((buf, h.aio_pread(buf, (1 << 20) + i * 65536)))
out["max_in_flight"] = h.aio_in_flight()
while h.aio_in_flight():
    h.poll(-1)
out["aio_ok"] = all(h.aio_command_completed(cookie)
                    and buf.to_bytearray() == bytearray([0x70 + i]) * 65536
                    for i, (buf, cookie) in enumerate(reads))

# fast zero: whole clusters are fast; part of a cluster holding data is not
h.zero(128 * 1024, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
try:
    h.zero(4096, (2 << 20) + 4096, nbd.CMD_FLAG_FAST_ZERO)
    out["slow_zero"] = 0
except nbd.Error as exc:
    out["slow_zero"] = exc.errnum
out["zeroed"] = h.pread(128 * 1024, 1 << 20) == bytes(128 * 1024)
out["kept"] = h.pread(4096, (2 << 20) + 4096) == bytes([0x70 + 16]) * 4096
h.cache(2 << 20, 0)
try:
    h.set_strict_mode(0)
    h.pread(4096, (64 << 20) - 2048)
    out["past_end"] = 0
except nbd.Error as exc:
    out["past_end"] = exc.errnum
h.shutdown()
print(json.dumps(out))
"""


def test_libnbd_structured_reads_block_status_aio_and_fast_zero(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "64M")
    qemu_io(image, "write -P 0x41 0 64k")
    with nbd_server(tmp_path, image) as (_, url):
        out = libnbd(LIBNBD_FEATURES, url)
    assert out["chunks"] == [
        [0, 65536, out["read_data"], "41"],
        [65536, 196608, out["read_hole"], "00"],
    ]
    assert out["chunks_short"] == [[61440, 8192, out["read_data"], "41" * 4096 + "00" * 4096]]
    assert out["chunks_df"] == [[0, 262144, out["read_data"]]]
    assert out["status"] == {
        "base:allocation": [[65536, 0, (4 << 20) - 65536, 3]],
        "qemu:allocation-depth": [[65536, 1, (4 << 20) - 65536, 0]],
    }
    assert out["status_one"] == {"base:allocation": [65536, 0], "qemu:allocation-depth": [65536, 1]}
    assert out["max_in_flight"] > 1 and out["aio_ok"]
    assert out["slow_zero"] == errno.ENOTSUP
    assert out["zeroed"] and out["kept"]
    assert out["past_end"] == errno.EINVAL
    assert_clean(image)
    twin = tmp_path / "twin.qcow2"
    qemu_create(twin, "64M")
    qemu_io(
        twin,
        "write -P 0x41 0 64k",
        *[f"write -P {0x70 + i:#x} {(1 << 20) + i * 65536} 64k" for i in range(24)],
        "write -z 1M 128k",
    )
    assert qemu_compare(image, twin) == 0


def test_clients_share_the_device_up_to_the_limit(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "16M")
    with nbd_server(tmp_path, image, shared=2) as (server, url):
        result = libnbd(
            """
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(sys.argv[1]); b.connect_uri(sys.argv[1])
a.pwrite(b"\\x5a" * 65536, 65536)
a.flush()
seen = b.pread(65536, 65536) == b"\\x5a" * 65536
b.pwrite(b"\\x5b" * 4096, 0, nbd.CMD_FLAG_FUA)
print(json.dumps({"seen": seen, "back": a.pread(4096, 0) == b"\\x5b" * 4096}))
""",
            url,
        )
        assert result == {"seen": True, "back": True}
        first, second = RawClient(server.address), RawClient(server.address)
        third = socket.socket(socket.AF_UNIX)
        third.connect(str(server.address))
        third.settimeout(0.5)
        with pytest.raises(socket.timeout):
            third.recv(1)  # a third client waits: no greeting while two are connected
        first.close()
        third.settimeout(5)
        assert struct.unpack(">Q", recv_exact(third, 8))[0] == P.NBDMAGIC
        second.close()
        third.close()
    assert_clean(image)


def test_tcp_export(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "8M")
    device = qcow2lib.open(str(image), "r+")
    server = NBDServer(device, host="127.0.0.1", port=0, persistent=True)
    server.start()
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        host, port = server.address
        assert port > 0
        url = f"nbd://{host}:{port}"
        qemu_io(url, "write -P 0x21 1M 64k", "read -P 0x21 1M 64k", fmt="raw")
        assert (
            json.loads(run("nbdinfo", "--json", url).stdout)["exports"][0]["export-size"] == 8 << 20
        )
    finally:
        server.shutdown()
        thread.join(10)
        device.close()
    qemu_io(image, "read -P 0x21 1M 64k")
    assert_clean(image)


def test_not_persistent_stops_after_the_last_client(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "8M")
    sock = tmp_path / "once.sock"
    servers = []
    with qcow2lib.open(str(image), "r+") as device:
        thread = threading.Thread(
            target=serve, args=(device,), kwargs={"unix_path": sock, "ready": servers.append}
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not servers and time.monotonic() < deadline:
            time.sleep(0.01)
        qemu_io(f"nbd+unix:///?socket={sock}", "write -P 0x7e 0 64k", fmt="raw")
        thread.join(10)
        assert not thread.is_alive()
    assert not sock.exists()
    qemu_io(image, "read -P 0x7e 0 64k")
    assert_clean(image)


def test_several_exports_listed_and_chosen_by_name(tmp_path: Path) -> None:
    one, two = tmp_path / "one.qcow2", tmp_path / "two.raw"
    qemu_create(one, "4M")
    qemu_create(two, "6M", fmt="raw")
    qemu_io(two, "write -P 0x22 0 4k", fmt="raw")
    sock = tmp_path / "multi.sock"
    with (
        qcow2lib.open(str(one), "r+") as dev_one,
        qcow2lib.open(str(two), "r", fmt="raw") as dev_two,
    ):
        server = NBDServer(
            [NBDExport(dev_one, "one", "first disk"), NBDExport(dev_two, "two", "second disk")],
            unix_path=sock,
            persistent=True,
            shared=0,
        )
        server.start()
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            listing = json.loads(
                run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}").stdout
            )["exports"]
            assert [
                (e["export-name"], e["description"], e["export-size"], e["is_read_only"])
                for e in listing
            ] == [("one", "first disk", 4 << 20, False), ("two", "second disk", 6 << 20, True)]
            qemu_io(f"nbd+unix:///two?socket={sock}", "read -P 0x22 0 4k", fmt="raw", extra=["-r"])
            default = json.loads(run("nbdinfo", "--json", f"nbd+unix:///?socket={sock}").stdout)[
                "exports"
            ][0]
            assert default["export-size"] == 4 << 20  # the empty name: the first export
            missing = run("nbdinfo", f"nbd+unix:///three?socket={sock}", check=False)
            assert missing.returncode != 0
            # metadata contexts hold only for the export they were negotiated for
            for context_export, status_error in (("one", P.EINVAL), ("two", 0)):
                client = RawClient(sock)
                assert client.option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
                name = context_export.encode()
                query = (
                    struct.pack(">I", len(name))
                    + name
                    + struct.pack(">II", 1, 15)
                    + b"base:allocation"
                )
                assert client.option(P.OPT_SET_META_CONTEXT, query)[-1][0] == P.REP_ACK
                client.go("two", structured=False)
                client.request(P.CMD_BLOCK_STATUS, 0, 6 << 20, handle=4)
                assert client.reply()[:2] == (4, status_error)
                client.close()
        finally:
            server.shutdown()
            thread.join(10)


def test_bad_server_arguments(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "1M")
    with qcow2lib.open(str(image), "r") as device:
        with pytest.raises(InvalidArgumentError, match="unix_path or host"):
            NBDServer(device)
        with pytest.raises(InvalidArgumentError, match="unix_path or host"):
            NBDServer(device, unix_path=tmp_path / "s", host="127.0.0.1")
        with pytest.raises(InvalidArgumentError, match="shared -1"):
            NBDServer(device, unix_path=tmp_path / "s", shared=-1)
        for name in ("x" * 5000, "a\0b", "\udcff"):
            with pytest.raises(InvalidArgumentError, match="export name"):
                NBDServer(device, unix_path=tmp_path / "s", export_name=name)
        with pytest.raises(InvalidArgumentError, match="given twice"):
            NBDServer([NBDExport(device, "a"), NBDExport(device, "a")], unix_path=tmp_path / "s")
        server = NBDServer(device, unix_path=tmp_path / "missing" / "s")
        with pytest.raises(Qcow2IOError, match="cannot listen on unix socket"):
            server.start()
        (tmp_path / "file").write_text("keep me")
        with pytest.raises(Qcow2IOError, match="exists and is not a socket"):
            NBDServer(device, unix_path=tmp_path / "file").start()
        assert (tmp_path / "file").read_text() == "keep me"
        stale = socket.socket(socket.AF_UNIX)  # bound, never listening: a dead server's file
        stale.bind(str(tmp_path / "stale.sock"))
        stale.close()
        with NBDServer(device, unix_path=tmp_path / "stale.sock") as live:
            live.start()
            with pytest.raises(Qcow2IOError, match="another server is listening"):
                NBDServer(device, unix_path=tmp_path / "stale.sock").start()
        assert not (tmp_path / "stale.sock").exists()


# --- hostile clients, with raw sockets ----------------------------------------------------


def recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


class RawClient:
    """Speaks the protocol byte by byte, so tests can break it on purpose."""

    def __init__(self, address, flags: int = P.FLAG_C_FIXED_NEWSTYLE):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(address))
        magic, opt_magic, _ = P.GREETING.unpack(recv_exact(self.sock, P.GREETING.size))
        assert (magic, opt_magic) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", flags))
        self.read_lengths: dict[int, int] = {}  # simple replies to reads carry unframed data

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; return its replies (type, data) up to the final one."""
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, reply, length = P.OPTION_REPLY.unpack(recv_exact(self.sock, 20))
            assert magic == P.OPTION_REPLY_MAGIC and opt == option
            replies.append((reply, recv_exact(self.sock, length)))
            if reply not in (P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT):
                return replies

    def go(self, name: str = "", structured: bool = True) -> None:
        if structured:
            assert self.option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
        encoded = name.encode()
        data = struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0)
        assert self.option(P.OPT_GO, data)[-1][0] == P.REP_ACK

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        handle: int = 1,
    ) -> None:
        if command == P.CMD_READ:
            self.read_lengths[handle] = length
        self.sock.sendall(
            P.REQUEST.pack(P.REQUEST_MAGIC, flags, command, handle, offset, length) + payload
        )

    def reply(self) -> tuple[int, int, bytes]:
        """(handle, error, data) of one whole reply (structured chunks joined)."""
        data, error = b"", 0
        while True:
            magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]
            if magic == P.SIMPLE_REPLY_MAGIC:
                error, handle = struct.unpack(">IQ", recv_exact(self.sock, 12))
                if not error and handle in self.read_lengths:
                    data = recv_exact(self.sock, self.read_lengths[handle])
                return handle, error, data
            assert magic == P.STRUCTURED_REPLY_MAGIC
            flags, kind, handle, length = struct.unpack(">HHQI", recv_exact(self.sock, 16))
            payload = recv_exact(self.sock, length)
            if kind == P.REPLY_TYPE_ERROR:
                error = struct.unpack(">I", payload[:4])[0]
            elif kind == P.REPLY_TYPE_OFFSET_DATA:
                data += payload[8:]
            elif kind == P.REPLY_TYPE_OFFSET_HOLE:
                data += bytes(struct.unpack(">QI", payload)[1])
            if flags & P.REPLY_FLAG_DONE:
                return handle, error, data

    def close(self) -> None:
        self.sock.close()


def test_hostile_handshakes(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "4M")
    with nbd_server(tmp_path, image, shared=0, handshake_timeout=1.0) as (server, url):
        address = server.address
        # unknown client flags, then a bad option magic: both dropped
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(address))
        recv_exact(client, P.GREETING.size)
        client.sendall(struct.pack(">I", 0x80))
        assert closed_by_server(client)
        client = RawClient(address)
        client.sock.sendall(struct.pack(">QII", 0x1122334455667788, P.OPT_GO, 0))
        assert closed_by_server(client.sock)
        # an option longer than any option needs is refused; past 32 MiB it disconnects
        client = RawClient(address)
        assert client.option(99, bytes(100 << 10))[-1][0] == P.REP_ERR_TOO_BIG
        assert client.option(P.OPT_LIST) == [(P.REP_SERVER, bytes(4)), (P.REP_ACK, b"")]
        client.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 0xFFFFFFFF))
        assert closed_by_server(client.sock)
        # malformed options get NBD_REP_ERR_INVALID and the handshake goes on
        client = RawClient(address)
        assert client.option(1234)[-1][0] == P.REP_ERR_UNSUP
        assert client.option(P.OPT_STARTTLS)[-1][0] == P.REP_ERR_POLICY
        assert client.option(P.OPT_LIST, b"x")[-1][0] == P.REP_ERR_INVALID
        assert client.option(P.OPT_GO, struct.pack(">I", 1000) + b"ab")[-1][0] == P.REP_ERR_INVALID
        assert (
            client.option(P.OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 5))[-1][0]
            == P.REP_ERR_INVALID
        )
        assert (
            client.option(P.OPT_INFO, struct.pack(">I", 2) + b"no" + bytes(2))[-1][0]
            == P.REP_ERR_UNKNOWN
        )
        query = struct.pack(">II", 0, 1) + struct.pack(">I", 15) + b"base:allocation"
        assert client.option(P.OPT_SET_META_CONTEXT, query)[-1][0] == P.REP_ERR_INVALID
        assert client.option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
        assert client.option(P.OPT_SET_META_CONTEXT, query[:-3])[-1][0] == P.REP_ERR_INVALID
        assert client.option(P.OPT_SET_META_CONTEXT, query) == [
            (P.REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation"),
            (P.REP_ACK, b""),
        ]
        listed = client.option(
            P.OPT_LIST_META_CONTEXT, struct.pack(">II", 0, 1) + struct.pack(">I", 5) + b"qemu:"
        )
        assert listed == [
            (P.REP_META_CONTEXT, bytes(4) + b"qemu:allocation-depth"),
            (P.REP_ACK, b""),
        ]
        replies = client.option(P.OPT_INFO, struct.pack(">IH", 0, 0))
        assert replies[0] == (P.REP_INFO, P.INFO_EXPORT_PAYLOAD.pack(P.INFO_EXPORT, 4 << 20, 0xDED))
        assert client.option(P.OPT_ABORT) == [(P.REP_ACK, b"")]
        assert closed_by_server(client.sock)
        # EXPORT_NAME of an unknown export can only disconnect
        client = RawClient(address, P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
        client.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 3) + b"bad")
        assert closed_by_server(client.sock)
        # a client that goes silent mid-handshake is dropped after handshake_timeout
        client = RawClient(address)
        client.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 0)[:7])
        started = time.monotonic()
        assert closed_by_server(client.sock)
        assert 0.5 < time.monotonic() - started < 5
        # ... and one that vanishes mid-option leaves the server serving
        client = RawClient(address)
        client.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 100) + b"xx")
        client.close()
        # EXPORT_NAME with NO_ZEROES: size and flags only, then transmission
        client = RawClient(address, P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
        client.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0))
        assert P.EXPORT_NAME_REPLY.unpack(recv_exact(client.sock, 10)) == (4 << 20, 0xD6D)
        client.request(P.CMD_READ, 0, 512, handle=7)
        assert client.reply() == (7, 0, bytes(512))
        client.request(P.CMD_DISC)
        assert closed_by_server(client.sock)
        assert (
            json.loads(run("nbdinfo", "--json", url).stdout)["exports"][0]["export-size"] == 4 << 20
        )
    assert_clean(image)


def test_hostile_requests(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "4M")
    qemu_io(image, "write -P 0x31 0 1M")
    size = 4 << 20
    with nbd_server(tmp_path, image, shared=0) as (server, url):
        for structured in (False, True):
            client = RawClient(server.address)
            client.go(structured=structured)
            checks = [
                (P.CMD_READ, size - 512, 1024, 0, P.EINVAL),
                (P.CMD_READ, 1 << 63, 512, 0, P.EINVAL),
                (P.CMD_READ, 0, (32 << 20) + 1, 0, P.EINVAL),
                (P.CMD_WRITE_ZEROES, size, 512, 0, P.ENOSPC),
                (P.CMD_TRIM, size - 4096, 8192, 0, P.EINVAL),
                (P.CMD_CACHE, 1 << 63, 1, 0, P.EINVAL),
                (P.CMD_READ, 0, 512, 0x100, P.EINVAL),
                (P.CMD_FLUSH, 0, 0, P.CMD_FLAG_REQ_ONE, P.EINVAL),
                (P.CMD_BLOCK_STATUS, 0, 512, 0, P.EINVAL),  # no context negotiated
                (42, 0, 0, 0, P.EINVAL),
                (P.CMD_WRITE_ZEROES, 0, 4096, P.CMD_FLAG_FAST_ZERO, P.ENOTSUP),
            ]
            for handle, (command, offset, length, flags, error) in enumerate(checks):
                client.request(command, offset, length, flags, handle=handle)
                assert client.reply()[:2] == (handle, error), (command, offset, length, flags)
            client.request(P.CMD_WRITE, size - 100, 200, payload=b"\xee" * 200, handle=50)
            assert client.reply()[:2] == (50, P.ENOSPC)
            # a write beyond the maximum block size: its payload is skipped, EINVAL
            client.request(
                P.CMD_WRITE, 0, (32 << 20) + 4096, handle=51, payload=b"\xee" * ((32 << 20) + 4096)
            )
            assert client.reply()[:2] == (51, P.EINVAL)
            # many requests in flight, answered in any order
            for handle in range(100, 140):
                client.request(P.CMD_READ, (handle - 100) * 8192, 8192, handle=handle)
            answers = {}
            for _ in range(40):
                handle, error, data = client.reply()
                answers[handle] = (error, data)
            assert answers == {h: (0, b"\x31" * 8192) for h in range(100, 140)}
            client.request(P.CMD_DISC)
            assert closed_by_server(client.sock)
        # abrupt ends: mid-request header, mid-payload of a write
        client = RawClient(server.address)
        client.go()
        client.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, 512)[:13])
        client.close()
        client = RawClient(server.address)
        client.go()
        client.request(P.CMD_WRITE, 1 << 20, 65536, payload=b"\xdd" * 1000)
        client.close()
        # a bad request magic cannot be answered: disconnect
        client = RawClient(server.address)
        client.go()
        client.sock.sendall(P.REQUEST.pack(0x12345678, 0, P.CMD_READ, 1, 0, 512))
        assert closed_by_server(client.sock)
        qemu_io(url, "read -P 0x31 0 1M", "read -P 0 1M 3M", fmt="raw", extra=["-r"])
    assert_clean(image)
    qemu_io(image, "read -P 0x31 0 1M", "read -P 0 1M 3M")


def test_device_errors_become_nbd_errors(tmp_path: Path) -> None:
    image = tmp_path / "broken.qcow2"
    qemu_create(image, "4M")
    qemu_io(image, "write -P 0x41 0 128k")
    with open(image, "r+b") as f:  # point guest cluster 1 past the end of the file
        f.seek(40)
        l1_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset + 8)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))
    with nbd_server(tmp_path, image, mode="r", shared=0) as (server, url):
        for structured in (False, True):
            client = RawClient(server.address)
            client.go(structured=structured)
            client.request(P.CMD_READ, 0, 4096, handle=1)
            assert client.reply() == (1, 0, b"\x41" * 4096)
            client.request(P.CMD_READ, 60 << 10, 8192, handle=2)
            assert client.reply()[:2] == (2, P.EIO)
            client.request(P.CMD_READ, 0, 4096, handle=3)  # the connection goes on
            assert client.reply() == (3, 0, b"\x41" * 4096)
            client.close()
        failed = run("qemu-io", "-r", "-f", "raw", "-c", "read 64k 4k", url, check=False)
        assert "Input/output error" in failed.stdout + failed.stderr


def test_read_only_devices_name_host_pieces_which_the_export_sends(tmp_path: Path) -> None:
    """A read-only device names the host file pieces holding a range (its backing file's
    too), which a read-only export sends with sendfile; anything else is read."""
    top = make_chain(tmp_path)
    with qcow2lib.open(str(top)) as device:
        # base data below a hole of the top, then the top's data: two files
        pieces = device.host_pieces(0, 1536 << 10)
        assert pieces is not None and len({fd for fd, _, _ in pieces}) == 2
        content = b"".join(os.pread(fd, length, pos) for fd, pos, length in pieces)
        assert content == device.read(0, 1536 << 10)
        assert device.host_pieces(5 << 20, 64 << 10) is None  # a zero cluster
        assert device.host_pieces(30 << 20, 4096) is None  # no data anywhere in the chain
    with qcow2lib.open(str(top), "r+") as device:
        assert device.host_pieces(0, 4096) is None  # writable: its clusters may move
    compressed, raw = tmp_path / "compressed.qcow2", tmp_path / "disk.raw"
    qemu_img("convert", "-c", "-O", "qcow2", top, compressed)
    qemu_img("convert", "-O", "raw", top, raw)
    with qcow2lib.open(str(compressed)) as device:
        assert device.host_pieces(0, 4096) is None
    with qcow2lib.RawDevice(str(raw)) as device:
        assert device.host_pieces(4096, 8192) == [(device.file.fd, 4096, 8192)]
    expected = raw.read_bytes()
    for mode in ("r", "r+"):  # sent from the files; read into buffers (one per part)
        with nbd_server(tmp_path, top, mode=mode, shared=0) as (server, _):
            for structured in (False, True):
                client = RawClient(server.address)
                client.go(structured=structured)
                client.request(P.CMD_READ, 0, 6 << 20, handle=1)  # data of both files, zeros
                assert client.reply() == (1, 0, expected[: 6 << 20])
                client.close()
    # the file ends 4 KiB into the last data cluster: the rest reads as zeros
    truncated = tmp_path / "truncated.qcow2"
    qemu_create(truncated, "4M")
    qemu_io(truncated, "write -P 0x41 0 64k", "write -P 0x42 1M 64k")
    os.truncate(truncated, os.path.getsize(truncated) - (60 << 10))
    with nbd_server(tmp_path, truncated, mode="r", shared=0) as (server, _):
        for structured in (False, True):
            client = RawClient(server.address)
            client.go(structured=structured)
            client.request(P.CMD_READ, 1 << 20, 64 << 10, handle=2)
            assert client.reply() == (2, 0, b"\x42" * 4096 + bytes(60 << 10))
            client.request(P.CMD_READ, 0, 4096, handle=3)  # and the connection goes on
            assert client.reply() == (3, 0, b"\x41" * 4096)
            client.close()


@pytest.mark.parametrize(
    "exc, error",
    [
        (ReadOnlyError("read-only"), P.EPERM),
        (InvalidArgumentError("bad range"), P.EINVAL),
        (CorruptImageError("bad L2 entry"), P.EIO),
        (Qcow2IOError(errno.ENOSPC, "full"), P.ENOSPC),
        (Qcow2IOError(errno.EDQUOT, "quota"), P.ENOSPC),
        (OSError(errno.EFBIG, "too big"), P.ENOSPC),
        (OSError(errno.EROFS, "read-only fs"), P.EPERM),
        (OSError(errno.EBADF, "bad fd"), P.EIO),
    ],
)
def test_nbd_error_values(exc: Exception, error: int) -> None:
    assert nbd_error_for(exc) == error


def test_shutdown_from_a_signal_handler_with_clients_connected(tmp_path: Path) -> None:
    """What a CLI does: serve in the main thread, shut down on a signal."""
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "4M")
    device = qcow2lib.open(str(image), "r+")
    server = NBDServer(device, unix_path=tmp_path / "sig.sock", persistent=True, shared=0)
    server.start()
    clients: list[RawClient] = []

    def connect_then_signal() -> None:
        idle = RawClient(server.address)
        idle.go()
        idle.request(P.CMD_WRITE, 0, 4096, payload=b"\x66" * 4096, handle=9)
        clients.extend([idle, RawClient(server.address)])  # the second stays in handshake
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, lambda *_: server.shutdown())
    try:
        helper = threading.Thread(target=connect_then_signal)
        helper.start()
        started = time.monotonic()
        server.serve_forever()
        assert time.monotonic() - started < 5
        helper.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        device.close()
    idle, in_handshake = clients
    assert idle.reply() == (9, 0, b"")
    assert closed_by_server(idle.sock) and closed_by_server(in_handshake.sock)
    assert not (tmp_path / "sig.sock").exists()
    qemu_io(image, "read -P 0x66 0 4k")
    assert_clean(image)


def test_a_client_that_stops_reading_replies_is_held_to_its_budget(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "64M")
    qemu_io(image, "write -P 0x5c 0 32M")
    with nbd_server(tmp_path, image, shared=0) as (server, url):
        stalled = RawClient(server.address)
        stalled.go()
        for handle in range(64):  # 256 MiB of replies asked for, none read yet
            stalled.request(P.CMD_READ, (handle % 8) << 22, 4 << 20, handle=handle)
        time.sleep(0.5)
        [connection] = [c for c in list(server._connections) if c.requests]
        # reading stopped at the limit: 16 requests of 4 MiB in flight, plus the one waiting,
        # plus the replies already handed to the kernel's socket buffer (no longer ours)
        kernel_held = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // (4 << 20)
        assert connection.requests <= server.max_requests_in_flight + 1 + kernel_held
        assert connection.budget.bytes <= server.max_buffered_bytes
        qemu_io(url, "read -P 0x5c 1M 64k", "write -P 0x5d 40M 64k", fmt="raw")
        replies = {}
        for _ in range(64):
            handle, error, data = stalled.reply()
            replies[handle] = (error, data == b"\x5c" * (4 << 20))
        assert replies == {handle: (0, True) for handle in range(64)}
        stalled.close()
    qemu_io(image, "read -P 0x5d 40M 64k")
    assert_clean(image)


def test_can_zero_fast_follows_what_zeroing_would_write(tmp_path: Path) -> None:
    """FAST_ZERO's answer: metadata-only zeroing is fast, writing zero bytes is not."""
    v3 = tmp_path / "v3.qcow2"
    qemu_create(v3, "4M")
    qemu_io(v3, "write -P 0x41 0 64k")
    base = tmp_path / "base.qcow2"
    qemu_create(base, "4M")
    qemu_io(base, "write -P 0x42 0 64k")
    v2 = tmp_path / "v2.qcow2"
    qemu_create(v2, "4M", options={"compat": "0.10"}, backing=base.name, backing_fmt="qcow2")
    raw = tmp_path / "disk.raw"
    qemu_create(raw, "4M", fmt="raw")
    with qcow2lib.open(str(v3), "r+") as disk:
        assert disk.can_zero_fast(0, 65536)  # a zero flag for the whole cluster
        assert not disk.can_zero_fast(4096, 4096)  # part of a data cluster: zeros written
        assert disk.can_zero_fast(65536 + 4096, 4096)  # part of a cluster that reads zero
        assert disk.can_zero_fast(0, 4 << 20)
    v2_alone = tmp_path / "v2-alone.qcow2"
    qemu_create(v2_alone, "4M", options={"compat": "0.10"})
    qemu_io(v2_alone, "write -P 0x43 0 1M")
    with qcow2lib.open(str(v2_alone), "r+") as disk:
        assert disk.can_zero_fast(0, 1 << 20)  # v2 without a backing file: holes
        size_before = v2_alone.stat().st_size
        disk.write_zeroes(0, 1 << 20, may_unmap=True)
        disk.flush()
    assert v2_alone.stat().st_size <= size_before  # no data cluster was written
    with qcow2lib.open(str(v2), "r+") as disk:
        # v2 has no zero flag: over a backing file, zeroing writes zero bytes (as QEMU)
        assert not disk.can_zero_fast(0, 65536)
        assert not disk.can_zero_fast(65536, 65536)
        size_before = v2.stat().st_size
        disk.write_zeroes(65536, 1 << 20)
        disk.flush()
    assert v2.stat().st_size - size_before >= 1 << 20  # the zeros were written as data
    with qcow2lib.open(str(v3), "r") as disk:
        assert not disk.can_zero_fast(0, 65536)  # read-only
    with qcow2lib.open(str(raw), "r+", fmt="raw") as disk:
        assert disk.can_zero_fast(0, 65536, may_unmap=True)
        assert not disk.can_zero_fast(0, 65536, may_unmap=False)


SERVER_WITH_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
import qcow2lib
from qcow2lib.exports.nbd import serve
with qcow2lib.open(sys.argv[1], "r+", fmt="raw") as device:
    serve(device, unix_path=sys.argv[2])
"""


def test_host_errors_reach_the_client_in_a_server_process(tmp_path: Path) -> None:
    """A server in its own process whose file may not grow past 1 MiB: EFBIG becomes
    ENOSPC for the client, and the server leaves once its only client is gone."""
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    sock = tmp_path / "limited.sock"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(
        ["python3", "-c", SERVER_WITH_FILE_SIZE_LIMIT, str(image), str(sock)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():  # (no probe: a probe would be this server's only client)
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        result = run(
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x22 2M 64k",
            "-c",
            "read -P 0x11 0 64k",
            f"nbd+unix:///?socket={sock}",
            check=False,
        )
        assert "write failed: No space left on device" in result.stdout + result.stderr
        assert "read 65536/65536 bytes at offset 0" in result.stdout
        assert proc.wait(20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not sock.exists()
    data = image.read_bytes()
    assert data[:65536] == b"\x11" * 65536 and data[65536:] == bytes(len(data) - 65536)
