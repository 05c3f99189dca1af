"""Malformed images: every one must fail with a Qcow2Error subclass that names the field.

Each image starts as a valid image made by the real qemu-img (or qemu-io) and is then
damaged by patching big-endian header fields / table entries at their spec offsets
(docs/interop/qcow2.txt).  The engine must:

* raise a Qcow2Error subclass (CorruptImageError / UnsupportedFeatureError as
  appropriate) -- never a struct/construct/zlib/Recursion/OS error, never hang;
* name the offending field and its value in the message;
* leave the file untouched when it refuses at open time (also in mode "r+"), and
  change nothing but (at most) the corrupt bit when it refuses a later write.
"""

from __future__ import annotations

import os
import re
import struct
import traceback
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import CorruptImageError, Qcow2Error, UnsupportedFeatureError

from qemutools import qemu_create, qemu_img, qemu_io

pytestmark = pytest.mark.timeout(30)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

BOTH = (CorruptImageError, UnsupportedFeatureError)

# Header fields: name -> (offset, struct format), spec docs/interop/qcow2.txt "Header".
FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00

PAST_EOF = 0x10000000  # 256 MiB: cluster aligned for every cluster size, far past every test file


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def get(path, field):
    off, fmt = FIELDS[field]
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def put(path, field, value):
    off, fmt = FIELDS[field]
    put_at(path, off, fmt, value)


def put_at(path, offset, fmt, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def get_at(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def make(
    tmp_path: Path,
    name="img.qcow2",
    size=4 * GiB,
    compat="1.1",
    cluster_size=65536,
    backing=None,
    backing_fmt=None,
    **opts,
) -> Path:
    path = tmp_path / name
    options = {"compat": compat, "cluster_size": cluster_size, **opts}
    qemu_create(path, size, options=options, backing=backing, backing_fmt=backing_fmt)
    return path


def numbers_in(msg: str) -> set[int]:
    """Every integer written in the message, decimal or 0x-hex (with optional _ separators)."""
    found = set()
    for tok in re.findall(r"0x[0-9a-f_]+|\d[\d_]*", msg.lower()):
        tok = tok.replace("_", "")
        try:
            found.add(int(tok, 16) if tok.startswith("0x") else int(tok))
        except ValueError:
            pass
    return found


def norm(msg: str) -> str:
    return re.sub(r"[\s\-]+", "_", msg.lower())


def assert_mentions(err: BaseException, *alternatives):
    """alternatives: (fields, value) pairs; fields a str or tuple of str (any may appear),
    value an int, a tuple of acceptable ints, or None.  One alternative must match."""
    # Drop directory parts of paths: pytest's tmp dirs carry the test's name and numbers.
    msg = re.sub(r"/(?:[^/\s'\"]+/)+", "/", str(err))
    nmsg = norm(msg)
    nums = numbers_in(msg)
    if os.environ.get("MALFORMED_SHOW"):
        print(f"\n[{type(err).__name__}] {msg}")
    for fields, value in alternatives:
        if isinstance(fields, str):
            fields = (fields,)
        if not any(norm(f) in nmsg for f in fields):
            continue
        if value is None:
            return
        values = value if isinstance(value, tuple) else (value,)
        if any(v in nums for v in values):
            return
    pytest.fail(f"{type(err).__name__} message {msg!r} does not name any of {alternatives!r}")


def expect_error(fn, classes=Qcow2Error):
    """Run fn; it must raise a Qcow2Error subclass (of `classes`); return the exception."""
    try:
        fn()
    except Qcow2Error as e:
        assert isinstance(e, classes), f"expected {classes}, got {type(e).__name__}: {e}"
        return e
    except Exception as e:  # noqa: BLE001 - anything else is a bug in the engine
        pytest.fail(
            f"expected a Qcow2Error subclass, got {type(e).__module__}."
            f"{type(e).__name__}: {e!r}\n{traceback.format_exc()}"
        )
    pytest.fail("no error was raised")


def _open_op(path, mode, op=None, fmt="qcow2", backing=True):
    def run():
        img = qcow2lib.open(str(path), mode=mode, fmt=fmt, backing=backing)
        failed = True
        try:
            if op is not None:
                op(img)
            failed = False
        finally:
            try:
                img.close()
            except Qcow2Error:
                if not failed:
                    raise

    return run


def open_fails(path, classes, *alternatives, modes=("r", "r+"), fmt="qcow2"):
    """Opening must fail in every mode, naming the field, and must not change the file."""
    before = Path(path).read_bytes()
    errors = []
    for mode in modes:
        err = expect_error(_open_op(path, mode, fmt=fmt), classes)
        if alternatives:
            assert_mentions(err, *alternatives)
        errors.append(err)
        assert_same_bytes(before, Path(path).read_bytes(), f"after failed open mode={mode}")
    return errors


def op_fails(path, mode, op, classes, *alternatives, allow_corrupt_bit=True):
    """Open (which may already refuse) then op must fail; the file may only gain the
    corrupt bit, and only when opened r+ (mode "r" must never write)."""
    allow_corrupt_bit = allow_corrupt_bit and mode != "r"
    before = Path(path).read_bytes()
    err = expect_error(_open_op(path, mode, op), classes)
    if alternatives:
        assert_mentions(err, *alternatives)
    assert_same_bytes(
        before,
        Path(path).read_bytes(),
        f"after failed op mode={mode}",
        allow_corrupt_bit=allow_corrupt_bit,
    )
    return err


def assert_same_bytes(before: bytes, after: bytes, what: str, allow_corrupt_bit=False):
    if (
        allow_corrupt_bit
        and len(before) == len(after)
        and len(before) >= 104
        and struct.unpack_from(">I", before, 4)[0] >= 3
    ):
        a = bytearray(after)
        inc_before = struct.unpack_from(">Q", before, 72)[0]
        inc_after = struct.unpack_from(">Q", a, 72)[0]
        if inc_after & ~INCOMPAT_CORRUPT == inc_before & ~INCOMPAT_CORRUPT:
            struct.pack_into(">Q", a, 72, inc_before)
        after = bytes(a)
    if before == after:
        return
    if len(before) != len(after):
        pytest.fail(f"file changed {what}: size {len(before)} -> {len(after)}")
    first = next(i for i in range(len(before)) if before[i] != after[i])
    pytest.fail(
        f"file changed {what}: first differing byte at {first:#x} "
        f"({before[first]:#04x} -> {after[first]:#04x})"
    )


def read_exts(path):
    """Parse the header extension area -> (header_length, end, [(type, data, offset)])."""
    data = Path(path).read_bytes()
    version = struct.unpack_from(">I", data, 4)[0]
    cluster_size = 1 << struct.unpack_from(">I", data, 20)[0]
    hlen = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
    bfo = struct.unpack_from(">Q", data, 8)[0]
    end = bfo if bfo else cluster_size
    exts = []
    off = hlen
    while off + 8 <= end:
        typ, ln = struct.unpack_from(">II", data, off)
        if typ == EXT_END:
            break
        exts.append((typ, data[off + 8 : off + 8 + ln], off))
        off += 8 + (ln + 7) // 8 * 8
    return hlen, end, exts


def write_exts(path, exts, terminate=True):
    """Rewrite the extension area (image without backing file) with [(type, data)]."""
    hlen, end, _ = read_exts(path)
    blob = bytearray()
    for typ, data in exts:
        blob += struct.pack(">II", typ, len(data)) + data
        blob += b"\0" * ((-len(data)) % 8)
    if terminate:
        blob += struct.pack(">II", EXT_END, 0)
    assert hlen + len(blob) <= end
    blob += b"\0" * (end - hlen - len(blob))
    with open(path, "r+b") as f:
        f.seek(hlen)
        f.write(blob)


def l1_entry_offset(path, index=0):
    return get(path, "l1_table_offset") + 8 * index


def l2_entry_offset(path, index=0, entry_size=8):
    l1e = get_at(path, l1_entry_offset(path), ">Q")
    l2 = l1e & OFFSET_MASK
    assert l2, "test setup: guest cluster 0 must be allocated"
    return l2 + entry_size * index


def read0(img):
    img.read(0, 512)


def write0(img):
    img.write(0, b"\xa5" * 4096)


@pytest.fixture
def v3(tmp_path):
    """A clean 4 GiB v3 image, 64 KiB clusters, no backing file (l1_size 8)."""
    return make(tmp_path)


@pytest.fixture
def v2(tmp_path):
    return make(tmp_path, compat="0.10")


def with_data(tmp_path, compressed=False, compat="1.1", cluster_size=65536, **opts):
    path = make(tmp_path, size=64 * MiB, compat=compat, cluster_size=cluster_size, **opts)
    flag = "-c " if compressed else ""
    qemu_io(path, f"write {flag}-P 0x5a 0 {cluster_size}")
    return path


# ----------------------------------------------------------------------------------------------
# file too short / not qcow2
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_empty_file(tmp_path):
    path = tmp_path / "empty.qcow2"
    path.write_bytes(b"")
    open_fails(path, CorruptImageError, ("header", None), ("magic", None))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("compat,length", [("1.1", 10), ("0.10", 71), ("1.1", 71), ("1.1", 103)])
def test_truncated_header(tmp_path, compat, length):
    src = make(tmp_path, compat=compat)
    path = tmp_path / "short.qcow2"
    path.write_bytes(src.read_bytes()[:length])
    open_fails(path, CorruptImageError, ("header", None), ("file", None))


@pytest.mark.timeout(10)
def test_bad_magic(v3):
    put(v3, "magic", 0x514649FA)
    open_fails(v3, CorruptImageError, ("magic", None), ("qcow2", None))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("version", [0, 1, 4])
def test_bad_version(v3, version):
    put(v3, "version", version)
    open_fails(v3, UnsupportedFeatureError if version else BOTH, ("version", version))


# ----------------------------------------------------------------------------------------------
# header fields
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bits", [0, 8, 22, 31, 64, 0xFFFFFFFF])
def test_cluster_bits(v3, bits):
    put(v3, "cluster_bits", bits)
    open_fails(v3, BOTH, ("cluster_bits", bits), ("cluster_size", None))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [1 << 62, (1 << 64) - 512])
def test_absurd_size(v3, size):
    put(v3, "size", size)
    open_fails(v3, BOTH, ("size", size), ("l1_size", 8))


@pytest.mark.timeout(10)
def test_l1_size_absurd(v3):
    put(v3, "l1_size", 0x10000000)
    open_fails(v3, BOTH, ("l1_size", 0x10000000))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("l1_size", [0, 3, 7])
def test_l1_size_too_small_for_size(v3, l1_size):
    assert get(v3, "l1_size") == 8
    put(v3, "l1_size", l1_size)
    open_fails(v3, CorruptImageError, ("l1_size", l1_size))


@pytest.mark.timeout(10)
def test_l1_table_offset_past_eof(v3):
    put(v3, "l1_table_offset", PAST_EOF)
    open_fails(v3, CorruptImageError, ("l1_table_offset", PAST_EOF), ("l1", PAST_EOF))


@pytest.mark.timeout(10)
def test_l1_table_offset_misaligned(v3):
    bad = get(v3, "l1_table_offset") + 8
    put(v3, "l1_table_offset", bad)
    open_fails(v3, CorruptImageError, ("l1_table_offset", bad))


@pytest.mark.timeout(10)
def test_l1_table_overlaps_header(v3):
    put(v3, "l1_table_offset", 0)
    open_fails(v3, CorruptImageError, ("l1_table_offset", 0), ("l1", 0))


@pytest.mark.timeout(10)
def test_l1_table_offset_overflow(v3):
    bad = (1 << 64) - 65536
    put(v3, "l1_table_offset", bad)
    open_fails(v3, CorruptImageError, ("l1_table_offset", bad))


@pytest.mark.timeout(10)
def test_refcount_table_offset_misaligned(v3):
    bad = get(v3, "refcount_table_offset") + 512
    put(v3, "refcount_table_offset", bad)
    open_fails(v3, CorruptImageError, ("refcount_table_offset", bad))


@pytest.mark.timeout(10)
def test_refcount_table_offset_past_eof(v3):
    put(v3, "refcount_table_offset", PAST_EOF)
    open_fails(
        v3, CorruptImageError, ("refcount_table_offset", PAST_EOF), ("refcount_table", PAST_EOF)
    )


@pytest.mark.timeout(10)
def test_refcount_table_overlaps_header(v3):
    put(v3, "refcount_table_offset", 0)
    open_fails(v3, CorruptImageError, ("refcount_table_offset", 0))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("clusters", [0x10000000, 0xFFFFFFFF])
def test_refcount_table_clusters_absurd(v3, clusters):
    put(v3, "refcount_table_clusters", clusters)
    open_fails(v3, BOTH, ("refcount_table_clusters", clusters))


@pytest.mark.timeout(10)
def test_refcount_table_clusters_zero(v3):
    put(v3, "refcount_table_clusters", 0)
    open_fails(v3, CorruptImageError, ("refcount_table_clusters", 0), ("refcount_table", None))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("order", [7, 64, 0xFFFFFFFF])
def test_refcount_order(v3, order):
    put(v3, "refcount_order", order)
    open_fails(v3, BOTH, ("refcount_order", order))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("length", [0, 72, 96, 103])
def test_header_length_too_short_v3(v3, length):
    put(v3, "header_length", length)
    open_fails(v3, CorruptImageError, ("header_length", length))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("length", [65536 + 8, 0x100000, 0xFFFFFFF8])
def test_header_length_beyond_cluster(v3, length):
    put(v3, "header_length", length)
    open_fails(v3, CorruptImageError, ("header_length", length))


# ----------------------------------------------------------------------------------------------
# backing file fields and chains
# ----------------------------------------------------------------------------------------------


def backed(tmp_path, size=64 * MiB):
    base = make(tmp_path, "base.qcow2", size=size)
    qemu_io(base, "write -P 0x42 0 64k")
    return make(tmp_path, "top.qcow2", size=size, backing="base.qcow2", backing_fmt="qcow2")


@pytest.mark.timeout(10)
def test_backing_file_offset_past_eof(v3):
    put(v3, "backing_file_offset", PAST_EOF)
    put(v3, "backing_file_size", 9)
    open_fails(v3, CorruptImageError, ("backing_file_offset", PAST_EOF))


@pytest.mark.timeout(10)
def test_backing_file_offset_past_eof_existing_backing(tmp_path):
    top = backed(tmp_path)
    put(top, "backing_file_offset", PAST_EOF)
    open_fails(top, CorruptImageError, ("backing_file_offset", PAST_EOF))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [1024, 0xFFFFFFFF])
def test_backing_file_size_too_long(tmp_path, size):
    top = backed(tmp_path)
    put(top, "backing_file_size", size)
    open_fails(top, CorruptImageError, ("backing_file_size", size))


@pytest.mark.timeout(10)
def test_backing_file_name_crosses_cluster_end(tmp_path):
    top = backed(tmp_path)
    put(top, "backing_file_offset", 65536 - 4)
    put(top, "backing_file_size", 10)
    open_fails(
        top, CorruptImageError, ("backing_file_offset", 65536 - 4), ("backing_file_size", 10)
    )


@pytest.mark.timeout(10)
def test_backing_file_missing(tmp_path):
    top = tmp_path / "top.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-u", "-b", "no-such-base.qcow2", "-F", "qcow2", top, "1M"
    )
    open_fails(top, Qcow2Error, ("no_such_base.qcow2", None))
    # Without the backing chain the image itself is fine.
    _open_op(top, "r", read0, backing=False)()


@pytest.mark.timeout(10)
def test_backing_chain_loop(tmp_path):
    for name, target in (("a.qcow2", "b.qcow2"), ("b.qcow2", "a.qcow2")):
        qemu_img(
            "create", "-q", "-f", "qcow2", "-u", "-b", target, "-F", "qcow2", tmp_path / name, "1M"
        )
    open_fails(tmp_path / "a.qcow2", Qcow2Error, ("a.qcow2", None), ("b.qcow2", None))


@pytest.mark.timeout(10)
def test_backing_self_reference(tmp_path):
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        tmp_path / "self.qcow2",
        "1M",
    )
    open_fails(tmp_path / "self.qcow2", Qcow2Error, ("self.qcow2", None))


@pytest.mark.timeout(10)
def test_backing_self_reference_by_other_spelling(tmp_path):
    """./self.qcow2 names the same file as self.qcow2: still a loop."""
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "./self.qcow2",
        "-F",
        "qcow2",
        tmp_path / "self.qcow2",
        "1M",
    )
    open_fails(tmp_path / "self.qcow2", Qcow2Error, ("self.qcow2", None))


def make_chain(tmp_path: Path, depth: int) -> Path:
    """c0000 (data 0x42 in the first 4 KiB) <- c0001 <- ... <- c{depth}; returns the top."""
    base = tmp_path / "c0000.qcow2"
    qemu_create(base, 64 * KiB, options={"cluster_size": 512})
    qemu_io(base, "write -P 0x42 0 4k")
    tmpl = tmp_path / "template.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-o",
        "cluster_size=512",
        "-b",
        "c0000.qcow2",
        "-F",
        "qcow2",
        tmpl,
        "64K",
    )
    data = bytearray(tmpl.read_bytes())
    bfo = struct.unpack_from(">Q", data, 8)[0]
    bfs = struct.unpack_from(">I", data, 16)[0]
    assert data[bfo : bfo + bfs] == b"c0000.qcow2"
    tmpl.unlink()
    for i in range(1, depth + 1):
        data[bfo : bfo + bfs] = f"c{i - 1:04d}.qcow2".encode()
        (tmp_path / f"c{i:04d}.qcow2").write_bytes(data)
    return tmp_path / f"c{depth:04d}.qcow2"


@pytest.mark.timeout(30)
def test_reasonable_backing_chain_opens(tmp_path):
    top = make_chain(tmp_path, 8)
    img = qcow2lib.open(str(top), mode="r")
    try:
        assert img.read(0, 4096) == b"\x42" * 4096
        assert img.read(4096, 4096) == bytes(4096)
    finally:
        img.close()


@pytest.mark.timeout(30)
def test_deep_backing_chain_30(tmp_path):
    """30 links: either supported (and read correctly) or refused with a Qcow2Error."""
    top = make_chain(tmp_path, 30)
    try:
        img = qcow2lib.open(str(top), mode="r")
    except Qcow2Error as e:
        assert_mentions(e, ("depth", None), ("chain", None), ("backing", None))
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"expected Qcow2Error or success, got {type(e).__name__}: {e!r}")
    try:
        assert img.read(0, 4096) == b"\x42" * 4096
    finally:
        img.close()


@pytest.mark.timeout(60)
def test_over_deep_backing_chain(tmp_path):
    """1500 links (beyond any sane depth limit and Python's recursion limit): a clean refusal."""
    top = make_chain(tmp_path, 1500)
    open_fails(top, Qcow2Error, ("depth", None), ("chain", None), ("backing", None), modes=("r",))


# ----------------------------------------------------------------------------------------------
# feature bits, encryption, compression type
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_unknown_incompatible_bit_named(v3):
    hlen, end, exts = read_exts(v3)
    new = []
    found = False
    for typ, data, _ in exts:
        if typ == EXT_FEATURE_TABLE:
            data = data + struct.pack(">BB46s", 0, 20, b"frobnicator")
            found = True
        new.append((typ, data))
    assert found, "qemu-img should have written a feature name table"
    write_exts(v3, new)
    put(v3, "incompatible_features", 1 << 20)
    open_fails(v3, UnsupportedFeatureError, ("frobnicator", None))


@pytest.mark.timeout(10)
def test_unknown_incompatible_bit_unnamed(v3):
    put(v3, "incompatible_features", 1 << 63)
    open_fails(
        v3, UnsupportedFeatureError, ("incompatible", (63, 1 << 63)), ("feature", (63, 1 << 63))
    )


@pytest.mark.timeout(10)
def test_unknown_incompatible_bit_without_feature_table(v3):
    write_exts(v3, [])
    put(v3, "incompatible_features", 1 << 33)
    open_fails(
        v3, UnsupportedFeatureError, ("incompatible", (33, 1 << 33)), ("feature", (33, 1 << 33))
    )


@pytest.mark.timeout(10)
def test_unknown_compatible_and_autoclear_bits_are_fine(v3):
    """Control case: unknown compatible / autoclear bits must NOT prevent opening."""
    put(v3, "compatible_features", 1 << 40)
    put(v3, "autoclear_features", 1 << 40)
    _open_op(v3, "r", read0)()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("method", [3, 0xFFFFFFFF])
def test_crypt_method_unknown(v3, method):
    put(v3, "crypt_method", method)
    open_fails(v3, BOTH, ("crypt_method", method), ("encryption", method))


@pytest.mark.timeout(10)
def test_luks_without_crypto_header_extension(v3):
    """crypt_method 2 (LUKS) needs the full disk encryption header extension.  QEMU refuses
    at open ("Missing CRYPTO header"); refusing at the first read is tolerated, but the
    message must point at the missing extension, not at a missing key/secret."""
    put(v3, "crypt_method", 2)
    err = op_fails(v3, "r", read0, BOTH, allow_corrupt_bit=False)
    assert_mentions(
        err,
        (
            (
                "crypto_header",
                "encryption_header",
                "header_extension",
                "0x0537be77",
                "full_disk_encryption",
            ),
            None,
        ),
    )


@pytest.mark.timeout(10)
def test_compression_type_unknown(v3):
    assert get(v3, "header_length") >= 105
    put(v3, "compression_type", 2)
    put(v3, "incompatible_features", INCOMPAT_COMPRESSION)
    open_fails(v3, BOTH, ("compression_type", 2), ("compression", 2))


@pytest.mark.timeout(10)
def test_compression_type_without_incompatible_bit(v3):
    put(v3, "compression_type", 1)
    open_fails(v3, CorruptImageError, ("compression_type", 1), ("compression", 1))


@pytest.mark.timeout(10)
def test_compression_bit_with_zlib_type(v3):
    put(v3, "incompatible_features", INCOMPAT_COMPRESSION)
    open_fails(v3, CorruptImageError, ("compression", None))


@pytest.mark.timeout(10)
def test_data_file_bit_without_data_file(v3):
    put(v3, "incompatible_features", INCOMPAT_DATA_FILE)
    open_fails(v3, Qcow2Error, ("data_file", None), ("data file", None))


@pytest.mark.timeout(10)
def test_data_file_raw_without_data_file(v3):
    put(v3, "autoclear_features", AUTOCLEAR_DATA_FILE_RAW)
    open_fails(v3, Qcow2Error, ("data_file", None), ("data file", None))


@pytest.mark.timeout(10)
def test_external_data_file_missing(tmp_path):
    data = tmp_path / "gone-data.raw"
    path = make(tmp_path, size=16 * MiB, data_file=str(data))
    data.unlink()
    open_fails(path, Qcow2Error, ("gone_data.raw", None))


# ----------------------------------------------------------------------------------------------
# header extensions
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("length", [0x100000, 0xFFFFFFFF, 0xFFFFFFF8])
def test_extension_length_overflows_cluster(v3, length):
    _, _, exts = read_exts(v3)
    off = next(o for t, _, o in exts if t == EXT_FEATURE_TABLE)
    put_at(v3, off + 4, ">I", length)
    open_fails(v3, CorruptImageError, ("extension", length))


@pytest.mark.timeout(10)
def test_extension_data_runs_one_byte_past_cluster(v3):
    hlen, end, _ = read_exts(v3)
    length = end - hlen - 8 + 1
    put_at(v3, hlen, ">I", 0x12345678)
    put_at(v3, hlen + 4, ">I", length)
    open_fails(v3, CorruptImageError, ("extension", length))


@pytest.mark.timeout(10)
def test_extension_runs_into_backing_name(tmp_path):
    """With a backing file the extension area ends at backing_file_offset."""
    top = backed(tmp_path)
    hlen, end, exts = read_exts(top)
    length = end - hlen  # header(8) + length > end
    put_at(top, hlen, ">I", 0x12345678)
    put_at(top, hlen + 4, ">I", length)
    open_fails(top, CorruptImageError, ("extension", length))


@pytest.mark.timeout(10)
def test_extensions_without_terminator_fill_cluster(v3):
    """Unknown zero-length extensions up to the very end of the cluster and no end marker:
    must neither hang nor crash (QEMU accepts it; a clean Qcow2Error is also fine)."""
    hlen, end, _ = read_exts(v3)
    write_exts(v3, [(0x12345678, b"")] * ((end - hlen) // 8), terminate=False)
    try:
        _open_op(v3, "r", read0)()
    except Qcow2Error as e:
        assert_mentions(e, ("extension", None))


@pytest.mark.timeout(10)
def test_backing_format_extension_too_long(tmp_path):
    top = backed(tmp_path)
    _, end, exts = read_exts(top)
    off = next(o for t, _, o in exts if t == EXT_BACKING_FORMAT)
    put_at(top, off + 4, ">I", end - off)  # runs past the extension area
    open_fails(top, CorruptImageError, ("extension", end - off), ("backing_format", None))


def bitmap_image(tmp_path):
    path = make(tmp_path, size=16 * MiB)
    qemu_img("bitmap", "--add", path, "b0")
    _, _, exts = read_exts(path)
    off = next(o for t, _, o in exts if t == EXT_BITMAPS)
    return path, off + 8


@pytest.mark.timeout(10)
def test_bitmaps_extension_zero_bitmaps(tmp_path):
    path, data = bitmap_image(tmp_path)
    put_at(path, data, ">I", 0)
    err = expect_error(_open_op(path, "r", lambda img: img.bitmaps), BOTH)
    assert_mentions(err, ("nb_bitmaps", 0), ("bitmap", 0))


@pytest.mark.timeout(10)
def test_bitmaps_extension_absurd_count(tmp_path):
    path, data = bitmap_image(tmp_path)
    put_at(path, data, ">I", 0x7FFFFFFF)
    err = expect_error(_open_op(path, "r", lambda img: img.bitmaps), BOTH)
    assert_mentions(err, ("nb_bitmaps", 0x7FFFFFFF), ("bitmap", 0x7FFFFFFF))


@pytest.mark.timeout(10)
def test_bitmap_directory_past_eof(tmp_path):
    path, data = bitmap_image(tmp_path)
    put_at(path, data + 16, ">Q", PAST_EOF)
    err = expect_error(_open_op(path, "r", lambda img: img.bitmaps), CorruptImageError)
    assert_mentions(err, ("bitmap_directory_offset", PAST_EOF), ("bitmap", PAST_EOF))


# ----------------------------------------------------------------------------------------------
# corrupt bit, snapshots
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_corrupt_bit(tmp_path):
    path = with_data(tmp_path)
    put(path, "incompatible_features", INCOMPAT_CORRUPT)
    before = path.read_bytes()
    img = qcow2lib.open(str(path), mode="r", fmt="qcow2")
    try:
        assert img.corrupt
        assert img.read(0, 4096) == b"\x5a" * 4096
    finally:
        img.close()
    err = expect_error(_open_op(path, "r+"), Qcow2Error)
    assert "corrupt" in str(err).lower(), str(err)
    assert_same_bytes(before, path.read_bytes(), "after refused r+ open of a corrupt image")


@pytest.mark.timeout(10)
def test_snapshot_table_past_eof(v3):
    """QEMU reads a snapshot table past the end of the file as zeros (entries without an
    L1 table): the image opens, lists what qemu-img lists, and a read-only open leaves it
    alone."""
    from qemutools import run_qimg

    put(v3, "nb_snapshots", 1)
    put(v3, "snapshots_offset", PAST_EOF)
    before = v3.read_bytes()
    img = qcow2lib.open(str(v3), mode="r", fmt="qcow2")
    try:
        assert img.read(0, 4096) == bytes(4096)
    finally:
        img.close()
    expected = qemu_img("snapshot", "-l", v3)
    got = run_qimg("snapshot", "-l", v3)
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)
    assert_same_bytes(before, v3.read_bytes(), "after reading a table past the end")


@pytest.mark.timeout(10)
def test_snapshot_table_misaligned(v3):
    put(v3, "nb_snapshots", 1)
    put(v3, "snapshots_offset", 0x30008)
    open_fails(v3, CorruptImageError, ("snapshots_offset", 0x30008), ("snapshot", 0x30008))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("count", [0x7FFFFFFF, 0xFFFFFFFF])
def test_nb_snapshots_absurd(v3, count):
    put(v3, "nb_snapshots", count)
    put(v3, "snapshots_offset", 0x30000)
    open_fails(v3, BOTH, ("nb_snapshots", count), ("snapshot", count))


# ----------------------------------------------------------------------------------------------
# damage reachable only through I/O: L1 / L2 / refcount entries
# ----------------------------------------------------------------------------------------------


def io_fails(path, value, fields=("l1", "l2", "offset", "entry", "cluster")):
    """read (mode r) and write (mode r+) of guest cluster 0 must both fail with
    CorruptImageError naming the bad value; the write may only set the corrupt bit."""
    alternatives = [(fields, value)]
    pristine = Path(path).read_bytes()
    for mode, op in (("r", read0), ("r+", write0), ("r+", read0)):
        # The engine may set the corrupt bit when it detects the damage (as QEMU does),
        # which would make the next r+ open fail for another reason: start each step afresh.
        Path(path).write_bytes(pristine)
        op_fails(path, mode, op, CorruptImageError, *alternatives)


@pytest.mark.timeout(15)
def test_l1_entry_past_eof(tmp_path):
    path = with_data(tmp_path)
    put_at(path, l1_entry_offset(path), ">Q", OFLAG_COPIED | PAST_EOF)
    io_fails(path, (PAST_EOF, OFLAG_COPIED | PAST_EOF))


@pytest.mark.timeout(15)
def test_l1_entry_misaligned(tmp_path):
    path = with_data(tmp_path)
    off = l1_entry_offset(path)
    l2 = get_at(path, off, ">Q") & OFFSET_MASK
    put_at(path, off, ">Q", OFLAG_COPIED | (l2 + 512))
    io_fails(path, (l2 + 512, OFLAG_COPIED | (l2 + 512)))


@pytest.mark.timeout(15)
def test_l2_entry_past_eof(tmp_path):
    path = with_data(tmp_path)
    put_at(path, l2_entry_offset(path), ">Q", OFLAG_COPIED | PAST_EOF)
    io_fails(path, (PAST_EOF, OFLAG_COPIED | PAST_EOF))


@pytest.mark.timeout(15)
def test_l2_entry_misaligned(tmp_path):
    path = with_data(tmp_path)
    off = l2_entry_offset(path)
    host = get_at(path, off, ">Q") & OFFSET_MASK
    put_at(path, off, ">Q", OFLAG_COPIED | (host + 512))
    io_fails(path, (host + 512, OFLAG_COPIED | (host + 512)))


@pytest.mark.timeout(15)
@pytest.mark.parametrize("bits", [1 << 1, 1 << 8, 1 << 56, 1 << 61])
def test_l2_entry_reserved_bits(tmp_path, bits):
    path = with_data(tmp_path)
    off = l2_entry_offset(path)
    entry = get_at(path, off, ">Q") | bits
    put_at(path, off, ">Q", entry)
    alternatives = [(("reserved",), None), (("l2", "entry"), entry)]
    pristine = path.read_bytes()
    op_fails(path, "r", read0, CorruptImageError, *alternatives)
    path.write_bytes(pristine)
    op_fails(path, "r+", write0, CorruptImageError, *alternatives)


@pytest.mark.timeout(15)
def test_l1_entry_reserved_bits(tmp_path):
    path = with_data(tmp_path)
    off = l1_entry_offset(path)
    entry = get_at(path, off, ">Q") | (1 << 57)
    put_at(path, off, ">Q", entry)
    alternatives = [(("reserved",), None), (("l1", "entry"), entry)]
    pristine = path.read_bytes()
    op_fails(path, "r", read0, CorruptImageError, *alternatives)
    path.write_bytes(pristine)
    op_fails(path, "r+", write0, CorruptImageError, *alternatives)


@pytest.mark.timeout(15)
def test_zero_flag_in_v2_image(tmp_path):
    path = with_data(tmp_path, compat="0.10")
    off = l2_entry_offset(path)
    entry = get_at(path, off, ">Q") | 1
    put_at(path, off, ">Q", entry)
    alternatives = [(("zero",), None), (("reserved",), None), (("l2", "entry"), entry)]
    op_fails(path, "r", read0, CorruptImageError, *alternatives)


@pytest.mark.timeout(15)
def test_compressed_cluster_past_eof(tmp_path):
    path = with_data(tmp_path, compressed=True)
    off = l2_entry_offset(path)
    entry = get_at(path, off, ">Q")
    assert entry & OFLAG_COMPRESSED
    shift = 62 - (16 - 8)
    new = OFLAG_COMPRESSED | (entry & ~((1 << shift) - 1) & ((1 << 62) - 1)) | PAST_EOF
    put_at(path, off, ">Q", new)
    op_fails(
        path,
        "r",
        read0,
        CorruptImageError,
        (("compress", "offset", "l2", "entry", "cluster"), (PAST_EOF, new)),
    )


@pytest.mark.timeout(15)
def test_compressed_cluster_garbage(tmp_path):
    path = with_data(tmp_path, compressed=True)
    entry = get_at(path, l2_entry_offset(path), ">Q")
    shift = 62 - (16 - 8)
    host = entry & ((1 << shift) - 1)
    with open(path, "r+b") as f:
        f.seek(host)
        f.write(b"\xff\x00\xfe\x13" * 64)
    err = op_fails(path, "r", read0, CorruptImageError)
    assert (
        "compress" in str(err).lower()
        or "inflate" in str(err).lower()
        or "decompress" in str(err).lower()
    ), str(err)


@pytest.mark.timeout(15)
def test_extended_l2_alloc_and_zero_bits_both_set(tmp_path):
    path = with_data(tmp_path, cluster_size=16384, extended_l2="on")
    off = l2_entry_offset(path, 0, entry_size=16) + 8
    bitmap = get_at(path, off, ">Q")
    assert bitmap & 1
    new = bitmap | (1 << 32)
    put_at(path, off, ">Q", new)
    op_fails(
        path,
        "r",
        read0,
        CorruptImageError,
        (("subcluster", "bitmap", "l2"), (new, 0)),
        (("subcluster",), None),
    )


@pytest.mark.timeout(15)
@pytest.mark.parametrize("kind", ["past_eof", "misaligned"])
def test_refcount_table_entry_bad(tmp_path, kind):
    """A write that needs a new cluster must fail clearly and change nothing else."""
    path = with_data(tmp_path)
    rt = get(path, "refcount_table_offset")
    old = get_at(path, rt, ">Q")
    bad = PAST_EOF if kind == "past_eof" else old + 512
    put_at(path, rt, ">Q", bad)

    def write_new_cluster(img):
        img.write(5 * 65536 + 100, b"\x77" * 70000)  # unallocated, needs two clusters

    op_fails(
        path,
        "r+",
        write_new_cluster,
        CorruptImageError,
        (("refcount", "refblock", "reftable"), bad),
    )


@pytest.mark.timeout(15)
def test_refcount_table_entry_zero_while_clusters_in_use(tmp_path):
    """reftable[0] = 0 claims every cluster of the first refblock is free although the
    header, tables and data live there.  The engine may refuse the allocating write, or
    allocate elsewhere, but it must never overwrite a cluster that is in use."""
    path = with_data(tmp_path)
    rt = get(path, "refcount_table_offset")
    l1 = get(path, "l1_table_offset")
    l2 = get_at(path, l1, ">Q") & OFFSET_MASK
    data = get_at(path, l2, ">Q") & OFFSET_MASK
    put_at(path, rt, ">Q", 0)
    before = path.read_bytes()

    def write_new_cluster(img):
        img.write(7 * 65536, b"\x66" * 65536)

    try:
        _open_op(path, "r+", write_new_cluster)()
    except Qcow2Error:
        assert_same_bytes(before, path.read_bytes(), "after refused write", allow_corrupt_bit=True)
        return
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"expected Qcow2Error or success, got {type(e).__name__}: {e!r}")
    after = path.read_bytes()
    for name, start, length in (
        ("header extensions", 112, 65536 - 112),
        ("L1", l1, 64),
        ("L2", l2, 65536),
        ("data", data, 65536),
    ):
        assert after[start : start + length] == before[start : start + length], (
            f"{name} cluster at {start:#x} was overwritten"
        )
    img = qcow2lib.open(str(path), mode="r")
    try:
        assert img.read(0, 65536) == b"\x5a" * 65536
        assert img.read(7 * 65536, 65536) == b"\x66" * 65536
    finally:
        img.close()


# ----------------------------------------------------------------------------------------------
# a failing open never writes (spot check on a v2 image and probing)
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_v2_bad_l1_offset_nothing_written(v2):
    put(v2, "l1_table_offset", get(v2, "l1_table_offset") + 8)
    open_fails(v2, CorruptImageError, ("l1_table_offset", None))


@pytest.mark.timeout(10)
def test_probe_does_not_hide_corruption(v3):
    """fmt=None must still detect qcow2 by magic and report the broken field (never
    silently fall back to raw)."""
    put(v3, "l1_size", 0x10000000)
    open_fails(v3, BOTH, ("l1_size", 0x10000000), fmt=None)


def test_reserved_bits_in_the_refcount_table_are_judged_where_it_is_used(tmp_path):
    """QEMU reads the refcount table at open without judging its entries: info, map and
    reads of such an image work, as with qemu-img. The table is loaded at its first use
    here (not at open), and a write, which needs it, is refused naming the entry; check
    reports it as qemu-img check does. Many threads' first reads make one cluster map."""
    import threading

    from qemutools import run_qimg

    path = tmp_path / "a.qcow2"
    qemu_create(path, "4M")
    qemu_io(path, "write -P 0x61 0 64k")
    with open(path, "r+b") as f:
        table_offset = struct.unpack(">Q", f.read(56)[48:56])[0]
        f.seek(table_offset)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(table_offset)
        f.write(struct.pack(">Q", entry | 1))
    for command in (["info"], ["map", "--output=json"]):
        ours = run_qimg(*command, path)
        assert (ours.returncode, ours.stdout) == (0, qemu_img(*command, path).stdout)
    with qcow2lib.open(str(path), "r+") as image:
        assert "map" not in vars(image)  # (opening read the header alone)
        maps, start = [], threading.Barrier(8)

        def first_read() -> None:
            start.wait()
            assert image.read(0, 65536) == b"\x61" * 65536
            maps.append(image.map)

        threads = [threading.Thread(target=first_read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(maps) == 8 and all(m is maps[0] for m in maps)
        with pytest.raises(CorruptImageError, match="Refcount table entry 0 has reserved bits"):
            image.write(65536, b"\x62" * 512)
    ours = run_qimg("check", path)
    theirs = qemu_img("check", path, check=False)
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        theirs.returncode,
        theirs.stdout,
        theirs.stderr,
    )
