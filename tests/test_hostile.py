"""Hostile images and failure paths (issue 10): each test builds its hostile images at test
time from valid ones made by qemu-img, and compares with what QEMU does where QEMU answers.

* Decompression bombs: a compressed cluster whose stream inflates far past the cluster
  (to gigabytes) costs no more than about a cluster of memory, under an address-space
  limit, for read, convert, compare and a copy-on-write into the cluster.
* Special files: a FIFO, socket or character device named by an image as its backing file
  or external data file is refused before any I/O (qemu-img hangs on a FIFO); a FIFO or
  socket given as the image itself too. Regular files and block devices still open.
* LUKS key derivation: a header whose key slots would make one open compute more PBKDF2
  blocks than luks.MAX_KDF_BLOCKS (8x what qemu-img's iter-time=10000 gives) is refused
  before any derivation, naming the slot and its iterations.
* Durability after a failed fdatasync: a raw image's flush and close fail from then on,
  as a qcow2 image's do (nothing claimed durable that the kernel may have dropped).
* Nothing acknowledged is lost silently: after a write meets broken metadata and the image
  is marked corrupt, flush and close still write back the metadata of the writes
  acknowledged before (or fail): the data is there after reopening.
* Compressed writes with narrow refcounts: a host cluster whose refcount is at its width's
  maximum takes no more compressed clusters (convert -c with refcount_bits=1 and 2).
* Untrusted images (open_image(untrusted=True), qimg's QIMG_UNTRUSTED=1): no external data
  file, backing files only qcow2 images inside the naming image's directory.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import zstandard
from qemu_luks import BLANK, copy_image
from qemu_luks import PASS as LUKS_PASS
from qemutools import QEMU_IMG, QEMU_IO, assert_clean, qemu_img, run

import qcow2lib
from qcow2lib import CorruptImageError, Qcow2Error, Qcow2IOError, codecs, hostfile

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

OFLAG_COMPRESSED = 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# ---------------------------------------------------------------------------------------------
# Decompression bombs
# ---------------------------------------------------------------------------------------------


def zstd_rle_frame(total: int, content_size: int | None = None, byte: int = 0) -> bytes:
    """A zstd frame of RLE blocks (4 bytes each for 128 KiB of output): `total` bytes of
    `byte`, declaring `content_size` (honest or not) or no content size."""
    descriptor = 0xC0 if content_size is not None else 0x00  # 8-byte content size, or none
    frame = bytearray(struct.pack("<IBB", 0xFD2FB528, descriptor, 0x38))  # window 128 KiB
    if content_size is not None:
        frame += struct.pack("<Q", content_size)
    block = 128 * KiB
    blocks = -(-total // block)
    for i in range(blocks):
        size = min(block, total - i * block)
        header = (i == blocks - 1) | 1 << 1 | size << 3
        frame += struct.pack("<I", header)[:3] + bytes([byte])
    return bytes(frame)


def zlib_bomb(total: int) -> bytes:
    """Raw deflate (QEMU's 4 KiB window) of `total` zero bytes, made from one 4 MiB piece
    repeated: a full flush makes every piece start afresh, so the pieces are identical."""
    chunk = 4 * MiB
    deflater = zlib.compressobj(9, zlib.DEFLATED, -12)
    piece = deflater.compress(bytes(chunk)) + deflater.flush(zlib.Z_FULL_FLUSH)
    assert deflater.compress(bytes(chunk)) + deflater.flush(zlib.Z_FULL_FLUSH) == piece
    return piece * (total // chunk) + deflater.flush()


def max_payload(cluster_size: int) -> int:
    """The most compressed bytes an L2 entry can describe: 2^(cluster_bits - 8) sectors."""
    return cluster_size // 256 * 512


def bomb_image(path: Path, kind: str, cluster_size: int, payload: bytes) -> Path:
    """A qemu-img image whose guest cluster 0 is compressed with `payload` as its stream
    (cluster 1 holds plain data). The payload goes into new clusters at the end of the
    file with their refcounts set and the old compressed cluster's cleared, so qemu-img
    check finds nothing wrong: only decompressing shows the bomb."""
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"compression_type={kind},cluster_size={cluster_size}",
        path,
        4 * cluster_size,
    )
    run(
        [
            QEMU_IO,
            "-c",
            f"write -c -P 0x5a 0 {cluster_size}",
            "-c",
            f"write -P 0x33 {cluster_size} {cluster_size}",
            path,
        ]
    )
    cluster_bits = cluster_size.bit_length() - 1
    csize_shift = 62 - (cluster_bits - 8)
    with open(path, "r+b") as f:
        data = f.read()
        (l1_offset,) = struct.unpack_from(">Q", data, 40)
        (reftable_offset,) = struct.unpack_from(">Q", data, 48)
        assert struct.unpack_from(">I", data, 96) == (4,)  # 16-bit refcounts
        l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & OFFSET_MASK
        (entry,) = struct.unpack_from(">Q", data, l2_offset)
        assert entry & OFLAG_COMPRESSED
        old_host = entry & ((1 << csize_shift) - 1)
        refblock = struct.unpack_from(">Q", data, reftable_offset)[0]
        new_host = -(-len(data) // cluster_size) * cluster_size
        sectors = -(-len(payload) // 512)
        assert sectors <= max_payload(cluster_size) // 512
        f.seek(new_host)
        f.write(payload)
        f.truncate(new_host + -(-len(payload) // cluster_size) * cluster_size)
        f.seek(l2_offset)
        f.write(struct.pack(">Q", OFLAG_COMPRESSED | new_host | (sectors - 1) << csize_shift))
        f.seek(refblock + 2 * (old_host >> cluster_bits))
        f.write(struct.pack(">H", 0))
        for cluster in range(
            new_host >> cluster_bits, -(-(new_host + len(payload)) // cluster_size)
        ):
            f.seek(refblock + 2 * cluster)
            f.write(struct.pack(">H", 1))
    assert_clean(path)
    return path


# The worker runs in its own process under an address-space limit of 512 MiB above what it
# uses once warmed up: a bomb decompressed whole (gigabytes) would end in MemoryError there.
LIMITED_WORKER = r"""
import contextlib, io, json, os, resource, sys, time
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tools")]
import qcow2lib, qimg
from qcow2lib import Qcow2Error, codecs

def vm_size():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

list(codecs.pool().map(time.sleep, [0.01] * 8))  # the codec threads exist before the limit
limit = vm_size() + (512 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
image, reference, out_dir, length = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
results = {}

def attempt(name, action):
    try:
        results[name] = {"ok": action()}
    except Qcow2Error as exc:
        results[name] = {"error": type(exc).__name__, "message": str(exc)}

def read():
    with qcow2lib.open(image) as dev:
        return dev.read(0, length).hex()

def cow_write():
    dev = qcow2lib.open(image, "r+")
    try:
        dev.write(512, b"\x77" * 512)
    finally:
        dev.close()
    return True

def cli(*args):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = qimg.main(list(args), prog="qemu-img")
    return {"code": code, "stderr": err.getvalue()}

attempt("read", read)
results["convert"] = cli("convert", "-O", "qcow2", image, os.path.join(out_dir, "converted.qcow2"))
results["compare"] = cli("compare", image, reference)
attempt("cow_write", cow_write)
print(json.dumps(results))
"""


def run_limited(image: Path, reference: Path, out_dir: Path, length: int) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LIMITED_WORKER,
            str(ROOT),
            str(image),
            str(reference),
            str(out_dir),
            str(length),
        ],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "MALLOC_ARENA_MAX": "2"},
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


BOMBS = {
    # name: (compression type, cluster size, payload built from the cluster size)
    "zstd-64k": ("zstd", 64 * KiB, lambda cs: zstd_rle_frame(3 * GiB)),
    "zstd-64k-honest-size": ("zstd", 64 * KiB, lambda cs: zstd_rle_frame(3 * GiB, 3 * GiB)),
    "zstd-64k-lying-size": ("zstd", 64 * KiB, lambda cs: zstd_rle_frame(3 * GiB, cs)),
    "zstd-64k-second-frame": (
        "zstd",
        64 * KiB,
        lambda cs: zstandard.ZstdCompressor().compress(bytes(cs // 2)) + zstd_rle_frame(3 * GiB),
    ),
    "zstd-2m": ("zstd", 2 * MiB, lambda cs: zstd_rle_frame(4 * GiB)),
    "zlib-64k": ("zlib", 64 * KiB, lambda cs: zlib_bomb(120 * MiB)),
    "zlib-2m": ("zlib", 2 * MiB, lambda cs: zlib_bomb(2 * GiB)),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_decompression_bomb(tmp_path, name):
    """As QEMU: zlib stops at the cluster size and reads what it has; a zstd frame going on
    past the cluster is an error (QEMU: EIO; here CorruptImageError naming the cluster).
    Either way memory stays bounded: read, convert, compare and a copy-on-write write run
    under a 512 MiB address-space limit, and every failure is a clean Qcow2Error."""
    kind, cluster_size, make_payload = BOMBS[name]
    payload = make_payload(cluster_size)
    assert len(payload) <= max_payload(cluster_size)
    image = bomb_image(tmp_path / "bomb.qcow2", kind, cluster_size, payload)
    twin = tmp_path / "twin.qcow2"  # QEMU's copy, for the write
    twin.write_bytes(image.read_bytes())
    reference = tmp_path / "reference.raw"
    reference.write_bytes(b"\x5a" * cluster_size)
    qemu_read = run([QEMU_IO, "-c", f"read 0 {cluster_size}", image], check=False)
    qemu_convert = run(
        [QEMU_IMG, "convert", "-O", "raw", image, tmp_path / "qemu.raw"], check=False
    )
    qemu_compare = run([QEMU_IMG, "compare", image, reference], check=False)
    qemu_write = run([QEMU_IO, "-c", "write -P 0x77 512 512", twin], check=False)

    results = run_limited(image, reference, tmp_path, cluster_size)
    converted = tmp_path / "converted.qcow2"
    assert results["convert"]["code"] == qemu_convert.returncode, results["convert"]
    assert results["compare"]["code"] == qemu_compare.returncode, results["compare"]
    if kind == "zlib":
        # QEMU keeps the first cluster's worth and reads on.
        assert "read failed" not in qemu_read.stdout and qemu_convert.returncode == 0
        expected = (tmp_path / "qemu.raw").read_bytes()[:cluster_size]
        assert bytes.fromhex(results["read"]["ok"]) == expected
        assert qemu_img("compare", converted, tmp_path / "qemu.raw").returncode == 0
        assert results["cow_write"] == {"ok": True}
        assert "wrote" in qemu_write.stdout
        assert qemu_img("compare", image, twin).returncode == 0
    else:
        assert "Input/output error" in qemu_read.stdout + qemu_read.stderr
        assert "Input/output error" in qemu_write.stdout + qemu_write.stderr
        for step in ("read", "cow_write"):
            assert results[step]["error"] == "CorruptImageError", results
            message = results[step]["message"]
            assert "guest offset 0x0" in message and "zstd" in message, message
        for step in ("convert", "compare"):
            assert "guest offset 0x0" in results[step]["stderr"], results[step]
        assert_clean(image)  # the failed write changed nothing on disk


def test_decompress_memory_stays_within_a_cluster():
    """The codec itself: Python memory for a 4 GiB bomb stays about one cluster (plus one
    128 KiB zstd block), whether or not the frame states its size."""
    cluster_size = 64 * KiB
    cases = [
        ("zstd", zstd_rle_frame(3 * GiB)),
        ("zstd", zstd_rle_frame(3 * GiB, 3 * GiB)),
        ("zlib", zlib_bomb(64 * MiB)),
    ]
    for kind, payload in cases:
        tracemalloc.start()
        try:
            try:
                codecs.decompress(kind, payload, cluster_size, " (test)")
            except CorruptImageError as exc:
                assert kind == "zstd" and "(test)" in str(exc)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < cluster_size + 128 * KiB + 64 * KiB + len(payload), (kind, peak)


def _frames(*pieces: bytes) -> bytes:
    return b"".join(pieces)


@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("content_size", [False, True])
@pytest.mark.parametrize("cluster_size", [512, 64 * KiB, 2 * MiB])
def test_zstd_valid_streams_decode(checksum, content_size, cluster_size):
    """What zstd writers produce still decodes: one frame with or without checksum and
    content size, several frames making up the cluster, trailing bytes after the frame
    that fills it (the next compressed cluster shares the last sector), skippable frames."""
    data = (os.urandom(97) * (cluster_size // 97 + 1))[:cluster_size]
    compressor = zstandard.ZstdCompressor(write_checksum=checksum, write_content_size=content_size)
    half = cluster_size // 2
    skippable = struct.pack("<II", 0x184D2A53, 5) + b"12345"
    streams = [
        compressor.compress(data),
        compressor.compress(data) + b"\x28\xb5\x2f\xfd\x00garbage",
        compressor.compress(data[:half]) + compressor.compress(data[half:]) + bytes(300),
        skippable + compressor.compress(data[:half]) + skippable + compressor.compress(data[half:]),
    ]
    chunker = compressor.chunker(chunk_size=4096)  # many blocks from a streaming compressor
    streamed = b"".join(chunker.compress(data)) + b"".join(chunker.finish())
    streams.append(streamed)
    for stream in streams:
        assert codecs.decompress("zstd", stream, cluster_size) == data


def test_zstd_frames_that_do_not_fit_the_cluster():
    """QEMU's rule: decoding stops when the cluster is full, and the frame filling it must
    end there; a stream ending early is short. Each is a CorruptImageError."""
    cluster_size = 64 * KiB
    data = os.urandom(cluster_size)
    compressor = zstandard.ZstdCompressor()
    cases = {
        "past the cluster": compressor.compress(data + b"x"),
        "past the cluster in the second frame": compressor.compress(data[:100])
        + compressor.compress(data),
        "short": compressor.compress(data[:-1]),
        "cut": compressor.compress(data)[:-3],
        "garbage": b"\x00" * 64,
        "rle bomb without an end": zstd_rle_frame(4 * GiB)[:-4],
    }
    for what, stream in cases.items():
        with pytest.raises(CorruptImageError, match="compressed cluster"):
            codecs.decompress("zstd", stream, cluster_size)
            pytest.fail(what)


# ---------------------------------------------------------------------------------------------
# Special files
# ---------------------------------------------------------------------------------------------


def qimg_run(*args: str) -> tuple[int, str, str]:
    """qimg in this process: (exit code, stdout, stderr)."""
    import qimg

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = qimg.main([str(a) for a in args], prog="qemu-img")
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def special_file(path: Path, kind: str):
    """Make `path` a FIFO, a listening Unix socket, or a character device (a symlink to
    /dev/zero, the one host file these tests name)."""
    listener = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listener.listen()
    else:
        os.symlink("/dev/zero", path)
    try:
        yield path
    finally:
        if listener is not None:
            listener.close()


SPECIAL_NAMES = {"fifo": "a FIFO", "socket": "a socket", "chardev": "a character device"}


def images_naming(tmp_path: Path, target_name: str) -> dict[str, Path]:
    """Two qemu-img images naming `target_name` (a file made afterwards): one as its backing
    file (stated format raw, so no probing decides anything), one as its external data file
    (data_file_raw: every guest cluster maps to the data file)."""
    qemu_img("create", "-q", "-f", "raw", tmp_path / target_name, "1M")
    backed = tmp_path / "backed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", target_name, "-F", "raw", backed, "1M")
    with_data = tmp_path / "with-data.qcow2"
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"data_file={target_name},data_file_raw=on",
        with_data,
        "1M",
    )
    (tmp_path / target_name).unlink()
    return {"backing file": backed, "external data file": with_data}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(SPECIAL_NAMES))
def test_special_files_named_by_an_image_are_refused(tmp_path, kind, monkeypatch):
    """qcow2lib.open and every qimg command that opens the file refuse it with an error
    naming the file and what it is, at once (a FIFO is never opened blocking)."""
    monkeypatch.chdir(tmp_path)  # qemu-img resolves a data file name against the cwd
    images = images_naming(tmp_path, "target")
    with special_file(tmp_path / "target", kind):
        for role, image in images.items():
            for mode in ("r", "r+"):
                with pytest.raises(Qcow2Error, match=SPECIAL_NAMES[kind]) as info:
                    qcow2lib.open(str(image), mode)
                message = str(info.value)
                assert f"The {role} '" in message and "target'" in message, message
                assert f"named by '{image}'" in message, message
            commands = [
                ("map", image),
                ("convert", "-O", "raw", image, tmp_path / "out.raw"),
                ("compare", image, image),
                ("info", "--backing-chain", image),
            ]
            if role == "external data file":  # qemu-img opens the data file for these too
                commands += [("snapshot", "-l", image), ("check", "-r", "all", image)]
            else:
                commands += [("check", image), ("snapshot", "-l", image)]
            for command in commands:
                code, _, err = qimg_run(*command)
                if command[0] == "info" and role == "external data file":
                    assert code == 0, err  # info reads no guest data
                    continue
                assert code != 0 and SPECIAL_NAMES[kind] in err and "target'" in err, (command, err)
                assert "Traceback" not in err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_fifo_or_socket_as_the_image_is_refused(tmp_path, kind):
    """Named directly, a FIFO or socket is refused too (qemu-img waits on a FIFO forever);
    a character device still opens as a file, as before."""
    with special_file(tmp_path / "image", kind) as path:
        for mode in ("r", "r+"):
            with pytest.raises(Qcow2Error, match="regular file|No such device"):
                qcow2lib.open(str(path), mode)
        for fmt in ("qcow2", "raw"):
            with pytest.raises(Qcow2Error, match="regular file|No such device"):
                qcow2lib.open(str(path), "r", fmt=fmt)
        for command in (
            ("info", path),
            ("check", path),
            ("map", path),
            ("convert", "-O", "raw", path, tmp_path / "out.raw"),
        ):
            code, _, err = qimg_run(*command)
            assert code == 1 and str(path) in err and "Traceback" not in err, (command, err)
    if kind == "fifo":
        with (
            special_file(tmp_path / "fifo2", "fifo") as path,
            pytest.raises(Qcow2Error, match="it is a FIFO"),
        ):
            qcow2lib.open(str(path))
    with special_file(tmp_path / "chardev", "chardev") as path:
        code, out, err = qimg_run("info", "--output=json", path)
        assert code == 0 and json.loads(out)["format"] == "raw", err


@pytest.mark.timeout(120)
def test_block_devices_and_regular_files_named_by_an_image_open(tmp_path, monkeypatch):
    """A loop device (through a symlink in tmp_path) as backing file and as data file."""
    monkeypatch.chdir(tmp_path)
    backing_content = tmp_path / "disk.raw"
    backing_content.write_bytes(b"\x42" * MiB)
    loop = subprocess.run(
        ["losetup", "-f", "--show", backing_content], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        images = images_naming(tmp_path, "target")
        os.symlink(loop, tmp_path / "target")
        for role, image in images.items():
            with qcow2lib.open(str(image)) as dev:
                assert dev.read(0, 4096) == b"\x42" * 4096, role
            code, _, err = qimg_run("compare", image, backing_content)
            assert code == 0, (role, err)
        (tmp_path / "target").unlink()
        os.symlink(backing_content, tmp_path / "target")  # a regular file through a symlink
        for role, image in images.items():
            with qcow2lib.open(str(image)) as dev:
                assert dev.read(0, 4096) == b"\x42" * 4096, role
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


# ---------------------------------------------------------------------------------------------
# LUKS key derivation work
# ---------------------------------------------------------------------------------------------

PASSPHRASE = LUKS_PASS  # the passphrase of the images QEMU encrypts (tests/qemu_luks.py)
SLOT_ENABLED = 0x00AC71F3
LUKS_SLOTS_AT = 208  # the first key slot in the LUKS1 header; 48 bytes each
EXT_CRYPTO_HEADER = 0x0537BE77


def luks_image(path: Path, iter_time: int) -> Path:
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        f"secret,id=s0,data={PASSPHRASE}",
        "-o",
        f"encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time={iter_time}",
        path,
        "1M",
    )
    return path


def luks_header_offset(path: Path) -> int:
    """Where the LUKS header lies: the qcow2 'full disk encryption header' extension."""
    data = path.read_bytes()
    pos = struct.unpack_from(">I", data, 100)[0]  # header_length
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        if kind == EXT_CRYPTO_HEADER:
            return struct.unpack_from(">Q", data, pos + 8)[0]
        assert kind != 0, "no crypto header extension"
        pos += 8 + -(-length // 8) * 8


def set_slots(path: Path, iterations: dict[int, int]) -> None:
    """Make the given key slots active with these PBKDF2 iteration counts (their key
    material stays what it is: no passphrase opens the new ones)."""
    base = luks_header_offset(path)
    with open(path, "r+b") as f:
        for index, count in iterations.items():
            f.seek(base + LUKS_SLOTS_AT + 48 * index)
            f.write(struct.pack(">II", SLOT_ENABLED, count))


def luks_iterations(path: Path) -> tuple[int, int]:
    """(master key digest iterations, slot 0 iterations) of a LUKS qcow2 image."""
    data = path.read_bytes()
    base = luks_header_offset(path)
    master = struct.unpack_from(">I", data, base + 196)[0]
    slot0 = struct.unpack_from(">I", data, base + LUKS_SLOTS_AT + 4)[0]
    return master, slot0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["eight-huge-slots", "sum-over-the-limit"])
def test_luks_key_derivation_work_is_bounded(tmp_path, tmp_path_factory, layout):
    """A header whose slots would cost more than MAX_KDF_BLOCKS is refused at once, for a
    wrong passphrase and for the right one alike (every slot counts: a wrong passphrase
    tries them all), naming the slot where the sum passes the limit and its iterations.
    Without a passphrase (info) nothing is derived and the image still describes itself."""
    from qcow2lib.crypto import luks

    image = copy_image(tmp_path_factory, BLANK, tmp_path / "luks.qcow2")
    if layout == "eight-huge-slots":
        slots = dict.fromkeys(range(8), 0xFFFFFFFF)
        named_slot, named_iterations = 0, 0xFFFFFFFF
    else:  # each slot alone is fine; together they are not
        per_slot = luks.MAX_KDF_BLOCKS // 6 // 2  # a 64-byte key: two SHA-256 blocks each
        slots = dict.fromkeys(range(1, 8), per_slot)
        named_slot, named_iterations = 6, per_slot
    set_slots(image, slots)
    for passphrase in (PASSPHRASE, "wrong"):
        start = time.process_time()
        with pytest.raises(CorruptImageError) as info:
            qcow2lib.open(str(image), passphrase=passphrase)
        assert time.process_time() - start < 2
        message = str(info.value)
        assert f"keyslot {named_slot} (iterations {named_iterations}" in message, message
        assert str(luks.MAX_KDF_BLOCKS) in message
    code, _, err = qimg_run(
        "convert",
        "--object",
        f"secret,id=s0,data={PASSPHRASE}",
        "--image-opts",
        f"driver=qcow2,file.filename={image},encrypt.key-secret=s0",
        "-O",
        "raw",
        tmp_path / "out.raw",
    )
    assert code == 1 and f"keyslot {named_slot}" in err and "Traceback" not in err, err
    code, out, err = qimg_run("info", "--output=json", image)
    assert code == 0, err
    reported = json.loads(out)["format-specific"]["data"]["encrypt"]["slots"]
    assert [slot["iters"] for slot in reported if slot["active"]][-1] == named_iterations


@pytest.mark.timeout(60)
def test_luks_images_qemu_makes_still_open(tmp_path):
    """What qemu-img makes opens: iter-time 100 ms here (a unit check of the bound covers
    10 s: the counts qemu-img 7.2 gave for iter-time=10000, also on a machine 8x faster),
    and a header whose slots sum to just the limit is tried, not refused."""
    from qcow2lib.crypto import luks

    image = luks_image(tmp_path / "luks.qcow2", iter_time=100)
    run(
        [
            QEMU_IO,
            "--object",
            f"secret,id=s0,data={PASSPHRASE}",
            "--image-opts",
            "-c",
            "write -P 0x61 0 64k",
            f"driver=qcow2,file.filename={image},encrypt.key-secret=s0",
        ]
    )
    with qcow2lib.open(str(image), passphrase=PASSPHRASE) as dev:
        assert dev.read(0, 64 * KiB) == b"\x61" * 64 * KiB
    header = luks.LuksHeader(
        hash_alg="sha256", master_key_len=64, master_key_iterations=8 * 11_113_461
    )
    header.key_slots[0] = luks.KeySlot(SLOT_ENABLED, 8 * 44_643_050)
    header.check_kdf_work()  # qemu-img's iter-time=10000 on a machine 8x as fast
    header.key_slots[0].iterations += 1
    with pytest.raises(CorruptImageError, match="keyslot 0"):
        header.check_kdf_work()
    # Three slots summing to the limit (to within one iteration) pass; one more does not.
    iterations = 2 * 44_643_050
    header.key_slots[0].iterations = iterations
    header.key_slots[1] = luks.KeySlot(SLOT_ENABLED, iterations)
    spare = luks.MAX_KDF_BLOCKS - 2 * header.slot_kdf_blocks(iterations) - header.slot_kdf_blocks(0)
    header.key_slots[2] = luks.KeySlot(SLOT_ENABLED, spare // 2)  # two blocks an iteration
    header.check_kdf_work()
    header.key_slots[2].iterations += 1
    with pytest.raises(CorruptImageError, match=f"keyslot 2 \\(iterations {spare // 2 + 1}"):
        header.check_kdf_work()
    # A slower hash's blocks weigh what they cost: sha512 (one 64-byte block a key, 2.5x
    # SHA-256's time each) passes at 1/2.5 of the blocks sha256 may have, not above.
    slow = luks.LuksHeader(hash_alg="sha512", master_key_len=64, master_key_iterations=0)
    slow.key_slots[0] = luks.KeySlot(SLOT_ENABLED, int(luks.MAX_KDF_BLOCKS / 2.5))
    slow.check_kdf_work()
    slow.key_slots[0].iterations = int(luks.MAX_KDF_BLOCKS / 2.5) + 2
    with pytest.raises(CorruptImageError, match="PBKDF2-sha512 worth"):
        slow.check_kdf_work()


@pytest.mark.timeout(120)
def test_luks_create_refuses_an_iter_time_it_could_not_open(tmp_path):
    """qcow2lib's own create and amend refuse an iter-time whose slot would pass the limit,
    before deriving anything (an image that could never be opened again)."""
    from qcow2lib.crypto import ciphers, luks

    per_second = ciphers.pbkdf2_iterations_for("sha256", 64, 1000)  # 64-byte key slots
    too_long = luks.MAX_KDF_BLOCKS // (2 * per_second) * 1000 + 60_000
    start = time.process_time()
    with pytest.raises(qcow2lib.InvalidArgumentError, match="iter-time"):
        qcow2lib.create(
            str(tmp_path / "new.qcow2"),
            MiB,
            encrypt_format="luks",
            passphrase=PASSPHRASE,
            encrypt_options={"iter-time": too_long},
        )
    assert time.process_time() - start < 5


# ---------------------------------------------------------------------------------------------
# A failed fdatasync
# ---------------------------------------------------------------------------------------------


def failing_flushes(monkeypatch, path: Path, sticky: bool) -> dict:
    """Swap in a HostFile whose first fdatasync of `path` fails with EIO (sticky: every
    one from then on), as tests/test_faults.py injects faults; returns the counters."""
    state = {"flushes": 0, "failed": 0}
    watched = os.path.realpath(path)

    class FailingFlush(hostfile.HostFile):
        def flush(self):
            if os.path.realpath(self.path) == watched:
                state["flushes"] += 1
                if state["flushes"] == 1 or (sticky and state["failed"]):
                    state["failed"] += 1
                    raise Qcow2IOError(
                        errno.EIO,
                        f"flush failed on '{self.path}': Input/output error (injected)",
                        self.path,
                    )
            return super().flush()

    monkeypatch.setattr(hostfile, "host_file_class", FailingFlush)
    return state


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("sticky", [False, True])
def test_failed_fdatasync_fails_later_flushes_and_close(tmp_path, monkeypatch, fmt, sticky):
    """Once an fdatasync failed, flush() and close() keep failing, also when the disk
    would accept the next one (transient): the pages it lost are not written again."""
    path = tmp_path / f"img.{fmt}"
    qemu_img("create", "-q", "-f", fmt, path, "1M")
    state = failing_flushes(monkeypatch, path, sticky)
    dev = qcow2lib.open(str(path), "r+", fmt=fmt)
    dev.write(0, b"A" * 4096)
    with pytest.raises(Qcow2IOError) as info:
        dev.flush()
    assert info.value.errno == errno.EIO
    dev.write(4096, b"B" * 4096)
    with pytest.raises(Qcow2IOError):
        dev.flush()
    with pytest.raises(Qcow2IOError):
        dev.close()
    dev.close()  # a second close does nothing
    assert state["failed"] == 1 + (sticky and state["flushes"] - 1)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_close_flushes_what_was_written(tmp_path, monkeypatch, fmt):
    """close() makes writes durable and reports the fdatasync that fails doing it; a
    device that wrote nothing (or only reads) closes without one."""
    path = tmp_path / f"img.{fmt}"
    qemu_img("create", "-q", "-f", fmt, path, "1M")
    state = failing_flushes(monkeypatch, path, sticky=False)
    with qcow2lib.open(str(path), "r", fmt=fmt) as dev:
        dev.read(0, 4096)
    dev = qcow2lib.open(str(path), "r+", fmt=fmt)
    flushes_at_open = state["flushes"]
    dev.write(0, b"C" * 4096)
    with pytest.raises(Qcow2IOError):
        dev.close()
    assert state["flushes"] > flushes_at_open
    with qcow2lib.open(str(path), "r+", fmt=fmt) as dev:  # the next fdatasync succeeds
        dev.write(0, b"D" * 4096)
    monkeypatch.undo()
    with qcow2lib.open(str(path), "r", fmt=fmt) as dev:
        assert dev.read(0, 4096) == b"D" * 4096
    if fmt == "raw":
        state = failing_flushes(monkeypatch, path, sticky=True)
        qcow2lib.open(str(path), "r+", fmt=fmt).close()
        assert state["flushes"] == 0


# ---------------------------------------------------------------------------------------------
# Writes acknowledged before corruption was found
# ---------------------------------------------------------------------------------------------


def break_l2_entry(path: Path, cluster_index: int, how: str) -> None:
    """Damage the L2 entry of a guest cluster qemu-io allocated (first L2 table)."""
    data = path.read_bytes()
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & OFFSET_MASK
    (entry,) = struct.unpack_from(">Q", data, l2_offset + 8 * cluster_index)
    assert entry & OFFSET_MASK
    if how == "unaligned":
        entry |= 0x200
    else:  # past the end of the file, cluster aligned
        entry = (entry & ~OFFSET_MASK) | 0x10000000
    with open(path, "r+b") as f:
        f.seek(l2_offset + 8 * cluster_index)
        f.write(struct.pack(">Q", entry))


BROKEN_OPERATIONS = {
    "write": lambda dev, start: dev.write(start + 100, b"x" * 10),
    "write-across": lambda dev, start: dev.write(start - 512, b"x" * 1024),
    "write-zeroes": lambda dev, start: dev.write_zeroes(start, 64 * KiB),
    "discard": lambda dev, start: dev.discard(start, 64 * KiB),
}


@pytest.mark.parametrize("how", ["unaligned", "past-eof"])
@pytest.mark.parametrize("operation", sorted(BROKEN_OPERATIONS))
@pytest.mark.parametrize("ending", ["flush-close", "close"])
def test_writes_acknowledged_before_corruption_survive(tmp_path, how, operation, ending):
    """A 64 KiB write (new cluster: its L2 entry only in the cache), then an operation on a
    cluster whose L2 entry is broken: that one fails and the image is marked corrupt, but
    flush and close succeed only with the first write on disk (QEMU reads it back)."""
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    run([QEMU_IO, "-c", "write -P 0x11 320k 64k", path])
    break_l2_entry(path, 5, how)
    dev = qcow2lib.open(str(path), "r+")
    dev.write(0, b"\x42" * 64 * KiB)
    dev.write(128 * KiB, b"\x43" * 4096)
    with pytest.raises(CorruptImageError):
        BROKEN_OPERATIONS[operation](dev, 5 * 64 * KiB)
    with pytest.raises(Qcow2Error):  # stopped: nothing more is written
        dev.write(192 * KiB, b"\x44" * 4096)
    if ending == "flush-close":
        dev.flush()
    dev.close()
    with qcow2lib.open(str(path)) as dev:
        assert dev.corrupt
        assert dev.read(0, 64 * KiB) == b"\x42" * 64 * KiB
        assert dev.read(128 * KiB, 4096) == b"\x43" * 4096
        assert dev.read(192 * KiB, 4096) == bytes(4096)
    result = run([QEMU_IO, "-r", "-c", "read -P 0x42 0 64k", "-c", "read -P 0x43 128k 4k", path])
    assert "verification failed" not in result.stdout and "read failed" not in result.stdout, (
        result.stdout
    )


# ---------------------------------------------------------------------------------------------
# Compressed clusters and narrow refcounts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("refcount_bits", [1, 2])
def test_convert_compressed_with_narrow_refcounts(tmp_path, compression, refcount_bits):
    """qimg convert -c -o refcount_bits=1|2 succeeds like qemu-img: each host cluster holds
    as many compressed clusters as its refcount can count; check is clean, the content
    equal, and (zlib: the same compressed bytes) the file as long as qemu-img's."""
    rng = random.Random(refcount_bits)
    words = [rng.randbytes(8) for _ in range(64)]
    source = tmp_path / "source.raw"
    source.write_bytes(b"".join(rng.choice(words) for _ in range(4 * MiB // 8)))
    options = f"refcount_bits={refcount_bits},compression_type={compression}"
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    code, _, err = qimg_run("convert", "-c", "-O", "qcow2", "-o", options, source, ours)
    assert code == 0, err
    qemu_img("convert", "-c", "-O", "qcow2", "-o", options, source, theirs)
    reports = {}
    for image in (ours, theirs):
        assert_clean(image)
        assert qemu_img("compare", image, source).returncode == 0
        reports[image] = json.loads(qemu_img("check", "--output=json", image).stdout)
        assert reports[image]["compressed-clusters"] == 64
    if compression == "zlib":
        assert reports[ours]["image-end-offset"] == reports[theirs]["image-end-offset"]
    expected = bytearray(source.read_bytes())
    with qcow2lib.open(str(ours), "r+") as dev:  # and overwriting them keeps counts valid
        for index in range(0, 64, 3):
            dev.write_compressed(index * 64 * KiB, bytes(64 * KiB))
            expected[index * 64 * KiB : (index + 1) * 64 * KiB] = bytes(64 * KiB)
    assert_clean(ours)
    source.write_bytes(expected)
    assert qemu_img("compare", ours, source).returncode == 0


# ---------------------------------------------------------------------------------------------
# Untrusted images
# ---------------------------------------------------------------------------------------------


def qcow2(
    path: Path,
    backing: str | None = None,
    backing_fmt: str | None = "qcow2",
    options: str | None = None,
) -> Path:
    """A qemu-img image (its backing name stored as given, -u: no check of it)."""
    args = ["create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-u", "-b", backing] + (["-F", backing_fmt] if backing_fmt else [])
    qemu_img(*args, path, "1M")
    return path


def hostile_layouts(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Images naming what an untrusted image may not, each with the words its refusal
    must contain. Everything named lies in tmp_path (outside/ plays the host's files)."""
    inside, outside = tmp_path / "images", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    qcow2(outside / "secret.qcow2")
    (outside / "secret.raw").write_bytes(b"\x99" * MiB)
    qcow2(inside / "base.qcow2")
    (inside / "disk.raw").write_bytes(b"\x98" * MiB)
    os.symlink(outside / "secret.qcow2", inside / "escape.qcow2")
    os.symlink(outside, inside / "outdir")
    layouts = {
        "absolute": (
            qcow2(inside / "absolute.qcow2", str(outside / "secret.qcow2")),
            "absolute name",
        ),
        "dotdot": (qcow2(inside / "dotdot.qcow2", "../outside/secret.qcow2"), "'..'"),
        "raw-inside": (qcow2(inside / "raw.qcow2", "disk.raw", "raw"), "format is raw"),
        "raw-outside": (
            qcow2(inside / "raw-out.qcow2", str(outside / "secret.raw"), "raw"),
            "format is raw",
        ),
        "json": (
            qcow2(
                inside / "json.qcow2",
                'json:{"driver": "qcow2", "file": {"driver": '
                f'"file", "filename": "{outside / "secret.qcow2"}"}}}}',
            ),
            "protocol or json",
        ),
        "nbd": (qcow2(inside / "nbd.qcow2", "nbd:localhost:10809"), "protocol or json"),
        "file-prefix": (qcow2(inside / "file.qcow2", "file:base.qcow2"), "protocol or json"),
        "symlink-file": (qcow2(inside / "symlink.qcow2", "escape.qcow2"), "outside the image"),
        "symlink-dir": (qcow2(inside / "symdir.qcow2", "outdir/secret.qcow2"), "outside the image"),
        "deeper": (qcow2(inside / "deeper.qcow2", "absolute.qcow2"), "absolute name"),
        "data-file": (
            qcow2(
                inside / "data.qcow2",
                options=f"data_file={outside / 'secret.raw'},data_file_raw=on",
            ),
            "external data file",
        ),
    }
    os.mkfifo(inside / "fifo.qcow2")
    layouts["fifo"] = (qcow2(inside / "fifo-backed.qcow2", "fifo.qcow2"), "a FIFO")
    return layouts


def test_untrusted_images_are_confined_to_their_directory(tmp_path):
    """Each refusal of the library switch; the default (trusted, as qemu-img) opens every
    layout whose target is a usable image."""
    for name, (image, words) in hostile_layouts(tmp_path).items():
        with pytest.raises(Qcow2Error) as info:
            qcow2lib.open(str(image), untrusted=True)
        message = str(info.value)
        assert words in message, (name, message)
        if name != "fifo":
            assert isinstance(info.value, qcow2lib.UntrustedImageError), (name, message)
        if name in (
            "absolute",
            "dotdot",
            "raw-outside",
            "symlink-file",
            "symlink-dir",
            "data-file",
            "raw-inside",
            "deeper",
        ):
            qcow2lib.open(str(image)).close()  # trusted, as qemu-img: opened
    for mode in ("r", "r+"):
        with pytest.raises(qcow2lib.UntrustedImageError):
            qcow2lib.open(str(tmp_path / "images" / "data.qcow2"), mode, untrusted=True)


def test_untrusted_images_inside_their_directory_open(tmp_path):
    """A chain of relative names inside the directory (a subdirectory too, and a symlink
    that stays inside) opens and reads as qemu-img reads it."""
    directory = tmp_path / "images"
    (directory / "sub").mkdir(parents=True)
    base = qcow2(directory / "sub" / "base.qcow2")
    run([QEMU_IO, "-c", "write -P 0x31 0 64k", base])
    middle = qcow2(directory / "sub" / "middle.qcow2", "base.qcow2")
    run([QEMU_IO, "-c", "write -P 0x32 64k 64k", middle])
    top = qcow2(directory / "top.qcow2", "sub/middle.qcow2")
    os.symlink("sub/base.qcow2", directory / "link.qcow2")
    linked = qcow2(directory / "linked.qcow2", "link.qcow2")
    for image in (top, linked):
        run([QEMU_IO, "-c", "write -P 0x33 128k 64k", image])
        expected = tmp_path / "expected.raw"
        qemu_img("convert", "-O", "raw", image, expected)
        with qcow2lib.open(str(image), "r+", untrusted=True) as dev:
            assert dev.read(0, MiB) == expected.read_bytes()
            dev.write(256 * KiB, b"\x34" * 4096)
    explicit = qcow2(directory / "explicit-data.qcow2", options=f"data_file={directory / 'd.raw'}")
    with qcow2lib.open(
        str(explicit), untrusted=True, data_file=str(directory / "d.raw")
    ) as dev:  # named by the caller
        assert dev.read(0, 4096) == bytes(4096)


def test_qimg_untrusted_environment_variable(tmp_path, monkeypatch):
    """QIMG_UNTRUSTED=1 makes qimg open every image as untrusted: each command refuses what
    the library refuses; unset, qimg behaves as qemu-img."""
    layouts = hostile_layouts(tmp_path)
    inside = tmp_path / "images"
    monkeypatch.chdir(inside)
    commands = {
        "absolute": [
            ("info", "--backing-chain"),
            ("convert", "-O", "raw", "{image}", "out.raw"),
            ("map",),
            ("compare", "{image}", "base.qcow2"),
            ("check",),
            ("commit",),
            ("rebase", "-b", "base.qcow2", "-F", "qcow2"),
            ("create", "-f", "qcow2", "-b", "{image}", "-F", "qcow2", "new.qcow2"),
            (
                "info",
                "--object",
                "secret,id=s0,data=x",
                "--object",
                "secret,id=s1,data=y",
                "--image-opts",
                (
                    "driver=qcow2,file.filename={image},encrypt.key-secret=s0,"
                    "backing.encrypt.key-secret=s1"
                ),
            ),
        ],
        "symlink-file": [("info", "--backing-chain"), ("map",)],
        "raw-outside": [
            ("convert", "-O", "raw", "{image}", "out.raw"),
            ("info", "--backing-chain"),
        ],
        "data-file": [
            ("map",),
            ("convert", "-O", "raw", "{image}", "out.raw"),
            ("amend", "-o", "lazy_refcounts=on"),
            ("check",),
            ("check", "-r", "all"),
        ],
    }
    for name, runs in commands.items():
        image, words = layouts[name]
        for command in runs:
            args = [part.format(image=image) for part in command]
            if "{image}" not in " ".join(command):
                args.append(str(image))
            for value in ("1", "yes", "TRUE", "on", "y"):
                monkeypatch.setenv("QIMG_UNTRUSTED", value)
                code, _, err = qimg_run(*args)
                assert code != 0 and words in err and "Traceback" not in err, (name, args, err)
            if command[0] in ("info", "map", "check"):
                for value in ("0", "no", "Off", ""):
                    monkeypatch.setenv("QIMG_UNTRUSTED", value)
                    code, _, err = qimg_run(*args)
                    assert code == 0, (name, args, value, err)
            monkeypatch.delenv("QIMG_UNTRUSTED")
