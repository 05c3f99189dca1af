"""Internal snapshots at scale (issues 10 and 13): many snapshots sharing their tables cost
bounded memory and one walk of each distinct table; snapshot operations keep the file
within a small constant of what qemu-img leaves; the snapshot table is parsed once.

Images with many snapshots are made at test time from one qemu-img snapshot whose table
entry is repeated (distinct IDs and names, one L1 table shared by all), refcounts then
fixed by `qemu-img check -r all`: qemu-img itself accepts them.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import snapshot_table
from qcow2lib import snapshots as snaps
from qemutools import assert_clean, qemu_img, qemu_io, bytes_without_dates, run_qimg
from shared import build_once

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 1 << 30  # address space of the subprocess
MAXRSS_LIMIT_KIB = 256 * 1024  # the target: under 256 MiB resident
HEADER_NB_SNAPSHOTS = 60  # nb_snapshots (4 bytes), then snapshots_offset (8)
HEADER_INCOMPATIBLE = 72


def repeat_snapshot(path: Path, count: int, repair: bool = True, verify: bool = True) -> None:
    """Replace the image's single snapshot table entry by `count` copies of it (IDs 1..count,
    names s1..scount), all on the same L1 table; the table goes to the end of the file.
    With `repair`, qimg's check -r all then fixes the refcounts (qemu-img's takes about
    twenty times as long on 65536 snapshots), and with `verify` qemu-img check confirms
    the result."""
    with open(path, "r+b") as f:
        header = f.read(104)
        nb_snapshots, table_offset = struct.unpack_from(">IQ", header, HEADER_NB_SNAPSHOTS)
        assert nb_snapshots == 1
        cluster_size = 1 << struct.unpack_from(">I", header, 20)[0]
        f.seek(table_offset)
        entry = f.read(1024)
        fields = list(struct.unpack_from(">QIHHIIQII", entry, 0))
        extra = entry[40 : 40 + fields[8]]
        table = bytearray()
        for number in range(1, count + 1):
            ident, name = str(number).encode(), f"s{number}".encode()
            fields[2:4] = len(ident), len(name)
            table += bytes(-len(table) % 8)
            table += struct.pack(">QIHHIIQII", *fields) + extra + ident + name
        end = -(-f.seek(0, 2) // cluster_size) * cluster_size
        f.seek(end)
        f.write(table + bytes(-len(table) % cluster_size))
        f.seek(HEADER_NB_SNAPSHOTS)
        f.write(struct.pack(">IQ", count, end))
    if repair:
        repaired = run_qimg("check", "-q", "-r", "all", path)
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        if verify:
            assert_clean(path)


def make_many_snapshots(path: Path, count: int, size: str = "64T", refcount_bits: int = 16) -> None:
    """An image whose `count` snapshots share one L1 table and the L2 tables under it; the
    active image has moved on since (data written after). At 64 TiB the L1 table is 1 MiB,
    so holding every snapshot's copy of it would take 1 GiB, four times the memory bound the
    tests set; a larger image would only make QEMU's compare and check of it slower."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={refcount_bits}", path, size)
    qemu_io(path, "write -P 0x11 0 1M", "write -c -P 0x12 2M 64k", "write -P 0x13 100M 256k")
    qemu_img("snapshot", "-c", "base", path)
    qemu_io(path, "write -P 0x21 64k 128k", "write -P 0x22 3M 64k")
    repeat_snapshot(path, count)
    listing = qemu_img("snapshot", "-l", path).stdout.splitlines()
    assert len(listing) == count + 2


@pytest.fixture(scope="module")
def many_snapshots(tmp_path_factory) -> Path:
    """An image with 1000 snapshots, made once for the run; the tests work on copies."""
    directory = build_once(
        tmp_path_factory,
        "many-snapshots",
        lambda here: make_many_snapshots(here / "many.qcow2", 1000),
    )
    return directory / "many.qcow2"


_RUNNER = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tools"]
import qimg
try:
    code = qimg.main(sys.argv[4:], prog="qemu-img")
finally:  # (ru_maxrss would include the parent's: Linux keeps it across fork and exec)
    with open("/proc/self/status") as status, open(sys.argv[3], "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
sys.exit(code)
"""


def bounded_qimg(tmp_path: Path, *args) -> tuple[subprocess.CompletedProcess, int]:
    """qimg in a subprocess limited to 1 GiB of address space: its result and peak resident
    memory (KiB, VmHWM)."""
    rss_file = tmp_path / "maxrss"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUNNER,
            str(MEMORY_LIMIT),
            str(ROOT),
            str(rss_file),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
    )
    assert "MemoryError" not in result.stderr, result.stderr[-2000:]
    return result, int(rss_file.read_text())


_DATE_AND_CLOCK = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+\d+:\d\d:\d\d\.\d+")


def without_dates(listing: str) -> list[str]:
    """`snapshot -l` lines with the date and VM clock columns dropped (a snapshot made by
    each tool has its own), columns joined by one space."""
    return [" ".join(_DATE_AND_CLOCK.sub("", line).split()) for line in listing.splitlines()]


def twins(source: Path, tmp_path: Path) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    shutil.copyfile(source, ours)
    shutil.copyfile(source, theirs)
    return ours, theirs


def assert_same_images(ours: Path, theirs: Path, tmp_path: Path) -> None:
    """Clean, same snapshots (dates aside), same guest content as qemu-img's twin."""
    assert_clean(ours)
    assert without_dates(qemu_img("snapshot", "-l", ours).stdout) == without_dates(
        qemu_img("snapshot", "-l", theirs).stdout
    )
    assert qemu_img("compare", "-q", ours, theirs, check=False).returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ("snapshot", "-l"),
        ("snapshot", "-c", "x"),
        ("snapshot", "-a", "s500"),
        ("snapshot", "-d", "s7"),
        ("snapshot", "-a", "base-not-there"),
    ],
    ids=["list", "create", "apply", "delete", "apply-missing"],
)
def test_thousand_snapshots_bounded_memory_like_qemu(many_snapshots, tmp_path, args):
    ours, theirs = twins(many_snapshots, tmp_path)
    result, maxrss = bounded_qimg(tmp_path, *args, ours)
    expected = qemu_img(*args, theirs, check=False)
    assert maxrss < MAXRSS_LIMIT_KIB, f"{args}: peak RSS {maxrss} KiB"
    assert result.returncode == expected.returncode, result.stderr
    assert without_dates(result.stdout) == without_dates(expected.stdout)
    assert result.stderr == expected.stderr
    assert_same_images(ours, theirs, tmp_path)


@pytest.mark.parametrize("repair", [None, "leaks", "all"])
@pytest.mark.parametrize("damage", ["clean", "leaked", "bad-entries"])
def test_thousand_snapshots_check_like_qemu(many_snapshots, tmp_path, repair, damage):
    """check walks an L1 table shared by 1000 snapshots once, with QEMU's report: clean,
    with one snapshot dropped from the table (each shared cluster leaks once), and with bad
    entries in the snapshots' shared L2 table (reported once per snapshot)."""
    source = tmp_path / "source.qcow2"
    shutil.copyfile(many_snapshots, source)
    if damage != "clean":
        with open(source, "r+b") as f:
            header = f.read(104)
            l1_offset = struct.unpack_from(">Q", header, 40)[0]
            nb_snapshots, table_offset = struct.unpack_from(">IQ", header, 60)
            f.seek(table_offset)
            snapshot_l1 = struct.unpack(">Q", f.read(8))[0]
            f.seek(snapshot_l1)
            l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
            if damage == "leaked":  # one snapshot fewer in the table: every shared count leaks
                f.seek(HEADER_NB_SNAPSHOTS)
                f.write(struct.pack(">I", nb_snapshots - 1))
            else:  # reserved bit in one entry, a data cluster past the end in another
                f.seek(l2_offset + 8)
                value = struct.unpack(">Q", f.read(8))[0]
                f.seek(l2_offset + 8)
                f.write(struct.pack(">Q", value | 2))
                f.seek(l2_offset + 8 * 1000)
                f.write(struct.pack(">Q", (1 << 63) | (0x7F << 30)))
            assert l1_offset
    ours, theirs = twins(source, tmp_path)
    args = ["check"] + (["-r", repair] if repair else [])
    result, maxrss = bounded_qimg(tmp_path, *args, ours)
    expected = qemu_img(*args, theirs, check=False)
    assert maxrss < MAXRSS_LIMIT_KIB, f"{args}: peak RSS {maxrss} KiB"
    assert (result.returncode, result.stdout, result.stderr) == (
        expected.returncode,
        expected.stdout,
        expected.stderr,
    )
    if damage == "bad-entries":
        assert result.stderr.count("ERROR found l2 entry with reserved bits set") == 1000
    assert ours.read_bytes() == theirs.read_bytes()


def test_thousand_snapshots_overflowing_8bit_refcounts_check_like_qemu(tmp_path):
    """300 snapshots on 8-bit refcounts: counts overflow; the shared walk is redone
    snapshot by snapshot so the overflow lines come where qemu-img prints them."""
    source = tmp_path / "source.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=8", source, "1G")
    qemu_io(source, "write -P 0x11 0 256k")
    qemu_img("snapshot", "-c", "base", source)
    repeat_snapshot(source, 300, repair=False)  # (no repair could make it clean)
    ours, theirs = twins(source, tmp_path)
    for args in (["check"], ["check", "-r", "all"]):
        result, _ = bounded_qimg(tmp_path, *args, ours)
        expected = qemu_img(*args, theirs, check=False)
        assert "overflow" in expected.stderr
        assert (result.returncode, result.stdout, result.stderr) == (
            expected.returncode,
            expected.stdout,
            expected.stderr,
        )
        assert ours.read_bytes() == theirs.read_bytes()


def own_l1_copies(path: Path, count: int) -> None:
    """Repeat the image's single snapshot `count` times (as repeat_snapshot), each copy on
    an L1 table of its own (a copy of the snapshot's, appended to the file): distinct L1
    tables sharing every L2 table, as snapshots taken one after another share them."""
    repeat_snapshot(path, count, repair=False)
    with open(path, "r+b") as f:
        header = f.read(104)
        cluster_size = 1 << struct.unpack_from(">I", header, 20)[0]
        table_offset = struct.unpack_from(">Q", header, HEADER_NB_SNAPSHOTS + 4)[0]
        f.seek(table_offset)
        table = bytearray(f.read(count * 1024))
        l1_offset, l1_size = struct.unpack_from(">QI", table, 0)
        f.seek(l1_offset)
        l1_table = f.read(l1_size * 8).ljust(cluster_size, b"\0")
        end = -(-f.seek(0, 2) // cluster_size) * cluster_size
        position = 0
        for number in range(count):
            struct.pack_into(">Q", table, position, end + number * cluster_size)
            extra_size, id_size, name_size = (
                struct.unpack_from(">I", table, position + 36)[0],
                *struct.unpack_from(">HH", table, position + 12),
            )
            position += 40 + extra_size + id_size + name_size
            position += -position % 8
        f.seek(end)
        f.write(l1_table * count)
        f.seek(table_offset)
        f.write(table[:position])


@pytest.mark.parametrize("refcount_bits", [8, 16])
def test_snapshots_sharing_l2_tables_check_like_qemu(tmp_path, refcount_bits):
    """300 snapshots, each on its own L1 table, all sharing the L2 tables: check counts
    each shared table once per distinct run of clusters, with QEMU's verdict whether the
    counts fit (16 bits: leaks of the copied tables only) or overflow (8 bits: the walk is
    redone in QEMU's order for the overflow lines)."""
    source = tmp_path / "source.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"refcount_bits={refcount_bits}", source, "1G")
    qemu_io(source, "write -P 0x11 0 256k", "write -P 0x12 600M 128k", "write -P 0x13 1M 64k")
    qemu_img("snapshot", "-c", "base", source)
    qemu_io(source, "write -P 0x21 64k 64k")
    own_l1_copies(source, 300)
    ours, theirs = twins(source, tmp_path)
    for args in (["check"], ["check", "--output=json"], ["check", "-r", "all"]):
        result, maxrss = bounded_qimg(tmp_path, *args, ours)
        expected = qemu_img(*args, theirs, check=False)
        assert ("overflow" in expected.stderr) == (refcount_bits == 8)
        assert maxrss < MAXRSS_LIMIT_KIB, f"{args}: peak RSS {maxrss} KiB"
        assert (
            result.returncode,
            result.stdout.replace(str(ours), str(theirs)),
            result.stderr,
        ) == (
            expected.returncode,
            expected.stdout,
            expected.stderr,
        )
        assert ours.read_bytes() == theirs.read_bytes()


def test_dirty_lazy_refcounts_with_thousand_snapshots_opens_bounded(many_snapshots, tmp_path):
    """Opening a dirty lazy-refcounts image for writing rebuilds its refcounts: each
    shared table is counted once, with its multiplicity."""
    source = tmp_path / "source.qcow2"
    shutil.copyfile(many_snapshots, source)
    qemu_img("amend", "-o", "lazy_refcounts=on", source)
    with open(source, "r+b") as f:
        f.seek(HEADER_INCOMPATIBLE)
        features = struct.unpack(">Q", f.read(8))[0]
        f.seek(HEADER_INCOMPATIBLE)
        f.write(struct.pack(">Q", features | 1))  # dirty
    ours, theirs = twins(source, tmp_path)
    result, maxrss = bounded_qimg(tmp_path, "snapshot", "-c", "after", ours)
    assert result.returncode == 0, result.stderr
    assert maxrss < MAXRSS_LIMIT_KIB, f"peak RSS {maxrss} KiB"
    qemu_img("snapshot", "-c", "after", theirs)
    assert_same_images(ours, theirs, tmp_path)


# --- disk space ---------------------------------------------------------------------------


def test_create_apply_delete_rounds_leave_qemu_img_s_bytes(tmp_path):
    """40 rounds of create / (apply) / delete: the file is byte for byte what qemu-img
    leaves doing the same (but the snapshots' dates); it used to grow by a refcount
    structure a round."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", ours, "64M")
    qemu_io(ours, "write -P 0x31 0 2M", "write -c -P 0x32 8M 64k")
    shutil.copyfile(ours, theirs)
    for round_number in range(40):
        steps = [("-c", "x")] + ([("-a", "x")] if round_number % 2 else []) + [("-d", "x")]
        if round_number % 5 == 0:  # one that stays a while, deleted later
            steps.insert(0, ("-c", f"keep{round_number}"))
        if round_number % 5 == 3:
            steps.append(("-d", f"keep{round_number - 3}"))
        for action, name in steps:
            with qcow2lib.open(str(ours), "r+") as img:
                {
                    # (icount 0: what qemu-img snapshot -c writes)
                    "-c": lambda img, name: snaps.create_snapshot(img, name, icount=0),
                    "-a": snaps.apply_snapshot,
                    "-d": snaps.delete_snapshot,
                }[action](img, name)
            qemu_img("snapshot", action, name, theirs)
            same = bytes_without_dates(ours) == bytes_without_dates(theirs)
            assert same, (round_number, action, name)
    assert_clean(ours)


# --- the snapshot table, parsed once ------------------------------------------------------


def test_65536_snapshots_table_parsed_once(tmp_path, monkeypatch):
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=32", path, "64M")
    qemu_io(path, "write -P 0x51 0 64k")
    qemu_img("snapshot", "-c", "base", path)
    repeat_snapshot(path, 65536, verify=False)  # the qemu-img check at the end covers it
    parses = []
    real_parse = snapshot_table.read_snapshot_table

    def counting_parse(*args, **kwargs):
        parses.append(args[2])
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(snapshot_table, "read_snapshot_table", counting_parse)
    with qcow2lib.open(str(path), "r+") as img:
        assert len(snaps.list_snapshots(img)) == 65536
        for number in range(1, 65537, 997):
            assert snaps.find_snapshot(img, f"s{number}").id == str(number)
            assert snaps.find_snapshot(img, id=str(number)).name == f"s{number}"
        with snaps.SnapshotView(img, "s65536") as view:
            assert view.read(0, 4) == b"\x51" * 4
        snaps.delete_snapshot(img, "s3")
        snaps.apply_snapshot(img, "s65536")
        assert len(snaps.list_snapshots(img)) == 65535
        assert snaps.find_snapshot(img, "s3") is None
    assert parses == [65536]
    assert_clean(path)


# --- the refcount table grows inside a commit -----------------------------------------------


@pytest.mark.parametrize("data", [True, False], ids=["with data", "empty"])
def test_a_new_snapshot_table_is_named_by_the_commits_last_header_write(tmp_path, data):
    """Snapshot creation writes its table with the last commit of the shared counts: the
    header write that switches back from the shadow state (or, with no table to copy, the
    one after the in-place writes) names the table too. So a creation syncs five times
    (the L1 copy, the shadow, its header, the state in place, the last header), or three
    without a shadow, not two more for a table commit of its own. Each header write is
    one sector; the result is qemu-img's image."""
    from test_snapshots import _Recorder

    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    if data:
        qemu_io(path, "write -P 0x61 0 1M", "write -P 0x62 40M 64k")
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(path, twin)
    with qcow2lib.open(str(path), "r+") as img:
        img.load_tables()
        recorder = _Recorder(img.file)
        snaps.create_snapshot(img, "second", icount=0)
        recorder.stop()
        table = (img.header.nb_snapshots, img.header.snapshots_offset)
    ops = recorder.ops
    header_writes = [index for index, op in enumerate(ops) if op[0] == "w" and op[1] == 0]
    assert len(header_writes) == (2 if data else 1)
    assert all(len(ops[index][2]) <= 512 for index in header_writes)
    last = header_writes[-1]
    assert struct.unpack(">IQ", ops[last][2][60:72]) == table == (1, table[1])
    assert ops[last - 1] == ops[last + 1] == ("f",)
    table_write = next(i for i, op in enumerate(ops) if op[0] == "w" and op[1] == table[1])
    assert table_write < last
    syncs = [i for i, op in enumerate(ops) if op == ("f",) and i and ops[i - 1] != ("f",)]
    assert len(syncs) == (5 if data else 3), ops
    qemu_img("snapshot", "-c", "second", twin)
    assert_same_images(path, twin, tmp_path)
    assert_clean(path)


def test_refcount_table_grows_inside_a_crash_safe_commit(tmp_path):
    """512-byte clusters with 64-bit refcounts: a refcount table cluster reaches 4096
    clusters, and a snapshot of 1950 KiB of data has its shadow state (shadow.py) copy ~60
    L2 tables past that reach, so the shadow state needs a larger table than the image
    keeps. A crash at any write (every prefix, and a sample of the reorderings within a
    flush epoch) leaves the old state, the shadow or the new one, never harm."""
    import random

    from test_snapshots import _apply_ops, _Recorder, harmful_check_findings

    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", path, "8M")
    qemu_io(path, "write -P 0x61 0 1950k")
    twin = tmp_path / "twin.qcow2"
    shutil.copyfile(path, twin)
    base = path.read_bytes()
    with qcow2lib.open(str(path), "r+") as img:
        table_clusters = img.header.refcount_table_clusters
        before = img.read(0, 2 << 20)
        recorder = _Recorder(img.file)
        snaps.create_snapshot(img, "a", icount=0)  # (what qemu-img snapshot -c writes)
        recorder.stop()
        assert img.header.refcount_table_clusters == table_clusters  # (as QEMU leaves it)
    header_writes = [op[2] for op in recorder.ops if op[0] == "w" and op[1] == 0]
    assert any(int.from_bytes(header[56:60], "big") > table_clusters for header in header_writes)
    qemu_img("snapshot", "-c", "a", twin)
    assert_same_images(path, twin, tmp_path)
    states = recorder.crash_states()
    assert len(states) > 100
    prefixes = [state for state in states if not state[0].startswith("write ")]
    sample = random.Random(13).sample(states, min(len(states), 120))
    crashed = tmp_path / "crashed.qcow2"
    for description, ops in prefixes + sample:
        crashed.write_bytes(_apply_ops(base, ops))
        assert not harmful_check_findings(crashed, 9), description
        with qcow2lib.open(str(crashed)) as img:
            assert img.read(0, 2 << 20) == before, description
            assert [s.name for s in snaps.list_snapshots(img)] in ([], ["a"]), description


# --- the room a commit needs, measured before it is written ----------------------------------


@pytest.mark.parametrize(
    "options", ["cluster_size=512,refcount_bits=64", "cluster_size=4096,refcount_bits=4", ""]
)
def test_shadow_bytes_bounds_what_a_commit_writes_past_the_end(tmp_path, monkeypatch, options):
    """shadow.shadow_bytes, which lets a deletion go ahead on a file system too full for
    room_needed's bound, is a bound itself: every commit of snapshot operations on tables
    shared, diverged and given back writes at most that much past the end of the file,
    and nothing where it says so (a deletion of clusters the snapshot holds alone)."""
    from qcow2lib import shadow

    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", options] if options else []), path, "64M")
    qemu_io(path, "write -P 1 0 1950k", "write -P 2 20M 300k", "write -P 3 63M 1M")
    measured: list[tuple[int, int]] = []  # (bound, bytes written past the end)
    write_shadow, commit = shadow._write_shadow, snaps.commit_in_place

    def measuring_commit(image, active_l1, inactive_l1s, freed, header_fields=None):
        bound, start, reached = shadow.shadow_bytes(image, active_l1), image.file.size(), []

        def measuring_write(image, dirty_l2):
            written = write_shadow(image, dirty_l2)
            reached.append(image.file.size() - start)
            return written

        monkeypatch.setattr(shadow, "_write_shadow", measuring_write)
        commit(image, active_l1, inactive_l1s, freed, header_fields)
        measured.append((bound, max(reached, default=0)))

    monkeypatch.setattr(snaps, "commit_in_place", measuring_commit)
    with qcow2lib.open(str(path), "r+") as img:
        snaps.create_snapshot(img, "shared", icount=0)
        snaps.create_snapshot(img, "alone", icount=0)
        img.write(20 << 20, b"\x04" * (300 << 10))  # ("alone" keeps these clusters alone)
        img.write(63 << 20, b"\x05" * (1 << 20))
        snaps.apply_snapshot(img, "shared")
        snaps.delete_snapshot(img, "alone")
        snaps.delete_snapshot(img, "shared")
    assert len(measured) >= 5
    assert all(written <= bound for bound, written in measured), measured
    assert any(written > 0 for _, written in measured), measured
    assert (0, 0) in measured, measured
    assert_clean(path)
