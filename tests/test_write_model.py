"""Property tests: random write / write_zeroes / discard sequences against an in-memory model.

Every example creates a fresh image with the real qemu-img (optionally on top of a backing
file whose content qemu-io wrote), applies a hypothesis-drawn sequence of operations with
qcow2lib, and after every step reads back the touched range (plus a cluster of margin on each
side) and compares it with a byte model.  At the end the image is closed and the real QEMU
must agree: `qemu-img check` finds no corruption and no leaks, and `qemu-img compare` finds
the image identical to the model written out as a raw file.

The model is sparse (64 KiB chunks) so that images with 64 KiB clusters can be made a little
larger than one L2 table's span (512 MiB) and operations can straddle that boundary.
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2lib

from qemutools import assert_clean, qemu_compare, qemu_create, qemu_img, qemu_io

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB

EXAMPLES = int(os.environ.get("WRITE_MODEL_EXAMPLES", "20"))
MAX_OPS = int(os.environ.get("WRITE_MODEL_MAX_OPS", "10"))

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
    report_multiple_bugs=False,
)


# ----------------------------------------------------------------------------------------------
# sparse byte model
# ----------------------------------------------------------------------------------------------


class Model:
    """A virtual disk of `size` bytes; chunks not in the dict read as zeros."""

    def __init__(self, size: int):
        self.size = size
        self.chunks: dict[int, bytearray] = {}

    def copy(self) -> "Model":
        m = Model(self.size)
        m.chunks = {k: bytearray(v) for k, v in self.chunks.items()}
        return m

    def write(self, offset: int, data: bytes) -> None:
        assert 0 <= offset and offset + len(data) <= self.size
        pos = 0
        while pos < len(data):
            idx, within = divmod(offset + pos, CHUNK)
            n = min(CHUNK - within, len(data) - pos)
            chunk = self.chunks.get(idx)
            if chunk is None:
                if not any(data[pos : pos + n]):
                    pos += n
                    continue
                chunk = self.chunks[idx] = bytearray(CHUNK)
            chunk[within : within + n] = data[pos : pos + n]
            pos += n

    def zero(self, offset: int, length: int) -> None:
        assert 0 <= offset and offset + length <= self.size
        pos = offset
        end = offset + length
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            n = min(CHUNK - within, end - pos)
            if idx in self.chunks:
                if n == CHUNK:
                    del self.chunks[idx]
                else:
                    self.chunks[idx][within : within + n] = bytes(n)
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        assert 0 <= offset and offset + length <= self.size
        out = bytearray()
        pos = offset
        end = offset + length
        while pos < end:
            idx, within = divmod(pos, CHUNK)
            n = min(CHUNK - within, end - pos)
            chunk = self.chunks.get(idx)
            out += chunk[within : within + n] if chunk is not None else bytes(n)
            pos += n
        return bytes(out)

    def dump(self, path: Path) -> None:
        """Write the model as a sparse raw file."""
        with open(path, "wb") as f:
            f.truncate(self.size)
            for idx in sorted(self.chunks):
                chunk = self.chunks[idx]
                if any(chunk):
                    f.seek(idx * CHUNK)
                    f.write(chunk[: max(0, min(CHUNK, self.size - idx * CHUNK))])


# ----------------------------------------------------------------------------------------------
# configurations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cfg:
    id: str
    cluster_size: int
    compat: str = "1.1"
    refcount_bits: int = 16
    backing: str | None = None  # None, "qcow2" or "raw"
    extended_l2: bool = False
    data_file: bool = False
    data_file_raw: bool = False
    lazy_refcounts: bool = False

    @property
    def granule(self) -> int:
        """Smallest independently allocated unit (subcluster with extended L2)."""
        return self.cluster_size // 32 if self.extended_l2 else self.cluster_size

    @property
    def l2_span(self) -> int:
        entries = self.cluster_size // (16 if self.extended_l2 else 8)
        return entries * self.cluster_size

    @property
    def size(self) -> int:
        if self.l2_span <= 4 * MiB:
            return 4 * MiB + 1536  # several L2 tables, partial last cluster
        return self.l2_span + 1 * MiB + 1536  # just past the first L2 table

    @property
    def backing_size(self) -> int:
        # shorter than the overlay and not cluster aligned: reads past it must give zeros
        return (self.size - self.cluster_size - 1024) // 512 * 512

    @property
    def windows(self) -> list[tuple[int, int]]:
        """Ranges compared in a 'whole image' check (everything when the image is small)."""
        if self.size <= 8 * MiB:
            return [(0, self.size)]
        raw = [
            (0, 2 * MiB),
            (self.l2_span - 1 * MiB, self.l2_span + 1 * MiB),
            (self.size - 1 * MiB, self.size),
        ]
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted((max(0, lo), min(self.size, hi)) for lo, hi in raw):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        return merged

    @property
    def anchors(self) -> list[int]:
        a = [
            0,
            self.cluster_size,
            self.l2_span,
            self.size,
            self.size // 2,
            self.backing_size,
            2 * self.l2_span,
        ]
        return sorted({x for x in a if 0 <= x <= self.size})


CONFIGS = [
    Cfg("v2-64k", 65536, compat="0.10"),
    Cfg("v2-512-backing", 512, compat="0.10", backing="qcow2"),
    Cfg("v2-4k-rawbacking", 4096, compat="0.10", backing="raw"),
    Cfg("v3-512-rc1", 512, refcount_bits=1),
    Cfg("v3-512-rc16-backing", 512, backing="qcow2"),
    Cfg("v3-512-rc64-backing", 512, refcount_bits=64, backing="qcow2"),
    Cfg("v3-4k-rc16", 4096),
    Cfg("v3-4k-rc1-backing", 4096, refcount_bits=1, backing="qcow2"),
    Cfg("v3-4k-rc64", 4096, refcount_bits=64),
    Cfg("v3-4k-lazy-refcounts", 4096, lazy_refcounts=True),
    Cfg("v3-64k-rc16-backing", 65536, backing="qcow2"),
    Cfg("v3-64k-rc64", 65536, refcount_bits=64),
    Cfg("v3-64k-rc1-rawbacking", 65536, refcount_bits=1, backing="raw"),
    Cfg("v3-16k-extl2-backing", 16384, extended_l2=True, backing="qcow2"),
    Cfg("v3-64k-extl2", 65536, extended_l2=True),
    Cfg("v3-64k-extl2-backing", 65536, extended_l2=True, backing="qcow2"),
    Cfg("v3-4k-datafile", 4096, data_file=True),
    Cfg("v3-4k-datafile-backing", 4096, data_file=True, backing="qcow2"),
    Cfg("v3-64k-datafile-raw", 65536, data_file=True, data_file_raw=True),
    Cfg("v3-16k-extl2-datafile-raw", 16384, extended_l2=True, data_file=True, data_file_raw=True),
]


# ----------------------------------------------------------------------------------------------
# image setup
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("write_model")


_BACKING_CACHE: dict[str, tuple[Path, Model]] = {}


def backing_writes(cfg: Cfg) -> list[tuple[int, int, int]]:
    """(offset, length, pattern) written into the backing file with qemu-io, in order."""
    cs = cfg.cluster_size
    bsize = cfg.backing_size
    w = [
        (0, 3 * cs + 700, 0x11),
        (cfg.l2_span - cs - 300, 2 * cs + 600, 0x22),
        (bsize // 3 + 123, 5 * cs, 0x44),
        (bsize - 2 * cs - 100, 2 * cs + 100, 0x33),
        (cs // 2 + 7, cs + 1, 0x55),
    ]
    return [(o, min(n, bsize - o), p) for o, n, p in w if 0 <= o < bsize]


def get_backing(cfg: Cfg, workdir: Path) -> tuple[Path | None, Model]:
    """The backing file for cfg (made once, shared read-only) and the initial model."""
    if cfg.backing is None:
        return None, Model(cfg.size)
    if cfg.id not in _BACKING_CACHE:
        path = workdir / f"backing-{cfg.id}.{cfg.backing}"
        if cfg.backing == "raw":
            qemu_create(path, cfg.backing_size, fmt="raw")
        else:
            qemu_create(path, cfg.backing_size, options={"cluster_size": 65536})
        base = Model(cfg.size)
        cmds = []
        for off, n, pat in backing_writes(cfg):
            cmds.append(f"write -P {pat:#x} {off} {n}")
            base.write(off, bytes([pat]) * n)
        qemu_io(path, *cmds, fmt=cfg.backing)
        _BACKING_CACHE[cfg.id] = (path, base)
    path, base = _BACKING_CACHE[cfg.id]
    return path, base.copy()


def create_image(cfg: Cfg, directory: Path, backing: Path | None) -> tuple[Path, Path | None]:
    img = directory / "img.qcow2"
    options: dict = {"compat": cfg.compat, "cluster_size": cfg.cluster_size}
    if cfg.compat != "0.10":
        options["refcount_bits"] = cfg.refcount_bits
    if cfg.extended_l2:
        options["extended_l2"] = "on"
    if cfg.lazy_refcounts:
        options["lazy_refcounts"] = "on"
    data = None
    if cfg.data_file:
        data = directory / "img.data"  # absolute: QEMU resolves data files against the cwd
        options["data_file"] = str(data)
        if cfg.data_file_raw:
            options["data_file_raw"] = "on"
    qemu_create(
        img,
        cfg.size,
        options=options,
        backing=str(backing) if backing else None,
        backing_fmt=cfg.backing if backing else None,
    )
    return img, data


# ----------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------


def first_diff(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n
    if a[:n] == b[:n]:
        return n
    while hi - lo > 1:  # binary search on prefixes
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def check_range(img, model: Model, offset: int, length: int, what: str) -> None:
    pos = offset
    end = offset + length
    while pos < end:
        n = min(1 * MiB, end - pos)
        got = img.read(pos, n)
        want = model.read(pos, n)
        assert len(got) == n, f"{what}: read({pos}, {n}) returned {len(got)} bytes"
        if got != want:
            i = first_diff(got, want)
            raise AssertionError(
                f"{what}: mismatch at guest offset {pos + i} ({pos + i:#x}): "
                f"engine {got[i : i + 8].hex()} model {want[i : i + 8].hex()}"
            )
        pos += n


def check_all(img, model: Model, cfg: Cfg, what: str) -> None:
    for lo, hi in cfg.windows:
        check_range(img, model, lo, hi - lo, what)


def check_discard(cfg: Cfg, offset: int, got: bytes, old: bytes, base: bytes) -> None:
    """After discard every granule-piece of the range reads as its old content, zeros, or
    the backing content (qcow2 discard leaves 'undefined but one of these')."""
    g = cfg.granule
    pos = offset
    end = offset + len(got)
    while pos < end:
        nxt = min(end, (pos // g + 1) * g)
        s = slice(pos - offset, nxt - offset)
        piece = got[s]
        if piece not in (old[s], bytes(nxt - pos), base[s]):
            raise AssertionError(
                f"discard({offset}, {len(got)}): bytes {pos}..{nxt} read back as neither the "
                f"old data, zeros nor the backing data ({piece[:8].hex()}...)"
            )
        pos = nxt


def verify_with_qemu(
    cfg: Cfg, img_path: Path, data_path: Path | None, model: Model, directory: Path
) -> None:
    assert_clean(img_path)
    raw = directory / "model.raw"
    model.dump(raw)
    seen_by_qemu = img_path
    if cfg.data_file_raw:
        # Every cluster of such an image is allocated, so qemu-img compare reads all of it
        # (2.6 s for 513 MiB of holes); qemu-img convert asks the data file where its holes
        # are and skips them. QEMU still reads the image through its qcow2 driver.
        seen_by_qemu = directory / "qemu-view.raw"
        qemu_img("convert", "-f", "qcow2", "-O", "raw", img_path, seen_by_qemu)
    assert qemu_compare(seen_by_qemu, raw, "raw" if cfg.data_file_raw else "qcow2", "raw") == 0, (
        "qemu-img compare: image differs from the model"
    )
    if cfg.data_file_raw:
        assert qemu_compare(data_path, raw, "raw", "raw") == 0, (
            "data_file_raw: the external data file is not a faithful raw image"
        )


# ----------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------

KINDS = ["write", "write", "write", "write", "zero", "zero_unmap", "discard"]


def op_strategy(cfg: Cfg, kinds=KINDS):
    cs = cfg.cluster_size
    size = cfg.size
    tweaks = sorted({0, 1, -1, 512, -512, cfg.granule, -cfg.granule, cs // 2, 7})
    offset = st.one_of(
        st.integers(0, size - 1),
        st.builds(lambda a, d: a + d, st.sampled_from(cfg.anchors), st.integers(-2 * cs, 2 * cs)),
        st.builds(
            lambda a, k, d: a + k * cs + d,
            st.sampled_from(cfg.anchors),
            st.integers(-4, 4),
            st.sampled_from(tweaks),
        ),
    ).map(lambda o: min(max(o, 0), size - 1))
    length = st.one_of(
        st.integers(1, 2 * cs + 1),
        st.sampled_from(sorted({1, 512, cfg.granule, cs, 2 * cs, cs + 512, 3 * cs - 1})),
        st.integers(1, min(1 * MiB, 16 * cs)),
    )
    return st.tuples(st.sampled_from(kinds), offset, length, st.integers(0, 2**32 - 1)).map(
        lambda t: (t[0], t[1], min(t[2], size - t[1]), t[3])
    )


def apply_op(img, model: Model, base: Model, cfg: Cfg, op) -> None:
    kind, off, n, seed = op
    if kind == "write":
        data = random.Random(seed).randbytes(n)
        img.write(off, data)
        model.write(off, data)
    elif kind == "zero":
        img.write_zeroes(off, n)
        model.zero(off, n)
    elif kind == "zero_unmap":
        img.write_zeroes(off, n, may_unmap=True)
        model.zero(off, n)
    elif kind == "discard":
        old = model.read(off, n)
        img.discard(off, n)
        got = img.read(off, n)
        check_discard(cfg, off, got, old, base.read(off, n))
        model.write(off, got)
        if not any(got):
            model.zero(off, n)
    else:
        raise AssertionError(kind)
    lo = max(0, off - cfg.cluster_size)
    hi = min(cfg.size, off + n + cfg.cluster_size)
    check_range(img, model, lo, hi - lo, f"after {kind}({off}, {n})")


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id for c in CONFIGS])
@SETTINGS
@given(data=st.data())
def test_random_ops_match_model(cfg, workdir, data):
    backing, model = get_backing(cfg, workdir)
    base = model.copy()
    ops = data.draw(st.lists(op_strategy(cfg), min_size=1, max_size=MAX_OPS), label="ops")
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        d = Path(d)
        img_path, data_path = create_image(cfg, d, backing)
        img = qcow2lib.open(str(img_path), mode="r+")
        try:
            assert img.size == cfg.size
            check_all(img, model, cfg, "fresh image")
            for i, op in enumerate(ops):
                apply_op(img, model, base, cfg, op)
                if i % 4 == 3:
                    check_all(img, model, cfg, f"after step {i}")
            check_all(img, model, cfg, "after all steps")
        finally:
            img.close()
        verify_with_qemu(cfg, img_path, data_path, model, d)


REOPEN_CONFIGS = [
    Cfg("v3-4k-backing", 4096, backing="qcow2"),
    Cfg("v2-512-rc16", 512, compat="0.10"),
    Cfg("v3-512-rc64", 512, refcount_bits=64),
    Cfg("v3-4k-lazy-refcounts", 4096, lazy_refcounts=True, backing="qcow2"),
    Cfg("v3-16k-extl2-backing", 16384, extended_l2=True, backing="qcow2"),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("cfg", REOPEN_CONFIGS, ids=[c.id for c in REOPEN_CONFIGS])
@SETTINGS
@given(data=st.data())
def test_reopen_between_steps(cfg, workdir, data):
    """close + open r+ between steps: state kept only in memory would be lost."""
    backing, model = get_backing(cfg, workdir)
    base = model.copy()
    ops = data.draw(
        st.lists(op_strategy(cfg, KINDS + ["reopen", "reopen"]), min_size=2, max_size=MAX_OPS + 2),
        label="ops",
    )
    with tempfile.TemporaryDirectory(dir=workdir) as d:
        d = Path(d)
        img_path, data_path = create_image(cfg, d, backing)
        img = qcow2lib.open(str(img_path), mode="r+")
        try:
            for op in ops:
                if op[0] == "reopen":
                    img.close()
                    img = qcow2lib.open(str(img_path), mode="r+")
                    check_all(img, model, cfg, "after reopen")
                else:
                    apply_op(img, model, base, cfg, op)
        finally:
            img.close()
        # a read-only open after the final close sees the same thing
        img = qcow2lib.open(str(img_path), mode="r")
        try:
            assert img.read_only
            check_all(img, model, cfg, "read-only reopen at the end")
        finally:
            img.close()
        verify_with_qemu(cfg, img_path, data_path, model, d)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("cluster_size", [4096, 65536])
def test_concurrent_readers_and_writer(tmp_path, cluster_size):
    """Several threads read allocated clusters while another thread allocates and writes
    other clusters (L2 / refcount updates happen under the readers' feet)."""
    size = 16 * MiB
    cs = cluster_size
    path = tmp_path / "img.qcow2"
    qemu_create(path, size, options={"cluster_size": cs})
    rng = random.Random(1234)
    model = Model(size)
    stable = rng.randbytes(2 * MiB)  # first 2 MiB: written before the threads start
    img = qcow2lib.open(str(path), mode="r+")
    errors: list[str] = []
    try:
        img.write(0, stable)
        model.write(0, stable)
        stop = threading.Event()

        def reader(seed: int) -> None:
            r = random.Random(seed)
            try:
                while not stop.is_set():
                    off = r.randrange(0, 2 * MiB - 1)
                    n = r.randint(1, min(3 * cs, 2 * MiB - off))
                    got = img.read(off, n)
                    if got != stable[off : off + n]:
                        i = first_diff(got, stable[off : off + n])
                        errors.append(f"reader {seed}: wrong data at {off + i} (read {off}+{n})")
                        return
            except Exception as e:  # noqa: BLE001
                errors.append(f"reader {seed}: {type(e).__name__}: {e}")

        writes: list[tuple[int, bytes]] = []
        offsets = list(range(4 * MiB, size - 2 * cs, cs))
        rng.shuffle(offsets)
        for off in offsets[:300]:
            off += rng.choice([0, 0, 512, cs // 2])
            n = rng.choice([cs, 2 * cs, 512, cs + 512])
            n = min(n, size - off)
            writes.append((off, rng.randbytes(n)))

        def writer() -> None:
            try:
                for off, data in writes:
                    img.write(off, data)
            except Exception as e:  # noqa: BLE001
                errors.append(f"writer: {type(e).__name__}: {e}")

        readers = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        w = threading.Thread(target=writer)
        for t in readers:
            t.start()
        w.start()
        w.join(timeout=150)
        stop.set()
        for t in readers:
            t.join(timeout=20)
        assert not w.is_alive(), "writer thread hung"
        assert not any(t.is_alive() for t in readers), "reader thread hung"
        assert not errors, errors
        for off, data in writes:
            model.write(off, data)
        check_range(img, model, 0, size, "after the concurrent phase")
    finally:
        img.close()
    assert_clean(path)
    raw = tmp_path / "model.raw"
    model.dump(raw)
    assert qemu_compare(path, raw, "qcow2", "raw") == 0
