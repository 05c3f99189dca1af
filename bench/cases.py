"""The cases of the suite (issue 13's list) and the images they run on.

Inputs are made by the reference tools (qemu-img, qemu-io, mkfs.ext4) from raw data
written here, so that neither side measures images of its own making. Each case's setup
returns its rows; bench.py alternates ours and theirs over them.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from measure import (
    QIMG,
    ROOT,
    BenchError,
    Case,
    Launched,
    Row,
    Sample,
    Target,
    reported,
    run_child,
    wall,
    worker,
)

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
NBDCOPY = shutil.which("nbdcopy")
QEMU_STORAGE_DAEMON = shutil.which("qemu-storage-daemon")
MIB = 1 << 20


@dataclass
class Config:
    directory: Path
    size: int  # bytes of the data-carrying images
    io_count: int  # requests per random-I/O run
    fs_source: Path  # the tree mkfs.ext4 -d copies into the filesystem image
    snapshots: int  # snapshots in the metadata-heavy snapshot image


def sh(*argv, stdin: bytes | None = None) -> None:
    """Run a fixture-building command (untimed); its failure stops the case."""
    done = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True)
    if done.returncode:
        raise BenchError(
            f"{' '.join(map(str, argv[:6]))} failed: "
            f"{done.stderr.decode(errors='replace').strip()[-400:]}"
        )


def qemu_io(image: Path, commands: list[str], fmt: str = "qcow2") -> None:
    """Many qemu-io commands in one process, fed on stdin."""
    sh(QEMU_IO, "-f", fmt, image, stdin=("\n".join(commands) + "\nquit\n").encode())


def remove(path: Path) -> Callable[[str], None]:
    """Before each run: the last run's output removed and the page cache's dirty data
    written out, so that no run pays for the writeback of the run before it (a 1 GiB
    output written back during the other side's run moved convert rows by up to 1.7x)."""

    def prepare(_side: str) -> None:
        path.unlink(missing_ok=True)
        os.sync()

    return prepare


def copy_sparse(source: Path, target: Path) -> None:
    sh("cp", "--sparse=always", source, target)


class Fixtures:
    """The shared images, each built once on first use."""

    def __init__(self, config: Config):
        self.config = config
        self.dir = config.directory
        self._made: dict[str, Path] = {}

    def _once(self, name: str, build: Callable[[Path], None]) -> Path:
        if name not in self._made:
            path = self.dir / name
            build(path)
            self._made[name] = path
        return self._made[name]

    def _raw_to_qcow2(self, raw: Path, target: Path) -> None:
        sh(QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", raw, target)

    def _write_raw(
        self, path: Path, chunk_kind: Callable[[int, random.Random], str | None], chunk: int = MIB
    ) -> None:
        """A raw file of config.size, each chunk random, text, zeros or a hole."""
        rng = random.Random(13)
        text = (
            b"The quick brown fox jumps over the lazy dog; qcow2 clusters, refcounts "
            b"and L2 tables. "
        ) * (chunk // 80 + 1)
        with open(path, "wb") as out:
            out.truncate(self.config.size)
            for index, offset in enumerate(range(0, self.config.size, chunk)):
                kind = chunk_kind(index, rng)
                if kind is None:
                    continue
                data = {
                    "random": lambda: rng.randbytes(chunk),
                    "text": lambda: text[:chunk],
                    "zeros": lambda: bytes(chunk),
                    "old": lambda: (
                        rng.randbytes(chunk // 2) + bytes([rng.randrange(256)]) * (chunk // 2)
                    ),
                }[kind]()
                out.seek(offset)
                out.write(data)

    def mixed_raw(self) -> Path:
        """30% incompressible, 30% text, 15% zeros written as data, 25% holes."""

        def kind(_index, rng):
            roll = rng.random()
            return (
                "random"
                if roll < 0.30
                else "text"
                if roll < 0.60
                else "zeros"
                if roll < 0.75
                else None
            )

        return self._once("mixed.raw", lambda path: self._write_raw(path, kind))

    def mixed(self) -> Path:
        return self._once("mixed.qcow2", lambda path: self._raw_to_qcow2(self.mixed_raw(), path))

    def full(self) -> Path:
        """Every cluster allocated, incompressible data."""

        def build(path):
            raw = self.dir / "full.raw"
            self._write_raw(raw, lambda _i, _r: "random")
            self._raw_to_qcow2(raw, path)
            raw.unlink()

        return self._once("full.qcow2", build)

    def half(self) -> Path:
        """Every other MiB allocated, the rest unallocated."""

        def build(path):
            raw = self.dir / "half.raw"
            self._write_raw(raw, lambda index, _r: "random" if index % 2 == 0 else None)
            self._raw_to_qcow2(raw, path)
            raw.unlink()

        return self._once("half.qcow2", build)

    def empty(self) -> Path:
        return self._once(
            "empty.qcow2",
            lambda path: sh(QEMU_IMG, "create", "-f", "qcow2", path, self.config.size),
        )

    def old_bench(self) -> Path:
        """The old bench.py's image: 3/4 of the 4 MiB chunks written, each half random
        and half one repeated byte, 1/4 holes."""

        def build(path):
            raw = self.dir / "old.raw"
            self._write_raw(
                raw, lambda _i, rng: "old" if rng.random() < 0.75 else None, chunk=4 * MIB
            )
            self._raw_to_qcow2(raw, path)
            raw.unlink()

        return self._once("old.qcow2", build)

    def chain(self) -> Path:
        """A 3-deep chain over the mixed image: each upper layer rewrites some chunks."""

        def build(top):
            base = self.mixed()
            mid = self.dir / "chain-mid.qcow2"
            sh(QEMU_IMG, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
            sh(QEMU_IMG, "create", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
            step = max(self.config.size // 64, MIB)
            qemu_io(
                mid, [f"write -P 0x11 {offset} 1M" for offset in range(0, self.config.size, step)]
            )
            qemu_io(
                top,
                [
                    f"write -P 0x22 {offset + step // 2} 512k"
                    for offset in range(0, self.config.size - step // 2, step)
                ],
            )

        return self._once("chain-top.qcow2", build)

    def guest_disk(self, size_mib: int) -> Path:
        """Every cluster allocated with incompressible data, at a size of its own (the
        guest reads all of it under TCG, so it stays small whatever config.size is)."""

        def build(path):
            raw = self.dir / "guest.raw"
            rng = random.Random(17)
            with open(raw, "wb") as out:
                for _ in range(size_mib):
                    out.write(rng.randbytes(MIB))
            self._raw_to_qcow2(raw, path)
            raw.unlink()

        return self._once(f"guest-{size_mib}m.qcow2", build)

    def fs_raw(self) -> Path:
        """An ext4 filesystem holding a copy of config.fs_source (/usr/share by default)."""

        def build(path):
            used = int(
                subprocess.run(
                    ["du", "-sk", "--apparent-size", str(self.config.fs_source)],
                    capture_output=True,
                    text=True,
                ).stdout.split()[0]
            )
            size_mib = max(64, used * 14 // 10 // 1024 + 64)
            with open(path, "wb") as out:
                out.truncate(size_mib * MIB)
            sh(
                "mkfs.ext4",
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                "-d",
                self.config.fs_source,
                path,
            )

        return self._once("fs.raw", build)

    def fs(self) -> Path:
        return self._once("fs.qcow2", lambda path: self._raw_to_qcow2(self.fs_raw(), path))

    def small(self) -> Path:
        return self._once(
            "small.qcow2", lambda path: sh(QEMU_IMG, "create", "-f", "qcow2", path, "64M")
        )

    def huge(self) -> Path:
        """8 TiB with a few clusters written at offsets spread over all of it."""

        def build(path):
            sh(QEMU_IMG, "create", "-f", "qcow2", path, "8T")
            qemu_io(
                path,
                [
                    f"write -P {index + 1} {index * (512 << 30) + (index << 20)} 64k"
                    for index in range(16)
                ],
            )

        return self._once("huge.qcow2", build)

    def extents(self) -> Path:
        """Many small extents: 4 KiB written at every other 64 KiB cluster."""

        def build(path):
            sh(QEMU_IMG, "create", "-f", "qcow2", path, self.config.size)
            qemu_io(
                path,
                [f"write -P 0x5a {offset} 4k" for offset in range(0, self.config.size, 128 << 10)],
            )

        return self._once("extents.qcow2", build)

    def scattered(self) -> Path:
        """16 GiB written the way a guest's file system scatters its writes: `size` of
        data in 1 MiB writes at random 512-byte offsets (a seeded generator, so every
        run builds the same image). Most L2 tables then hold a few dozen runs of
        clusters, each starting inside a cluster."""

        def build(path):
            sh(QEMU_IMG, "create", "-f", "qcow2", path, "16G")
            chosen = random.Random(7)
            last = (16 << 30) - MIB
            qemu_io(
                path,
                [
                    f"write -P {index % 251} {chosen.randrange(0, last) // 512 * 512} 1M"
                    for index in range(self.config.size // MIB)
                ],
            )

        return self._once("scattered.qcow2", build)

    def sparse100g(self) -> Path:
        """100 GiB virtual, `size` of data in 1 MiB pieces spread evenly over it."""

        def build(path):
            sh(QEMU_IMG, "create", "-f", "qcow2", path, "100G")
            chunks = self.config.size // MIB
            spacing = (100 << 30) // chunks
            qemu_io(
                path,
                [f"write -P {index % 250 + 1} {index * spacing} 1M" for index in range(chunks)],
            )

        return self._once("sparse100g.qcow2", build)

    def allocated100g(self) -> Path:
        """100 GiB virtual with every cluster allocated (`preallocation=metadata`: 200 full
        L2 tables; the data clusters are holes in the file, 16 MiB on disk), as a disk
        provisioned in full is."""

        def build(path):
            sh(QEMU_IMG, "create", "-f", "qcow2", "-o", "preallocation=metadata", path, "100G")

        return self._once("allocated100g.qcow2", build)

    def many_snapshots(self) -> Path:
        """Snapshots sharing L1/L2 tables: the mixed image, then a snapshot after each of
        a few scattered writes."""

        def build(path):
            copy_sparse(self.mixed(), path)
            step = max(self.config.size // 16, MIB)
            for index in range(self.config.snapshots):
                offset = (index * 7919 * 65536) % (self.config.size - 65536)
                qemu_io(
                    path,
                    [
                        f"write -P {index % 250 + 1} {offset} 64k",
                        f"write -P {index % 250 + 2} {(offset + step) % self.config.size} 4k",
                    ],
                )
                sh(QEMU_IMG, "snapshot", "-c", f"s{index}", path)

        return self._once("snapshots.qcow2", build)


# --- the cases --------------------------------------------------------------------------


def startup_case(fx: Fixtures) -> list[Row]:
    small = fx.small()
    floor = wall([sys.executable, "-c", "pass"])
    in_process = worker(op="info", path=str(small))

    def floor_plus_read() -> Sample:
        started, work = floor(), in_process()
        return Sample(started.seconds + work.seconds, started.rss_kib)

    return [
        Row(
            "start-up: info, small image",
            wall([*QIMG, "info", small]),
            wall([QEMU_IMG, "info", small]),
            Target(max_ratio=3.0),
            "qemu-img info",
        ),
        Row(
            "start-up: info vs floor+read",
            wall([*QIMG, "info", small]),
            floor_plus_read,
            Target(max_ratio=1.5),
            "python3 -c pass + in-process info",
        ),
    ]


def snapshot_rows(fx: Fixtures, label: str, source: Path) -> list[Row]:
    """-c, -l, -a, -d in turn on each side's own copy, so that the image is back to where
    it started at the end of every round."""
    ours_copy = fx.dir / f"snap-{label}-ours.qcow2"
    theirs_copy = fx.dir / f"snap-{label}-theirs.qcow2"
    copy_sparse(source, ours_copy)
    copy_sparse(source, theirs_copy)
    rows = []
    for flag, name in (("-c", "create"), ("-l", "list"), ("-a", "apply"), ("-d", "delete")):
        operand = [] if flag == "-l" else ["bench"]
        rows.append(
            Row(
                f"snapshot {flag} ({name}), {label}",
                wall([*QIMG, "snapshot", flag, *operand, ours_copy]),
                wall([QEMU_IMG, "snapshot", flag, *operand, theirs_copy]),
                Target(max_ratio=1.5),
                "qemu-img snapshot",
            )
        )
    return rows


def snapshot_case(fx: Fixtures) -> list[Row]:
    size_label = f"{fx.config.size // MIB} MiB"
    return [
        *snapshot_rows(fx, f"{size_label} with data", fx.mixed()),
        *snapshot_rows(fx, f"100 GiB sparse, {size_label} data", fx.sparse100g()),
        *snapshot_rows(fx, "100 GiB, every cluster allocated", fx.allocated100g()),
    ]


def convert_rows(fx: Fixtures, label: str, raw: Path, qcow2: Path, chain: Path | None) -> list[Row]:
    out = fx.dir / "convert-out.img"
    jobs = [
        ("raw -> qcow2", ["-f", "raw", "-O", "qcow2"], raw),
        ("qcow2 -> raw", ["-f", "qcow2", "-O", "raw"], qcow2),
    ]
    if chain is not None:
        jobs.append(("3-deep chain -> qcow2", ["-f", "qcow2", "-O", "qcow2"], chain))
    jobs += [
        ("qcow2 -> qcow2 -c zlib", ["-f", "qcow2", "-O", "qcow2", "-c"], qcow2),
        (
            "qcow2 -> qcow2 -c zstd",
            ["-f", "qcow2", "-O", "qcow2", "-c", "-o", "compression_type=zstd"],
            qcow2,
        ),
    ]
    return [
        Row(
            f"convert {job}, {label}",
            wall([*QIMG, "convert", *args, source, out]),
            wall([QEMU_IMG, "convert", *args, source, out]),
            Target(max_ratio=1.0),
            "qemu-img convert",
            prepare=remove(out),
        )
        for job, args, source in jobs
    ]


def convert_case(fx: Fixtures) -> list[Row]:
    return [
        *convert_rows(fx, "mixed", fx.mixed_raw(), fx.mixed(), fx.chain()),
        *convert_rows(fx, f"ext4 of {fx.config.fs_source}", fx.fs_raw(), fx.fs(), None),
    ]


def check_map_case(fx: Fixtures) -> list[Row]:
    rows = []
    size_label = f"{fx.config.size // MIB} MiB"
    for label, image in (
        (f"{size_label} fully allocated", fx.full()),
        (f"100 GiB sparse, {size_label} data", fx.sparse100g()),
        ("100 GiB, every cluster allocated", fx.allocated100g()),
        ("many small extents", fx.extents()),
        (f"16 GiB written at random, {size_label}", fx.scattered()),
        (f"{fx.config.snapshots} snapshots", fx.many_snapshots()),
    ):
        rows.append(
            Row(
                f"check, {label}",
                wall([*QIMG, "check", image]),
                wall([QEMU_IMG, "check", image]),
                Target(max_ratio=1.0),
                "qemu-img check",
            )
        )
        rows.append(
            Row(
                f"map --output=json, {label}",
                wall([*QIMG, "map", "--output=json", image]),
                wall([QEMU_IMG, "map", "--output=json", image]),
                Target(max_ratio=1.0),
                "qemu-img map",
            )
        )
    # measure walks the same block status (not a row of the issue's: a user sizing a copy)
    for label, image in (
        (f"100 GiB sparse, {size_label} data", fx.sparse100g()),
        ("many small extents", fx.extents()),
        (f"16 GiB written at random, {size_label}", fx.scattered()),
    ):
        rows.append(
            Row(
                f"measure -O qcow2, {label}",
                wall([*QIMG, "measure", "-O", "qcow2", image]),
                wall([QEMU_IMG, "measure", "-O", "qcow2", image]),
                Target(max_ratio=1.0),
                "qemu-img measure",
            )
        )
    return rows


def compare_case(fx: Fixtures) -> list[Row]:
    """compare reads every allocated cluster of both sides (a user's check that a copy
    came out right), or up to the first difference."""
    mixed = fx.mixed()
    copy = fx.dir / "compare-copy.qcow2"
    copy_sparse(mixed, copy)
    changed = fx.dir / "compare-changed.qcow2"
    copy_sparse(mixed, changed)
    half = fx.config.size // 2
    qemu_io(changed, [f"write -P 0xa5 {half} 4k"])
    rows = []
    for label, args, accept in (
        ("compare -s, qcow2 and its copy (identical)", ["-s", mixed, copy], (0,)),
        ("compare, qcow2 and the raw file it came from", [mixed, fx.mixed_raw()], (0,)),
        ("compare, a difference half-way", [mixed, changed], (1,)),
    ):
        rows.append(
            Row(
                f"{label}, mixed",
                wall([*QIMG, "compare", *args], accept),
                wall([QEMU_IMG, "compare", *args], accept),
                Target(max_ratio=1.0),
                "qemu-img compare",
            )
        )
    return rows


def rebase_case(fx: Fixtures) -> list[Row]:
    """Safe rebase of an overlay over the mixed image (128 MiB of its own data): onto no
    backing file (the overlay flattened), and onto the many-extents image (every range
    compared with other data); and of an empty overlay of the fully allocated image onto
    a copy of it with two sectors changed in every cluster (a base image updated in
    place). Each run starts from a fresh copy of the overlay."""
    overlay = fx.dir / "rebase-overlay.qcow2"
    sh(QEMU_IMG, "create", "-f", "qcow2", "-b", fx.mixed(), "-F", "qcow2", overlay)
    quarter = fx.config.size // 4
    qemu_io(overlay, [f"write -P 9 0 {quarter // 2}", f"write -P 8 {2 * quarter} {quarter // 2}"])
    full_overlay = fx.dir / "rebase-full-overlay.qcow2"
    sh(QEMU_IMG, "create", "-f", "qcow2", "-b", fx.full(), "-F", "qcow2", full_overlay)
    updated = fx.dir / "rebase-full-updated.qcow2"
    copy_sparse(fx.full(), updated)
    qemu_io(
        updated,
        [
            f"write -P {pattern} {cluster + at} 512"
            for cluster in range(0, fx.config.size, 65536)
            for pattern, at in ((0x77, 4096), (0x66, 40960))
        ],
    )
    work = fx.dir / "rebase-work.qcow2"

    def fresh_copy(source: Path) -> Callable[[str], None]:
        def prepare(_side: str) -> None:
            work.unlink(missing_ok=True)
            copy_sparse(source, work)
            os.sync()

        return prepare

    return [
        Row(
            f"rebase {label}",
            wall([*QIMG, "rebase", *args, work]),
            wall([QEMU_IMG, "rebase", *args, work]),
            Target(max_ratio=1.0),
            "qemu-img rebase",
            prepare=fresh_copy(source),
        )
        for label, args, source in (
            ("-b '' (flatten), overlay of the mixed image", ["-b", ""], overlay),
            (
                "onto other data, overlay of the mixed image",
                ["-b", fx.extents(), "-F", "qcow2"],
                overlay,
            ),
            (
                "onto a copy with 2 sectors a cluster changed, empty overlay of the full image",
                ["-b", updated, "-F", "qcow2"],
                full_overlay,
            ),
        )
    ]


def random_io_case(fx: Fixtures) -> list[Row]:
    count = fx.config.io_count
    step = 4096 * 7919  # visits the 4 KiB blocks in a scattered order
    full, empty = fx.full(), fx.empty()
    fresh = fx.dir / "randio-fresh.qcow2"

    def fresh_copy(_side: str) -> None:
        copy_sparse(empty, fresh)

    rows = []
    for depth in (1, 8):
        for write, region, image, prepare in (
            (False, "allocated", full, None),
            (False, "unallocated", empty, None),
            (True, "allocated", full, None),
            (True, "unallocated", fresh, fresh_copy),
        ):
            verb = "writes" if write else "reads"
            theirs = [
                QEMU_IMG,
                "bench",
                "-f",
                "qcow2",
                "-c",
                count,
                "-d",
                depth,
                "-s",
                "4k",
                "-S",
                step,
                "-t",
                "writeback",
                "-i",
                "threads",
                *(["-w"] if write else []),
                image,
            ]
            rows.append(
                Row(
                    f"4k random {verb}, {region}, {'QD1' if depth == 1 else '8 threads'} x{count}",
                    worker(
                        op="randio",
                        path=str(image),
                        count=count,
                        threads=depth,
                        step=step,
                        write=write,
                    ),
                    reported(theirs),
                    Target(max_ratio=1.5),
                    f"qemu-img bench -d {depth}",
                    prepare=prepare,
                )
            )
    return rows


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def read_rows(
    fx: Fixtures, label: str, image: Path, bufsize: int, modes: tuple[str, ...], dissect: bool
) -> list[Row]:
    """Ours in each mode against pyqcow (target: faster) and, with `dissect`, against
    dissect.hypervisor (target: at least twice as fast); both of those only read()."""
    references = [("pyqcow", "pyqcow", Target(max_ratio=1.0))]
    if dissect:
        references.append(("dissect", "dissect.hypervisor", Target(max_ratio=0.5)))
    size = f"{bufsize // MIB} MiB"
    rows = []
    for mode in modes:
        for impl, module, target in references:
            installed = _installed(module)
            rows.append(
                Row(
                    f"read whole, {label}, {size} {mode}()",
                    worker(op="read", impl="ours", path=str(image), bufsize=bufsize, mode=mode),
                    worker(op="read", impl=impl, path=str(image), bufsize=bufsize, mode="read")
                    if installed
                    else None,
                    target,
                    f"{module} {size} read",
                    missing="" if installed else f"{module} not installed",
                )
            )
    return rows


def read_case(fx: Fixtures) -> list[Row]:
    rows = []
    for label, image in (("full", fx.full()), ("half allocated", fx.half()), ("empty", fx.empty())):
        rows += read_rows(fx, label, image, MIB, ("read", "readinto"), True)
    return rows


def read_why_case(fx: Fixtures) -> list[Row]:
    """Why the old bench and a user disagreed: buffer size, read() vs readinto(), and
    the image (the old bench's 3/4-written one, or fully allocated)."""
    rows = []
    for label, image in (("old bench image", fx.old_bench()), ("full", fx.full())):
        for bufsize in (4 * MIB, MIB):
            rows += read_rows(fx, label, image, bufsize, ("readinto", "read"), False)
    return rows


def open_case(fx: Fixtures) -> list[Row]:
    huge = fx.huge()
    return [
        Row(
            "open+close 8 TiB image (API)",
            worker(op="open", path=str(huge)),
            None,
            Target(max_seconds=0.05, max_rss_mib=50),
        ),
        Row(
            "info 8 TiB image (process)",
            wall([*QIMG, "info", huge]),
            wall([QEMU_IMG, "info", huge]),
            Target(max_ratio=3.0),
            "qemu-img info",
        ),
    ]


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited {proc.returncode} before listening on {path}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.01)
    raise BenchError(f"server did not listen on {path} within {timeout} s")


def served_sampler(
    server_argv: list,
    ready: Callable[[subprocess.Popen], None],
    client: Callable[[], float],
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
) -> Callable[[], Sample]:
    """The seconds `client()` returns against a server started (untimed) for it, once
    `ready(proc)` has returned; the RSS is the server's, once SIGTERM has stopped it.
    `before` runs (untimed) before the server starts (the place to give it a fresh copy of
    its image), `after` once it has stopped (a check that it left nothing behind)."""

    def sample() -> Sample:
        if before is not None:
            before()
        server = Launched(server_argv)
        try:
            ready(server.proc)
            seconds = client()
        finally:
            server.terminate()
            # SIGTERM stops qimg and the QEMU tools with exit 0 (qcow2lib.exports.nbd.serve
            # run bare keeps Python's default handler: killed by the signal).
            _, rss, _ = server.wait(timeout=60, accept=(0, -signal.SIGTERM))
        if after is not None:
            after()
        return Sample(seconds, rss)

    return sample


def socket_sampler(
    server_argv: list, sock: Path, client: Callable[[], float]
) -> Callable[[], Sample]:
    """served_sampler for a server listening on the unix socket `sock`."""
    return served_sampler(
        server_argv,
        lambda proc: _wait_for_socket(sock, proc),
        client,
        before=lambda: sock.unlink(missing_ok=True),
    )


def nbdcopy_client(sock: Path) -> Callable[[], float]:
    def client() -> float:
        return run_child([NBDCOPY, f"nbd+unix:///?socket={sock}", "null:"])[0]

    return client


def qemu_img_bench_client(sock: Path, args: list) -> Callable[[], float]:
    """`qemu-img bench` against the NBD export: the run time it prints."""
    argv = [QEMU_IMG, "bench", "-f", "raw", *args, f"nbd+unix:///?socket={sock}"]

    def client() -> float:
        _, _, stdout = run_child(argv)
        return float(stdout.rsplit("Run completed in ", 1)[1].split()[0])

    return client


def exports_case(fx: Fixtures) -> list[Row]:
    if not (ROOT / "qcow2lib" / "exports" / "nbd.py").exists():
        return [
            Row(
                "nbdcopy from NBD export",
                lambda: Sample(0, 0),
                None,
                Target(),
                missing="qcow2lib.exports.nbd not in this checkout",
            )
        ]
    rows = []
    sock = fx.dir / "nbd.sock"
    for label, image in (("full", fx.full()), ("mixed", fx.mixed())):
        if NBDCOPY is None:
            rows.append(
                Row(
                    f"nbdcopy to null:, {label}",
                    lambda: Sample(0, 0),
                    None,
                    Target(),
                    missing="nbdcopy not installed (libnbd-bin)",
                )
            )
            continue
        ours = [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import qcow2lib; "
            "from qcow2lib.exports.nbd import serve; "
            "serve(qcow2lib.open(sys.argv[2]), unix_path=sys.argv[3], read_only=True, "
            "persistent=True, shared=0)",
            ROOT,
            image,
            sock,
        ]
        theirs = [QEMU_NBD, "-r", "-f", "qcow2", "--persistent", "-e", "0", "-k", sock, image]
        rows.append(
            Row(
                f"nbdcopy to null:, {label}",
                socket_sampler(ours, sock, nbdcopy_client(sock)),
                socket_sampler(theirs, sock, nbdcopy_client(sock)),
                Target(max_ratio=1.2),
                "qemu-nbd",
            )
        )
    # qemu-img bench as the NBD client, against `qimg nbd` and qemu-nbd serving the same
    # fully allocated image, writable; the writes land on allocated clusters in place.
    image = fx.dir / "nbd-bench.qcow2"
    copy_sparse(fx.full(), image)
    ours = [*QIMG, "nbd", "-k", sock, "-t", "-f", "qcow2", image]
    theirs = [QEMU_NBD, "-k", sock, "-t", "-f", "qcow2", image]
    count = fx.config.io_count
    step = 4096 * 7919  # the 4 KiB blocks in a scattered order, as in randio
    jobs = [
        (
            f"4k random reads x{count}",
            ["-c", count, "-d", 16, "-s", "4k", "-S", step],
            Target(max_ratio=1.5),
        ),
        (
            f"4k random writes x{count}",
            ["-c", count, "-d", 16, "-s", "4k", "-S", step, "-w"],
            Target(max_ratio=1.5),
        ),
        (
            f"1 MiB sequential reads x{fx.config.size // MIB}",
            ["-c", fx.config.size // MIB, "-d", 16, "-s", "1M", "-S", "1M"],
            Target(max_ratio=1.2),
        ),
    ]
    for label, args, target in jobs:
        rows.append(
            Row(
                f"NBD qemu-img bench -d 16, {label}",
                socket_sampler(ours, sock, qemu_img_bench_client(sock, args)),
                socket_sampler(theirs, sock, qemu_img_bench_client(sock, args)),
                target,
                "qemu-nbd",
            )
        )
    # The same writes on a fresh empty image (a copy made before each sample): each
    # allocates a cluster, as a guest's writes to a new disk do.
    fresh = fx.dir / "nbd-fresh.qcow2"
    empty = fx.empty()
    args = ["-c", count, "-d", 16, "-s", "4k", "-S", step, "-w"]
    rows.append(
        Row(
            f"NBD qemu-img bench -d 16, 4k random writes x{count}, unallocated",
            socket_sampler(
                [*QIMG, "nbd", "-k", sock, "-t", "-f", "qcow2", fresh],
                sock,
                qemu_img_bench_client(sock, args),
            ),
            socket_sampler(
                [QEMU_NBD, "-k", sock, "-t", "-f", "qcow2", fresh],
                sock,
                qemu_img_bench_client(sock, args),
            ),
            Target(max_ratio=1.5),
            "qemu-nbd",
            prepare=lambda _side: copy_sparse(empty, fresh),
        )
    )
    return rows


def storage_daemon(image: Path, export: str) -> list:
    """qemu-storage-daemon serving the qcow2 `image` as node "disk" through `export`."""
    return [
        QEMU_STORAGE_DAEMON,
        "--blockdev",
        f"driver=file,node-name=file,filename={image}",
        "--blockdev",
        "driver=qcow2,node-name=disk,file=file",
        "--export",
        export,
    ]


# --- the FUSE mount, against qemu-storage-daemon's FUSE export ---------------------------


def _mounted(path: Path) -> bool:
    """Asked of /proc alone (a stat would wait on a server still starting)."""
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        return any(line.split(b" ")[4] == target for line in mountinfo.read().splitlines())


def mounted_sampler(
    server_argv: list,
    mountpoint: Path,
    client: Callable[[], float],
    before: Callable[[], None] | None = None,
) -> Callable[[], Sample]:
    """served_sampler for a FUSE server mounting `mountpoint`. Each sample mounts afresh:
    the kernel's cache of the last mount's file is gone."""

    def ready(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 30
        while not _mounted(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{server_argv[0]} did not mount {mountpoint}")
            time.sleep(0.01)

    def unmounted() -> None:
        if _mounted(mountpoint):
            raise BenchError(f"{mountpoint} is still mounted after its server stopped")

    return served_sampler(server_argv, ready, client, before, unmounted)


def mount_case(fx: Fixtures) -> list[Row]:
    """`qimg mount` (a directory holding disk.raw) against qemu-storage-daemon exporting
    the same image over FUSE (on a file): dd of the whole disk, cp --sparse=always of a
    sparse one (its holes found by SEEK_DATA/SEEK_HOLE), and qemu-img bench's direct
    4 KiB requests, 8 in flight, reads and (on a fresh copy) writes in place."""
    if QEMU_STORAGE_DAEMON is None:
        return [
            Row(
                "FUSE mount",
                lambda: Sample(0, 0),
                None,
                Target(),
                missing="qemu-storage-daemon not installed (qemu-utils)",
            )
        ]
    ours_dir = fx.dir / "mount-ours"
    theirs_file = fx.dir / "mount-theirs.raw"
    ours_dir.mkdir(exist_ok=True)
    theirs_file.touch()
    ours_disk = ours_dir / "disk.raw"

    def servers(image: Path, writable: bool) -> tuple[list, list]:
        ours = [*QIMG, "mount", "--foreground", *(["--rw"] if writable else []), image, ours_dir]
        theirs = storage_daemon(
            image,
            f"type=fuse,id=exp,node-name=disk,mountpoint={theirs_file},"
            f"writable={'on' if writable else 'off'}",
        )
        return ours, theirs

    def dd(disk: Path) -> Callable[[], float]:
        return lambda: run_child(["dd", f"if={disk}", "of=/dev/null", "bs=1M"])[0]

    def bench(disk: Path, write: bool) -> Callable[[], float]:
        argv = [
            QEMU_IMG, "bench", "-f", "raw", "-t", "none", "-i", "threads", "-d", 8,
            "-c", fx.config.io_count, "-s", "4k", "-S", 4096 * 7919,
            *(["-w"] if write else []), disk,
        ]  # fmt: skip

        def client() -> float:
            stdout = run_child(argv)[2]
            return float(stdout.rsplit("Run completed in ", 1)[1].split()[0])

        return client

    copy = fx.dir / "mount-copy.raw"

    def cp(disk: Path) -> Callable[[], float]:
        def client() -> float:
            seconds = run_child(["cp", "--sparse=always", disk, copy])[0]
            copy.unlink()
            return seconds

        return client

    def row(label: str, image: Path, client, target: Target, before=None) -> Row:
        """Both sides' samplers of one job: the mount read-write when `before` gives the
        image a fresh copy."""
        ours, theirs = servers(image, writable=before is not None)
        return Row(
            f"FUSE mount: {label}",
            mounted_sampler(ours, ours_dir, client(ours_disk), before),
            mounted_sampler(theirs, theirs_file, client(theirs_file), before),
            target,
            "qemu-storage-daemon",
        )

    fresh = fx.dir / "mount-fresh.qcow2"
    count = fx.config.io_count
    return [
        row("dd 1 MiB reads of the whole disk, full", fx.full(), dd, Target(max_ratio=1.2)),
        row(
            f"cp --sparse=always of the disk, 100 GiB sparse, {fx.config.size // MIB} MiB data",
            fx.sparse100g(),
            cp,
            Target(max_ratio=1.2),
        ),
        row(
            f"qemu-img bench -d 8, 4k random direct reads x{count}",
            fx.full(),
            lambda disk: bench(disk, write=False),
            Target(max_ratio=1.5),
        ),
        row(
            f"qemu-img bench -d 8, 4k random direct writes x{count}",
            fresh,
            lambda disk: bench(disk, write=True),
            Target(max_ratio=1.5),
            before=lambda: copy_sparse(fx.full(), fresh),
        ),
    ]


# --- the guest's own view of a vhost-user-blk disk ---------------------------------------

GUEST_DISK_MIB = 256  # the guest reads all of it, writes half of it (TCG is slow)
GUEST_RANDOM_IOS = 300  # one busybox dd per 4 KiB request: process start-up included
GUEST_METRICS = ("seqread", "seqwrite", "randread", "randwrite")


GUEST_PASSES = 3  # each phase runs this often per boot; a boot's sample is their median
GUEST_CLOCK = "{ read _; read _; read _ _ %s _; } < /proc/timer_list"  # "now at N nsecs"


def guest_script(blocks: list[int]) -> str:
    """Each phase, GUEST_PASSES times, between two readings of the guest's monotonic clock
    in nanoseconds (/proc/uptime counts in 10 ms steps, 5% of a 1 MiB phase), printed
    as `BENCH name start end` for the host to subtract; boot time is outside every phase."""
    listed = " ".join(map(str, blocks))
    phases = {
        "seqread": f"dd if=/dev/vda of=/dev/null bs=1M count={GUEST_DISK_MIB} iflag=direct",
        "seqwrite": f"dd if=/dev/zero of=/dev/vda bs=1M count={GUEST_DISK_MIB // 2} oflag=direct",
        "randread": f"for b in {listed}; do dd if=/dev/vda of=/dev/null bs=4096 skip=$b "
        f"count=1 iflag=direct 2>/dev/null || echo BENCH-FAILED; done",
        "randwrite": f"for b in {listed}; do dd if=/dev/zero of=/dev/vda bs=4096 seek=$b "
        f"count=1 oflag=direct 2>/dev/null || echo BENCH-FAILED; done",
    }
    lines = []
    for _ in range(GUEST_PASSES):
        for name in GUEST_METRICS:
            lines += [
                GUEST_CLOCK % "s",
                f"{phases[name]} 2>/dev/null || echo BENCH-FAILED",
                GUEST_CLOCK % "e",
                f'echo "BENCH {name} $s $e"',
            ]
    return "\n".join(lines) + "\n"


def guest_results(output: str) -> dict[str, float]:
    """Seconds per phase: the median of its passes."""
    if "BENCH-FAILED" in output:
        raise BenchError(f"an I/O command failed in the guest:\n{output[-1500:]}")
    found: dict[str, list[float]] = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[0] == "BENCH" and fields[1] in GUEST_METRICS:
            found.setdefault(fields[1], []).append((int(fields[3]) - int(fields[2])) / 1e9)
    if sorted(found) != sorted(GUEST_METRICS) or any(
        len(passes) != GUEST_PASSES for passes in found.values()
    ):
        raise BenchError(f"the guest printed {sorted(found)}:\n{output[-1500:]}")
    return {name: statistics.median(passes) for name, passes in found.items()}


class GuestRuns:
    """One guest boot per side and round measures all four phases; each row's sampler
    takes its phase from the latest boot of that side, booting again when it was taken."""

    def __init__(self, fx: Fixtures, source: Path):
        sys.path.insert(0, str(ROOT / "tests"))
        import guest

        self.guest = guest
        self.fx = fx
        self.source = source
        rng = random.Random(11)
        self.script = guest_script(
            [rng.randrange(GUEST_DISK_MIB * 256) for _ in range(GUEST_RANDOM_IOS)]
        )
        self.pending: dict[str, dict[str, Sample]] = {"ours": {}, "theirs": {}}

    def server(self, side: str, image: Path, sock: Path) -> list:
        if side == "ours":
            return [*QIMG, "vhost-user-blk", "--socket", sock, image]
        return storage_daemon(
            image,
            "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,"
            f"addr.path={sock},writable=on",
        )

    def boot(self, side: str) -> None:
        image = self.fx.dir / f"guest-{side}.qcow2"
        sock = self.fx.dir / f"vhost-{side}.sock"
        copy_sparse(self.source, image)
        sock.unlink(missing_ok=True)
        server = Launched(self.server(side, image, sock))
        try:
            _wait_for_socket(sock, server.proc)
            disk = [
                "-chardev",
                f"socket,id=vub,path={sock}",
                "-device",
                "vhost-user-blk-pci,chardev=vub",
            ]
            try:
                output = self.guest.boot_guest(disk, self.script, timeout=600, workdir=self.fx.dir)
            except AssertionError as exc:
                raise BenchError(str(exc)[-1500:]) from None
        finally:
            server.terminate()
            _, rss, _ = server.wait(timeout=30, accept=(0, -signal.SIGTERM))
        self.pending[side] = {
            name: Sample(seconds, rss) for name, seconds in guest_results(output).items()
        }

    def sampler(self, side: str, metric: str) -> Callable[[], Sample]:
        def sample() -> Sample:
            if metric not in self.pending[side]:
                self.boot(side)
            return self.pending[side].pop(metric)

        return sample


def guest_case(fx: Fixtures) -> list[Row]:
    if not (ROOT / "qcow2lib" / "exports" / "vhost_user_blk.py").exists():
        return [
            Row(
                "guest I/O on vhost-user-blk",
                lambda: Sample(0, 0),
                None,
                Target(),
                missing="qcow2lib.exports.vhost_user_blk not in this checkout",
            )
        ]
    if QEMU_STORAGE_DAEMON is None:
        return [
            Row(
                "guest I/O on vhost-user-blk",
                lambda: Sample(0, 0),
                None,
                Target(),
                missing="qemu-storage-daemon not installed (qemu-system-x86)",
            )
        ]
    runs = GuestRuns(fx, fx.guest_disk(GUEST_DISK_MIB))
    accel = "KVM" if os.environ.get("QIMG_TEST_KVM") == "1" else "TCG"
    labels = {
        "seqread": f"dd 1 MiB direct reads x{GUEST_DISK_MIB}",
        "seqwrite": f"dd 1 MiB direct writes x{GUEST_DISK_MIB // 2}",
        "randread": f"4k random direct reads x{GUEST_RANDOM_IOS} (a dd each)",
        "randwrite": f"4k random direct writes x{GUEST_RANDOM_IOS} (a dd each)",
    }
    return [
        Row(
            f"guest ({accel}) on vhost-user-blk: {labels[metric]}, median of {GUEST_PASSES}",
            runs.sampler("ours", metric),
            runs.sampler("theirs", metric),
            Target(max_ratio=1.25),
            "qemu-storage-daemon",
        )
        for metric in GUEST_METRICS
    ]


CASES = [
    Case("startup", "start-up", startup_case),
    Case("snapshot", "snapshot -c/-a/-d", snapshot_case),
    Case("convert", "convert", convert_case),
    Case("checkmap", "check and map on metadata-heavy images", check_map_case),
    Case("compare", "compare two images", compare_case),
    Case("rebase", "safe rebase of an overlay", rebase_case),
    Case("randio", "random 4 KiB I/O", random_io_case),
    Case("read", "whole-image read vs pyqcow and dissect", read_case),
    Case("readwhy", "old bench vs user: buffer size, read/readinto, image", read_why_case),
    Case("open", "open an 8 TiB image", open_case),
    Case("exports", "NBD export: nbdcopy and qemu-img bench as clients", exports_case),
    Case("mount", "the FUSE mount against qemu-storage-daemon's FUSE export", mount_case),
    Case("guest", "a Linux guest's I/O on the vhost-user-blk export", guest_case),
]
