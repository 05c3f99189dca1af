"""check of snapshots whose L2 tables are near copies of one another: a snapshot's table is
found from the table at the same place of the L1 table walked before it, when the two
differ in a few entries (check.walk's _near_copy_runs). Images built at random by qemu-io
and qemu-img snapshot, clean and with an entry of such a table damaged: the same report
as qemu-img's, and as a check that finds every table entry by entry of its runs."""

from __future__ import annotations

import random
import shutil
import struct

import pytest

import qcow2lib
from qcow2lib.check import check_path, walk
from qcow2lib.snapshots import _read_table
from qemutools import (
    QEMU_IMG,
    assert_same_in,
    assert_same_result,
    qemu_img,
    qemu_io,
    random_io_command,
    run,
    run_qimg_in,
)

SIZE = 24 << 20


def snapshot_series(path, seed: int, cluster_size: int) -> None:
    """A disk written a little between snapshots (copy-on-write copies of the tables the
    writes reach), with now and then a discard, a zero write or an earlier snapshot
    deleted."""
    rng = random.Random(seed)
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, SIZE)
    qemu_io(path, *(f"write -P {i + 1} {i * (1 << 20)} 512k" for i in range(0, SIZE >> 20, 2)))
    for index in range(8):
        lengths = [512, cluster_size, 3 * cluster_size]
        count = rng.randrange(1, 4)
        qemu_io(
            path,
            *(random_io_command(rng, SIZE, 512, lengths, 0.15, 0.25) for _ in range(count)),
        )
        qemu_img("snapshot", "-c", f"s{index}", path)
        if index == 5 and seed % 2:
            qemu_img("snapshot", "-d", "s2", path)


def report_fields(report) -> tuple:
    return (
        report.messages,
        report.check_errors,
        report.corruptions,
        report.leaks,
        report.allocated_clusters,
        report.fragmented_clusters,
        report.image_end_offset,
        report.error,
    )


def check_both_ways(monkeypatch, path) -> tuple[tuple, int]:
    """(the report with near copies found from one another, how many were; the report
    with every table found entry by entry of its runs) must agree: returns the first and
    the count."""
    found = []
    real = walk._Walk._near_copy_runs

    def counting(self, *args):
        runs = real(self, *args)
        found.append(runs is not None)
        return runs

    monkeypatch.setattr(walk._Walk, "_near_copy_runs", counting)
    near = report_fields(check_path(str(path)))
    monkeypatch.setattr(walk._Walk, "_near_copy_runs", lambda self, *args: None)
    assert report_fields(check_path(str(path))) == near
    monkeypatch.setattr(walk._Walk, "_near_copy_runs", real)
    return near, sum(found)


@pytest.mark.parametrize("sorted_runs", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_snapshots_near_copies_check_as_qemu(tmp_path, monkeypatch, seed, sorted_runs):
    """sorted_runs: the runs holding the clusters cut out are found through the runs
    sorted by first cluster (as for a table of many runs), not one by one."""
    if sorted_runs:
        monkeypatch.setattr(walk, "_NEAR_SCAN", 0)
    image = tmp_path / "snaps.qcow2"
    snapshot_series(image, seed, [4096, 65536][seed % 2])
    _, near_copies = check_both_ways(monkeypatch, image)
    assert near_copies > 0  # (the path under test was taken)
    for output in ([], ["--output=json"]):
        assert_same_in(tmp_path, "check", *output, image.name)


def snapshot_only_entry(path) -> tuple[int, int]:
    """(file offset, value) of a used entry of an L2 table that a snapshot names and the
    active L1 table does not, one where that table differs from the one the snapshot
    before names at the same place (so the near-copy path meets it)."""
    with qcow2lib.open(str(path), "r") as img:
        mask = ((1 << 56) - 1) & ~511
        snapshots = _read_table(img)[0]
        active = {entry & mask for entry in img.map.l1}
    with open(path, "rb") as file:

        def l1(sn) -> list[int]:
            file.seek(sn.l1_table_offset)
            return list(struct.unpack(f">{sn.l1_size}Q", file.read(8 * sn.l1_size)))

        def table(offset: int) -> list[int]:
            file.seek(offset)
            return list(struct.unpack(">8192Q", file.read(65536)))

        for earlier, later in zip(snapshots[-2::-1], snapshots[:0:-1]):
            for old_entry, new_entry in zip(l1(earlier), l1(later)):
                old, new = old_entry & mask, new_entry & mask
                if new and old and new != old and new not in active:
                    changed = [
                        i for i, (a, b) in enumerate(zip(table(old), table(new))) if a != b and b
                    ]
                    if changed:
                        return new + 8 * changed[0], table(new)[changed[0]]
    raise AssertionError("no table that snapshots alone name")


DAMAGE = {
    "reserved bit": lambda entry: entry | 1 << 60,
    "compressed flag": lambda entry: entry | 1 << 62,
    "copied without an offset": lambda entry: 1 << 63,
    "past the end of the file": lambda entry: (entry & 0xFF << 56) | 1 << 40,
    "misaligned": lambda entry: entry + 512,
    "another cluster": lambda entry: (entry & 0xFF << 56) | 3 << 16,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_of_a_near_copy_is_reported_as_qemu(tmp_path, monkeypatch, damage):
    image = tmp_path / "snaps.qcow2"
    snapshot_series(image, 3, 65536)
    offset, value = snapshot_only_entry(image)
    with open(image, "r+b") as file:
        file.seek(offset)
        file.write(struct.pack(">Q", DAMAGE[damage](value)))
    _, near_copies = check_both_ways(monkeypatch, image)
    assert near_copies > 0
    for output in ([], ["--output=json"]):
        assert_same_in(tmp_path, "check", *output, image.name)
    # repaired, each side its own copy (same name, own directory)
    ours_dir, theirs_dir = tmp_path / "ours", tmp_path / "theirs"
    for directory in (ours_dir, theirs_dir):
        directory.mkdir()
        shutil.copy(image, directory / image.name)
    ours = run_qimg_in(ours_dir, "check", "-r", "all", image.name)
    theirs = run([QEMU_IMG, "check", "-r", "all", image.name], check=False, cwd=theirs_dir)
    assert_same_result(ours, theirs, damage)
    assert_same_in(tmp_path, "compare", ours_dir / image.name, theirs_dir / image.name)
