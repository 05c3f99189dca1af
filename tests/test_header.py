"""Header rewriting: what qcow2lib must keep, clear and write, checked with qemu-img."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import qcow2lib
from qcow2lib import structs as S
from qcow2lib.header import Header
from qemutools import assert_clean, qemu_create, qemu_img, qemu_io


def _header(path: Path) -> Header:
    data = path.read_bytes()
    return Header.parse(lambda offset, length: data[offset : offset + length], len(data))


def _add_unknown_extension(path: Path, ext_type: int, payload: bytes) -> None:
    """Insert an extension right after the header (QEMU ignores and keeps unknown ones)."""
    data = bytearray(path.read_bytes())
    length = struct.unpack_from(">I", data, 100)[0]
    blob = struct.pack(">II", ext_type, len(payload)) + payload + bytes(-len(payload) % 8)
    data[length:length] = blob
    del data[
        65536 : 65536 + len(blob)
    ]  # keep the cluster layout: the header cluster's tail is free
    path.write_bytes(bytes(data))


def test_unknown_extension_and_fields_survive_a_header_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    qemu_create(path, "64M")
    qemu_io(path, "write -P 0x11 0 128k")
    _add_unknown_extension(path, 0x12345678, b"keep me, please")
    data = bytearray(path.read_bytes())
    struct.pack_into(">Q", data, 88, 1 << 40)  # an unknown autoclear bit
    path.write_bytes(bytes(data))
    assert qemu_img("check", path).returncode == 0
    with qcow2lib.open(str(path), "r+") as image:  # opening for writing rewrites the header
        image.write(1 << 20, b"x" * 4096)
    hdr = _header(path)
    assert hdr.autoclear_features == 0  # unknown autoclear bits are cleared on write access
    kept = [e for e in hdr.extensions if e.type == 0x12345678]
    assert kept and kept[0].data == b"keep me, please"
    assert_clean(path)
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert info["virtual-size"] == 64 << 20


def test_created_header_matches_qemu_layout(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_create(tmp_path / "base.qcow2", 1 << 30)
    qcow2lib.create(
        str(ours), 1 << 30, lazy_refcounts=True, backing_file="base.qcow2", backing_fmt="qcow2"
    )
    qemu_create(
        theirs, 1 << 30, options={"lazy_refcounts": "on"}, backing="base.qcow2", backing_fmt="qcow2"
    )
    a, b = _header(ours), _header(theirs)
    for name in (
        "version",
        "cluster_bits",
        "size",
        "l1_size",
        "l1_table_offset",
        "refcount_table_offset",
        "refcount_table_clusters",
        "incompatible_features",
        "compatible_features",
        "autoclear_features",
        "refcount_order",
        "header_length",
        "backing_file",
        "backing_format",
        "feature_names",
    ):
        assert getattr(a, name) == getattr(b, name), name
    # The header cluster is byte-identical up to the end of the backing file name.
    end = a.backing_file_offset + a.backing_file_size
    assert ours.read_bytes()[:end] == theirs.read_bytes()[:end]


def test_v2_header_has_no_extensions_but_backing_format(tmp_path: Path) -> None:
    path = tmp_path / "v2.qcow2"
    qcow2lib.create(str(path), 1 << 20, compat="0.10", backing_file="b.raw", backing_fmt="raw")
    hdr = _header(path)
    assert hdr.version == 2 and hdr.header_length == 72
    assert [e.type for e in hdr.extensions] == [S.EXT_BACKING_FORMAT]
    info = json.loads(qemu_img("info", "-U", "--output=json", path, check=False).stdout or "{}")
    assert info.get("backing-filename-format") == "raw"


def test_long_header_with_unknown_trailing_fields_is_kept(tmp_path: Path) -> None:
    """header_length beyond the fields we know: the extra bytes are preserved."""
    path = tmp_path / "long.qcow2"
    qemu_create(path, "1M")
    data = bytearray(path.read_bytes())
    old_length = struct.unpack_from(">I", data, 100)[0]
    extra = b"FUTURE!!"
    data[old_length:old_length] = extra
    del data[65536 : 65536 + len(extra)]
    struct.pack_into(">I", data, 100, old_length + len(extra))
    path.write_bytes(bytes(data))
    with qcow2lib.open(str(path), "r+") as image:
        image.header.autoclear_features = 0
        image._write_header()
    raw = path.read_bytes()
    assert raw[old_length : old_length + len(extra)] == extra
    assert struct.unpack_from(">I", raw, 100)[0] == old_length + len(extra)
    assert qemu_img("check", path).returncode == 0


def test_copied_entry_at_offset_zero_is_not_written_in_place(tmp_path: Path) -> None:
    """An L2 entry with only COPIED set (host offset 0, no data file) is unallocated: a write
    must allocate a cluster, never go to offset 0, where the header lives."""
    path = tmp_path / "a.qcow2"
    qemu_create(path, "1M", options={"cluster_size": "4096"})
    qemu_io(path, "write -P 0x11 0 4k")
    data = bytearray(path.read_bytes())
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & S.L1E_OFFSET_MASK
    struct.pack_into(">Q", data, l2, S.OFLAG_COPIED)
    path.write_bytes(bytes(data))
    with qcow2lib.open(str(path), "r+") as image:
        assert image.read(0, 4096) == bytes(4096)
        image.write(0, b"\x22" * 4096)
        assert image.read(0, 4096) == b"\x22" * 4096
    assert path.read_bytes()[:4] == b"QFI\xfb"
    assert qemu_img("check", path, check=False).returncode in (0, 3)  # a leak at most
