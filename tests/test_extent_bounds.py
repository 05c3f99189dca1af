"""Extents of hostile images stay bounded in time and memory (issues 10 and 13).

The images are built at test time: qemu-img creates a valid image, then L1/L2 bytes are
patched so that many L1 entries share one L2 table whose entries alternate states (the
number of extents explodes while the file stays tiny), or the file is extended sparsely
to terabytes. qimg runs in a child process under an address-space and a CPU-time limit,
and its output must equal qemu-img's.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qemutools import QEMU_IMG, qemu_compare, qemu_create, qemu_img, qemu_io

import qcow2lib

ROOT = Path(__file__).resolve().parent.parent
OFLAG_COPIED = 1 << 63
OFLAG_ZERO = 1
MEMORY_LIMIT = 512 << 20  # RLIMIT_AS of the child
CPU_LIMIT = 30  # seconds of CPU time: a generous guard against the old minutes-long walks
MAX_RSS_KIB = 120 << 10  # one window of extents, not the whole map
WINDOW_RSS_KIB = 50 << 10  # the same, where holding every extent would take ~70 MiB

_DRIVER = """
import resource, sys
limit_as, limit_cpu, rss_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
resource.setrlimit(resource.RLIMIT_CPU, (limit_cpu, limit_cpu))
import qimg
try:
    code = qimg.main(sys.argv[4:], prog="qemu-img")
finally:
    sys.stdout.flush()
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec (the parent's peak).
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(rss_file, "w") as out:
        out.write(peak)
sys.exit(code)
"""


def run_limited(
    tmp_path: Path, *args, cpu: int = CPU_LIMIT
) -> tuple[subprocess.CompletedProcess, int]:
    """qimg (the in-process entry point, named qemu-img) in a child under RLIMIT_AS and
    RLIMIT_CPU; returns the result and the child's peak RSS in KiB."""
    rss_file = tmp_path / "rss.txt"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tools'}")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _DRIVER,
            str(MEMORY_LIMIT),
            str(cpu),
            str(rss_file),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode >= 0, f"killed by signal {-result.returncode} (CPU limit?)"
    return result, int(rss_file.read_text())


def _header(f) -> tuple[int, int, int]:
    """(cluster_bits, l1_size, l1_table_offset) of an open qcow2 file."""
    f.seek(0)
    head = f.read(48)
    return struct.unpack(">I", head[20:24])[0], *struct.unpack(">IQ", head[36:48])


def patch_shared_l2(path: Path, l1_entries: int, entry_words, data_clusters: int = 8) -> None:
    """Append one L2 table and `data_clusters` data clusters to the image and point the
    first `l1_entries` L1 entries at that table. entry_words(index, data_start, cluster_size)
    gives the table's 64-bit words for L2 index `index` (two for extended entries)."""
    with open(path, "r+b") as f:
        cluster_bits, l1_size, l1_offset = _header(f)
        cluster_size = 1 << cluster_bits
        assert l1_entries <= l1_size
        end = -(-f.seek(0, os.SEEK_END) // cluster_size) * cluster_size
        data_start = end + cluster_size
        words: list[int] = []
        index = 0
        while len(words) < cluster_size // 8:
            words += entry_words(index, data_start, cluster_size)
            index += 1
        f.seek(end)
        f.write(struct.pack(f">{len(words)}Q", *words))
        f.write(bytes(range(256)) * (data_clusters * cluster_size // 256))  # the data
        f.seek(l1_offset)
        f.write(struct.pack(f">{l1_entries}Q", *[end | OFLAG_COPIED] * l1_entries))


def alternating(index: int, data_start: int, cluster_size: int) -> list[int]:
    """Data, zero, unallocated in turn: no two neighbours merge."""
    return [[(data_start + index % 8 * cluster_size) | OFLAG_COPIED, OFLAG_ZERO, 0][index % 3]]


def rare_data(index: int, data_start: int, cluster_size: int) -> list[int]:
    """Zero and unallocated in turn, a data cluster every 64th: many extents, little data."""
    if index % 64 == 0:
        return [(data_start + index // 64 % 8 * cluster_size) | OFLAG_COPIED]
    return [[OFLAG_ZERO, 0][index % 2]]


def qemu_in(tmp_path: Path, *args) -> subprocess.CompletedProcess:
    """qemu-img run in tmp_path with the same arguments as qimg."""
    return subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True, cwd=tmp_path)


def assert_same_output(
    ours: subprocess.CompletedProcess, theirs: subprocess.CompletedProcess, what
) -> None:
    """Same exit code and stdout; a difference is shown as its first line, not a diff of
    megabytes."""
    assert ours.returncode == theirs.returncode, (what, ours.stderr, theirs.stderr)
    if ours.stdout != theirs.stdout:
        mine, qemu = ours.stdout.splitlines(), theirs.stdout.splitlines()
        line = next(
            (i for i, (a, b) in enumerate(zip(mine, qemu)) if a != b), min(len(mine), len(qemu))
        )
        raise AssertionError(
            f"{what}: stdout differs at line {line}: "
            f"{mine[line : line + 1]} != {qemu[line : line + 1]} "
            f"({len(mine)} vs {len(qemu)} lines)"
        )


def same_bytes(a: Path, b: Path) -> bool:
    """Same size and same bytes, as qemu-img compare of two raw files sees them: it skips
    the holes of both (these files are 1 GiB and nearly all hole)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    return qemu_compare(a, b, "raw", "raw") == 0


@pytest.fixture
def amplified(tmp_path) -> Path:
    """A 0.4 MB file whose map has 262144 entries (32 L1 entries share one L2 table)."""
    image = tmp_path / "amp.qcow2"
    qemu_create(image, 16 << 30)
    patch_shared_l2(image, 32, alternating)
    assert image.stat().st_size < 1 << 20
    return image


@pytest.mark.parametrize("output", ["json", "human"])
def test_map_of_amplified_extents_streams(tmp_path, amplified, output):
    args = ["map", f"--output={output}", amplified.name]
    result, rss = run_limited(tmp_path, *args)
    assert_same_output(result, qemu_in(tmp_path, *args), args)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) >= 262144 // (3 if output == "human" else 1)
    assert rss < MAX_RSS_KIB, f"peak RSS {rss} KiB: extents are not streamed"


def test_convert_compare_measure_of_amplified_extents(tmp_path):
    """262144 extents (4k clusters, 512 L1 entries sharing one L2 table), 16 MiB of data."""
    image = tmp_path / "rare.qcow2"
    qemu_create(image, 1 << 30, options={"cluster_size": "4k"})
    patch_shared_l2(image, 512, rare_data)
    qemu_in(tmp_path, "convert", "-O", "raw", image.name, "theirs.raw").check_returncode()
    for args in (
        ["convert", "-O", "raw", image.name, "ours.raw"],
        ["compare", image.name, "theirs.raw"],
        ["measure", "--output=json", "-O", "qcow2", image.name],
    ):
        result, rss = run_limited(tmp_path, *args)
        assert_same_output(result, qemu_in(tmp_path, *args), args)
        assert rss < MAX_RSS_KIB, f"{args[0]}: peak RSS {rss} KiB"
    assert same_bytes(tmp_path / "ours.raw", tmp_path / "theirs.raw")


def test_convert_rebase_commit_of_zero_and_unallocated_runs(tmp_path):
    """Zero clusters and unallocated ones in turn (262144 extents: 32 L1 entries share
    one L2 table, a 0.3 MB file): convert, a safe rebase and commit hold a window of
    extents, not all of them (each took over 70 MiB here, and 650 MiB with 3.3M
    extents), and their results equal qemu-img's."""

    def zero_unallocated(index, data_start, cluster_size):
        return [[OFLAG_ZERO, 0][index % 2]]

    size = 16 << 30
    for name in ("zu.qcow2", "base.qcow2", "new.qcow2"):
        qemu_create(tmp_path / name, size)
    qemu_io(tmp_path / "new.qcow2", "write -P 0x6e 0 1M", "write -P 0x6f 9G 3M")
    qemu_in(
        tmp_path, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"
    ).check_returncode()
    for name in ("zu.qcow2", "top.qcow2"):
        patch_shared_l2(tmp_path / name, 32, zero_unallocated, data_clusters=0)
        qemu_in(tmp_path, "check", "-q", "-r", "all", name)  # the shared table's refcount
        assert qemu_in(tmp_path, "check", name).returncode == 0
    for name in ("top.qcow2", "base.qcow2"):  # each tool works on copies of its own
        for tool in ("ours", "theirs"):
            (tmp_path / f"{tool}-{name}").write_bytes((tmp_path / name).read_bytes())
    qemu_in(tmp_path, "convert", "-O", "qcow2", "zu.qcow2", "theirs.qcow2").check_returncode()

    def limited(*args) -> None:
        result, rss = run_limited(tmp_path, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert rss < WINDOW_RSS_KIB, f"{args[0]}: peak RSS {rss} KiB"

    limited("convert", "-O", "qcow2", "zu.qcow2", "ours.qcow2")
    assert qemu_compare(tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2") == 0
    for tool in ("ours", "theirs"):  # each top onto its own base copy
        qemu_in(
            tmp_path, "rebase", "-u", "-b", f"{tool}-base.qcow2", "-F", "qcow2", f"{tool}-top.qcow2"
        ).check_returncode()
    rebase = ("rebase", "-b", "new.qcow2", "-F", "qcow2")
    limited(*rebase, "ours-top.qcow2")
    qemu_in(tmp_path, *rebase, "theirs-top.qcow2").check_returncode()
    assert qemu_compare(tmp_path / "ours-top.qcow2", tmp_path / "theirs-top.qcow2") == 0
    for tool in ("ours", "theirs"):  # back onto the (still empty) bases, to commit
        qemu_in(
            tmp_path, "rebase", "-u", "-b", f"{tool}-base.qcow2", "-F", "qcow2", f"{tool}-top.qcow2"
        ).check_returncode()
    limited("commit", "ours-top.qcow2")
    qemu_in(tmp_path, "commit", "theirs-top.qcow2").check_returncode()
    assert qemu_compare(tmp_path / "ours-base.qcow2", tmp_path / "theirs-base.qcow2") == 0
    assert qemu_in(tmp_path, "check", "ours-base.qcow2").returncode == 0


def test_iter_extents_of_amplified_image(amplified):
    """The library face: iter_extents streams; extents() of a bounded range is a list."""
    with qcow2lib.open(str(amplified)) as dev:
        count = 0
        previous_end = 0
        for ext in dev.iter_extents():
            assert ext.offset == previous_end
            previous_end = ext.offset + ext.length
            count += 1
        assert previous_end == dev.size and count == 32 * 8192
        first = dev.extents(0, 3 << 16)
        assert [(e.is_data, e.is_zero, e.present) for e in first] == [
            (True, False, True),
            (False, True, True),
            (False, True, False),
        ]


def test_extended_l2_alternating_subclusters(tmp_path):
    image = tmp_path / "ext.qcow2"
    qemu_create(image, 8 << 30, options={"extended_l2": "on", "cluster_size": "64k"})
    patterns = [
        0x00000000FFFFFFFF,
        0xFFFFFFFF00000000,
        0,
        0x000055550000AAAA,
        0xAAAAAAAA55555555,
        0xFFFF00000000FFFF,
    ]

    def words(index, data_start, cluster_size):
        bitmap = patterns[index % len(patterns)]
        host = (data_start + index % 8 * cluster_size) | OFLAG_COPIED
        return [host if bitmap & 0xFFFFFFFF or index % 2 else 0, bitmap]

    patch_shared_l2(image, 8, words)
    for output in ("json", "human"):
        args = ["map", f"--output={output}", image.name]
        result, rss = run_limited(tmp_path, *args)
        assert_same_output(result, qemu_in(tmp_path, *args), args)
        assert result.returncode == 0 and rss < MAX_RSS_KIB


def test_runs_of_entries_match_qemu(tmp_path):
    """Random L2 tables with long runs (contiguous data, preallocated zero clusters, equal
    entries) broken at random places: the run detection merges exactly as qemu-img."""
    rng = random.Random(10)
    for trial in range(4):
        image = tmp_path / f"runs{trial}.qcow2"
        qemu_create(image, 4 << 30, options={"cluster_size": "4k"})
        table: list[int] = []
        kinds = ["data", "zero", "zero-host", "unallocated", "data-plain"]

        def words(index, data_start, cluster_size, table=table, kinds=kinds):
            while index >= len(table):
                kind = rng.choice(kinds)
                host = data_start + rng.randrange(256) * cluster_size
                for k in range(rng.choice([1, 2, 3, 7, 64, 200])):
                    room = 512 - (host - data_start) // cluster_size  # data clusters left
                    offset = host + k * cluster_size if k < room else data_start
                    table.append(
                        {
                            "data": offset | OFLAG_COPIED,
                            "data-plain": offset,
                            "zero": OFLAG_ZERO,
                            "zero-host": offset | OFLAG_ZERO,
                            "unallocated": 0,
                        }[kind]
                    )
            return [table[index]]

        patch_shared_l2(image, 3, words, data_clusters=512)
        for args in (
            ["map", "--output=json", image.name],
            ["map", image.name],
            ["map", "--output=json", "-s", "12345", "-l", "9999999", image.name],
        ):
            result, _ = run_limited(tmp_path, *args)
            assert_same_output(result, qemu_in(tmp_path, *args), (trial, args))


def test_map_error_part_way_prints_what_qemu_prints(tmp_path):
    """An unaligned data cluster in the middle of a run: the entries before it are
    printed, as qemu-img prints them, then the error (exit 1)."""
    image = tmp_path / "bad.qcow2"
    qemu_create(image, 1 << 30)

    def words(index, data_start, cluster_size):
        if index == 5:
            return [(data_start + 5 * cluster_size + 512) | OFLAG_COPIED]
        return [(data_start + index % 8 * cluster_size) | OFLAG_COPIED] if index < 8 else [0]

    patch_shared_l2(image, 1, words)
    for output in ("json", "human"):
        args = ["map", f"--output={output}", image.name]
        result, _ = run_limited(tmp_path, *args)
        theirs = qemu_in(tmp_path, *args)
        assert_same_output(result, theirs, args)
        assert result.returncode == 1
        # QEMU's notice of the damage (found read-only: reported, not marked), then EIO
        assert result.stderr == theirs.stderr
        assert result.stderr.startswith("qcow2: Image is corrupt: Cluster allocation offset ")
        assert result.stderr.endswith(
            "qemu-img: Could not read file metadata: Input/output error\n"
        )


@pytest.fixture
def sparse_extended(tmp_path) -> Path:
    """A valid image (512-byte clusters) whose file was extended sparsely to 64 GiB after
    creation: 128M clusters of file, a few dozen of them referenced."""
    image = tmp_path / "sparse.qcow2"
    qemu_create(image, 1 << 30, options={"cluster_size": "512"})
    qemu_io(image, "write -P 0x5a 0 1M", "write -z 4M 1M", "write -P 0x33 100M 64k")
    os.truncate(image, 64 << 30)
    return image


def test_sparse_host_file_costs_nothing(tmp_path, sparse_extended):
    """map, convert, compare and measure do work in proportion to the image's metadata,
    not to its file's size (the old refcount scan, one lookup per cluster of the file,
    took ~20 s of CPU here)."""
    name = sparse_extended.name
    qemu_in(tmp_path, "convert", "-O", "raw", name, "theirs.raw").check_returncode()
    for args in (
        ["map", "--output=json", name],
        ["map", name],
        ["compare", name, "theirs.raw"],
        ["measure", "--output=json", "-O", "qcow2", name],
        ["convert", "-O", "raw", name, "ours.raw"],
    ):
        result, _ = run_limited(tmp_path, *args, cpu=10)
        if args[0] != "convert":
            assert_same_output(result, qemu_in(tmp_path, *args), args)
        assert result.returncode == 0, (args, result.stderr)
    assert same_bytes(tmp_path / "ours.raw", tmp_path / "theirs.raw")
    with qcow2lib.open(str(sparse_extended)) as dev:
        data = [(e.offset, e.length) for e in dev.extents(0, 8 << 20) if e.is_data]
        assert data[0][0] == 0 and sum(length for _, length in data) == 1 << 20
        assert data[-1][0] + data[-1][1] == 1 << 20


def test_read_of_unallocated_image_is_zeros(tmp_path):
    image = tmp_path / "empty.qcow2"
    qemu_create(image, 256 << 20)
    with qcow2lib.open(str(image)) as dev:
        data = dev.read(0, dev.size)
        assert len(data) == 256 << 20 and not any(data[::4096]) and data.count(0) == len(data)
    assert json.loads(qemu_img("map", "--output=json", image).stdout)[0]["data"] is False
