"""The run-based classification of plain L2 tables (mapping.ClusterMap's whole-range path
for tables whose entries are all zero or plain data clusters): `map` of images qemu-io
fragmented at random prints what qemu-img prints, ranges give the segments the entry by
entry loop gives, and a table pointing into metadata or past the file fails as it does."""

from __future__ import annotations

import functools
import random
import struct
import sys

import pytest

import qcow2lib
from qcow2lib import mapping
from qcow2lib.errors import CorruptImageError
from qemutools import qemu_img, qemu_io, random_io_command, run_qimg


def fragmented_image(path, seed: int, cluster_size: int) -> None:
    """An image written by qemu-io at random places: single clusters, runs, rewrites that
    keep their clusters, discards (holes again) and, every few seeds, zero writes (zero
    flags: tables the run-based path leaves to the entry loop)."""
    rng = random.Random(seed)
    size = 64 << 20
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, size)
    lengths = [512, 4096, cluster_size, 3 * cluster_size, 1 << 20]
    zero_below = 0.15 if seed % 3 == 0 else 0.1
    qemu_io(
        path, *(random_io_command(rng, size, 512, lengths, 0.1, zero_below) for _ in range(300))
    )


@pytest.mark.parametrize("seed", range(6))
def test_map_of_fragmented_images_as_qemu(tmp_path, seed):
    image = tmp_path / "frag.qcow2"
    fragmented_image(image, seed, [4096, 65536][seed % 2])
    rng = random.Random(seed)
    windows = [[], ["-s", "0", "-l", "1M"]]
    for _ in range(3):
        start = rng.randrange(0, 64 << 20)
        windows.append(["-s", str(start), "-l", str(rng.randrange(1, (64 << 20) - start + 1))])
    for window in windows:
        for output in (["--output=json"], []):
            ours = run_qimg("map", *output, *window, image)
            theirs = qemu_img("map", *output, *window, image, check=False)
            assert (ours.returncode, ours.stdout, ours.stderr) == (
                theirs.returncode,
                theirs.stdout,
                theirs.stderr,
            ), window


def segments(image, ranges, monkeypatch, run_based: bool) -> list:
    """The segments of each range, with or without the run-based paths (as they were
    again afterwards)."""
    found = []
    with monkeypatch.context() as patch, qcow2lib.open(str(image), "r") as disk:
        patch.setattr(mapping, "_PLAIN_MIN_ENTRIES", 1 if run_based else 1 << 40)
        for start, length in ranges:
            for status in (False, True):
                try:
                    segs, end, error = disk.map.lookup_window(start, length, status=status)
                    found.append((repr(segs), end, str(error)))
                except CorruptImageError as exc:
                    found.append(str(exc))
    return found


@pytest.mark.parametrize("seed", range(4))
def test_run_based_segments_match_the_entry_loop(tmp_path, monkeypatch, seed):
    image = tmp_path / "frag.qcow2"
    fragmented_image(image, seed + 100, [4096, 65536][seed % 2])
    rng = random.Random(seed)
    ranges = [(0, 64 << 20)]
    for _ in range(40):
        start = rng.randrange(0, 64 << 20)
        ranges.append((start, rng.randrange(1, (64 << 20) - start + 1)))
    assert segments(image, ranges, monkeypatch, True) == segments(image, ranges, monkeypatch, False)


@pytest.mark.parametrize("target", ["l1", "refcount-table", "past-end", "copied-only"])
def test_bad_plain_tables_fail_as_in_the_entry_loop(tmp_path, monkeypatch, target):
    """An entry pointing at the L1 table, the refcount table or past the file's end (or
    COPIED without an offset) inside an otherwise plain table: the run-based path leaves
    the table to the entry loop, which names the entry."""
    image = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    qemu_io(image, "write -P 1 0 1M", "write -P 2 4M 64k")
    with open(image, "r+b") as f:
        header = f.read(72)
        l1_offset = struct.unpack_from(">Q", header, 40)[0]
        refcount_table = struct.unpack_from(">Q", header, 48)[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        size = f.seek(0, 2)
        entry = {
            "l1": l1_offset & ~0xFFFF,
            "refcount-table": refcount_table,
            "past-end": (size + 0xFFFF) & ~0xFFFF,
            "copied-only": 0,
        }[target] | (1 << 63)
        f.seek(l2_offset + 8 * 40)
        f.write(struct.pack(">Q", entry))
    ranges = [(0, 64 << 20), (0, 4 << 20), (1 << 20, 2 << 20), (2 << 20, 1 << 20)]
    run_based = segments(image, ranges, monkeypatch, True)
    assert run_based == segments(image, ranges, monkeypatch, False)
    if target != "copied-only":
        assert any("guest cluster 40" in str(result) for result in run_based)


@pytest.mark.parametrize("seed", range(8))
def test_metadata_overlap_is_found_in_every_lane_at_once(seed):
    """_overlaps_metadata tests all the offsets of a table at once (integer lanes): it
    says what a test of each offset against each metadata range says, whether the
    metadata lies below every offset (the quick answer) or among them."""
    from array import array
    from types import SimpleNamespace

    from qcow2lib.mapping import ClusterMap

    rng = random.Random(seed)
    cluster_size = 1 << rng.choice([9, 12, 16, 21])
    for _ in range(50):
        metadata = [(0, cluster_size, "the image header")]
        for name in ("the L1 table", "the refcount table"):
            start = rng.randrange(1, 4000) * cluster_size + rng.choice([0, 8, 512])
            metadata.append((start, start + rng.randrange(8, 3 * cluster_size), name))
        count = rng.choice([1, 7, 512])
        offsets = [rng.randrange(1, 5000) * cluster_size for _ in range(count)]
        if rng.random() < 0.5:  # (every offset past the metadata)
            offsets = [offset + 8000 * cluster_size for offset in offsets]
        cluster_map = SimpleNamespace(cluster_size=cluster_size, metadata=metadata)
        cluster_map._metadata_spans = functools.partial(ClusterMap._metadata_spans, cluster_map)
        values = int.from_bytes(array("Q", offsets).tobytes(), sys.byteorder)
        found = ClusterMap._overlaps_metadata(cluster_map, values, count)
        expected = any(
            max(start - start % cluster_size, cluster_size) <= offset < end
            for offset in offsets
            for start, end, _ in metadata
        )
        assert found == expected


@pytest.mark.parametrize("swap", [None, (1, 510), (200, 201)])
def test_a_full_table_of_one_run_is_told_from_one_that_only_ends_as_one(tmp_path, swap):
    """A full L2 table whose first and last offsets are one run apart is taken as one
    run only when every entry between follows (two entries swapped keep both ends)."""
    image = tmp_path / "full.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "4M")
    qemu_io(image, "write -P 7 0 2M")  # (table 0: 512 entries, written in order)
    if swap is not None:
        data = image.read_bytes()
        (l1_offset,) = struct.unpack(">Q", data[40:48])
        (table,) = struct.unpack(">Q", data[l1_offset : l1_offset + 8])
        table &= 0x00FFFFFFFFFFFE00
        first, second = (table + 8 * index for index in swap)
        with open(image, "r+b") as file:
            file.seek(first)
            file.write(data[second : second + 8])
            file.seek(second)
            file.write(data[first : first + 8])
    ours = run_qimg("map", "--output=json", image)
    theirs = qemu_img("map", "--output=json", image, check=False)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    runs = ours.stdout.count('"data": true')
    assert runs == 1 if swap is None else runs > 1


@pytest.mark.parametrize("where", ["over the refcount table", "past the end of the file"])
def test_a_full_table_of_one_run_is_checked_at_its_ends(tmp_path, where):
    """A full table of one run is mapped from its first and last offsets: one that runs
    over the image's metadata is still refused as the entry by entry reading refuses it,
    and one past the end of the file still maps as qemu-img maps it."""
    image = tmp_path / "run.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, "4M")
    qemu_io(image, "write -P 7 0 2M")
    data = image.read_bytes()
    (l1_offset,) = struct.unpack(">Q", data[40:48])
    (table,) = struct.unpack(">Q", data[l1_offset : l1_offset + 8])
    first = 4096 if where.startswith("over") else (len(data) // 4096 + 10) * 4096
    with open(image, "r+b") as file:
        file.seek(table & 0x00FFFFFFFFFFFE00)
        file.write(b"".join(struct.pack(">Q", 1 << 63 | first + 4096 * k) for k in range(512)))
    ours = run_qimg("map", "--output=json", image)
    if where.startswith("over"):
        assert ours.returncode == 1
        assert "at offset 0x1000 overlaps the refcount table" in ours.stderr
    else:
        theirs = qemu_img("map", "--output=json", image, check=False)
        assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
        assert f'"offset": {first}' in ours.stdout


def preallocated_64k_table(image) -> tuple[int, list[int]]:
    """A 512 MiB image with 64 KiB clusters and its metadata preallocated: (the offset of
    its one L2 table, the table's 8192 entries, one run of data clusters)."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", image, "512M")
    data = image.read_bytes()
    (l1_offset,) = struct.unpack(">Q", data[40:48])
    (table,) = struct.unpack(">Q", data[l1_offset : l1_offset + 8])
    table &= 0x00FFFFFFFFFFFE00
    return table, list(struct.unpack(">8192Q", data[table : table + 65536]))


@pytest.mark.parametrize(
    "change",
    [
        "none",
        "compressed flag",
        "reserved bit",
        "zero flag in all",
        "one off",
        "copied cleared in all",
        "over the refcount table",
        "past the end of the file",
        "past the end, counting across bit 32",
    ],
)
def test_a_full_64k_table_of_one_run_is_told_by_its_bytes(tmp_path, monkeypatch, change):
    """64 KiB clusters: a full table of one run is told by comparing its bytes with the
    run's (runs.is_64k_cluster_run), checking only the first entry and the flag byte of
    each, from the bytes as read when a block-status walk (map) reads the table: a flag
    in one entry, zero flags in all, or one entry off the run map as the entry by entry
    reading maps them, and as qemu-img does (a reserved bit excepted: qemu-img map passes
    over it, qimg refuses it as qemu-img check does); so do runs without COPIED (as a
    snapshot leaves them) and runs past the end of the file; a run over the metadata is
    refused."""
    image = tmp_path / "run.qcow2"
    table, entries = preallocated_64k_table(image)
    if change == "compressed flag":
        entries[4000] |= 1 << 62
    elif change == "reserved bit":
        entries[4000] |= 1 << 56
    elif change == "zero flag in all":
        entries = [entry | 1 for entry in entries]
    elif change == "one off":
        entries[4000] += 65536
    elif change == "copied cleared in all":
        entries = [entry & ~(1 << 63) for entry in entries]
    elif change == "over the refcount table":
        entries = [1 << 63 | 65536 * (1 + k) for k in range(8192)]
    elif change.startswith("past the end"):
        first = 1 << 40 if change == "past the end of the file" else 1 << 40 | 0xFFF0 << 16
        entries = [1 << 63 | first + 65536 * k for k in range(8192)]
    with open(image, "r+b") as file:
        file.seek(table)
        file.write(struct.pack(">8192Q", *entries))
    ranges = [(0, 512 << 20), (3 << 20, 100 << 20)]
    run_based = segments(image, ranges, monkeypatch, True)
    assert run_based == segments(image, ranges, monkeypatch, False)
    ours = run_qimg("map", "--output=json", image)
    if change == "reserved bit":  # (qemu-img maps past it; qimg names it, as check does)
        assert ours.returncode == 1 and "guest cluster 4000 has reserved bits" in ours.stderr
        return
    if change == "over the refcount table":
        assert ours.returncode == 1
        assert "at offset 0x10000 overlaps the refcount table" in ours.stderr
        return
    theirs = qemu_img("map", "--output=json", image, check=False)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
    if change not in ("compressed flag", "one off"):
        assert ours.stdout.count("\n") == 1  # (one extent: the whole table)


@pytest.mark.parametrize("name", ["plain.img", "100%.img", "a%sb%%c%d.img"])
def test_human_map_names_the_file_as_qemu(tmp_path, name):
    """Human map lines are formatted in one go where no field is zero: a file name with
    % signs is printed as it is, and the lines at offset 0 of a raw file (host offset 0)
    as C prints zero."""
    for fmt in ("qcow2", "raw"):
        image = tmp_path / f"{fmt}-{name}"
        qemu_img("create", "-q", "-f", fmt, image, "8M")
        qemu_io(image, "write -P 1 0 64k", "write -P 2 1M 192k", "write -P 3 7M 4k", fmt=fmt)
        ours = run_qimg("map", "-f", fmt, image)
        theirs = qemu_img("map", "-f", fmt, image, check=False)
        assert (ours.returncode, ours.stdout, ours.stderr) == (
            theirs.returncode,
            theirs.stdout,
            theirs.stderr,
        )
        assert name in ours.stdout


SPARSE_RUNS = [(0, 5), (60, 70), (1024, 1040), (4100, 4101), (8180, 8192)]


@pytest.mark.parametrize(
    "layout",
    [
        "runs",
        "runs without COPIED",
        "runs past the end of the file",
        "two runs one zero entry apart",
        "two host runs in one run of entries",
        "a compressed flag in a run",
        "a run over the refcount table",
        "a run carrying into the reserved bits",
        "more runs than are looked at one by one",
        "empty",
    ],
)
def test_a_sparse_64k_table_is_classified_from_its_used_entries(tmp_path, monkeypatch, layout):
    """64 KiB clusters: a sparse table (a few runs of entries among zeros) read by a
    block-status walk is classified from the bytes of its used entries alone
    (ClusterMap._classify_raw_runs, runs.used_entry_runs), stretch by stretch: runs at
    either end of the table, across a stretch boundary, of one entry, one zero entry
    apart, without COPIED, past the end of the file, or holding two runs of clusters map
    as the entry by entry reading and qemu-img map them. A flag, a run over the metadata
    or too many runs leave the table to be decoded whole, which maps (or refuses) it as
    before."""
    image = tmp_path / "sparse.qcow2"
    table, full = preallocated_64k_table(image)
    runs = {
        "two runs one zero entry apart": [(100, 104), (105, 110)],
        "more runs than are looked at one by one": [(2 * k, 2 * k + 1) for k in range(65)],
        "empty": [],
    }.get(layout, SPARSE_RUNS)
    entries = [0] * 8192
    for first, end in runs:
        entries[first:end] = full[first:end]
    if layout == "runs without COPIED":
        entries = [entry & ~(1 << 63) for entry in entries]
    elif layout == "runs past the end of the file":
        entries = [entry and entry + (1 << 40) for entry in entries]
    elif layout == "two host runs in one run of entries":
        entries[1030:1040] = full[3000:3010]
    elif layout == "a compressed flag in a run":
        entries[1030] |= 1 << 62
    elif layout == "a run carrying into the reserved bits":  # (offsets past 2**56 - 1)
        entries[1024:1040] = [(1 << 56) - (8 << 16) + (k << 16) for k in range(16)]
    elif layout == "a run over the refcount table":
        (refcount_table,) = struct.unpack(">Q", image.read_bytes()[48:56])
        entries[1024:1040] = [1 << 63 | refcount_table + 65536 * k for k in range(16)]
    raw = struct.pack(">8192Q", *entries)
    with open(image, "r+b") as file:
        file.seek(table)
        file.write(raw)
    with qcow2lib.open(str(image), "r") as disk:
        taken = disk.map._classify_raw_runs([], raw, 0)
    assert taken == (
        layout
        in (
            "runs",
            "runs without COPIED",
            "runs past the end of the file",
            "two runs one zero entry apart",
            "two host runs in one run of entries",
            "empty",
        )
    )
    ranges = [(0, 512 << 20), (0, 1 << 30), (3 << 20, 100 << 20)]
    run_based = segments(image, ranges, monkeypatch, True)
    assert run_based == segments(image, ranges, monkeypatch, False)
    ours = run_qimg("map", "--output=json", image)
    if layout == "a run over the refcount table":
        assert ours.returncode == 1 and "overlaps the refcount table" in ours.stderr
        return
    if layout == "a run carrying into the reserved bits":  # (qemu-img map passes over
        # them; qimg names the first entry, as qemu-img check does)
        assert ours.returncode == 1 and "guest cluster 1032 has reserved bits" in ours.stderr
        return
    theirs = qemu_img("map", "--output=json", image, check=False)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_64k_tables_written_at_random_map_as_qemu(tmp_path, monkeypatch, seed):
    """Whole 64 KiB-cluster tables that qemu-io wrote sparsely at random (pieces of 64 KiB
    to 1 MiB, rewrites, discards and, for odd seeds, zero writes): what the block-status
    walk finds from their used entries (or, where they are not runs of plain clusters,
    from the decoded table) is what the entry loop finds and what qemu-img map prints.
    The walk is checked to have taken the used-entry path for some tables."""
    image = tmp_path / "sparse.qcow2"
    size = 2 << 30  # (four whole tables)
    qemu_img("create", "-q", "-f", "qcow2", image, size)
    rng = random.Random(seed)
    lengths = [65536, 3 * 65536, 1 << 20]
    zero_below = 0.15 if seed % 2 else 0.05
    commands = []
    for table in range(4):  # a few busy places of 512 entries in each table (sparse)
        for place in rng.sample(range(16), 3):
            base = (table << 29) + (place << 25)
            # (one write at each place of table 0: runs of plain clusters; several at the
            # others: runs of entries that may hold several runs of clusters, or holes;
            # table 3 has zero flags too, which leave it to the decoded path)
            for index in range(1 if table == 0 else rng.randrange(2, 6)):
                offset, length = base + (rng.randrange(64) << 16), rng.choice(lengths)
                roll = rng.random()
                if table == 3 and index == 0:
                    commands.append(f"write -z {offset} {length}")
                elif table == 0 or roll >= zero_below:
                    commands.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
                else:
                    commands.append(f"{'discard' if roll < 0.05 else 'write -z'} {offset} {length}")
    qemu_io(image, *commands)
    taken = []
    original = mapping.ClusterMap._classify_raw_runs

    def spy(self, segments, raw, base):
        taken.append(original(self, segments, raw, base))
        return taken[-1]

    with monkeypatch.context() as patch:
        patch.setattr(mapping.ClusterMap, "_classify_raw_runs", spy)
        with qcow2lib.open(str(image), "r") as disk:
            disk.map.lookup_window(0, size, status=True)
    assert True in taken and False in taken
    ranges = [(0, size), (1 << 29, 1 << 30), (12345 << 9, 700 << 20)]
    assert segments(image, ranges, monkeypatch, True) == segments(image, ranges, monkeypatch, False)
    ours = run_qimg("map", "--output=json", image)
    theirs = qemu_img("map", "--output=json", image, check=False)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout)
