"""The public API as users call it: size strings, closed devices, help() text."""

from __future__ import annotations

import errno
import pydoc

import pytest

import qcow2lib
from qemutools import qemu_img


@pytest.mark.parametrize(
    "size, expected", [("1G", 1 << 30), ("1.5M", 3 << 19), ("0x10000", 65536), (4096, 4096)]
)
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_takes_size_strings(tmp_path, size, expected, fmt):
    path = tmp_path / "img"
    qcow2lib.create(str(path), size, fmt=fmt)
    info = qemu_img("info", "--output=json", "-f", fmt, path).stdout
    assert f'"virtual-size": {expected},' in info


@pytest.mark.parametrize(
    "size, words",
    [
        ("x", "'x'"),
        ("1Q", "'1Q'"),
        ("-1", "'-1'"),
        (1.5, "float (1.5)"),
        (True, "bool (True)"),
        ([1], "list ([1])"),
    ],
)
def test_create_refuses_bad_sizes_naming_them(tmp_path, size, words):
    path = tmp_path / "img"
    with pytest.raises(qcow2lib.InvalidArgumentError, match="size") as caught:
        qcow2lib.create(str(path), size)
    assert words in str(caught.value)
    assert not path.exists()


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_closed_device_says_it_is_closed(tmp_path, fmt):
    path = tmp_path / "img"
    qcow2lib.create(str(path), "1M", fmt=fmt)
    disk = qcow2lib.open(str(path), "r+", fmt=fmt)
    disk.write(0, b"data")
    disk.close()
    requests = [
        lambda: disk.read(0, 4),
        lambda: disk.readinto(0, bytearray(4)),
        lambda: disk.write(0, b"x"),
        lambda: disk.write_zeroes(0, 512),
        lambda: disk.discard(0, 512),
        lambda: disk.extents(),
        lambda: disk.readinto_scattered(0, [bytearray(4)]),
        lambda: disk.host_pieces(0, 4),
    ]
    for request in requests:
        with pytest.raises(qcow2lib.Qcow2IOError) as caught:
            request()
        assert caught.value.errno == errno.EBADF
        assert "is closed" in str(caught.value) and str(path) in str(caught.value)
    disk.flush()  # nothing left to write: no error
    disk.close()  # closing twice is harmless
    with qcow2lib.open(str(path), fmt=fmt) as again:
        assert again.read(0, 4) == b"data"


def test_help_documents_the_block_device():
    text = pydoc.render_doc(qcow2lib.BlockDevice, renderer=pydoc.plaintext)
    for method in (
        "readinto",
        "write",
        "write_zeroes",
        "discard",
        "flush",
        "extents",
        "close",
        "read",
        "as_file",
        "readinto_scattered",
        "host_pieces",
    ):
        section = text[text.index(f" {method}(self") :]
        doc = section.split("\n", 2)[1]
        assert doc.strip(), f"BlockDevice.{method} has no docstring"


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("mode", ["r", "r+"])
def test_scattered_reads_fill_the_buffers_as_readinto_would(tmp_path, fmt, mode):
    """One run of plain data goes straight into the buffers; for anything else the device
    says no (False, nothing read) and readinto does it."""
    path = tmp_path / "img"
    qcow2lib.create(str(path), "4M", fmt=fmt)
    with qcow2lib.open(str(path), "r+", fmt=fmt) as disk:
        disk.write(0, bytes(range(256)) * 1024)
    with qcow2lib.open(str(path), mode, fmt=fmt) as disk:
        buffers = [bytearray(n) for n in (1, 4095, 8192, 100000)]
        assert disk.readinto_scattered(511, buffers)
        assert b"".join(buffers) == disk.read(511, sum(map(len, buffers)))
        across = [bytearray(4096), bytearray(4096)]  # the end of the data, then no data
        done = disk.readinto_scattered((256 << 10) - 4096, across)
        if fmt == "raw":  # plain bytes of the file all along, the hole reads as zeros
            assert done and b"".join(across) == disk.read((256 << 10) - 4096, 8192)
        else:
            assert not done and across == [bytearray(4096), bytearray(4096)]
            assert disk.readinto_scattered(0, []) is False


def test_scattered_reads_past_the_end_of_the_file_and_of_compressed_clusters(tmp_path):
    truncated, compressed = tmp_path / "truncated.qcow2", tmp_path / "compressed.qcow2"
    qcow2lib.create(str(truncated), "4M")
    with qcow2lib.open(str(truncated), "r+") as disk:
        disk.write(1 << 20, b"\x42" * 65536)  # the last cluster of the file
    qemu_img("convert", "-c", "-O", "qcow2", truncated, compressed)
    with open(truncated, "r+b") as f:  # the file ends 4 KiB into that cluster
        f.truncate(f.seek(0, 2) - (60 << 10))
    with qcow2lib.open(str(truncated)) as disk:
        buffers = [bytearray(3000), bytearray(3000), bytearray(3000)]
        assert disk.readinto_scattered(1 << 20, buffers)
        assert b"".join(buffers) == b"\x42" * 4096 + bytes(9000 - 4096)
    with qcow2lib.open(str(compressed)) as disk:
        assert not disk.readinto_scattered(1 << 20, [bytearray(4096)])
