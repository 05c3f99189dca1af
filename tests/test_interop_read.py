"""Read interoperability: images written by real QEMU 7.2, read by qcow2lib.

Every image here is made by qemu-img / qemu-io (never by qcow2lib).  For each one:

* ``qemu-img convert -O raw`` is the oracle for the guest-visible bytes; qcow2lib must
  return exactly those bytes for a whole-image read, for a read in odd-sized chunks that
  cross cluster boundaries, via ``readinto`` and via ``as_file()``.
* ``qemu-img map --output=json`` is the oracle for ``extents()``.  Both lists are
  normalised into per-byte (data, zero, depth) classifications, so run boundaries may
  differ legitimately.  Two differences are tolerated, both coming from QEMU probing the
  *host* file with SEEK_DATA/SEEK_HOLE, which is a property of the host file system and
  not of the qcow2 metadata:

    - where both say data, the zero flag may differ (QEMU reports data+zero for
      allocated clusters whose host range is a hole, e.g. preallocation=metadata); but
      wherever qcow2lib claims zero=True the bytes must really be zero;
    - in a raw layer, a host hole is reported by QEMU as (data=False, zero=True); qcow2lib
      may call it data instead (the depth must still agree).

  Where both give a host offset for data, the offsets must agree too, and qemu's "present"
  must match Extent.present.
"""

from __future__ import annotations

import io
import os
import random
import struct
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

try:
    from qemutools import QEMU_IO, qemu_create, qemu_img, qemu_io, qemu_map, to_raw
except ImportError:  # tests/ imported as a package
    from tests.qemutools import QEMU_IO, qemu_create, qemu_img, qemu_io, qemu_map, to_raw

try:
    import qcow2lib
except ImportError:  # pragma: no cover - conftest normally puts the source tree on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import qcow2lib

KiB = 1024
MiB = 1024 * KiB


# --------------------------------------------------------------------------------------
# local helpers (kept here so tests/qemutools.py stays untouched)
# --------------------------------------------------------------------------------------


def rand_file(path: Path, size: int, seed: int) -> Path:
    """Deterministic random bytes, used with `qemu-io write -s` so shifts inside a
    cluster are detectable (a single-byte -P pattern hides them)."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def compressible_bytes(size: int, seed: int) -> bytes:
    """Text-like data: compresses well but is not a constant pattern."""
    rng = random.Random(seed)
    words = [
        b"qcow2",
        b"cluster",
        b"refcount",
        b"l2-entry",
        b"zstd",
        b"zlib",
        b"backing",
        b"snapshot",
        b"0123456789",
        b"\x00\x00\x00\x00",
    ]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" %d\n" % rng.randrange(1000)
    return bytes(out[:size])


def qemu_io_then_crash(image, *commands: str) -> None:
    """Run qemu-io commands, then SIGKILL qemu-io itself (leaves the image dirty)."""
    args = [QEMU_IO]
    for command in commands:
        args += ["-c", command]
    args += ["-c", "sigraise 9", str(image)]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == -9 or result.returncode == 137, (
        result.returncode,
        result.stdout,
        result.stderr,
    )


def header_incompatible_features(image) -> int:
    with open(image, "rb") as f:
        head = f.read(80)
    return struct.unpack(">Q", head[72:80])[0] if struct.unpack(">I", head[4:8])[0] >= 3 else 0


def workload(
    c: int,
    size: int,
    rnd: Path,
    rnd2: Path,
    *,
    extended: bool = False,
    compressed_writes: bool = False,
) -> list[str]:
    """qemu-io commands exercising unaligned, subcluster-sized, zero and discard writes.

    Everything is placed relative to the cluster size `c`; needs size >= 24 * c.
    """
    assert size >= 24 * c
    cmds = [
        f"write -s {rnd} {c // 2 + 3} {2 * c + 100}",  # unaligned, crosses 2 boundaries
        f"write -P 0x41 {3 * c + 17} 33",  # tiny write in a fresh cluster
        f"write -z {3 * c + 20} 10",  # tiny zero inside it
        f"write -P 0x42 {5 * c} {c}",  # aligned whole cluster
        f"write -z {5 * c + c // 4} {c // 2}",  # partial zero over data
        f"write -z {8 * c} {2 * c}",  # aligned zero, unallocated
        f"write -s {rnd2} {10 * c} {4 * c}",  # 4 clusters of data ...
        f"discard {11 * c} {c}",  # ... aligned discard inside
        f"discard {13 * c + 100} {c}",  # ... unaligned discard
        f"write -P 0x45 {16 * c} {2 * c}",
        f"write -z -u {16 * c} {c}",  # zero with unmap over data
        f"write -P 0x46 {19 * c + c // 3} {max(c // 16, 1)}",  # small, inside a cluster
        f"write -s {rnd} {size - 3 * c // 2 - 7} {c + 7}",  # near the end, unaligned
        f"write -P 0x44 {size - 100} 100",  # the very last bytes
    ]
    if extended:
        sub = c // 32
        base = 20 * c
        cmds += [
            f"write -P 0x47 {base + 3 * sub} {sub}",  # exactly one subcluster
            f"write -s {rnd} {base + 6 * sub - 5} {2 * sub + 11}",  # unaligned subclusters
            f"write -z {base + 7 * sub} {sub}",  # zero one subcluster of data
            f"write -z {base + 20 * sub} {3 * sub}",  # zero subclusters, unallocated
            f"write -P 0x48 {base + 31 * sub} {sub}",  # the last subcluster
        ]
    l2_entries = c // (16 if extended else 8)
    l2_cover = l2_entries * c
    if l2_cover + 4 * KiB < size - 2 * c:  # write across an L2 table boundary
        cmds.append(f"write -s {rnd} {l2_cover - 1000} 3000")
    # qemu-io `write -c`: fresh clusters only
    if compressed_writes:
        cmds.append(f"write -c -s {rnd} {21 * c} {c}")
        cmds.append(f"write -c -P 0x49 {22 * c} {c}")
    return cmds


def make_rnd(d: Path, c: int) -> tuple[Path, Path]:
    n = max(4 * c + 64, 64 * KiB)
    return rand_file(d / "rnd1.bin", n, 1), rand_file(d / "rnd2.bin", n, 2)


def default_size(c: int) -> int:
    return max(4 * MiB, 24 * c)


# --------------------------------------------------------------------------------------
# case table
# --------------------------------------------------------------------------------------


@dataclass
class Built:
    path: Path  # the image qcow2lib opens (top of a chain)
    raw_depths: set = field(default_factory=set)  # chain depths that are raw layers
    chain_len: int = 1  # number of layers (top + backings)


@dataclass
class Case:
    id: str
    build: Callable[[Path], Built]


CASES: list[Case] = []


def case(id_: str):
    def deco(fn):
        CASES.append(Case(id_, fn))
        return fn

    return deco


def add_plain(
    id_: str,
    *,
    cluster: int,
    compat: str = "1.1",
    refcount_bits: int = 16,
    extended: bool = False,
    lazy: bool = False,
    prealloc: str = "off",
    size: int | None = None,
    compression_type: str | None = None,
    compressed_writes: bool = False,
):
    def build(d: Path) -> Built:
        img = d / "img.qcow2"
        sz = size or default_size(cluster)
        opts = {"compat": compat, "cluster_size": cluster}
        if compat != "0.10":
            opts["refcount_bits"] = refcount_bits
            if extended:
                opts["extended_l2"] = "on"
            if lazy:
                opts["lazy_refcounts"] = "on"
            if compression_type:
                opts["compression_type"] = compression_type
        if prealloc != "off":
            opts["preallocation"] = prealloc
        qemu_create(img, sz, options=opts)
        r1, r2 = make_rnd(d, cluster)
        qemu_io(
            img,
            *workload(cluster, sz, r1, r2, extended=extended, compressed_writes=compressed_writes),
        )
        return Built(img)

    CASES.append(Case(id_, build))


# -- compat x cluster size x refcount width ------------------------------------------
for _cl, _cname in ((512, "512"), (4 * KiB, "4k"), (64 * KiB, "64k"), (2 * MiB, "2M")):
    add_plain(f"v2-{_cname}", cluster=_cl, compat="0.10")
    for _rb in (1, 16, 64):
        add_plain(f"v3-{_cname}-rc{_rb}", cluster=_cl, refcount_bits=_rb)

# -- virtual size not a multiple of the cluster size (last cluster partly beyond the end) --
add_plain("v3-64k-size-unaligned", cluster=64 * KiB, size=4 * MiB + 5 * 512)
add_plain("v2-4k-size-unaligned", cluster=4 * KiB, compat="0.10", size=4 * MiB + 512)
add_plain("v3-2M-extl2-size-unaligned", cluster=2 * MiB, extended=True, size=48 * MiB + 1536)

# -- extended L2 (qemu needs cluster_size >= 16k for it) ----------------------------------
add_plain("v3-16k-extl2", cluster=16 * KiB, extended=True)
add_plain("v3-64k-extl2", cluster=64 * KiB, extended=True)
add_plain("v3-64k-extl2-rc1", cluster=64 * KiB, extended=True, refcount_bits=1)
add_plain("v3-2M-extl2", cluster=2 * MiB, extended=True)
add_plain(
    "v3-64k-extl2-compressed-writes-zstd",
    cluster=64 * KiB,
    extended=True,
    compression_type="zstd",
    compressed_writes=True,
)

# -- lazy refcounts ----------------------------------------------------------------------
add_plain("v3-64k-lazy-clean", cluster=64 * KiB, lazy=True)


@case("v3-4k-lazy-dirty")
def _lazy_dirty(d: Path) -> Built:
    """lazy_refcounts image whose writer was killed: dirty bit set, refcounts stale."""
    img = d / "img.qcow2"
    c, sz = 4 * KiB, 4 * MiB
    qemu_create(img, sz, options={"cluster_size": c, "lazy_refcounts": "on"})
    r1, r2 = make_rnd(d, c)
    qemu_io_then_crash(img, *workload(c, sz, r1, r2), "flush")
    assert header_incompatible_features(img) & 1, "expected the dirty bit to stay set"
    return Built(img)


# -- preallocation --------------------------------------------------------------------------
for _p in ("metadata", "falloc", "full"):
    add_plain(f"v3-64k-prealloc-{_p}", cluster=64 * KiB, prealloc=_p)
    add_plain(f"v3-4k-prealloc-{_p}", cluster=4 * KiB, prealloc=_p)
add_plain("v2-64k-prealloc-metadata", cluster=64 * KiB, compat="0.10", prealloc="metadata")
add_plain("v3-64k-extl2-prealloc-metadata", cluster=64 * KiB, extended=True, prealloc="metadata")
add_plain("v3-64k-extl2-prealloc-falloc", cluster=64 * KiB, extended=True, prealloc="falloc")
add_plain("v3-512-rc64-prealloc-metadata", cluster=512, refcount_bits=64, prealloc="metadata")


# -- internal snapshots (shared clusters, refcount > 1, L2 entries without COPIED) -----------
def add_snapshots(id_: str, *, cluster: int, apply: bool = False, extended: bool = False):
    def build(d: Path) -> Built:
        img = d / "img.qcow2"
        sz = default_size(cluster)
        opts = {"cluster_size": cluster}
        if extended:
            opts["extended_l2"] = "on"
        qemu_create(img, sz, options=opts)
        r1, r2 = make_rnd(d, cluster)
        qemu_io(img, *workload(cluster, sz, r1, r2, extended=extended))
        qemu_img("snapshot", "-c", "snap1", img)
        qemu_io(
            img,
            f"write -P 0x91 {cluster // 2} {cluster}",  # COW of shared clusters
            f"write -z {5 * cluster} {cluster}",
            f"discard {10 * cluster} {cluster}",
            f"write -s {r2} {12 * cluster + 5} {cluster // 3}",
        )
        qemu_img("snapshot", "-c", "snap2", img)
        qemu_io(img, f"write -P 0x92 {cluster + 1} 100", f"write -z {17 * cluster} {cluster}")
        if apply:
            qemu_img("snapshot", "-a", "snap1", img)
        return Built(img)

    CASES.append(Case(id_, build))


add_snapshots("v3-64k-snapshots", cluster=64 * KiB)
add_snapshots("v3-4k-snapshots-applied-snap1", cluster=4 * KiB, apply=True)
add_snapshots("v3-64k-extl2-snapshots", cluster=64 * KiB, extended=True)


# -- external data file ------------------------------------------------------------------
def add_data_file(
    id_: str, *, raw: bool, cluster: int = 64 * KiB, prealloc: str = "off", extended: bool = False
):
    def build(d: Path) -> Built:
        img, data = d / "img.qcow2", d / "img.data"
        sz = default_size(cluster)
        # absolute path: qemu resolves a relative data_file against its cwd, not the image
        opts = {
            "cluster_size": cluster,
            "data_file": str(data),
            "data_file_raw": "on" if raw else "off",
        }
        if extended:
            opts["extended_l2"] = "on"
        if prealloc != "off":
            opts["preallocation"] = prealloc
        qemu_create(img, sz, options=opts)
        r1, r2 = make_rnd(d, cluster)
        qemu_io(img, *workload(cluster, sz, r1, r2, extended=extended))
        return Built(img)

    CASES.append(Case(id_, build))


add_data_file("datafile-64k", raw=False)
add_data_file("datafile-raw-64k", raw=True)
add_data_file("datafile-raw-4k-prealloc-metadata", raw=True, cluster=4 * KiB, prealloc="metadata")
add_data_file("datafile-64k-extl2", raw=False, extended=True)
add_data_file("datafile-raw-64k-prealloc-falloc", raw=True, prealloc="falloc")


# -- compressed images made by `qemu-img convert -c` ----------------------------------------
def compressed_source(d: Path, size: int, c: int) -> Path:
    """A raw source mixing compressible text, incompressible random data (qemu stores
    those clusters uncompressed), zero runs and holes."""
    src = d / "src.raw"
    buf = bytearray(size)
    rng = random.Random(7)
    pos = 0
    kinds = ["text", "random", "zero", "text", "pattern", "hole"]
    i = 0
    while pos < size:
        n = min(size - pos, rng.choice([c // 3 + 1, c, 2 * c + 77, 5 * c // 2, 3 * KiB + 5]))
        kind = kinds[i % len(kinds)]
        i += 1
        if kind == "text":
            buf[pos : pos + n] = compressible_bytes(n, pos)
        elif kind == "random":
            buf[pos : pos + n] = rng.randbytes(n)
        elif kind == "pattern":
            buf[pos : pos + n] = bytes([0x5A]) * n
        pos += n
    src.write_bytes(bytes(buf))
    # punch real holes into the "hole"/"zero" areas is not needed: qemu-img convert
    # detects zero runs itself.
    return src


def add_compressed(
    id_: str,
    *,
    cluster: int,
    ctype: str,
    compat: str = "1.1",
    size: int | None = None,
    extended: bool = False,
):
    def build(d: Path) -> Built:
        sz = size or max(4 * MiB, 8 * cluster)
        src = compressed_source(d, sz, cluster)
        img = d / "img.qcow2"
        opts = {"cluster_size": cluster, "compat": compat}
        if compat != "0.10":
            opts["compression_type"] = ctype
        if extended:
            opts["extended_l2"] = "on"
        qemu_img(
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            ",".join(f"{k}={v}" for k, v in opts.items()),
            src,
            img,
        )
        return Built(img)

    CASES.append(Case(id_, build))


add_compressed("convert-c-zlib-512", cluster=512, ctype="zlib", size=1 * MiB)
add_compressed("convert-c-zlib-4k", cluster=4 * KiB, ctype="zlib")
add_compressed("convert-c-zlib-64k", cluster=64 * KiB, ctype="zlib")
add_compressed("convert-c-zlib-64k-v2", cluster=64 * KiB, ctype="zlib", compat="0.10")
add_compressed("convert-c-zstd-512", cluster=512, ctype="zstd", size=1 * MiB)
add_compressed("convert-c-zstd-4k", cluster=4 * KiB, ctype="zstd")
add_compressed("convert-c-zstd-64k", cluster=64 * KiB, ctype="zstd")
add_compressed("convert-c-zstd-64k-extl2", cluster=64 * KiB, ctype="zstd", extended=True)
add_compressed("convert-c-zstd-2M", cluster=2 * MiB, ctype="zstd", size=16 * MiB)
add_compressed("convert-c-zlib-2M", cluster=2 * MiB, ctype="zlib", size=16 * MiB)


@case("compressed-then-overwritten-zlib-64k")
def _compressed_rewritten(d: Path) -> Built:
    """convert -c, then qemu-io partial writes / zeroes / discards over compressed clusters."""
    c = 64 * KiB
    sz = 4 * MiB
    src = compressed_source(d, sz, c)
    img = d / "img.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={c}", src, img)
    r1, r2 = make_rnd(d, c)
    qemu_io(
        img,
        f"write -s {r1} {c + 100} 1000",  # partial overwrite of a compressed cluster
        f"write -z {3 * c + 7} 3000",  # partial zero of a compressed cluster
        f"write -z {5 * c} {c}",  # whole-cluster zero
        f"discard {7 * c} {2 * c}",  # discard compressed clusters
        f"write -s {r2} {10 * c - 5} {c + 10}",
    )
    return Built(img)


# -- backing chains -------------------------------------------------------------------------
def fill_raw(path: Path, size: int, seed: int, sparse_gaps: bool = False) -> None:
    """A raw base, fully written (no host holes) unless sparse_gaps is set."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        pos = 0
        while pos < size:
            n = min(size - pos, 192 * KiB + 4 * KiB)
            if sparse_gaps and (pos // n) % 3 == 1:
                f.seek(n, io.SEEK_CUR)  # leave a hole
            else:
                f.write(rng.randbytes(n))
            pos += n
        f.truncate(size)


@case("chain3-rawbase-relative-smaller-backing")
def _chain3(d: Path) -> Built:
    """top.qcow2 (6M) -> layers/mid.qcow2 (5M) -> layers/base.raw (3M), relative names."""
    layers = d / "layers"
    layers.mkdir()
    base, mid, top = layers / "base.raw", layers / "mid.qcow2", d / "top.qcow2"
    fill_raw(base, 3 * MiB, 11)
    c = 64 * KiB
    qemu_create(mid, 5 * MiB, options={"cluster_size": c}, backing="base.raw", backing_fmt="raw")
    r1, r2 = make_rnd(d, c)
    qemu_io(
        mid,
        f"write -s {r1} {c + 1000} 300",  # partial: COW merges base data
        f"write -z {4 * c} {2 * c}",  # zero clusters hide base data
        f"discard {8 * c} {c}",  # discard with backing -> zero
        f"write -z {10 * c + 512} 1024",  # partial zero over base data
        f"write -P 0x22 {3 * MiB - 1000} 3000",  # straddles the end of base
        f"write -s {r2} {4 * MiB + 77} {c}",
    )  # past the end of base
    qemu_create(
        top, 6 * MiB, options={"cluster_size": c}, backing="layers/mid.qcow2", backing_fmt="qcow2"
    )
    qemu_io(
        top,
        f"write -P 0x33 {c + 1100} 10",  # over mid's data
        f"write -s {r1} {4 * c + 3} {c}",  # over mid's zero clusters
        f"write -z {12 * c} {c}",  # hides base
        f"discard {16 * c} {c}",
        f"write -P 0x34 {5 * MiB + 5} 100",
    )  # past the end of mid
    return Built(top, raw_depths={2}, chain_len=3)


@case("chain3-sparse-rawbase")
def _chain3_sparse(d: Path) -> Built:
    """Same shape, but the raw base has host holes (QEMU reports them zero, not data)."""
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
    fill_raw(base, 4 * MiB, 12, sparse_gaps=True)
    c = 64 * KiB
    qemu_create(mid, 4 * MiB, options={"cluster_size": c}, backing="base.raw", backing_fmt="raw")
    r1, r2 = make_rnd(d, c)
    qemu_io(mid, f"write -s {r1} {200 * KiB} {100 * KiB}", f"write -z {1 * MiB} {c}")
    qemu_create(top, 4 * MiB, options={"cluster_size": c}, backing="mid.qcow2", backing_fmt="qcow2")
    qemu_io(top, f"write -s {r2} {500 * KiB + 3} {3 * c}", f"discard {2 * MiB} {c}")
    return Built(top, raw_depths={2}, chain_len=3)


@case("chain3-v2mid-4k-extl2top-64k")
def _chain_mixed(d: Path) -> Built:
    """top: v3 extended_l2 64k -> mid: v2 4k clusters -> base raw 4M."""
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
    fill_raw(base, 4 * MiB, 13)
    qemu_create(
        mid,
        4 * MiB,
        options={"cluster_size": 4096, "compat": "0.10"},
        backing="base.raw",
        backing_fmt="raw",
    )
    r1, r2 = make_rnd(d, 64 * KiB)
    qemu_io(
        mid,
        f"write -s {r1} 5000 20000",
        f"write -z {300 * KiB} 8k",
        f"discard {400 * KiB} 16k",
        f"write -P 0x21 {1 * MiB - 100} 200",
    )
    c, sub = 64 * KiB, 2 * KiB
    qemu_create(
        top,
        4 * MiB,
        options={"cluster_size": c, "extended_l2": "on"},
        backing="mid.qcow2",
        backing_fmt="qcow2",
    )
    qemu_io(
        top,
        f"write -P 0x31 {sub} {sub}",  # one subcluster over mid data
        f"write -s {r2} {5 * sub + 9} {sub}",  # unaligned, two subclusters
        f"write -z {4 * c + 3 * sub} {2 * sub}",  # zero subclusters over base
        f"write -P 0x32 {6 * c + 31 * sub} {sub + 100}",  # crosses a cluster boundary
        f"discard {8 * c} {c}",
        f"write -z {20 * c} {c}",
    )
    return Built(top, raw_depths={2}, chain_len=3)


@case("chain3-overlay-smaller-than-backing")
def _chain_small_overlay(d: Path) -> Built:
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
    fill_raw(base, 8 * MiB, 14)
    qemu_create(
        mid, 8 * MiB, options={"cluster_size": 16 * KiB}, backing="base.raw", backing_fmt="raw"
    )
    qemu_io(mid, "write -P 0x51 1000 100000", f"write -z {3 * MiB} 1M")
    qemu_create(
        top, 2 * MiB + 512, options={"cluster_size": 4096}, backing="mid.qcow2", backing_fmt="qcow2"
    )
    qemu_io(top, "write -P 0x52 50000 5000", f"write -P 0x53 {2 * MiB - 10} 522")
    return Built(top, raw_depths={2}, chain_len=3)


@case("chain3-compressed-top-zstd")
def _chain_compressed(d: Path) -> Built:
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
    fill_raw(base, 4 * MiB, 15)
    c = 64 * KiB
    qemu_create(
        mid,
        4 * MiB,
        options={"cluster_size": c, "compression_type": "zlib"},
        backing="base.raw",
        backing_fmt="raw",
    )
    r1, r2 = make_rnd(d, c)
    qemu_io(
        mid,
        f"write -c -s {r1} {2 * c} {c}",
        f"write -c -P 0x61 {3 * c} {2 * c}",
        f"write -z {6 * c} {c}",
    )
    qemu_create(
        top,
        4 * MiB,
        options={"cluster_size": c, "compression_type": "zstd"},
        backing="mid.qcow2",
        backing_fmt="qcow2",
    )
    qemu_io(
        top,
        f"write -c -s {r2} {8 * c} {c}",
        f"write -c -P 0x62 {10 * c} {c}",
        f"write -P 0x63 {3 * c + 5} 1000",
    )  # partial write over mid's compressed
    return Built(top, raw_depths={2}, chain_len=3)


@case("chain3-datafile-top")
def _chain_datafile(d: Path) -> Built:
    base, mid, top = d / "base.raw", d / "mid.qcow2", d / "top.qcow2"
    fill_raw(base, 4 * MiB, 16)
    c = 64 * KiB
    qemu_create(mid, 4 * MiB, options={"cluster_size": c}, backing="base.raw", backing_fmt="raw")
    r1, r2 = make_rnd(d, c)
    qemu_io(mid, f"write -s {r1} {c // 2} {c}", f"write -z {5 * c} {c}")
    qemu_create(
        top,
        4 * MiB,
        options={"cluster_size": c, "data_file": str(d / "top.data")},
        backing="mid.qcow2",
        backing_fmt="qcow2",
    )
    qemu_io(top, f"write -s {r2} 1000 2000", f"write -z {9 * c} {c}", f"write -P 0x71 {20 * c} 7")
    return Built(top, raw_depths={2}, chain_len=3)


@case("chain2-qcow2-on-qcow2-2M-clusters")
def _chain_2m(d: Path) -> Built:
    mid, top = d / "mid.qcow2", d / "top.qcow2"
    c = 2 * MiB
    qemu_create(mid, 16 * MiB, options={"cluster_size": c})
    r1, r2 = make_rnd(d, 64 * KiB)
    qemu_io(mid, f"write -s {r1} {c - 1000} 50000", f"write -P 0x11 {5 * c} {c}")
    qemu_create(
        top, 16 * MiB, options={"cluster_size": 64 * KiB}, backing="mid.qcow2", backing_fmt="qcow2"
    )
    qemu_io(top, f"write -P 0x12 {c - 64 * KiB} {128 * KiB}", f"write -z {5 * c + 64 * KiB} 64k")
    return Built(top, chain_len=2)


# --------------------------------------------------------------------------------------
# building (once per case) and comparison helpers
# --------------------------------------------------------------------------------------


@dataclass
class Oracle:
    built: Built
    raw_path: Path
    size: int
    qmap: list[dict]

    def raw(self) -> bytes:
        return self.raw_path.read_bytes()


_BUILT: dict[str, Oracle] = {}
_BUILT_DIRS: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _drop_built_images():
    """The built images (~700 MB) live for this module's tests only, not for the whole run."""
    yield
    _BUILT.clear()
    while _BUILT_DIRS:
        shutil.rmtree(_BUILT_DIRS.pop(), ignore_errors=True)


@pytest.fixture
def oracle(request, tmp_path_factory) -> Oracle:
    c: Case = request.param
    if c.id not in _BUILT:
        d = tmp_path_factory.mktemp(c.id.replace("/", "_"))
        _BUILT_DIRS.append(d)
        built = c.build(d)
        raw_path = d / "oracle.raw"
        to_raw(built.path, raw_path)
        _BUILT[c.id] = Oracle(built, raw_path, raw_path.stat().st_size, qemu_map(built.path))
    return _BUILT[c.id]


def by_case(fn):
    return pytest.mark.parametrize("oracle", CASES, ids=[c.id for c in CASES], indirect=True)(fn)


def assert_same_bytes(got: bytes, want: bytes, what: str, base: int = 0) -> None:
    if len(got) == len(want) and got == want:
        return
    n = min(len(got), len(want))
    first = next((i for i in range(0, n, 4096) if got[i : i + 4096] != want[i : i + 4096]), None)
    if first is not None:
        first = next(i for i in range(first, min(first + 4096, n)) if got[i] != want[i])
    raise AssertionError(
        f"{what}: len {len(got)} vs expected {len(want)}; first differing byte at guest "
        f"offset {None if first is None else base + first} "
        f"(got {got[first : first + 8].hex() if first is not None else '-'}, "
        f"want {want[first : first + 8].hex() if first is not None else '-'})"
    )


def chunk_sizes(cluster: int):
    """Odd sizes that straddle cluster boundaries in different phases."""
    sizes = [
        cluster // 2 + 1,
        2 * cluster + 3,
        7,
        3 * cluster - 5,
        12345,
        cluster,
        1,
        cluster + 511,
    ]
    while True:
        yield from sizes


def cluster_size_of(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(24)
    return 1 << struct.unpack(">I", head[20:24])[0]


def open_image(o: Oracle):
    return qcow2lib.open(str(o.built.path), mode="r")


# --------------------------------------------------------------------------------------
# extents comparison
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    start: int
    end: int
    data: bool
    zero: bool
    depth: int
    offset: int | None
    present: bool | None = None  # None: not reported (older engine)


def qemu_runs(qmap: list[dict]) -> list[Run]:
    return [
        Run(
            e["start"],
            e["start"] + e["length"],
            bool(e["data"]),
            bool(e["zero"]),
            int(e["depth"]),
            e.get("offset"),
            bool(e["present"]),
        )
        for e in qmap
    ]


def engine_runs(extents, size: int, start: int = 0) -> list[Run]:
    runs = []
    pos = start
    for e in extents:
        assert e.length > 0, f"empty extent {e}"
        assert e.offset == pos, f"extents not contiguous: expected offset {pos}, got {e}"
        runs.append(
            Run(
                e.offset,
                e.offset + e.length,
                bool(e.is_data),
                bool(e.is_zero),
                int(e.depth),
                e.host_offset,
                getattr(e, "present", None),
            )
        )
        pos += e.length
    assert pos == size, f"extents end at {pos}, image/window ends at {size}"
    return runs


def compare_runs(
    q: list[Run],
    e: list[Run],
    raw: bytes,
    raw_depths: set,
    lo: int,
    hi: int,
    check_host_offsets: bool = True,
) -> list[str]:
    """Per-byte comparison on [lo, hi).  Returns a list of human-readable mismatches."""
    problems: list[str] = []
    qi = next(i for i, r in enumerate(q) if r.end > lo)
    ei = 0
    pos = lo
    while pos < hi and len(problems) < 12:
        a, b = q[qi], e[ei]
        end = min(a.end, b.end, hi)
        where = f"[{pos:#x}, {end:#x})"
        desc = (
            f"qemu(data={a.data}, zero={a.zero}, depth={a.depth}, present={a.present}, "
            f"off={a.offset}) vs qcow2lib(data={b.data}, zero={b.zero}, depth={b.depth}, "
            f"present={b.present}, off={b.offset})"
        )
        if a.depth != b.depth:
            problems.append(f"{where}: depth differs: {desc}")
        elif a.data != b.data:
            raw_hole = a.depth in raw_depths and not a.data and a.zero and b.data
            if not raw_hole:
                problems.append(f"{where}: data flag differs: {desc}")
        elif not a.data and a.zero != b.zero:
            problems.append(f"{where}: zero flag differs: {desc}")
        if b.present is not None and a.present != b.present:
            problems.append(f"{where}: present flag differs: {desc}")
        if b.zero and any(raw[pos:end]):
            problems.append(f"{where}: qcow2lib says zero but the bytes are not: {desc}")
        if (
            check_host_offsets
            and a.data
            and b.data
            and a.offset is not None
            and b.offset is not None
            and a.depth == b.depth
        ):
            if a.offset + (pos - a.start) != b.offset + (pos - b.start):
                problems.append(f"{where}: host offset differs: {desc}")
        pos = end
        if a.end == end:
            qi += 1
        if b.end == end:
            ei += 1
    return problems


# --------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------


@by_case
def test_read_whole_image(oracle: Oracle):
    with open_image(oracle) as img:
        assert img.size == oracle.size
        assert img.format == "qcow2"
        assert img.read_only
        got = img.read(0, img.size)
    assert_same_bytes(got, oracle.raw(), "whole-image read")


@by_case
def test_read_odd_chunks(oracle: Oracle):
    want = oracle.raw()
    cluster = cluster_size_of(oracle.built.path)
    sizes = chunk_sizes(cluster)
    with open_image(oracle) as img:
        pos = 0
        while pos < oracle.size:
            n = min(next(sizes), oracle.size - pos)
            got = img.read(pos, n)
            assert_same_bytes(got, want[pos : pos + n], f"read({pos}, {n})", base=pos)
            pos += n


@by_case
def test_readinto(oracle: Oracle):
    want = oracle.raw()
    cluster = cluster_size_of(oracle.built.path)
    size = oracle.size
    with open_image(oracle) as img:
        # whole image into one preallocated buffer
        buf = bytearray(size)
        assert img.readinto(0, buf) == size
        assert_same_bytes(bytes(buf), want, "readinto(whole image)")
        # odd windows into memoryview slices of a larger buffer
        big = bytearray(b"\xee" * (3 * cluster + 64))
        mv = memoryview(big)
        for off in sorted({0, 1, cluster - 1, cluster + 17, size // 2 - 3, size - 2 * cluster - 9}):
            for n in (1, cluster - 1, 2 * cluster + 5):
                if off < 0 or off + n > size:
                    continue
                big[:] = b"\xee" * len(big)
                assert img.readinto(off, mv[5 : 5 + n]) == n
                assert_same_bytes(
                    bytes(mv[5 : 5 + n]), want[off : off + n], f"readinto({off}, [{n}])", base=off
                )
                assert big[:5] == b"\xee" * 5 and big[5 + n :] == b"\xee" * (len(big) - 5 - n), (
                    f"readinto({off}, [{n}]) wrote outside its buffer slice"
                )


@by_case
def test_as_file(oracle: Oracle):
    want = oracle.raw()
    cluster = cluster_size_of(oracle.built.path)
    size = oracle.size
    with open_image(oracle) as img:
        f = img.as_file()
        assert isinstance(f, io.RawIOBase)
        assert f.readable() and f.seekable()
        # sequential reads with odd sizes until EOF (short reads are allowed)
        out = bytearray()
        sizes = chunk_sizes(cluster)
        while True:
            chunk = f.read(next(sizes))
            assert chunk is not None
            if not chunk:
                break
            out += chunk
            assert len(out) <= size
        assert_same_bytes(bytes(out), want, "as_file() sequential read")
        assert f.tell() == size
        assert f.seek(0, io.SEEK_END) == size
        assert f.read(10) == b""
        # random access
        for off in (cluster - 3, size // 3 + 1, size - cluster - 1, 0):
            assert f.seek(off) == off
            n = min(2 * cluster + 9, size - off)
            got = bytearray()
            while len(got) < n:
                piece = f.read(n - len(got))
                assert piece, f"unexpected EOF at {f.tell()}"
                got += piece
            assert_same_bytes(
                bytes(got), want[off : off + n], f"as_file seek({off}) read({n})", base=off
            )
        f.seek(cluster + 1)
        f.seek(-2, io.SEEK_CUR)
        b = bytearray(cluster + 3)
        got_n = f.readinto(b)
        assert 0 < got_n <= len(b)
        assert_same_bytes(
            bytes(b[:got_n]),
            want[cluster - 1 : cluster - 1 + got_n],
            "as_file readinto",
            base=cluster - 1,
        )
        # the whole thing through a BufferedReader
        f.seek(0)
        assert_same_bytes(
            io.BufferedReader(f, buffer_size=cluster + 1).read(),
            want,
            "BufferedReader(as_file()).read()",
        )
        f.close()


@by_case
def test_extents_match_qemu_map(oracle: Oracle):
    raw = oracle.raw()
    with open_image(oracle) as img:
        exts = img.extents()
    e = engine_runs(exts, oracle.size)
    q = qemu_runs(oracle.qmap)
    assert q[-1].end == oracle.size
    problems = compare_runs(q, e, raw, oracle.built.raw_depths, 0, oracle.size)
    assert not problems, "extents() disagrees with qemu-img map:\n  " + "\n  ".join(problems)
    # adjacent runs that could have been merged must have been merged
    for a, b in zip(exts, exts[1:]):
        same = (a.is_data, a.is_zero, a.depth, getattr(a, "present", None)) == (
            b.is_data,
            b.is_zero,
            b.depth,
            getattr(b, "present", None),
        )
        contiguous = (a.host_offset is None and b.host_offset is None) or (
            a.host_offset is not None
            and b.host_offset is not None
            and a.host_offset + a.length == b.host_offset
        )
        assert not (same and contiguous), f"unmerged adjacent extents {a} {b}"


@by_case
def test_extents_window(oracle: Oracle):
    """extents(offset, length) over odd windows equals the full map clipped to them."""
    raw = oracle.raw()
    cluster = cluster_size_of(oracle.built.path)
    size = oracle.size
    q = qemu_runs(oracle.qmap)
    windows = [
        (1, cluster),
        (cluster - 7, 3 * cluster + 11),
        (size // 2 + 5, cluster // 2 + 3),
        (size - cluster - 1, cluster + 1),
        (3 * cluster + 100, 20 * cluster),
    ]
    with open_image(oracle) as img:
        for off, n in windows:
            n = min(n, size - off)
            exts = img.extents(off, n)
            e = engine_runs(exts, off + n, start=off)
            problems = compare_runs(q, e, raw, oracle.built.raw_depths, off, off + n)
            assert not problems, (
                f"extents({off}, {n}) disagrees with qemu-img map:\n  " + "\n  ".join(problems)
            )


@pytest.mark.parametrize(
    "oracle",
    [c for c in CASES if c.id.startswith("chain")],
    ids=[c.id for c in CASES if c.id.startswith("chain")],
    indirect=True,
)
def test_chain_layers(oracle: Oracle):
    """img.backing walks the same chain qemu-img info --backing-chain reports."""
    import json

    info = json.loads(
        qemu_img("info", "--backing-chain", "--output=json", oracle.built.path).stdout
    )
    assert len(info) == oracle.built.chain_len
    with open_image(oracle) as img:
        layer = img
        for depth, layer_info in enumerate(info):
            assert layer is not None, f"chain ends early at depth {depth}"
            assert layer.format == layer_info["format"], depth
            assert layer.size == layer_info["virtual-size"], depth
            assert (
                os.path.realpath(layer.filename) == os.path.realpath(layer_info["filename"])
                or depth == 0
            ), (depth, layer.filename, layer_info["filename"])
            if depth > 0:
                assert layer.read_only
            if layer.format == "qcow2":
                assert layer.backing_filename == layer_info.get("backing-filename"), depth
                assert layer.backing_format == layer_info.get("backing-filename-format"), depth
            layer = layer.backing
        assert layer is None
