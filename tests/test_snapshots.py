"""Internal snapshots against the real QEMU, both ways.

- Snapshots qcow2lib creates are listed by `qemu-img snapshot -l` / `qemu-img info` with the
  same fields, and `qemu-img convert -l snapshot.name=X` gives the content we expect.
- Snapshots `qemu-img snapshot -c` creates are read, applied and deleted by qcow2lib.
- A seeded random sequence of writes, creates, applies and deletes is checked against a
  byte model after every step; `qemu-img check` finds no errors and no leaks.
- Every write qcow2lib makes during create/apply/delete is recorded; the image as it would
  be after a crash at each point is checked by `qemu-img check` (leaks allowed, and a
  COPIED flag that lags behind its refcount in the harmless direction, as in QEMU itself).
"""

from __future__ import annotations

import json
import random
import re
import time
import zlib
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import InvalidArgumentError, ReadOnlyError, UnsupportedFeatureError
from qcow2lib import snapshots as snap_api
from qcow2lib import structs as S
from qcow2lib.snapshots import (
    SnapshotView,
    apply_snapshot,
    create_snapshot,
    delete_snapshot,
    find_snapshot,
    list_snapshots,
    read_vmstate,
    write_vmstate,
)

from qemutools import assert_clean, qemu_check, qemu_create, qemu_img, qemu_io, to_raw

KiB = 1024
MiB = 1024 * KiB


# --- helpers --------------------------------------------------------------------------------


def qemu_snapshot_info(path) -> list[dict]:
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    return info.get("snapshots", [])


def qemu_snapshot_raw(path, tmp_path: Path, *, name=None, id=None) -> bytes:
    """The snapshot's content as QEMU reads it (qemu-img convert -l)."""
    param = ",".join(
        p for p in (f"snapshot.id={id}" if id else "", f"snapshot.name={name}" if name else "") if p
    )
    out = tmp_path / f"snap-{random.random()}.raw"
    qemu_img("convert", "-f", "qcow2", "-l", param, "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_raw(path, tmp_path: Path) -> bytes:
    out = tmp_path / f"active-{random.random()}.raw"
    data = to_raw(path, out, fmt="qcow2")
    out.unlink()
    return data


def assert_clean_while_open(path, leaks: int = 0) -> None:
    """qemu-img check (sharing the image qcow2lib holds open): no corruption, and exactly
    `leaks` leaked clusters."""
    result = qemu_img("check", "-U", "--output=json", path, check=False)
    assert result.returncode == (3 if leaks else 0), (
        f"qemu-img check exit {result.returncode}: {result.stdout}{result.stderr}"
    )
    report = json.loads(result.stdout)
    assert not report.get("corruptions") and report.get("leaks", 0) == leaks, report


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def make_image(
    path, size, *, compat="1.1", refcount_bits=16, extended_l2=False, cluster_size=64 * KiB
) -> None:
    opts = {"compat": compat, "refcount_bits": refcount_bits, "cluster_size": cluster_size}
    if extended_l2:
        opts["extended_l2"] = "on"
    qemu_create(path, size, options=opts)


CONFIGS = [
    pytest.param(dict(compat="1.1", refcount_bits=16, cluster_size=64 * KiB), id="v3-rc16-64k"),
    pytest.param(dict(compat="1.1", refcount_bits=64, cluster_size=4 * KiB), id="v3-rc64-4k"),
    pytest.param(dict(compat="1.1", refcount_bits=2, cluster_size=4 * KiB), id="v3-rc2-4k"),
    pytest.param(dict(compat="0.10", refcount_bits=16, cluster_size=4 * KiB), id="v2-4k"),
    pytest.param(
        dict(compat="1.1", refcount_bits=8, cluster_size=64 * KiB, extended_l2=True),
        id="v3-extl2-rc8-64k",
    ),
    pytest.param(
        dict(compat="1.1", refcount_bits=16, cluster_size=16 * KiB, extended_l2=True),
        id="v3-extl2-16k",
    ),
]


# --- qcow2lib creates, QEMU reads ---------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_created_snapshots_seen_by_qemu(tmp_path, config):
    path = tmp_path / "img.qcow2"
    size = 3 * MiB
    make_image(path, size, **config)
    cs = config["cluster_size"]
    expected = {}
    with qcow2lib.open(str(path), "r+") as img:
        first = pattern(1, 2 * cs + 100)
        img.write(cs // 2, first)
        a = create_snapshot(
            img, "first", vm_clock_nsec=3_723_456_000_000, date=(1_700_000_000, 123_000_000)
        )
        expected["first"] = img.read(0, size)
        img.write(cs, pattern(2, 3 * cs))  # copies shared clusters
        img.write_zeroes(0, cs)
        b = create_snapshot(img, "second", icount=42)
        expected["second"] = img.read(0, size)
        img.write(2 * MiB + 7, pattern(3, cs))  # past the first L2 table with 4K clusters
        img.discard(cs, cs)
        active = img.read(0, size)
        assert (a.id, b.id) == ("1", "2")
        # Snapshot content is intact after writes to the active image.
        with SnapshotView(img, "first") as view:
            assert view.size == size
            assert view.read(0, size) == expected["first"]
    assert_clean(path)
    listed = qemu_snapshot_info(path)
    assert [(s["id"], s["name"]) for s in listed] == [("1", "first"), ("2", "second")]
    assert listed[0]["date-sec"] == 1_700_000_000 and listed[0]["date-nsec"] == 123_000_000
    assert listed[0]["vm-clock-sec"] == 3723 and listed[0]["vm-clock-nsec"] == 456_000_000
    assert listed[0]["vm-state-size"] == 0
    assert "icount" not in listed[0] and listed[1]["icount"] == 42
    assert abs(listed[1]["date-sec"] - time.time()) < 120
    text = qemu_img("snapshot", "-l", path).stdout
    assert re.search(
        r"^1\s+first\s+0 B\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\s+01:02:03\.456\s*$", text, re.M
    ), text
    assert re.search(r"^2\s+second\s+0 B .*\s42$", text, re.M), text
    for name, content in expected.items():
        assert qemu_snapshot_raw(path, tmp_path, name=name) == content
    assert qemu_raw(path, tmp_path) == active
    # QEMU writes to the active image copy-on-write (our COPIED flags told it to) and
    # leaves the snapshots alone.
    qemu_io(path, f"write -P 0x5a 0 {4 * cs}", f"write -P 0x6b {2 * MiB} {cs}")
    assert_clean(path)
    for name, content in expected.items():
        assert qemu_snapshot_raw(path, tmp_path, name=name) == content
    with qcow2lib.open(str(path)) as img:
        with SnapshotView(img, "second") as view:
            assert view.read(0, size) == expected["second"]


# --- QEMU creates, qcow2lib reads, applies, deletes ----------------------------------------


@pytest.mark.parametrize("config", CONFIGS[:1] + CONFIGS[3:5])
def test_qemu_snapshots_read_applied_deleted(tmp_path, config):
    path = tmp_path / "img.qcow2"
    size = 3 * MiB
    make_image(path, size, **config)
    cs = config["cluster_size"]
    qemu_io(
        path,
        f"write -P 0x11 0 {4 * cs}",
        f"write -c -P 0x22 {8 * cs} {2 * cs}",
        f"write -P 0x33 {2 * MiB} {cs}",
    )
    qemu_img("snapshot", "-c", "base", path)
    qemu_io(
        path,
        f"write -P 0x44 {cs} {cs}",
        f"write -c -P 0x55 {cs * 5} {cs}",
        f"write -z {8 * cs} {cs}",
    )
    qemu_img("snapshot", "-c", "middle", path)
    qemu_io(path, f"write -P 0x66 {2 * MiB} {cs // 2}")
    contents = {name: qemu_snapshot_raw(path, tmp_path, name=name) for name in ("base", "middle")}
    active = qemu_raw(path, tmp_path)
    qemu_list = qemu_snapshot_info(path)

    with qcow2lib.open(str(path)) as img:
        ours = list_snapshots(img)
        assert [
            (s.id, s.name, s.date_sec, s.date_nsec, s.vm_clock_nsec, s.vm_state_size) for s in ours
        ] == [
            (
                q["id"],
                q["name"],
                q["date-sec"],
                q["date-nsec"],
                q["vm-clock-sec"] * 10**9 + q["vm-clock-nsec"],
                q["vm-state-size"],
            )
            for q in qemu_list
        ]
        assert all(s.disk_size == size for s in ours)
        for name, content in contents.items():
            with SnapshotView(img, name) as view:
                assert view.read(0, size) == content
        with SnapshotView(img, "1") as view:  # by ID
            assert view.snapshot.name == "base"
            extents = view.extents()
            assert sum(e.length for e in extents) == size
            with pytest.raises(ReadOnlyError):
                view.write(0, b"x")

    with qcow2lib.open(str(path), "r+") as img:
        assert img.read(0, size) == active
        apply_snapshot(img, "base")
        assert img.read(0, size) == contents["base"]
        img.write(cs + 5, b"after apply")
        model = bytearray(contents["base"])
        model[cs + 5 : cs + 16] = b"after apply"
        assert img.read(0, size) == model
    assert_clean(path)
    assert qemu_raw(path, tmp_path) == model
    assert qemu_snapshot_raw(path, tmp_path, name="base") == contents["base"]

    with qcow2lib.open(str(path), "r+") as img:
        delete_snapshot(img, "base")
        assert [s.name for s in list_snapshots(img)] == ["middle"]
    assert_clean(path)
    assert qemu_raw(path, tmp_path) == model
    assert qemu_snapshot_raw(path, tmp_path, name="middle") == contents["middle"]
    # QEMU carries on with the result.
    qemu_img("snapshot", "-a", "middle", path)
    assert qemu_raw(path, tmp_path) == contents["middle"]
    qemu_img("snapshot", "-d", "middle", path)
    assert_clean(path)
    with qcow2lib.open(str(path), "r+") as img:
        assert list_snapshots(img) == []
        assert img.read(0, size) == contents["middle"]
        img.write(0, b"owned again")  # every flag is COPIED again: written in place
    assert_clean(path)


def test_apply_restores_disk_size(tmp_path):
    path = tmp_path / "img.qcow2"
    qemu_create(path, MiB)
    qemu_io(path, "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "small", path)
    qemu_img("resize", path, "3M")
    qemu_io(path, "write -P 0x22 2M 64k")
    with qcow2lib.open(str(path), "r+") as img:
        assert img.size == 3 * MiB
        with SnapshotView(img, "small") as view:
            assert view.size == MiB
        create_snapshot(img, "big")
        apply_snapshot(img, "small")
        assert img.size == MiB and img.header.size == MiB
        assert img.read(0, 64 * KiB) == b"\x11" * 65536
    assert_clean(path)
    assert json.loads(qemu_img("info", "--output=json", path).stdout)["virtual-size"] == MiB
    with qcow2lib.open(str(path), "r+") as img:
        apply_snapshot(img, "big")
        assert img.size == 3 * MiB
        assert img.read(2 * MiB, 64 * KiB) == b"\x22" * 65536
    assert_clean(path)
    assert qemu_raw(path, tmp_path)[2 * MiB : 2 * MiB + 65536] == b"\x22" * 65536


def _allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_disk_use_stays_bounded_and_freed_data_is_given_back(tmp_path):
    """Old copies of metadata (L2 tables whose COPIED flags change) are left for the
    next operation's copies rather than punched one by one: the file and its disk use
    stop growing after the first round. Data clusters a delete frees are punched, as
    QEMU discards them (pass-discard-snapshot)."""
    path = tmp_path / "img.qcow2"
    qemu_create(path, "8G")
    # 16 L2 tables over the disk (one each 512 MiB), 1 MiB of data under each
    qemu_io(path, *[f"write -P {i + 1} {i * 512}M 1M" for i in range(16)])
    sizes = []
    for _ in range(4):
        with qcow2lib.open(str(path), "r+") as img:
            create_snapshot(img, "s")
        with qcow2lib.open(str(path), "r+") as img:
            delete_snapshot(img, "s")
        sizes.append((path.stat().st_size, _allocated_bytes(path)))
    # (the filesystem's own extent blocks may come and go as holes are punched)
    assert sizes[1][0] == sizes[2][0] == sizes[3][0], sizes
    assert max(used for _, used in sizes[1:]) - min(used for _, used in sizes[1:]) <= 65536, sizes
    assert_clean(path)
    # a snapshot then owns 8 MiB of data alone: deleting it gives the space back
    with qcow2lib.open(str(path), "r+") as img:
        create_snapshot(img, "s")
    qemu_io(path, *[f"write -P 0x77 {i * 512}M 512k" for i in range(16)])
    before = _allocated_bytes(path)
    with qcow2lib.open(str(path), "r+") as img:
        delete_snapshot(img, "s")
    assert before - _allocated_bytes(path) >= 16 * 512 * KiB
    assert_clean(path)
    with qcow2lib.open(str(path)) as img:
        assert img.read(512 * MiB, MiB) == b"\x77" * (512 * KiB) + b"\x02" * (512 * KiB)


# --- lookup and IDs ---------------------------------------------------------------------------


def test_ids_and_lookup_like_qemu(tmp_path):
    path = tmp_path / "img.qcow2"
    qemu_create(path, MiB)
    with qcow2lib.open(str(path), "r+") as img:
        for name in ("a", "2", "a"):  # duplicate names are allowed, as in QEMU
            create_snapshot(img, name)
        assert [(s.id, s.name) for s in list_snapshots(img)] == [("1", "a"), ("2", "2"), ("3", "a")]
        assert find_snapshot(img, "2").id == "2"  # an ID wins over a name
        assert find_snapshot(img, "a").id == "1"  # the first name match
        assert find_snapshot(img, id="3", name="a").id == "3"
        assert find_snapshot(img, name="2").id == "2"
        assert find_snapshot(img, "nope") is None
        with pytest.raises(InvalidArgumentError, match="nope"):
            apply_snapshot(img, "nope")
        with pytest.raises(InvalidArgumentError, match="nope"):
            delete_snapshot(img, "nope")
        delete_snapshot(img, "3")
        assert create_snapshot(img, "b").id == "3"  # max + 1
        delete_snapshot(img, "1")
        assert create_snapshot(img, "c").id == "4"
    qemu_img("snapshot", "-c", "from-qemu", path)
    assert [s["id"] for s in qemu_snapshot_info(path)] == ["2", "3", "4", "5"]
    assert_clean(path)
    with qcow2lib.open(str(path)) as img:
        with pytest.raises(ReadOnlyError):
            create_snapshot(img, "ro")


def test_external_data_file_refused(tmp_path):
    path = tmp_path / "img.qcow2"
    qemu_create(path, MiB, options={"data_file": str(tmp_path / "data.raw")})
    with qcow2lib.open(str(path), "r+") as img:
        with pytest.raises(UnsupportedFeatureError, match="external data file"):
            create_snapshot(img, "s")
        assert list_snapshots(img) == []


def test_dirty_lazy_refcounts_image_with_snapshots_rebuilds_exactly(tmp_path):
    """Opening a dirty image rebuilds refcounts; a shared L2 table counts once per path."""
    path = tmp_path / "img.qcow2"
    qemu_create(path, 4 * MiB, options={"lazy_refcounts": "on", "cluster_size": 4096})
    qemu_io(path, "write -P 0x11 0 64k", "write -P 0x12 3M 64k")
    qemu_img("snapshot", "-c", "s", path)
    qemu_io(path, "write -P 0x22 3M 4k")  # the first L2 table stays shared
    with open(path, "r+b") as f:  # mark it dirty, as a crash with lazy refcounts leaves it
        f.seek(72)
        features = int.from_bytes(f.read(8), "big")
        f.seek(72)
        f.write((features | 1).to_bytes(8, "big"))
    qcow2lib.open(str(path), "r+").close()
    assert_clean(path)


# --- refcount width 1 -----------------------------------------------------------------------


def test_refcount_bits_1_overflow_is_a_clean_error(tmp_path):
    path = tmp_path / "img.qcow2"
    make_image(path, MiB, refcount_bits=1)
    with qcow2lib.open(str(path), "r+") as img:
        create_snapshot(img, "empty")  # nothing to share: fits in 1 bit
        img.write(0, b"data" * 1000)
        before = img.read(0, MiB)
        with pytest.raises(InvalidArgumentError, match="overflow.*refcount_bits=1"):
            create_snapshot(img, "full")
        assert [s.name for s in list_snapshots(img)] == ["empty"]
        assert img.read(0, MiB) == before
        img.write(100, b"still writable")
    # No corruption; the copy of the L1 table made first leaks, as with QEMU (iotest 112).
    assert_clean_while_open(path, leaks=1)
    with qcow2lib.open(str(path), "r+") as img:
        apply_snapshot(img, "empty")
        assert img.read(0, MiB) == bytes(MiB)
        delete_snapshot(img, "empty")
    assert_clean_while_open(path, leaks=1)


# --- VM state -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[4]])
def test_vm_state_snapshot_stays_loadable(tmp_path, config):
    path = tmp_path / "img.qcow2"
    size = 3 * MiB
    make_image(path, size, **config)
    state = pattern(7, 300 * KiB + 17)
    with qcow2lib.open(str(path), "r+") as img:
        img.write(0, pattern(8, 100 * KiB))
        disk = img.read(0, size)
        snap = create_snapshot(img, "vm", vm_state=state, vm_clock_nsec=5 * 10**9)
        assert snap.vm_state_size == len(state)
        assert img.header.l1_size * img.cluster_size * img.map.l2_entries > size + len(state)
        img.write(0, b"changed")
        write_vmstate(img, 0, pattern(9, 1000))  # a second snapshot's VM state
        create_snapshot(img, "vm2", vm_state_size=1000)
        assert read_vmstate(img, "vm") == state
        assert read_vmstate(img, "vm2") == pattern(9, 1000)
        assert read_vmstate(img, "vm", 1000, 10) == state[1000:1010]
        # The active image's VM state area maps no cluster again (as after QEMU's savevm,
        # which discards it from the active tree: its L2 tables stay, emptied).
        vm_index = snap_api.vm_state_offset(img) // (img.cluster_size * img.map.l2_entries)
        for entry in img.map.l1[vm_index:]:
            if entry:
                table = img.map.l2_cache.get(entry & S.L1E_OFFSET_MASK)
                assert not any(e & S.L2E_OFFSET_MASK for e in table[:: img.map.entry_words])
    code, report = qemu_check(path)
    assert code == 0 and not report.get("leaks") and not report.get("corruptions"), report
    listed = {s["name"]: s for s in qemu_snapshot_info(path)}
    assert listed["vm"]["vm-state-size"] == len(state)
    assert listed["vm2"]["vm-state-size"] == 1000
    assert re.search(r"^1\s+vm\s+300 KiB ", qemu_img("snapshot", "-l", path).stdout, re.M)
    assert qemu_snapshot_raw(path, tmp_path, name="vm") == disk
    # QEMU applies it (keeping the VM state in the active tree) and deletes the other.
    qemu_img("snapshot", "-a", "vm", path)
    qemu_img("snapshot", "-d", "vm2", path)
    assert_clean(path)
    with qcow2lib.open(str(path), "r+") as img:
        assert img.read(0, size) == disk
        assert read_vmstate(img, "vm") == state
        create_snapshot(img, "again")  # captures no VM state, drops it
        apply_snapshot(img, "vm")
        delete_snapshot(img, "again")
        assert read_vmstate(img, "vm") == state
        delete_snapshot(img, "vm")
        assert img.read(0, size) == disk
    assert_clean(path)


# --- randomized model -----------------------------------------------------------------------


def _random_run(tmp_path, config, seed, steps, max_snapshots, compressed=True):
    rng = random.Random(seed)
    path = tmp_path / "img.qcow2"
    cs = config["cluster_size"]
    size = 3 * MiB if cs < 64 * KiB else 2 * MiB
    make_image(path, size, **config)
    if compressed:
        qemu_io(path, f"write -c -P 0x77 0 {2 * cs}", f"write -c -P 0x78 {size - cs} {cs}")
    active = bytearray(qemu_raw(path, tmp_path))
    snaps: dict[str, tuple[str, bytes]] = {}  # id -> (name, content)
    narrow = config["refcount_bits"] < 8
    names = 0
    overflows = 0
    failed_creates = 0  # each leaks the copy of the L1 table it made first, as QEMU's
    img = qcow2lib.open(str(path), "r+")
    try:
        for step in range(steps):
            action = rng.random()
            if not snaps and action >= 0.70:
                action = 0.60  # nothing to apply or delete yet: create
            if action < 0.45:
                offset = rng.randrange(size)
                length = min(rng.choice([1, 100, cs // 2, cs, 3 * cs + 7]), size - offset)
                data = rng.randbytes(length)
                img.write(offset, data)
                active[offset : offset + length] = data
            elif action < 0.52:
                offset = rng.randrange(0, size, 512)
                length = min(rng.choice([512, cs, 2 * cs]), size - offset)
                if rng.random() < 0.5:
                    img.write_zeroes(offset, length, may_unmap=rng.random() < 0.5)
                    active[offset : offset + length] = bytes(length)
                else:
                    img.discard(offset, length)
                    first = -(-offset // cs) * cs
                    last = (offset + length) // cs * cs if offset + length < size else size
                    if first < last:
                        active[first:last] = bytes(last - first)
            elif action < 0.70:
                if len(snaps) >= max_snapshots:
                    continue
                names += 1
                try:
                    snap = create_snapshot(img, f"s{names}", vm_clock_nsec=step)
                except InvalidArgumentError:
                    assert narrow, "refcount overflow with a wide refcount"
                    overflows += 1
                    failed_creates += 1
                    continue
                snaps[snap.id] = (snap.name, bytes(active))
            elif action < 0.82 and snaps:
                ident = rng.choice(sorted(snaps))
                key = ident if rng.random() < 0.5 else snaps[ident][0]
                try:
                    apply_snapshot(img, key)
                except InvalidArgumentError:
                    assert narrow, "refcount overflow with a wide refcount"
                    overflows += 1
                    continue
                active[:] = snaps[ident][1]
            elif snaps:
                ident = rng.choice(sorted(snaps))
                delete_snapshot(img, ident if rng.random() < 0.5 else snaps[ident][0])
                del snaps[ident]
            # Check after every step: the active image, one snapshot, the table.
            assert img.read(0, size) == active, f"step {step}"
            if snaps:
                ident = rng.choice(sorted(snaps))
                with SnapshotView(img, id=ident) as view:
                    assert view.read(0, size) == snaps[ident][1], f"step {step} snapshot {ident}"
            assert {s.id: s.name for s in list_snapshots(img)} == {
                i: n for i, (n, _) in snaps.items()
            }
            if step % 40 == 39:
                img.flush()
                assert_clean_while_open(path, failed_creates)
        # Delete what is left in random order, checking as we go.
        order = sorted(snaps)
        rng.shuffle(order)
        for ident in order[: len(order) // 2]:
            delete_snapshot(img, ident)
            del snaps[ident]
            assert img.read(0, size) == active
        for ident, (_, content) in snaps.items():
            with SnapshotView(img, ident) as view:
                assert view.read(0, size) == content
    finally:
        img.close()
    assert_clean_while_open(path, failed_creates)
    assert qemu_raw(path, tmp_path) == active
    for ident in rng.sample(sorted(snaps), min(4, len(snaps))):
        assert qemu_snapshot_raw(path, tmp_path, id=ident) == snaps[ident][1]
    return overflows


@pytest.mark.parametrize("config", CONFIGS)
def test_random_sequence_against_model(tmp_path, config):
    _random_run(
        tmp_path,
        config,
        seed=zlib.crc32(repr(sorted(config.items())).encode()),
        steps=160,
        max_snapshots=20,
    )


def test_hundred_snapshots_deleted_in_random_order(tmp_path):
    config = dict(compat="1.1", refcount_bits=64, cluster_size=4 * KiB)
    rng = random.Random(100)
    path = tmp_path / "img.qcow2"
    size = 3 * MiB
    make_image(path, size, **config)
    active = bytearray(size)
    contents = {}
    with qcow2lib.open(str(path), "r+") as img:
        for i in range(100):
            for _ in range(3):
                offset = rng.randrange(size - 9000)
                data = rng.randbytes(rng.choice([10, 4096, 9000]))
                img.write(offset, data)
                active[offset : offset + len(data)] = data
            contents[create_snapshot(img, f"snap{i}").id] = bytes(active)
        assert len(list_snapshots(img)) == 100
        img.write(0, b"x" * 8192)
        active[:8192] = b"x" * 8192
    assert_clean(path)
    for ident in ("1", "50", "100"):
        assert qemu_snapshot_raw(path, tmp_path, id=ident) == contents[ident]
    order = sorted(contents)
    rng.shuffle(order)
    with qcow2lib.open(str(path), "r+") as img:
        for n, ident in enumerate(order):
            delete_snapshot(img, ident)
            del contents[ident]
            assert img.read(0, size) == active
            if contents and n % 10 == 0:
                probe = rng.choice(sorted(contents))
                with SnapshotView(img, probe) as view:
                    assert view.read(0, size) == contents[probe]
            if n % 25 == 0:
                img.flush()
                assert_clean_while_open(path)
        assert list_snapshots(img) == []
    assert_clean(path)
    assert qemu_raw(path, tmp_path) == active
    info = json.loads(qemu_img("info", "--output=json", path).stdout)
    assert "snapshots" not in info


# --- crash safety ---------------------------------------------------------------------------


class _Recorder:
    """Record the writes and flushes an image makes to its file."""

    def __init__(self, hostfile):
        self.ops: list = []
        self.file = hostfile
        self._saved = {}
        for name in ("pwrite", "pwritev", "flush", "punch_hole", "truncate"):
            self._saved[name] = getattr(hostfile, name)

        def pwrite(data, offset):
            self.ops.append(("w", offset, bytes(memoryview(data).cast("B"))))
            return self._saved["pwrite"](data, offset)

        def pwritev(buffers, offset, length=None):
            blob = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
            self.ops.append(("w", offset, blob))
            return self._saved["pwritev"](buffers, offset, length)

        def flush():
            self.ops.append(("f",))
            return self._saved["flush"]()

        def punch_hole(offset, length):
            self.ops.append(("w", offset, bytes(length)))
            return self._saved["punch_hole"](offset, length)

        def truncate(length):
            self.ops.append(("t", length))
            return self._saved["truncate"](length)

        for name, fn in (
            ("pwrite", pwrite),
            ("pwritev", pwritev),
            ("flush", flush),
            ("punch_hole", punch_hole),
            ("truncate", truncate),
        ):
            setattr(hostfile, name, fn)

    def stop(self):
        for name in self._saved:
            delattr(self.file, name)

    def crash_states(self):
        """(description, list of writes applied) for every crash point.

        Every prefix of the writes; and since writes between two flushes may reach the
        disk in any order, also each single write of an epoch on top of the epochs before.
        """
        writes, epoch_start = [], 0
        states = [("nothing", [])]
        for op in self.ops:
            if op[0] == "f":
                epoch_start = len(writes)
                continue
            for i in range(epoch_start, len(writes)):
                states.append(
                    (f"write {len(writes)} without {i}", writes[:i] + writes[i + 1 :] + [op])
                )
            writes.append(op)
            states.append((f"after write {len(writes)}", list(writes)))
        return states


def _apply_ops(base: bytes, ops) -> bytes:
    data = bytearray(base)
    for op in ops:
        if op[0] == "t":
            del data[op[1] :]
            data.extend(bytes(max(0, op[1] - len(data))))
            continue
        _, offset, chunk = op
        if offset + len(chunk) > len(data):
            data.extend(bytes(offset + len(chunk) - len(data)))
        data[offset : offset + len(chunk)] = chunk
    return bytes(data)


_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def harmful_check_findings(path, cluster_bits: int) -> list[str]:
    """qemu-img check's findings other than leaks and harmless COPIED lag.

    COPIED clear with refcount 1 only costs a copy on write; COPIED set with refcount > 1
    is harmless where the cluster really has a single user (check reports it leaked with
    reference=1). Everything else (refcount below the references, bad tables) is harmful.
    """
    result = qemu_img("check", path, check=False)
    text = result.stdout + result.stderr
    leaked = {
        int(c): int(r)
        for c, r in re.findall(r"Leaked cluster (\d+) refcount=\d+ reference=(\d+)", text)
    }
    bad = []
    for line in text.splitlines():
        m = re.match(
            r"ERROR OFLAG_COPIED (?:data|L2) cluster: (?:l1_index=\d+ )?"
            r"l[12]_entry=([0-9a-f]+) refcount=(\d+)",
            line,
        )
        if m:
            entry, refcount = int(m.group(1), 16), int(m.group(2))
            cluster = (entry & _OFFSET_MASK) >> cluster_bits
            if not entry >> 63 and refcount == 1:
                continue
            if entry >> 63 and refcount > 1 and leaked.get(cluster) == 1:
                continue
            bad.append(line)
        elif line.startswith(("ERROR", "Warning", "qemu-img:")):
            bad.append(line)
    if result.returncode not in (0, 2, 3):
        bad.append(f"exit {result.returncode}: {text}")
    return bad


def _crash_image(tmp_path, config):
    path = tmp_path / "img.qcow2"
    cs = config["cluster_size"]
    make_image(path, MiB, **config)
    qemu_io(path, f"write -P 0x11 0 {3 * cs}", f"write -c -P 0x12 {4 * cs} {cs}")
    qemu_img("snapshot", "-c", "old", path)
    qemu_io(path, f"write -P 0x13 {cs} {cs}", f"write -P 0x14 {6 * cs} {cs // 2}")
    return path, cs


@pytest.mark.parametrize("op", ["create", "apply", "delete", "vmstate"])
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[4]])
def test_crash_at_any_write_leaves_a_consistent_image(tmp_path, config, op):
    path, cs = _crash_image(tmp_path, config)
    bits = cs.bit_length() - 1
    size = MiB
    with qcow2lib.open(str(path), "r+") as img:
        if op == "delete":
            create_snapshot(img, "new")
            img.write(0, b"\x99" * cs)
        img.flush()
        before_active = img.read(0, size)
        before_snaps = {
            s.name: SnapshotView(img, s.name).read(0, size) for s in list_snapshots(img)
        }
        base = path.read_bytes()
        rec = _Recorder(img.file)
        if op == "create":
            create_snapshot(img, "new")
        elif op == "apply":
            apply_snapshot(img, "old")
        elif op == "delete":
            delete_snapshot(img, "old")
        else:
            create_snapshot(img, "withstate", vm_state=pattern(5, 3 * cs + 100))
        rec.stop()
        after_active = img.read(0, size)
        after_snaps = {s.name: SnapshotView(img, s.name).read(0, size) for s in list_snapshots(img)}
    states = rec.crash_states()
    assert len(states) > 5
    crashed = tmp_path / "crashed.qcow2"
    for description, ops in states:
        crashed.write_bytes(_apply_ops(base, ops))
        findings = harmful_check_findings(crashed, bits)
        assert not findings, f"{op}: crash {description}: {findings}"
        with qcow2lib.open(str(crashed)) as img:
            assert img.read(0, size) in (before_active, after_active), description
            names = [s.name for s in list_snapshots(img)]
            assert names in (list(before_snaps), list(after_snaps)), description
            for name in names:
                with SnapshotView(img, name) as view:
                    want = (before_snaps if list(before_snaps) == names else after_snaps)[name]
                    assert view.read(0, size) == want, f"{description}: snapshot {name}"
    # The final state repairs to nothing: qemu-img check is clean.
    assert_clean(path)


def _random_l2_table(rng: random.Random, entries: int, cluster_bits: int, odd: bool) -> list[int]:
    """An L2 table's entries: runs of consecutive host clusters (some across a refcount
    block's end, some with COPIED, some with the zero flag or reserved low bits), holes,
    and with `odd`, entries the pass takes one by one (compressed, no host cluster,
    unaligned)."""
    table = []
    cluster = rng.choice([1 << 15, (1 << 15) - 3, 40])  # (near a 16-bit refcount block's end)
    while len(table) < entries:
        kind = rng.random()
        length = rng.randint(1, 40)
        if kind < 0.15:
            table.extend([0] * length)
            continue
        flags = rng.choice([0, S.OFLAG_COPIED, S.OFLAG_ZERO, 0x1FE, S.OFLAG_COPIED | 1])
        table.extend((cluster + k) << cluster_bits | flags for k in range(length))
        cluster += length + rng.choice([0, 0, 1, 7])
        if odd and kind > 0.9:
            table.append(
                rng.choice(
                    [
                        S.OFLAG_COMPRESSED | (cluster << cluster_bits) + 1024,
                        S.OFLAG_ZERO,
                        (cluster << cluster_bits) + 512,
                    ]
                )
            )
            cluster += 2
    return table[:entries]


@pytest.mark.parametrize("seed", range(12))
def test_a_table_s_layout_is_the_same_found_either_way(tmp_path, monkeypatch, seed):
    """_Layout finds a usual table's runs with whole-table byte and integer operations;
    any table, plain or not, full or sparse, gives what the entry by entry way gives."""
    from array import array

    from qcow2lib.runs import nonzero_positions

    path = tmp_path / "t.qcow2"
    qemu_create(path, "1G")
    rng = random.Random(seed)
    with qcow2lib.open(str(path)) as image:
        bits = image.cluster_bits
        shift = (image.refcounts.block_entries).bit_length() - 1
        for _ in range(20):
            entries = rng.choice([8192, 8192, 200, 64])
            table = array("Q", _random_l2_table(rng, entries, bits, odd=rng.random() < 0.3))
            if rng.random() < 0.3:
                table = array("Q", [value for value in table if value]) or array("Q", [1 << bits])
                table.extend([0] * (entries - len(table)))
            positions = nonzero_positions(table)
            fast = snap_api._Layout(image, table, positions, shift)
            with monkeypatch.context() as patch:
                patch.setattr(snap_api, "_plain_host_runs", lambda *args: None)
                slow = snap_api._Layout(image, table, positions, shift)
            for name in ("odd", "odd_clusters", "host_runs", "position_runs"):
                assert getattr(fast, name) == getattr(slow, name), name
            assert fast.values_of(table) == slow.values_of(table)
