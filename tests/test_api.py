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
        "host_pieces",
    ):
        section = text[text.index(f" {method}(self") :]
        doc = section.split("\n", 2)[1]
        assert doc.strip(), f"BlockDevice.{method} has no docstring"
