"""The NBD client (qcow2lib.exports.nbd_client) against real qemu-nbd and our own server.

qimg (in-process, as "qemu-img") and the real qemu-img are run with the same arguments
against the same export; exit code, stdout and stderr must be the same. The client is
also driven directly as a BlockDevice: reads, writes, zeroes, trims, flushes, splitting
at the server's maximum block size, many threads at once, server errors and a lost
connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib.exports.nbd import NBDServer
from qcow2lib.exports.nbd_client import NBDAddress, NBDClient, parse_nbd_name
from qemutools import qemu_img, qemu_io, run
from qemutools import wait_for_listener
from qemutools import assert_same_result
from qemutools import run_qimg


def assert_same(*args) -> subprocess.CompletedProcess:
    ours = run_qimg(*args)
    theirs = run(["qemu-img", *map(str, args)], check=False)
    assert_same_result(ours, theirs, args)
    return ours


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: Path, export: str = "exp", fmt: str = "qcow2", extra: tuple = ()):
    """A real qemu-nbd serving `image` on a Unix socket (several clients allowed)."""
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", fmt, "-x", export, "-k", str(sock), "-t", "-e", "8", *extra, str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_listener(sock, proc, 10)
        yield f"nbd+unix:///{export}?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stderr.close()


@contextlib.contextmanager
def own_server(
    image: Path,
    sock: Path,
    export: str = "exp",
    mode: str = "r+",
    fmt: str | None = None,
    **options,
):
    """qcow2lib's NBD server over `image` on a Unix socket, in this process."""
    device = qcow2lib.open(str(image), mode, fmt=fmt)
    server = NBDServer(
        device, unix_path=str(sock), export_name=export, shared=8, persistent=True, **options
    )
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"nbd+unix:///{export}?socket={sock}"
    finally:
        server.shutdown()
        thread.join(10)
        device.close()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 7 0 64k", "write -P 9 1M 192k", "write -z 2M 64k", "write -P 5 3M 4k")
    return path


def test_names():
    assert parse_nbd_name("nbd+unix:///exp?socket=/run/s.sock") == NBDAddress("exp", "/run/s.sock")
    assert parse_nbd_name("nbd:unix:/run/s.sock:exportname=e") == NBDAddress("e", "/run/s.sock")
    assert parse_nbd_name("nbd://example:1234/a%20b") == NBDAddress(
        "a b", host="example", port=1234
    )
    assert parse_nbd_name("nbd:localhost:10810") == NBDAddress("", host="localhost", port=10810)
    assert parse_nbd_name("nbd+unix:///e?socket=/s").uri() == "nbd+unix:///e?socket=/s"
    for bad in ("nbd+unix:///e", "nbd://h:99999/e", "nbd:host", "nbd+unix:///e?socket=/s&x=1"):
        with pytest.raises(qcow2lib.InvalidArgumentError):
            parse_nbd_name(bad)


@pytest.mark.parametrize("server", ["qemu-nbd", "qcow2lib"])
def test_info_map_compare_like_qemu_img(server, source: Path, tmp_path: Path):
    sock = tmp_path / "s.sock"
    serve = qemu_nbd(source, sock) if server == "qemu-nbd" else own_server(source, sock)
    with serve as url:
        json_names = [
            f'json:{{"driver":"nbd","server":{{"type":"unix","path":"{sock}"}},"export":"exp"}}',
            f'json:{{"driver":"nbd","path":"{sock}","export":"exp"}}',
            f'json:{{"driver":"raw","file":{{"driver":"nbd","path":"{sock}","export":"exp"}}}}',
        ]
        for name in (url, f"nbd:unix:{sock}:exportname=exp", *json_names):
            assert "4 MiB" in assert_same("info", name).stdout
            assert_same("info", "--output=json", name)
            assert_same("map", name)
            assert_same("map", "--output=json", name)
        assert_same("info", "-f", "raw", url)
        assert_same("compare", "-f", "raw", "-F", "raw", url, url)
        assert run_qimg("compare", "-U", source, url).returncode == 0
        assert_same("info", f"nbd+unix:///nope?socket={sock}")


def test_allocation_depth_as_dirty_bitmap(source: Path, tmp_path: Path):
    """iotest nbd-qemu-allocation's view: the depth context read through x-dirty-bitmap."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io(base, "write -P 1 0 2M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io(top, "write -P 2 1M 1M")
    sock = tmp_path / "s.sock"
    with qemu_nbd(top, sock, extra=("-r", "-A")):
        opts = f"driver=nbd,server.type=unix,server.path={sock},export=exp"
        for context in ("", ",x-dirty-bitmap=qemu:allocation-depth"):
            assert_same("map", "--output=json", "--image-opts", opts + context)
            assert_same("map", "--image-opts", opts + context)


@pytest.mark.parametrize("server", ["qemu-nbd", "qcow2lib"])
def test_convert_both_ways(server, source: Path, tmp_path: Path):
    target = tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", target, "4M")
    sock = tmp_path / "t.sock"
    serve = qemu_nbd(target, sock, "t") if server == "qemu-nbd" else own_server(target, sock, "t")
    with serve as url:
        assert run_qimg("convert", "-n", "-O", "raw", source, url).returncode == 0
        assert qemu_img("compare", "-U", source, url, check=False).returncode == 0
        assert_same("map", "--output=json", url)
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        assert run_qimg("convert", "-O", "qcow2", url, ours).returncode == 0
        qemu_img("convert", "-O", "qcow2", url, theirs)
    assert qemu_img("compare", ours, theirs, check=False).returncode == 0
    assert (
        qemu_img("map", "--output=json", ours).stdout
        == qemu_img("map", "--output=json", theirs).stdout
    )


def test_block_device_operations(tmp_path: Path):
    image = tmp_path / "d.raw"
    qemu_img("create", "-q", "-f", "raw", image, "8M")
    sock = tmp_path / "s.sock"
    with qemu_nbd(image, sock, fmt="raw", extra=("--discard=unmap",)) as url:
        with qcow2lib.open(url, "r+") as disk:
            assert disk.size == 8 << 20 and not disk.read_only
            payload = os.urandom(3 << 20)
            disk.max_block = 1 << 20  # as a server with a 1 MiB limit: requests are split
            disk.write(12345, payload)
            assert disk.read(12345, len(payload)) == payload
            disk.write_zeroes(4 << 20, 1 << 20, may_unmap=True)
            disk.write_zeroes(5 << 20, 65536, may_unmap=False)
            disk.discard(6 << 20, 1 << 20)
            disk.flush()
            assert disk.read(4 << 20, 2 << 20) == bytes(2 << 20)
            with ThreadPoolExecutor(8) as pool:  # one connection shared by many threads
                chunks = list(pool.map(lambda i: disk.read(12345 + i * 65536, 65536), range(40)))
            assert b"".join(chunks) == payload[: 40 * 65536]
            with pytest.raises(qcow2lib.InvalidArgumentError):
                disk.read(8 << 20, 1)
    assert image.read_bytes()[12345 : 12345 + len(payload)] == payload


def test_errors(tmp_path: Path, source: Path):
    sock = tmp_path / "s.sock"
    with pytest.raises(qcow2lib.Qcow2IOError) as missing:
        qcow2lib.open(f"nbd+unix:///exp?socket={sock}")
    assert missing.value.errno == errno.ENOENT
    with own_server(source, sock, mode="r") as url:
        disk = qcow2lib.open(url)
        with pytest.raises(qcow2lib.ReadOnlyError):
            disk.write(0, b"x")
        with pytest.raises(qcow2lib.ReadOnlyError):
            qcow2lib.open(url, "r+")
        assert disk.read(0, 4) == bytes([7]) * 4
    with pytest.raises(qcow2lib.Qcow2IOError) as lost:  # the server went away
        disk.read(0, 4)
    assert lost.value.errno == errno.EIO
    disk.close()


def test_server_error_mapped(tmp_path: Path):
    """A server's EIO on a read becomes Qcow2IOError(EIO), and the connection still works."""

    class FailingDevice(qcow2lib.RawDevice):
        def readinto(self, offset, buffer):
            if offset >= 1 << 20:
                raise qcow2lib.Qcow2IOError(errno.EIO, "injected read error")
            return super().readinto(offset, buffer)

    image = tmp_path / "d.raw"
    image.write_bytes(bytes(2 << 20))
    device = FailingDevice(str(image))
    server = NBDServer(device, unix_path=str(tmp_path / "s.sock"), export_name="e", persistent=True)
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with NBDClient(NBDAddress("e", str(tmp_path / "s.sock"))) as disk:
            with pytest.raises(qcow2lib.Qcow2IOError) as failed:
                disk.read(1 << 20, 512)
            assert failed.value.errno == errno.EIO
            assert disk.read(0, 512) == bytes(512)
    finally:
        server.shutdown()
        thread.join(10)
        device.close()


def test_tcp_names(source: Path, tmp_path: Path):
    """nbd://HOST:PORT/EXPORT, nbd:HOST:PORT:exportname=..., and json host/port options
    (iotest 162: a numeric port, a host that does not resolve)."""
    device = qcow2lib.open(str(source))
    server = NBDServer(
        device, host="127.0.0.1", port=0, export_name="exp", shared=8, persistent=True
    )
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.address
        for name in (
            f"nbd://{host}:{port}/exp",
            f"nbd:{host}:{port}:exportname=exp",
            f"json:{{'driver': 'nbd', 'host': '{host}', 'port': {port}, 'export': 'exp'}}",
            f'json:{{"driver":"nbd","server":{{"type":"inet","host":"{host}",'
            f'"port":"{port}"}},"export":"exp"}}',
        ):
            assert f"image: nbd://{host}:{port}/exp\n" in assert_same("info", name).stdout
            assert_same("map", "--output=json", name)
    finally:
        server.shutdown()
        thread.join(10)
        device.close()
    assert_same("info", 'json:{"driver": "nbd", "host": -1}')


def test_silent_server_does_not_hang(tmp_path: Path, monkeypatch):
    """A peer that accepts and never greets fails the open after the handshake timeout."""
    from qcow2lib.exports import nbd_client

    monkeypatch.setattr(nbd_client, "HANDSHAKE_TIMEOUT", 0.5)
    import socket

    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "silent.sock"))
    listener.listen()
    try:
        started = time.monotonic()
        with pytest.raises(qcow2lib.Qcow2IOError) as failed:
            qcow2lib.open(f"nbd+unix:///x?socket={tmp_path / 'silent.sock'}")
        assert failed.value.errno == errno.EIO and "timed out" in str(failed.value)
        assert time.monotonic() - started < 5
    finally:
        listener.close()


@pytest.mark.parametrize("server", ["qemu-nbd", "qcow2lib"])
def test_qcow2_inside_export(server, source: Path, tmp_path: Path):
    """A qcow2 image in a raw export (iotest 302): created there by convert, then probed,
    read, mapped and checked through NBD as qemu-img does."""
    container = tmp_path / "container.raw"
    with open(container, "wb") as f:
        f.truncate(8 << 20)
    sock = tmp_path / "c.sock"
    serve = (
        qemu_nbd(container, sock, fmt="raw")
        if server == "qemu-nbd"
        else own_server(container, sock, fmt="raw")
    )
    with serve as url:
        assert run_qimg("convert", "-f", "qcow2", "-O", "qcow2", "-c", source, url).returncode == 0
        assert qemu_img("check", url, check=False).returncode == 0
        assert qemu_img("compare", "-U", source, url, check=False).returncode == 0
        for args in (
            ("info", url),
            ("info", "--output=json", url),
            ("map", url),
            ("map", "--output=json", url),
            ("check", url),
            ("info", "-f", "raw", url),
            ("compare", "-U", source, url),
        ):
            assert_same(*args)
        with qcow2lib.open(url, "r+") as image:  # writes go through the export
            assert image.format == "qcow2"
            image.write(3 << 20, b"\x42" * 65536)
        assert qemu_img("check", url, check=False).returncode == 0
        assert_same("map", "--output=json", url)
        too_small = tmp_path / "big.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", too_small, "64M")
        qemu_io(too_small, "write -P 1 0 16M")
        result = run_qimg("convert", "-n", "-O", "qcow2", too_small, url)
        assert result.returncode == 1  # the qcow2 inside cannot grow past the export
