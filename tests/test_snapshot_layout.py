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
