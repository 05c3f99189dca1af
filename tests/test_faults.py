"""Resource faults: a full filesystem and injected I/O errors.

Full filesystem: images live on a small ext4 filesystem (a 20 MiB file made with
mkfs.ext4 and loop-mounted, so these tests run as root) that is filled to a chosen number
of free bytes. Writes, cluster/table allocation and
snapshot creation must then fail with Qcow2IOError(ENOSPC), leave an image that
`qemu-img check` finds free of corruption (leaks are allowed) with every acknowledged
byte in place, and work again once space is freed (on the same handle and after
reopening).

Injected errors: a HostFile subclass (swapped in through hostfile.host_file_class, as
tests/crashsim.py does) fails a chosen write or flush of the image (or of its external
data file) with EIO, once ("transient") or from then on ("sticky", a disk gone bad). The
operation during which the fault fires must raise Qcow2IOError(EIO): a failed write is
never reported as done. After the workload the image on disk must pass `qemu-img check`
without corruption, still open for writing (EIO is not corruption: no corrupt bit), and
read back every byte that was acknowledged (written, then flushed with success, and not
touched by an operation that failed or ran after that flush). A failed flush also stays
failed: as QEMU (file-posix's page_cache_inconsistent), later flushes of that image must
not report success, since the kernel may have dropped the pages that did not reach the
disk. Every write and every flush of a workload is failed once (in its own run), and
FAULT_STICKY (environment, default 6) of each for good.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import Qcow2Error, Qcow2IOError, hostfile
from qcow2lib import snapshots as snaps
from qemutools import (
    QEMU_IMG,
    qemu_create,
    qemu_img,
    qemu_io,
    require_root,
    run_qimg,
    run_qimg_in,
)

pytestmark = pytest.mark.timeout(300)

FAULT_STICKY = int(os.environ.get("FAULT_STICKY", "6"))
SECTOR = 512


def qemu_check(path, force_share: bool = False) -> dict:
    """`qemu-img check` must find no corruption (exit 0, or 3 for leaks only), also after
    a snapshot creation cut short (it commits with one header write)."""
    result = subprocess.run(
        [QEMU_IMG, "check", "--output=json", *(["-U"] if force_share else []), str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode in (0, 3), (
        f"qemu-img check exit {result.returncode}: {result.stdout}{result.stderr}"
    )
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0, report
    return report


def qemu_content(path, out: Path) -> bytes:
    subprocess.run(
        [QEMU_IMG, "convert", "-U", "-O", "raw", str(path), str(out)],
        check=True,
        capture_output=True,
    )
    return out.read_bytes()


# ---------------------------------------------------------------------------------------------
# A full filesystem
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_fs(tmp_path_factory):
    """A 20 MiB ext4 filesystem, loop-mounted (mkfs.ext4 from e2fsprogs, mount -o loop)."""
    require_root("loop-mounts a small ext4 filesystem")
    root = tmp_path_factory.mktemp("smallfs")
    backing = root / "fs.img"
    mountpoint = root / "mnt"
    mountpoint.mkdir()
    with open(backing, "wb") as f:
        f.truncate(20 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(backing)], check=True)
    subprocess.run(["mount", "-o", "loop", str(backing), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.fixture
def fs(small_fs):
    """The small filesystem, emptied before and after each test."""

    def clean():
        for entry in small_fs.iterdir():
            if entry.name != "lost+found":
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        os.sync()

    clean()
    yield small_fs
    clean()


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem completely, then give back `leave` bytes (whole 4 KiB blocks)."""
    filler = directory / "filler"
    os.sync()
    fd = os.open(filler, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = 0
        chunk = 1 << 20
        while chunk >= 4096:
            try:
                os.posix_fallocate(fd, size, chunk)
                size += chunk
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                chunk //= 2
        if leave:
            os.ftruncate(fd, max(0, size - leave))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.sync()
    return filler


def free_space(filler: Path) -> None:
    filler.unlink()
    os.sync()


class Model:
    """What the guest may expect to read: acknowledged bytes and bytes in doubt.

    doubtful[i]: 0 acknowledged, 1 written since the last successful flush, 2 undefined
    (an operation on it failed; only a later write that succeeds defines it again).
    """

    def __init__(self, content: bytes):
        self.current = bytearray(content)
        self.durable = bytes(content)
        self.doubtful = bytearray(len(content))

    def wrote(self, offset: int, data: bytes) -> None:
        self.current[offset : offset + len(data)] = data
        self.doubtful[offset : offset + len(data)] = b"\1" * len(data)

    def failed(self, offset: int, length: int) -> None:
        self.doubtful[offset : offset + length] = b"\2" * length

    def flushed(self) -> None:
        self.durable = bytes(self.current)
        self.doubtful = bytearray(self.doubtful.replace(b"\1", b"\0"))

    def check(self, content: bytes, what: str) -> None:
        assert len(content) == len(self.durable), what
        bad = [
            i
            for i in range(0, len(content), SECTOR)
            if content[i : i + SECTOR] != self.durable[i : i + SECTOR]
            and not any(self.doubtful[i : i + SECTOR])
        ]
        assert not bad, (
            f"{what}: acknowledged data lost at guest offsets {[hex(b) for b in bad[:8]]}"
        )


def _fill_until_enospc(
    img, model: Model, rng: random.Random, offsets: list[int], length: int
) -> tuple[Qcow2IOError, str]:
    """Write (and flush) at each offset until the filesystem runs out of space; returns
    the error and what failed ("write": the data, "flush": the metadata write-back)."""
    for offset in offsets:
        data = rng.randbytes(length)
        try:
            img.write(offset, data)
        except Qcow2IOError as exc:
            model.failed(offset, length)
            return exc, "write"
        model.wrote(offset, data)
        try:
            img.flush()
        except Qcow2IOError as exc:
            return exc, "flush"
        model.flushed()
    raise AssertionError("the filesystem never filled up")


ENOSPC_CASES = {
    # name: (cluster size, bytes per write, distance between writes, free bytes left,
    #        what runs out of space first)
    "data-4k-none-left": (4096, 16 << 10, 263 * 4096, 0, "write"),
    "data-4k-200k-left": (4096, 16 << 10, 263 * 4096, 200 << 10, "write"),
    "l2-table-4k": (4096, 4096, (2 << 20) + 4096, 4 << 10, "flush"),
    "l2-table-4k-3-blocks": (4096, 4096, (2 << 20) + 4096, 12 << 10, "flush"),
    "tables-512": (512, 512, (32 << 10) + 512, 8 << 10, None),
    "tables-512-none-left": (512, 512, (32 << 10) + 512, 0, None),
    "data-64k": (65536, 16 << 10, 3 << 16, 12 << 10, None),
}


@pytest.mark.parametrize("name", list(ENOSPC_CASES))
def test_enospc_during_writes(fs, tmp_path, name):
    """Data writes, and the L2 tables and refcount blocks they need, meet a full
    filesystem: ENOSPC, a sound image with every flushed byte, and writes work again
    once space is freed."""
    cluster_size, length, stride, leave, expected_where = ENOSPC_CASES[name]
    size = 64 << 20
    path = fs / "img.qcow2"
    qcow2lib.create(str(path), size, cluster_size=cluster_size)
    rng = random.Random(f"enospc-{name}")
    model = Model(bytes(size))
    img = qcow2lib.open(str(path), "r+")
    first = rng.randbytes(64 << 10)
    img.write(0, first)
    img.flush()
    model.wrote(0, first)
    model.flushed()
    filler = fill(fs, leave)
    offsets = [(i * stride) % (size - length) for i in range(1, 2000)]
    exc, where = _fill_until_enospc(img, model, rng, offsets, length)
    assert isinstance(exc, Qcow2IOError) and exc.errno == errno.ENOSPC, repr(exc)
    assert "No space left" in str(exc)
    if expected_where:
        assert where == expected_where, f"ENOSPC came from the {where}, not the {expected_where}"
    with contextlib.suppress(Qcow2IOError):
        img.flush()  # may fail again: still no space
    qemu_check(path, force_share=True)  # still open: what a crash now would leave
    model.check(qemu_content(path, tmp_path / "a.raw"), "after ENOSPC")
    # Space comes back: the same handle carries on.
    free_space(filler)
    retry = rng.randbytes(length)
    img.write(offsets[0], retry)
    model.wrote(offsets[0], retry)
    img.flush()
    model.flushed()
    img.close()
    qemu_check(path)
    model.check(qemu_content(path, tmp_path / "b.raw"), "after space came back")
    with qcow2lib.open(str(path), "r+") as again:
        again.write(size - 4096, b"E" * 4096)
        model.wrote(size - 4096, b"E" * 4096)
    model.flushed()
    qemu_check(path)
    model.check(qemu_content(path, tmp_path / "c.raw"), "after reopening")


@pytest.mark.parametrize("leave", [0, 4 << 10, 8 << 10, 16 << 10])
def test_enospc_when_closing_after_full(fs, tmp_path, leave):
    """The write-back in close() meets the full filesystem: close reports ENOSPC and the
    image on disk is still sound, with every flushed byte."""
    size = 32 << 20
    path = fs / "img.qcow2"
    qcow2lib.create(str(path), size, cluster_size=512)
    model = Model(bytes(size))
    rng = random.Random(f"close-{leave}")
    with qcow2lib.open(str(path), "r+") as img:
        img.write(0, b"F" * 8192)
    model.wrote(0, b"F" * 8192)
    model.flushed()
    img = qcow2lib.open(str(path), "r+")
    filler = fill(fs, leave)
    failures = []
    for i in range(64):  # unflushed writes all over: many dirty L2 tables
        offset = (i * 509 * 1024) % (size - 512)
        data = rng.randbytes(512)
        try:
            img.write(offset, data)
            model.wrote(offset, data)
        except Qcow2IOError as exc:
            failures.append(exc)
            model.failed(offset, 512)
    try:
        img.close()
    except Qcow2IOError as exc:
        failures.append(exc)
    assert failures, "nothing failed although the filesystem was full"
    assert all(exc.errno == errno.ENOSPC for exc in failures), failures
    qemu_check(path)
    model.check(qemu_content(path, tmp_path / "a.raw"), "after a failed close")
    free_space(filler)
    with qcow2lib.open(str(path), "r+") as img:
        img.write(4096, b"G" * 512)
    qemu_check(path)


@pytest.mark.parametrize("leave", [0, 4 << 10, 8 << 10, 16 << 10, 24 << 10])
def test_enospc_during_snapshot_creation(fs, tmp_path, leave):
    """create_snapshot needs a copy of the L1 table, a new snapshot table and refcount
    updates: on a full filesystem it fails cleanly, and works once space is back. (The
    first snapshot is QEMU's, which updates in place: a snapshot of ours would leave the
    clusters of the metadata it replaced for the next one, which then needs no space.)"""
    size = 64 << 20  # with 512-byte clusters an L1 table of 2048 entries (16 KiB)
    path = fs / "img.qcow2"
    qcow2lib.create(str(path), size, cluster_size=512)
    with qcow2lib.open(str(path), "r+") as img:
        for i in range(0, size, 1 << 20):
            img.write(i, i.to_bytes(8, "big") * 64)
    qemu_img("snapshot", "-c", "before", path)
    expected = qemu_content(path, tmp_path / "before.raw")
    filler = fill(fs, leave)
    img = qcow2lib.open(str(path), "r+")
    try:
        snaps.create_snapshot(img, "full")
        created = True
    except Qcow2IOError as exc:
        assert exc.errno == errno.ENOSPC, repr(exc)
        created = False
    if created:  # it fitted in what was left: then it must be whole
        assert leave, "a snapshot was created on a filesystem with no space left"
        img.close()
    else:
        with contextlib.suppress(Qcow2IOError):
            img.close()
    report = qemu_check(path)
    assert report["check-errors"] == 0
    listed = subprocess.run(
        [QEMU_IMG, "snapshot", "-l", str(path)], capture_output=True, text=True, check=True
    ).stdout
    assert "before" in listed
    assert qemu_content(path, tmp_path / "a.raw") == expected
    free_space(filler)
    with qcow2lib.open(str(path), "r+") as img:
        names = [s.name for s in snaps.list_snapshots(img)]
        if "full" not in names:
            snaps.create_snapshot(img, "full")
        img.write(0, b"after" * 100)
    qemu_check(path)
    snap_raw = tmp_path / "snap.raw"
    subprocess.run(
        [QEMU_IMG, "convert", "-l", "snapshot.name=full", "-O", "raw", str(path), str(snap_raw)],
        check=True,
    )
    assert snap_raw.read_bytes() == expected


def test_enospc_growing_the_refcount_table(fs, tmp_path):
    """512-byte clusters and 64-bit refcounts: the refcount table itself has to grow and
    move while the filesystem fills up."""
    size = 16 << 20
    path = fs / "img.qcow2"
    qcow2lib.create(str(path), size, cluster_size=512, refcount_bits=64)
    model = Model(bytes(size))
    rng = random.Random("reftable")
    img = qcow2lib.open(str(path), "r+")
    filler = fill(fs, 96 << 10)
    exc, _ = _fill_until_enospc(img, model, rng, [i * 8192 for i in range(size // 8192)], 4096)
    assert exc.errno == errno.ENOSPC
    with contextlib.suppress(Qcow2IOError):
        img.close()
    qemu_check(path)
    model.check(qemu_content(path, tmp_path / "a.raw"), "after ENOSPC")
    free_space(filler)
    with qcow2lib.open(str(path), "r+") as img:
        img.write(size - 8192, b"R" * 8192)
    qemu_check(path)


# ---------------------------------------------------------------------------------------------
# Injected I/O errors
# ---------------------------------------------------------------------------------------------


class Injector:
    """Swaps a HostFile subclass in that counts the writes and flushes of `watched` files
    and fails one chosen operation (and, if sticky, every later write and flush) with EIO."""

    def __init__(
        self, watched: set[str], kind: str | None = None, at: int = -1, sticky: bool = False
    ):
        self.watched = {os.path.realpath(p) for p in watched}
        self.kind = kind  # "write" or "flush"
        self.at = at  # index among operations of that kind
        self.sticky = sticky
        self.counts = {"write": 0, "flush": 0}
        self.fired = False
        self.in_flight = False  # the fault fired during the current guest operation

    def __enter__(self) -> "Injector":
        injector = self

        class FaultyHostFile(hostfile.HostFile):
            def _maybe_fail(self, kind: str) -> None:
                if os.path.realpath(self.path) not in injector.watched:
                    return
                index = injector.counts[kind]
                injector.counts[kind] += 1
                if injector.fired and injector.sticky and kind in ("write", "flush"):
                    raise Qcow2IOError(
                        errno.EIO,
                        f"{kind} failed on '{self.path}': Input/output error (sticky)",
                        self.path,
                    )
                if kind == injector.kind and index == injector.at:
                    injector.fired = True
                    injector.in_flight = True
                    raise Qcow2IOError(
                        errno.EIO,
                        f"{kind} failed on '{self.path}': Input/output error (injected)",
                        self.path,
                    )

            def pwrite(self, data, offset):
                self._maybe_fail("write")
                return super().pwrite(data, offset)

            def pwritev(self, buffers, offset):
                self._maybe_fail("write")
                return super().pwritev(buffers, offset)

            def flush(self):
                self._maybe_fail("flush")
                return super().flush()

        self._saved = hostfile.host_file_class
        hostfile.host_file_class = FaultyHostFile
        return self

    def __exit__(self, *exc) -> None:
        hostfile.host_file_class = self._saved


WORKLOADS = {
    # name: (create options, size, extras)
    "v3-4k": (dict(cluster_size=4096), 2 << 20, {"snapshot": True}),
    "v3-512-rc64": (dict(cluster_size=512, refcount_bits=64), 1 << 20, {"snapshot": True}),
    "v2-backing": (dict(cluster_size=4096, compat="0.10"), 2 << 20, {"backing": True}),
    "extended-l2": (dict(cluster_size=16384, extended_l2=True), 2 << 20, {}),
    "lazy-refcounts": (dict(cluster_size=4096, lazy_refcounts=True), 2 << 20, {}),
    "compressed-zstd": (
        dict(cluster_size=4096, compression_type="zstd"),
        1 << 20,
        {"compressed": True},
    ),
    "data-file": (dict(cluster_size=4096, data_file="img.data"), 2 << 20, {"data_file": True}),
}


def make_ops(rng: random.Random, size: int, cluster: int, extras: dict) -> list[tuple]:
    """A fixed sequence of guest operations (the same in every run of a workload)."""
    ops = []
    for step in range(26):
        choice = rng.random()
        offset = rng.choice(
            [
                rng.randrange(size),
                rng.randrange(size // cluster) * cluster,
                rng.randrange(1, size // cluster) * cluster - rng.randrange(1, 600),
            ]
        )
        offset = max(0, min(offset, size - 1))
        length = min(
            size - offset,
            rng.choice([512, 4096, cluster, 3 * cluster + 77, rng.randrange(1, 9000)]),
        )
        if extras.get("compressed") and choice < 0.3:
            start = rng.randrange(size // cluster) * cluster
            ops.append(
                (
                    "compressed",
                    start,
                    bytes([rng.randrange(1, 255)]) * (cluster // 2)
                    + rng.randbytes(16)
                    + bytes(cluster // 2 - 16),
                )
            )
        elif choice < 0.12:
            ops.append(("zeroes", offset, length, rng.random() < 0.5))
        elif choice < 0.2:
            ops.append(("discard", offset, length))
        else:
            ops.append(("write", offset, rng.randbytes(length)))
        if step == 12 and extras.get("snapshot"):
            ops.append(("snapshot", "mid"))
        if step % 4 == 3:
            ops.append(("flush",))
    ops.append(("flush",))
    return ops


def _setup(directory: Path, name: str) -> tuple[Path, bytes, set[str]]:
    options, size, extras = WORKLOADS[name]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "img.qcow2"
    if extras.get("backing"):
        base = directory / "base.qcow2"
        qemu_create(base, size, options={"cluster_size": 4096, "compat": "0.10"})
        qemu_io(base, "write -P 0x61 0 512k", "write -P 0x62 1M 256k")
        qemu_content(base, directory / "base.raw")  # what discarded v2 clusters read again
        qcow2lib.create(str(path), size, backing_file="base.qcow2", backing_fmt="qcow2", **options)
    else:
        qcow2lib.create(str(path), size, **options)  # a data file name is relative to the cwd
    with qcow2lib.open(str(path), "r+") as img:  # some data before the workload starts
        img.write(0, b"\x5a" * 20000)
        img.write(size // 2, b"\x5b" * 9000)
    content = qemu_content(path, directory / "start.raw")
    watched = {str(path)} | ({str(directory / "img.data")} if extras.get("data_file") else set())
    return path, content, watched


def _discard_effect(model: Model, img, offset: int, length: int, backing_content) -> None:
    cs = img.cluster_size
    start = -(-offset // cs) * cs
    stop = min((offset + length) // cs * cs, len(model.current))
    if offset + length == len(model.current):
        stop = len(model.current)
    if start < stop:
        if img.compat == "0.10" and img.backing_filename:
            model.wrote(start, backing_content[start:stop])
        else:
            model.wrote(start, bytes(stop - start))


GUEST_OPS = ("write", "compressed", "zeroes", "discard")


def run_workload(
    path: Path,
    content: bytes,
    ops: list[tuple],
    injector: Injector | None,
    backing_content: bytes | None,
) -> tuple[Model, list[str]]:
    """Run the ops; returns the model and a list of problems (empty if all went well)."""
    model = Model(content)
    problems: list[str] = []
    with injector or contextlib.nullcontext():
        try:
            img = qcow2lib.open(str(path), "r+")  # (a lazy-refcounts open writes the header)
        except Qcow2IOError as exc:
            if not (injector and injector.in_flight and exc.errno == errno.EIO):
                problems.append(f"open raised {exc!r}")
            return model, problems
        for op in ops + [("close",)]:
            kind = op[0]
            if injector:
                injector.in_flight = False
            try:
                if kind == "write":
                    img.write(op[1], op[2])
                    model.wrote(op[1], op[2])
                elif kind == "compressed":
                    img.write_compressed(op[1], op[2])
                    model.wrote(op[1], op[2])
                elif kind == "zeroes":
                    img.write_zeroes(op[1], op[2], op[3])
                    model.wrote(op[1], bytes(op[2]))
                elif kind == "discard":
                    img.discard(op[1], op[2])
                    _discard_effect(model, img, op[1], op[2], backing_content)
                elif kind == "snapshot":
                    snaps.create_snapshot(img, op[1])
                elif kind == "flush":
                    img.flush()
                    model.flushed()
                elif kind == "close":
                    img.close()
                    model.flushed()  # close() flushes
            except Exception as exc:  # noqa: BLE001 - sorted out below
                eio = isinstance(exc, Qcow2IOError) and exc.errno == errno.EIO
                if not isinstance(exc, Qcow2Error):
                    problems.append(
                        f"{kind} raised {type(exc).__module__}.{type(exc).__name__}: {exc!r}"
                    )
                elif not (injector and injector.fired):
                    problems.append(f"{kind} raised {type(exc).__name__} before any fault: {exc}")
                elif injector.in_flight and not eio:
                    problems.append(
                        f"the injected EIO during {kind} surfaced as {type(exc).__name__}: {exc}"
                    )
                elif isinstance(exc, qcow2lib.CorruptImageError):
                    problems.append(f"after an I/O error, {kind} found the image corrupt: {exc}")
                if kind in GUEST_OPS:
                    model.failed(op[1], len(op[2]) if isinstance(op[2], bytes) else op[2])
                if kind == "close":
                    break
                continue
            if injector and injector.in_flight:
                problems.append(
                    f"the injected EIO during {kind} was swallowed: the operation reported success"
                )
    return model, problems


def _verify_after(path: Path, model: Model, directory: Path, lazy: bool, what: str) -> None:
    if lazy:
        qcow2lib.open(str(path), "r+").close()  # a dirty lazy-refcounts image is repaired
    qemu_check(path)
    model.check(qemu_content(path, directory / "after.raw"), what)
    with qcow2lib.open(str(path), "r") as img:
        model.check(img.read(0, img.size), f"{what} (read by qcow2lib)")
    with qcow2lib.open(str(path), "r+") as img:  # EIO is not corruption: still writable
        assert not img.corrupt, f"{what}: the image was marked corrupt"
        img.write(0, b"W" * 4096)
    qemu_check(path)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_injected_eio(tmp_path, name):
    options, size, extras = WORKLOADS[name]
    rng = random.Random(f"eio-{name}")
    ops = make_ops(rng, size, options["cluster_size"], extras)
    template = tmp_path / "template"
    template.mkdir()
    with contextlib.chdir(template):
        path, content, watched = _setup(template, name)
    backing_content = (template / "base.raw").read_bytes() if extras.get("backing") else None
    # A clean run to count the operations and to check the workload itself.
    clean = tmp_path / "clean"
    shutil.copytree(template, clean)
    counter = Injector({str(clean / Path(p).name) for p in watched})
    with contextlib.chdir(clean):
        model, problems = run_workload(clean / "img.qcow2", content, ops, counter, backing_content)
        assert not problems, problems
        _verify_after(
            clean / "img.qcow2", model, clean, options.get("lazy_refcounts", False), "clean run"
        )
    totals = dict(counter.counts)
    assert totals["write"] > 10 and totals["flush"] > 5, totals

    # Every write and every flush fails once in some run; a sample of them fail for good.
    pick = random.Random(f"points-{name}")
    plans = [(kind, at, False) for kind in ("write", "flush") for at in range(totals[kind])]
    for kind in ("write", "flush"):
        for at in sorted(pick.sample(range(totals[kind]), min(FAULT_STICKY, totals[kind]))):
            plans.append((kind, at, True))
    failures = []
    for number, (kind, at, sticky) in enumerate(plans):
        run_dir = tmp_path / f"run{number}"
        shutil.copytree(template, run_dir)
        files = {str(run_dir / Path(p).name) for p in watched}
        injector = Injector(files, kind, at, sticky)
        what = f"EIO on {kind} #{at}{' (sticky)' if sticky else ''}"
        try:
            with contextlib.chdir(run_dir):
                model, problems = run_workload(
                    run_dir / "img.qcow2", content, ops, injector, backing_content
                )
            assert injector.fired, f"{what}: the fault never fired"
            assert not problems, problems
            with contextlib.chdir(run_dir):
                _verify_after(
                    run_dir / "img.qcow2",
                    model,
                    run_dir,
                    options.get("lazy_refcounts", False),
                    what,
                )
        except AssertionError as exc:
            failures.append(f"{what}: {exc}")
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not failures, f"{len(failures)} of {len(plans)} fault points failed:\n" + "\n".join(
        failures[:6]
    )


def test_failed_flush_keeps_failing(tmp_path):
    """After fdatasync failed, the kernel may have dropped dirty pages: QEMU then fails
    every later flush of that file (page_cache_inconsistent). A later flush that succeeds
    would claim durability for data that may be gone."""
    path = tmp_path / "img.qcow2"
    qcow2lib.create(str(path), 1 << 20, cluster_size=4096)
    with Injector({str(path)}, "flush", 0):
        img = qcow2lib.open(str(path), "r+")
        img.write(0, b"A" * 4096)
        with pytest.raises(Qcow2IOError) as info:
            img.flush()
        assert info.value.errno == errno.EIO
        img.write(8192, b"B" * 4096)
        with pytest.raises(Qcow2IOError):
            img.flush()
        with pytest.raises(Qcow2IOError):
            img.close()
    qemu_check(path)


def test_eio_on_read_is_reported(tmp_path):
    """A failing read of data or of a table is a Qcow2IOError, never wrong data."""
    path = tmp_path / "img.qcow2"
    qemu_create(path, "1M", options={"cluster_size": "4k"})
    qemu_io(path, "write -P 0x41 0 64k", "write -P 0x42 512k 4k")

    class FailingReads(hostfile.HostFile):
        """Both ways HostFile reads (into a buffer, or as new bytes) fail past 0x3000."""

        def _maybe_fail(self, offset):
            if offset >= 0x3000 and FailingReads.armed:  # past header, L1 and refcounts
                raise Qcow2IOError(
                    errno.EIO, f"read failed on '{self.path}': Input/output error", self.path
                )

        def readinto(self, buf, offset):
            self._maybe_fail(offset)
            return super().readinto(buf, offset)

        def pread(self, length, offset):
            self._maybe_fail(offset)
            return super().pread(length, offset)

    FailingReads.armed = False
    saved = hostfile.host_file_class
    hostfile.host_file_class = FailingReads
    try:
        with qcow2lib.open(str(path), "r") as img:
            FailingReads.armed = True
            with pytest.raises(Qcow2IOError) as info:
                img.read(0, 64 << 10)
            assert info.value.errno == errno.EIO
            with pytest.raises(Qcow2IOError):
                img.read(512 << 10, 4096)
            FailingReads.armed = False
            assert img.read(0, 4096) == b"\x41" * 4096
    finally:
        hostfile.host_file_class = saved


@pytest.mark.parametrize("target_exists", [False, True])
def test_convert_onto_a_full_filesystem_fails_in_qemu_img_words(tmp_path, target_exists):
    """A 2 MiB tmpfs takes 8 MiB of random data: both tools fail on the first write with
    strerror's text alone (no file name) and exit 1, and what they leave checks clean of
    corruption (leaks allowed)."""
    require_root("mounts a small tmpfs to fill it")
    source = tmp_path / "big.raw"
    source.write_bytes(os.urandom(8 << 20))
    mounts = []
    try:
        results = []
        for tool in ("qimg", "qemu-img"):
            full = tmp_path / f"full-{tool}"
            full.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", full], check=True)
            mounts.append(full)
            args = ["convert", "-O", "qcow2", source, full / "x.qcow2"]
            if target_exists:
                qemu_img("create", "-q", "-f", "qcow2", full / "x.qcow2", "16M")
                args.insert(1, "-n")
            if tool == "qimg":
                result = run_qimg(*args)
            else:
                result = subprocess.run(
                    ["qemu-img", *map(str, args)], capture_output=True, text=True
                )
            results.append((result.returncode, result.stderr.replace(str(full), "DIR")))
            if target_exists:
                check = qemu_img("check", full / "x.qcow2", check=False)
                assert check.returncode in (0, 3), check.stdout  # (3: leaks only)
        assert results[0] == results[1]
        assert results[0][0] == 1 and "No space left on device" in results[0][1]
    finally:
        for full in mounts:
            subprocess.run(["umount", full], check=False)


# (format and options of the image made first, or None; the command that meets the full
# filesystem). Each runs on a 300 KiB tmpfs of its own.
FULL_DISK_JOBS = {
    "create qcow2 full": (None, ["create", "-f", "qcow2", "-o", "preallocation=full", "a", "1M"]),
    "create qcow2 falloc": (
        None,
        ["create", "-f", "qcow2", "-o", "preallocation=falloc", "a", "1M"],
    ),
    "create qcow2 metadata": (
        None,
        ["create", "-f", "qcow2", "-o", "cluster_size=512,preallocation=metadata", "a", "100M"],
    ),
    "create qcow2 full, data file": (
        None,
        ["create", "-f", "qcow2", "-o", "data_file=d,preallocation=full", "a", "1M"],
    ),
    "create qcow2 falloc, data file": (
        None,
        ["create", "-f", "qcow2", "-o", "data_file=d,preallocation=falloc", "a", "1M"],
    ),
    "create raw full": (None, ["create", "-f", "raw", "-o", "preallocation=full", "a", "1M"]),
    "create raw falloc": (None, ["create", "-f", "raw", "-o", "preallocation=falloc", "a", "1M"]),
    "resize raw full": (
        ("raw", "100k"),
        ["resize", "-f", "raw", "--preallocation=full", "a", "1M"],
    ),
    "resize raw falloc": (
        ("raw", "100k"),
        ["resize", "-f", "raw", "--preallocation=falloc", "a", "1M"],
    ),
    "resize qcow2 full": (("qcow2", "1M"), ["resize", "--preallocation=full", "a", "2M"]),
    "resize qcow2 falloc": (("qcow2", "1M"), ["resize", "--preallocation=falloc", "a", "2M"]),
    "resize qcow2 metadata": (
        ("qcow2", "1M", "cluster_size=512"),
        ["resize", "--preallocation=metadata", "a", "100M"],
    ),
    "dd to a new raw file": (None, ["dd", "if=SOURCE", "of=a", "-O", "raw", "bs=64k"]),
    "dd into a raw file": (("raw", "100k"), ["dd", "if=SOURCE", "of=a", "-O", "raw", "bs=64k"]),
    "convert full": (None, ["convert", "-O", "raw", "-o", "preallocation=full", "SOURCE", "a"]),
    "convert qcow2 falloc": (
        None,
        ["convert", "-O", "qcow2", "-o", "preallocation=falloc", "SOURCE", "a"],
    ),
}


@pytest.mark.parametrize("case", list(FULL_DISK_JOBS))
def test_jobs_on_a_full_filesystem_fail_in_qemu_img_words(tmp_path, case):
    """Preallocating (create, resize, convert) or dd meets ENOSPC: qimg's first line is
    qemu-img's whole message (QEMU's chain of steps: "Could not resize image: Failed to
    resize underlying file: Could not write zeros for preallocation: No space left on
    device"), both exit 1, and a qcow2 image left behind has leaks at most (a qcow2 image
    whose creation failed is deleted, as QEMU deletes it). Where metadata the failed step
    allocated cannot be written back either, qimg adds the line QEMU's close prints for
    that cache."""
    require_root("mounts a small tmpfs to fill it")
    made, args = FULL_DISK_JOBS[case]
    source = tmp_path / "source.raw"
    source.write_bytes(random.Random(5).randbytes(400_000))
    args = [str(arg).replace("SOURCE", str(source)) for arg in args]
    outcomes = {}
    left = {}
    mounts = []
    try:
        for tool in ("qimg", "qemu-img"):
            full = tmp_path / tool
            full.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", full], check=True)
            mounts.append(full)
            if made is not None:
                options = ["-o", made[2]] if len(made) > 2 else []
                qemu_img("create", "-q", "-f", made[0], *options, full / "a", made[1])
            if tool == "qimg":
                outcomes[tool] = run_qimg_in(full, *args)
            else:
                outcomes[tool] = subprocess.run(
                    [QEMU_IMG, *args], capture_output=True, text=True, cwd=full
                )
            left[tool] = sorted(os.listdir(full))
            if left[tool] and ("qcow2" in args or (made is not None and made[0] == "qcow2")):
                check = qemu_img("check", full / "a", check=False)
                assert check.returncode in (0, 3), (tool, check.stdout)  # (3: leaks only)
        # a qcow2 image whose creation failed is deleted, with its data file; a raw file stays
        assert left["qimg"] == left["qemu-img"]
        ours, theirs = outcomes["qimg"], outcomes["qemu-img"]
        assert ours.returncode == theirs.returncode == 1
        assert "No space left on device" in theirs.stderr
        first, *more = ours.stderr.splitlines(keepends=True)
        assert first == theirs.stderr
        assert all(
            line.startswith("qemu-img: Failed to flush the ")
            and line.endswith(" cache: No space left on device\n")
            for line in more
        ), ours.stderr
    finally:
        for full in mounts:
            subprocess.run(["umount", full], check=False)
