"""Snapshot operations lay images out as qemu-img does, and fail as it does.

QEMU's iotests poke snapshot tables and L2 tables at the offsets QEMU's layout gives
them (080, 261, 271) and count the clusters its failures leak (112, 217): qimg's create,
apply and delete must leave the same bytes (only the snapshots' dates differ) and fail
the same way. Shrinking an image whose refcount table names broken refcount blocks
(060) fails as QEMU's does too.
"""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import pytest

from qemutools import QEMU_IMG, assert_same_result, qemu_io, bytes_without_dates, run
from qemutools import run_qimg_in as run_qimg

MiB = 1 << 20


def run_qemu(directory: Path, *args):
    return run([QEMU_IMG, *map(str, args)], check=False, cwd=directory)


def both(ours: Path, theirs: Path, *args) -> None:
    """One command run by qimg in `ours` and qemu-img in `theirs`: the same result."""
    assert_same_result(run_qimg(ours, *args), run_qemu(theirs, *args), args)


def twins(tmp_path: Path, *create_args) -> tuple[Path, Path]:
    ours, theirs = tmp_path / "qimg", tmp_path / "qemu"
    ours.mkdir()
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", *create_args], cwd=ours)
    shutil.copytree(ours, theirs)
    return ours, theirs


@pytest.mark.parametrize(
    "options, seed",
    [
        ("", 1),
        ("", 2),
        ("compat=0.10", 3),
        ("extended_l2=on", 4),
        ("cluster_size=4096", 5),
        ("refcount_bits=4", 6),
        ("cluster_size=512", 7),
        ("lazy_refcounts=on", 8),
        ("refcount_bits=64", 9),
        ("", 10),  # (compressed clusters too)
    ],
)
def test_snapshot_operations_leave_qemu_img_s_bytes(tmp_path, options, seed):
    """Tables whose entries all name aligned clusters are counted a run at a time, the
    others (compressed, zero without a cluster) entry by entry: both as QEMU counts."""
    rng = random.Random(seed)
    size = rng.choice([64, 200]) * MiB
    create = ["-o", options] if options else []
    ours, theirs = twins(tmp_path, *create, "t.qcow2", str(size))
    names: list[str] = []
    for step in range(14):
        if rng.random() < 0.45 or not names and step % 2:
            commands = []
            for _ in range(rng.randint(1, 4)):
                offset = rng.randrange(size // 4096) * 4096
                length = min(rng.choice([512, 4096, 65536, MiB]), size - offset)
                kind = rng.choice(["write -P 7", "write -P 9", "write -z", "discard"])
                if seed == 10 and rng.random() < 0.3:
                    offset, length, kind = offset & ~0xFFFF, 65536, "write -c -P 5"
                commands.append(f"{kind} {offset} {length}")
            for directory in (ours, theirs):
                qemu_io(directory / "t.qcow2", *commands)
            continue
        action = rng.choice(["-c", "-c", "-a", "-d"]) if names else "-c"
        if action == "-c":
            name = f"s{step}"
            names.append(name)
        else:
            name = rng.choice(names)
            if action == "-d":
                names.remove(name)
        both(ours, theirs, "snapshot", action, name, "t.qcow2")
        assert bytes_without_dates(ours / "t.qcow2") == bytes_without_dates(theirs / "t.qcow2"), (
            f"after snapshot {action} {name}"
        )
    both(ours, theirs, "check", "t.qcow2")


def test_a_refcount_overflow_leaks_the_snapshot_l1_copy_as_qemu_img(tmp_path):
    """iotest 112: snapshot -c of an image with 1-bit refcounts fails with EINVAL after
    the L1 table's copy was allocated; check finds that cluster leaked."""
    ours, theirs = twins(tmp_path, "-o", "refcount_bits=1", "t.qcow2", "64M")
    for directory in (ours, theirs):
        qemu_io(directory / "t.qcow2", "write 0 512")
    both(ours, theirs, "snapshot", "-c", "foo", "t.qcow2")
    both(ours, theirs, "check", "t.qcow2")
    assert bytes_without_dates(ours / "t.qcow2") == bytes_without_dates(theirs / "t.qcow2")


def test_an_io_error_while_deleting_a_snapshot_leaks_as_with_qemu_img(tmp_path):
    """iotest 217: blkdebug fails every request after the first cluster_free event of
    snapshot -d; the snapshot is gone, its clusters leak, and check -r leaks repairs
    them and the COPIED flags as qemu-img does."""
    ours, theirs = twins(tmp_path, "t.qcow2", "64M")
    for directory in (ours, theirs):
        qemu_io(directory / "t.qcow2", "write 0 64k")
        run([QEMU_IMG, "snapshot", "-c", "foo", "t.qcow2"], cwd=directory)
        (directory / "blkdebug.conf").write_text(
            '[inject-error]\nevent = "cluster_free"\nerrno = "5"\n'
        )
    both(ours, theirs, "snapshot", "-d", "foo", "blkdebug:blkdebug.conf:t.qcow2")
    both(ours, theirs, "check", "t.qcow2")
    both(ours, theirs, "check", "-r", "leaks", "t.qcow2")


@pytest.mark.parametrize(
    "field, value",
    [("l1_table_offset", b"\x00\x00\x00\x00\x00\x40\x02\x00"), ("l1_size", b"\x10\x00\x00\x00")],
)
def test_a_broken_snapshot_l1_table_is_refused_where_used_as_by_qemu_img(tmp_path, field, value):
    """iotest 080: the table is read without judging the snapshot's L1 table; convert -l,
    amend (zero cluster expansion), snapshot -a and -d refuse it in QEMU's words."""
    ours, theirs = twins(tmp_path, "t.qcow2", "64M")
    for directory in (ours, theirs):
        qemu_io(directory / "t.qcow2", "write 0 512")
        run([QEMU_IMG, "snapshot", "-c", "test", "t.qcow2"], cwd=directory)
        with open(directory / "t.qcow2", "r+b") as file:
            file.seek(0x70000 + (0 if field == "l1_table_offset" else 8))
            file.write(value)
    both(ours, theirs, "convert", "-l", "test", "t.qcow2", "t.snap")
    both(ours, theirs, "amend", "-o", "compat=0.10", "t.qcow2")
    both(ours, theirs, "snapshot", "-a", "test", "t.qcow2")
    both(ours, theirs, "snapshot", "-d", "test", "t.qcow2")
    both(ours, theirs, "check", "t.qcow2")


def _poke_reftable(path: Path, entries: dict[int, int]) -> None:
    with open(path, "r+b") as file:
        header = file.read(72)
        (table,) = struct.unpack(">Q", header[48:56])
        for index, value in entries.items():
            file.seek(table + 8 * index)
            file.write(struct.pack(">Q", value))


@pytest.mark.parametrize(
    "options, entries",
    [
        ("", {1: 0x00FFFFFF00000000}),  # far past the end of the file
        ("refcount_bits=1", {1: 0x1000000000}),  # no block counts where it lies
    ],
)
def test_shrinking_past_broken_refcount_blocks_fails_as_qemu_img(tmp_path, options, entries):
    """iotest 060: resize --shrink meets refcount table entries naming refcount blocks
    QEMU cannot discard: the image is marked corrupt and the resize fails, having already
    written the refcount table without them; check -r all then finds nothing to repair
    (and clears the corrupt bit), and the shrink succeeds."""
    create = ["-o", options] if options else []
    ours, theirs = twins(tmp_path, *create, "t.qcow2", "64M")
    for directory in (ours, theirs):
        _poke_reftable(directory / "t.qcow2", entries)
    both(ours, theirs, "resize", "--shrink", "t.qcow2", "32M")
    both(ours, theirs, "check", "-r", "all", "t.qcow2")
    both(ours, theirs, "resize", "--shrink", "t.qcow2", "32M")
    both(ours, theirs, "info", "t.qcow2")


def test_shrinking_past_an_unaligned_refcount_block_fails_as_qemu_img(tmp_path):
    """iotest 060: the same with an unaligned block in the table: the resize fails before
    writing anything, and check -r all rebuilds the refcount structure."""
    ours, theirs = twins(tmp_path, "-o", "refcount_bits=1", "t.qcow2", "64M")
    for directory in (ours, theirs):
        _poke_reftable(directory / "t.qcow2", {1: 0x1000000000, 2: 0x200})
    both(ours, theirs, "resize", "--shrink", "t.qcow2", "32M")
    for args in (("-q", "-r", "all"), ("-r", "all")):
        mine, real = (
            run_qimg(ours, "check", *args, "t.qcow2"),
            run_qemu(theirs, "check", *args, "t.qcow2"),
        )
        # (where the rebuilt refcount structure goes, and so where the file ends, differs)
        for result in (mine, real):
            result.stdout = "".join(
                line for line in result.stdout.splitlines(True) if "Image end offset" not in line
            )
        assert_same_result(mine, real, args)


@pytest.mark.parametrize("options", ["", "cluster_size=4096,refcount_bits=8"])
def test_passes_cut_into_spans_leave_sound_states_and_qemu_img_s_bytes(
    tmp_path, monkeypatch, options
):
    """A pass over a large tree is committed span by span of L1 entries (bounded memory):
    every state between two spans passes qemu-img check (leaks allowed), and the end is
    still qemu-img's bytes."""
    from qcow2lib import shadow, snapshots

    monkeypatch.setattr(snapshots, "SPAN_L1_ENTRIES", 1)
    size = 2048 * MiB if not options else 64 * MiB  # 4 L1 entries / 32 with 4 KiB clusters
    create = ["-o", options] if options else []
    ours, theirs = twins(tmp_path, *create, "t.qcow2", str(size))
    span = size // (4 if not options else 32)
    commands = [f"write -P {n + 1} {n * span + n * 4096} 64k" for n in range(0, size // span, 3)]
    for directory in (ours, theirs):
        qemu_io(directory / "t.qcow2", *commands)
    states: list[str] = []
    real_commit = shadow.commit_in_place

    def checked_commit(image, *args):
        real_commit(image, *args)
        image.file.flush()
        result = run([QEMU_IMG, "check", "-U", str(ours / "t.qcow2")], check=False)
        states.append(result.stdout)
        assert result.returncode in (0, 3), result.stdout + result.stderr

    monkeypatch.setattr(snapshots, "commit_in_place", checked_commit)
    for action, name in (("-c", "a"), ("-c", "b"), ("-a", "a"), ("-d", "b"), ("-d", "a")):
        both(ours, theirs, "snapshot", action, name, "t.qcow2")
        assert bytes_without_dates(ours / "t.qcow2") == bytes_without_dates(theirs / "t.qcow2"), (
            action,
            name,
        )
    assert len(states) > 10
    both(ours, theirs, "check", "t.qcow2")


def _l2_entry_offset(path: Path, l1_index: int, l2_index: int) -> int:
    """Where the active tree's entry l2_index of the L2 table at l1_index lies."""
    data = path.read_bytes()
    (l1_offset,) = struct.unpack(">Q", data[40:48])
    (l1_entry,) = struct.unpack(">Q", data[l1_offset + 8 * l1_index : l1_offset + 8 * l1_index + 8])
    return (l1_entry & 0x00FFFFFFFFFFFE00) + 8 * l2_index


def _poke_refcount(path: Path, cluster: int, count: int) -> None:
    """Set a cluster's 16-bit refcount (4 KiB clusters: 2048 counts a block)."""
    data = path.read_bytes()
    (table,) = struct.unpack(">Q", data[48:56])
    (block,) = struct.unpack(">Q", data[table + 8 * (cluster // 2048) :][:8])
    with open(path, "r+b") as file:
        file.seek(block + 2 * (cluster % 2048))
        file.write(struct.pack(">H", count))


def _spy_on_shortcuts(monkeypatch) -> list[tuple[str, int]]:
    """What each snapshot step's shortcut check decides: ("taken" or "refused", the
    number of tables it left out of a pass)."""
    from qcow2lib import snapshots

    outcomes: list[tuple[str, int]] = []
    real_check = snapshots._check_kept

    def spied_check(image, counts, kept_tables, *args, **kwargs):
        try:
            real_check(image, counts, kept_tables, *args, **kwargs)
        except snapshots._NoShortcut:
            outcomes.append(("refused", len(kept_tables)))
            raise
        outcomes.append(("taken", len(kept_tables)))

    monkeypatch.setattr(snapshots, "_check_kept", spied_check)
    return outcomes


def _cluster_of(path: Path, entry_offset: int) -> int:
    """The 4 KiB cluster an L2 entry names."""
    (entry,) = struct.unpack(">Q", path.read_bytes()[entry_offset : entry_offset + 8])
    return (entry & 0x00FFFFFFFFFFFE00) >> 12


def _eight_tables(tmp_path: Path, refcount_bits: int = 16, compressed: bool = False):
    """Twin images of 16 MiB in 4 KiB clusters (each L2 table maps 2 MiB: 8 of them),
    data in every table, snapshot s1 taken."""
    options = f"cluster_size=4096,refcount_bits={refcount_bits}"
    ours, theirs = twins(tmp_path, "-o", options, "t.qcow2", "16M")
    commands = [f"write -P {n + 1} {n * 2 * MiB} 256k" for n in range(8)]
    if compressed:
        commands.append(f"write -c -P 9 {4 * MiB + 512 * 1024} 4k")
    for directory in (ours, theirs):
        qemu_io(directory / "t.qcow2", *commands)
    both(ours, theirs, "snapshot", "-c", "s1", "t.qcow2")
    return ours, theirs


@pytest.mark.parametrize(
    "case, outcome",
    [
        ("nothing written since", "taken"),
        ("two tables written since", "taken"),
        ("compressed cluster in a shared table", "refused"),
        ("counts at the maximum", "refused"),
        ("a count at zero", "refused"),
        ("a shared table's cluster named again", "refused"),
    ],
)
def test_reverting_skips_shared_tables_only_where_that_ends_as_qemu_img(
    tmp_path, monkeypatch, case, outcome
):
    """snapshot -a leaves the L2 tables both trees share at the same L1 index out of its
    first two passes (each gains a reference and loses it again). Where that could end
    elsewhere than QEMU's passes (a compressed cluster, a count that would overflow on
    the way or drop to zero, a cluster another table names too) the shortcut is refused
    and QEMU's passes run: either way the bytes are qemu-img's."""
    outcomes = _spy_on_shortcuts(monkeypatch)
    ours, theirs = _eight_tables(
        tmp_path,
        refcount_bits=2 if case == "counts at the maximum" else 16,
        compressed=case == "compressed cluster in a shared table",
    )
    if case == "counts at the maximum":  # (2-bit counts: 3 after a second snapshot)
        both(ours, theirs, "snapshot", "-c", "s2", "t.qcow2")
    if case == "two tables written since":
        for directory in (ours, theirs):
            qemu_io(directory / "t.qcow2", f"write -P 11 {2 * MiB} 4k", f"write {10 * MiB} 4k")
    if case == "a count at zero":  # (QEMU's passes count it 1, then 0: and free it)
        for directory in (ours, theirs):
            path = directory / "t.qcow2"
            _poke_refcount(path, _cluster_of(path, _l2_entry_offset(path, 5, 0)), 0)
    if "named again" in case:
        # Table 0 is copied (a write) and kept by a second snapshot; its copy then names
        # shared table 5's first data cluster too, whose count is set to 2. QEMU's second
        # pass meets the copy first, while table 5's reference from the first pass still
        # counts: skipping table 5 would leave COPIED on the copy's entry, QEMU does not.
        for directory in (ours, theirs):
            qemu_io(directory / "t.qcow2", "write -P 11 0 4k")
        both(ours, theirs, "snapshot", "-c", "s2", "t.qcow2")
        for directory in (ours, theirs):
            path = directory / "t.qcow2"
            source = _l2_entry_offset(path, 5, 0)
            with open(path, "r+b") as file:
                file.seek(_l2_entry_offset(path, 0, 1))
                file.write(path.read_bytes()[source : source + 8])
            _poke_refcount(path, _cluster_of(path, source), 2)
    outcomes.clear()
    both(ours, theirs, "snapshot", "-a", "s1", "t.qcow2")
    assert bytes_without_dates(ours / "t.qcow2") == bytes_without_dates(theirs / "t.qcow2")
    kept = {"nothing written since": 8, "two tables written since": 6}.get(case)
    assert outcomes == [(outcome, kept or outcomes[0][1])], outcomes
    if case not in ("a shared table's cluster named again", "a count at zero"):
        both(ours, theirs, "check", "t.qcow2")


@pytest.mark.parametrize(
    "case, outcome",
    [
        ("nothing written since", "taken"),
        ("two tables written since", "taken"),
        ("compressed cluster in a shared table", "taken"),
        ("a shared table's cluster named again", "refused"),
    ],
)
def test_deleting_skips_shared_tables_only_where_that_ends_as_qemu_img(
    tmp_path, monkeypatch, case, outcome
):
    """snapshot -d leaves the L2 tables both trees share at the same L1 index out of its
    second pass: the first gave them their flags from the counts the second would find.
    Where another table's count change comes between (a cluster it names too), the
    shortcut is refused and QEMU's passes run: either way the bytes are qemu-img's."""
    outcomes = _spy_on_shortcuts(monkeypatch)
    ours, theirs = _eight_tables(tmp_path, compressed=case.startswith("compressed"))
    if case == "two tables written since":
        for directory in (ours, theirs):
            qemu_io(directory / "t.qcow2", f"write -P 11 {2 * MiB} 4k", f"write {10 * MiB} 4k")
    if "named again" in case:
        # The snapshot's own copy of table 5 (the active tree's is copied by a write)
        # names shared table 0's first data cluster too, whose count is set to 3. QEMU's
        # first pass meets table 0 (count 2 then), then the copy (1), and its second pass
        # gives table 0's entry COPIED: skipping it there would leave the flag off.
        for directory in (ours, theirs):
            path = directory / "t.qcow2"
            target = _l2_entry_offset(path, 5, 1)  # (table 5 as the snapshot keeps it)
            qemu_io(path, f"write -P 11 {10 * MiB} 4k")
            source = _l2_entry_offset(path, 0, 0)
            with open(path, "r+b") as file:
                file.seek(target)
                file.write(path.read_bytes()[source : source + 8])
            _poke_refcount(path, _cluster_of(path, source), 3)
    outcomes.clear()
    both(ours, theirs, "snapshot", "-d", "s1", "t.qcow2")
    assert bytes_without_dates(ours / "t.qcow2") == bytes_without_dates(theirs / "t.qcow2")
    kept = {"two tables written since": 6, "a shared table's cluster named again": 7}.get(case, 8)
    assert outcomes == [(outcome, kept)], outcomes
    if "named again" not in case:
        both(ours, theirs, "check", "t.qcow2")


def test_more_tables_than_the_shortcuts_hold_take_qemu_s_passes(tmp_path, monkeypatch):
    """The shortcuts hold the offsets of the L2 tables each L1 table names; an image
    naming more than SHORTCUT_MAX_TABLES (a hostile one could name millions) takes
    QEMU's passes, whose memory is bounded by a span."""
    from qcow2lib import snapshots

    monkeypatch.setattr(snapshots, "SHORTCUT_MAX_TABLES", 7)
    outcomes = _spy_on_shortcuts(monkeypatch)
    ours, theirs = _eight_tables(tmp_path)
    for action in ("-a", "-d"):
        both(ours, theirs, "snapshot", action, "s1", "t.qcow2")
        assert bytes_without_dates(ours / "t.qcow2") == bytes_without_dates(theirs / "t.qcow2")
    assert outcomes == []
    both(ours, theirs, "check", "t.qcow2")


def test_any_overlap_looks_at_the_kept_runs_only():
    from qcow2lib.snapshots import _any_overlap

    assert not _any_overlap([(10, 5), (20, 5)], [(0, 10), (15, 5), (25, 3), (26, 2)])
    assert _any_overlap([(10, 5), (14, 5)], [])  # kept with kept
    assert _any_overlap([(10, 5)], [(14, 1)])  # other inside kept
    assert _any_overlap([(10, 5)], [(0, 11)])  # kept starts inside other
    assert _any_overlap([(10, 1)], [(10, 1)])  # the same cluster
    assert not _any_overlap([], [(0, 5), (1, 5)])  # others may overlap each other
