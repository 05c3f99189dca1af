"""Check and repair against the oracle: `qemu-img check [-r leaks|all]` on identical copies.

Images are made by qemu-img/qemu-io (with data, some with internal snapshots and
compressed clusters), damaged with struct patches, then checked by qcow2lib and by
qemu-img. The counts, the JSON, the human summary, the problem lines on stderr and the
exit code must be the same; after a repair both files must be byte-identical, and the
data the damage did not destroy must read back as it did before.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct

import pytest

import qcow2lib
from qcow2lib.check import (
    CheckReport,
    check_image,
    check_path,
    format_check_human,
    format_check_json,
    format_check_stderr,
)
from qemutools import assert_clean, qemu_check, qemu_img, qemu_io, to_raw

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62


# --- images and damage -------------------------------------------------------------------


class Img:
    """Just enough of the qcow2 layout to damage an image on purpose."""

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            raw = f.read(104)
        (
            _,
            self.version,
            _,
            _,
            self.cluster_bits,
            self.size,
            _,
            self.l1_size,
            self.l1_off,
            self.rt_off,
            _,
            self.nb_snap,
            self.snap_off,
        ) = struct.unpack(">IIQIIQIIQQIIQ", raw[:72])
        self.cs = 1 << self.cluster_bits
        incompat = struct.unpack(">Q", raw[72:80])[0] if self.version >= 3 else 0
        self.order = struct.unpack(">I", raw[96:100])[0] if self.version >= 3 else 4
        self.entry_size = 16 if incompat & 16 else 8
        self.rb_entries = self.cs * 8 >> self.order

    def r64(self, off):
        with open(self.path, "rb") as f:
            f.seek(off)
            return struct.unpack(">Q", f.read(8).ljust(8, b"\0"))[0]

    def write(self, off, data):
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(data)

    def w64(self, off, value):
        self.write(off, struct.pack(">Q", value))

    def l2_off(self, l1_index=0):
        return self.r64(self.l1_off + 8 * l1_index) & OFFSET_MASK

    def l2e_addr(self, index, l1_index=0):
        return self.l2_off(l1_index) + index * self.entry_size

    def data_entries(self, l1_index=0):
        """(index, entry) of the standard data clusters in one L2 table."""
        out = []
        for index in range(self.cs // self.entry_size):
            entry = self.r64(self.l2e_addr(index, l1_index))
            if entry & OFFSET_MASK and not entry & COMPRESSED:
                out.append((index, entry))
        return out

    def _refcount_pos(self, cluster):
        block = self.r64(self.rt_off + 8 * (cluster // self.rb_entries)) & ~0x1FF
        return block, cluster % self.rb_entries, 1 << self.order

    def refcount(self, cluster):
        block, index, bits = self._refcount_pos(cluster)
        with open(self.path, "rb") as f:
            if bits >= 8:
                f.seek(block + index * bits // 8)
                return int.from_bytes(f.read(bits // 8), "big")
            f.seek(block + index * bits // 8)
            return (f.read(1)[0] >> (index * bits % 8)) & ((1 << bits) - 1)

    def set_refcount(self, cluster, value):
        block, index, bits = self._refcount_pos(cluster)
        if bits >= 8:
            self.write(block + index * bits // 8, value.to_bytes(bits // 8, "big"))
            return
        with open(self.path, "r+b") as f:
            f.seek(block + index * bits // 8)
            byte = f.read(1)[0]
            shift = index * bits % 8
            byte = byte & ~(((1 << bits) - 1) << shift) | value << shift
            f.seek(block + index * bits // 8)
            f.write(bytes([byte]))


VARIANTS = {
    "default": dict(opts={}),
    "v2": dict(opts={"compat": "0.10"}),
    "refcount1": dict(opts={"refcount_bits": 1}),
    "refcount64": dict(opts={"refcount_bits": 64}),
    "extl2": dict(opts={"extended_l2": "on"}, compressed=True),
    "snapshot": dict(opts={}, snapshot=True, compressed=True),
    "v2-snapshot": dict(opts={"compat": "0.10"}, snapshot=True),
    "extl2-snapshot": dict(opts={"extended_l2": "on"}, snapshot=True),
    "small-clusters": dict(opts={"cluster_size": 4096, "refcount_bits": 8}, snapshot=True),
    # (L2 tables of 2 MiB: L1 entries 0, 1 and 3 in use)
    "spread": dict(opts={"cluster_size": 4096}, writes=["write -P 0x77 7M 4k"]),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One image per variant (made lazily), with its raw content before any damage."""
    root = tmp_path_factory.mktemp("check-bases")
    made = {}

    def get(name):
        if name not in made:
            spec = VARIANTS[name]
            path = root / f"{name}.qcow2"
            args = ["create", "-q", "-f", "qcow2"]
            if spec["opts"]:
                args += ["-o", ",".join(f"{k}={v}" for k, v in spec["opts"].items())]
            qemu_img(*args, path, "8M")
            qemu_io(path, "write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -P 0x33 3M 128k")
            if spec.get("writes"):
                qemu_io(path, *spec["writes"])
            if spec.get("compressed"):
                qemu_io(path, "write -c -P 0x44 5M 128k")
            if spec.get("snapshot"):
                qemu_img("snapshot", "-c", "snap1", path)
                qemu_io(path, "write -P 0x55 64k 64k", "write -P 0x66 3M 64k")
            made[name] = (path, to_raw(path, root / f"{name}.raw"))
        return made[name]

    return get


def _first_data(img):
    return img.data_entries()[0]


def _shared(img):
    """A data entry of the active L2 table whose cluster a snapshot shares (refcount 2)."""
    for index, entry in img.data_entries():
        if img.refcount((entry & OFFSET_MASK) >> img.cluster_bits) == 2:
            return index, entry
    raise AssertionError("no shared cluster")


# Each damage returns the guest ranges whose content it destroys (None: nothing).
def leak_data_cluster(img):
    index, entry = _first_data(img)
    cluster = (entry & OFFSET_MASK) >> img.cluster_bits
    if img.order == 0:  # 1-bit refcounts cannot count higher: leak a free cluster instead
        return leak_free_cluster(img)
    img.set_refcount(cluster, img.refcount(cluster) + 1)


def leak_free_cluster(img):
    end = os.path.getsize(img.path) // img.cs
    with open(img.path, "r+b") as f:
        f.truncate((end + 1) * img.cs)
    img.set_refcount(end, 1)


def refcount_too_low(img):
    index, entry = _first_data(img)
    img.set_refcount((entry & OFFSET_MASK) >> img.cluster_bits, 0)


def shared_refcount_too_low(img):
    index, entry = _shared(img)
    img.set_refcount((entry & OFFSET_MASK) >> img.cluster_bits, 1)


def clear_copied(img):
    index, entry = _first_data(img)
    img.w64(img.l2e_addr(index), entry & ~COPIED)


def clear_l1_copied(img):
    img.w64(img.l1_off, img.r64(img.l1_off) & ~COPIED)


def flip_l1_copied(img):
    """COPIED wrong on every L1 entry in use (repaired in runs of neighbouring entries)."""
    for l1_index in range(img.l1_size):
        entry = img.r64(img.l1_off + 8 * l1_index)
        if entry & OFFSET_MASK:
            img.w64(img.l1_off + 8 * l1_index, entry ^ COPIED)


def copied_on_shared(img):
    index, entry = _shared(img)
    img.w64(img.l2e_addr(index), entry | COPIED)


def l2_entry_past_end(img):
    index, entry = img.data_entries()[1]
    past = (os.path.getsize(img.path) // img.cs + 16) * img.cs
    img.w64(img.l2e_addr(index), COPIED | past)
    return [(index * img.cs, img.cs)]


def l2_entry_misaligned(img):
    index, entry = img.data_entries()[1]
    img.w64(img.l2e_addr(index), entry + 512)
    return [(index * img.cs, img.cs)]


def l2_entry_on_l1_table(img):
    index, entry = img.data_entries()[1]
    img.w64(img.l2e_addr(index), COPIED | img.l1_off)
    return [(index * img.cs, img.cs)]


def refblock_garbage(img):
    block = img.r64(img.rt_off) & ~0x1FF
    img.write(block, random.Random(img.cs * 7 + img.order).randbytes(img.cs))


def reftable_entry_zeroed(img):
    img.w64(img.rt_off, 0)


def refblock_on_l1_table(img):
    img.w64(img.rt_off, img.l1_off)


def snapshot_entry_incomplete(img):
    img.write(img.snap_off + 36, struct.pack(">I", 8))  # extra_data_size 8 < 16


def snapshot_l1_misaligned(img):
    img.w64(img.snap_off, img.r64(img.snap_off) + 512)


DAMAGES = {
    f.__name__: f
    for f in (
        leak_data_cluster,
        leak_free_cluster,
        refcount_too_low,
        clear_copied,
        clear_l1_copied,
        flip_l1_copied,
        l2_entry_past_end,
        l2_entry_misaligned,
        l2_entry_on_l1_table,
        refblock_garbage,
        reftable_entry_zeroed,
        refblock_on_l1_table,
    )
}
SNAPSHOT_DAMAGES = {
    f.__name__: f
    for f in (
        copied_on_shared,
        shared_refcount_too_low,
        snapshot_entry_incomplete,
        snapshot_l1_misaligned,
    )
}

CASES = [("default", d) for d in DAMAGES]
CASES += [(v, "flip_l1_copied") for v in ("spread", "small-clusters", "snapshot")]
CASES += [
    (v, d)
    for v in ("v2", "refcount1", "refcount64", "extl2")
    for d in (
        "leak_data_cluster",
        "refcount_too_low",
        "clear_copied",
        "l2_entry_past_end",
        "refblock_garbage",
        "reftable_entry_zeroed",
    )
]
CASES += [
    (v, d)
    for v in ("snapshot", "v2-snapshot", "extl2-snapshot", "small-clusters")
    for d in (
        "leak_data_cluster",
        "refcount_too_low",
        "refblock_garbage",
        "reftable_entry_zeroed",
        *SNAPSHOT_DAMAGES,
    )
]


# --- comparing with qemu-img -------------------------------------------------------------


def qemu_check_all(path, repair=None):
    """(exit code, JSON dict, stderr) of qemu-img check --output=json [-r repair]."""
    args = ["check", "--output=json"] + (["-r", repair] if repair else []) + [path]
    result = qemu_img(*args, check=False)
    return (
        result.returncode,
        json.loads(result.stdout) if result.stdout.strip() else None,
        result.stderr,
    )


def our_json(report: CheckReport, name: str):
    text = format_check_json(report)
    if not text:
        return None
    data = json.loads(text)
    data["filename"] = name
    return data


def assert_same_as_qemu(report: CheckReport, qemu_result, ours_path, theirs_path):
    code, data, stderr = qemu_result
    theirs = str(theirs_path)
    assert report.exit_code == code, (report, stderr)
    assert our_json(report, theirs) == data
    assert format_check_stderr(report).replace(str(ours_path), theirs) == stderr


def damaged_copy(bases, tmp_path, variant, damage, name="damaged"):
    path, raw = bases(variant)
    target = tmp_path / f"{name}.qcow2"
    shutil.copy(path, target)
    destroyed = (DAMAGES | SNAPSHOT_DAMAGES)[damage](Img(target)) or []
    return target, raw, destroyed


def engine_check(path, repair=None) -> CheckReport:
    """check_image on an image opened by the engine (read-write when repairing)."""
    with qcow2lib.open(str(path), "r+" if repair else "r") as img:
        return check_image(img, repair)


def same_except(before: bytes, after: bytes, destroyed):
    assert len(before) == len(after)
    before, after = bytearray(before), bytearray(after)
    for start, length in destroyed:
        before[start : start + length] = after[start : start + length]
    return before == after


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_clean_image_matches_qemu(bases, variant):
    path, _ = bases(variant)
    report = engine_check(path)
    code, data, stderr = qemu_check_all(path)
    assert report.exit_code == code == 0
    assert report.to_json_dict() == data
    assert report.messages == [] and stderr == ""
    human = qemu_img("check", path).stdout
    assert format_check_human(report, str(path)) == human


@pytest.mark.parametrize("variant,damage", CASES, ids=[f"{v}-{d}" for v, d in CASES])
def test_damage_check_and_repair_like_qemu(bases, tmp_path, variant, damage):
    damaged, raw_before, destroyed = damaged_copy(bases, tmp_path, variant, damage)

    # Plain check: same verdict, numbers, JSON, human summary and problem lines.
    ours = tmp_path / "ours.qcow2"
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(damaged, ours)
    shutil.copy(damaged, theirs)
    report = check_path(str(ours))
    assert_same_as_qemu(report, qemu_check_all(theirs), ours, theirs)
    human = qemu_img("check", theirs, check=False)
    assert format_check_human(report) == human.stdout
    if not (variant.startswith("v2") and damage == "snapshot_entry_incomplete"):
        assert report.exit_code in (2, 3)  # every damage here is found (v2 snapshot
        # entries need no extra data, so a short one is no error there)
    try:  # the engine, where it opens the damaged image, reaches the same verdict
        engine_report = engine_check(ours)
    except qcow2lib.Qcow2Error:
        engine_report = None
    if engine_report is not None:
        assert engine_report.to_json_dict() == report.to_json_dict()
        assert engine_report.messages == report.messages

    for repair in ("leaks", "all"):
        shutil.copy(damaged, ours)
        shutil.copy(damaged, theirs)
        try:
            report = engine_check(ours, repair)
        except qcow2lib.Qcow2Error:  # the engine refuses to open it read-write: check mode does
            report = check_path(str(ours), repair)
        qemu_result = qemu_check_all(theirs, repair)
        assert_same_as_qemu(report, qemu_result, ours, theirs)
        assert ours.read_bytes() == theirs.read_bytes(), f"repair {repair}: files differ"
        if repair == "leaks":
            if report.exit_code != 1:  # -r leaks leaves no leak behind
                assert report.leaks == 0 and qemu_check(ours)[1].get("leaks", 0) == 0
        else:
            code, data = qemu_check(ours)
            assert code == qemu_result[0] or code == 1 and qemu_result[0] == 1
            if code == 0:
                assert_clean(ours)
            # The data the damage did not destroy reads back unchanged (where qemu-img can
            # read the image at all: a misaligned entry still fails reads after -r all).
            converted = qemu_img("convert", "-O", "raw", ours, tmp_path / "after.raw", check=False)
            if code == 0 or converted.returncode == 0:
                assert converted.returncode == 0, converted.stderr
                after = (tmp_path / "after.raw").read_bytes()
                assert same_except(raw_before, after, destroyed)


def test_copied_flags_checked_in_each_refcount_block(tmp_path):
    """The COPIED check of a table's runs looks each run up in its own refcount block: a
    table of 512-byte clusters holds a run counted in the first block (shared with a
    snapshot) and, after the snapshot, a run written in a later block whose COPIED flags
    are then cleared, at positions where the first block counts shared clusters. Both
    the check and -r all answer as qemu-img's, byte for byte."""
    path = tmp_path / "blocks.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "8M")
    qemu_io(path, "write -P 1 0 8k", "write -P 2 1M 150k")
    qemu_img("snapshot", "-c", "s", path)
    qemu_io(path, "write -P 3 8k 8k")
    img = Img(path)
    later = [(index, entry) for index, entry in img.data_entries() if entry & COPIED]
    assert [index for index, _ in later] == list(range(16, 32))
    first_cluster = (later[0][1] & OFFSET_MASK) >> img.cluster_bits
    assert first_cluster // img.rb_entries >= 1  # (the run lies past the first block)
    assert img.refcount(first_cluster % img.rb_entries) == 2  # (the same place there)
    for index, entry in later:
        img.w64(img.l2e_addr(index), entry & ~COPIED)
    for repair in (None, "all"):
        ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
        shutil.copy(path, ours)
        shutil.copy(path, theirs)
        report = engine_check(ours, repair) if repair else check_path(str(ours))
        result = qemu_check_all(theirs, repair)
        assert result[1]["corruptions" if not repair else "corruptions-fixed"] == 16
        assert_same_as_qemu(report, result, ours, theirs)
        assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("damage", ["leak_data_cluster", "leak_free_cluster"])
def test_repair_leaks_fixes_leaks(bases, tmp_path, damage):
    damaged, raw_before, _ = damaged_copy(bases, tmp_path, "default", damage)
    report = engine_check(damaged)
    if damage == "leak_free_cluster":
        assert (report.leaks, report.corruptions, report.exit_code) == (1, 0, 3)
    else:  # refcount 2 under a COPIED entry: a leak, and a wrong COPIED flag
        assert (report.leaks, report.corruptions, report.exit_code) == (1, 1, 2)
        assert report.messages[-1].startswith("ERROR OFLAG_COPIED data cluster")
    report = engine_check(damaged, "leaks")
    assert report.repaired and report.leaks_fixed == 1 and report.leaks == 0
    assert_clean(damaged)
    assert to_raw(damaged, tmp_path / "after.raw") == raw_before


def test_repair_leaks_leaves_corruptions(bases, tmp_path):
    damaged, _, _ = damaged_copy(bases, tmp_path, "default", "refcount_too_low")
    shutil.copy(damaged, tmp_path / "theirs.qcow2")
    report = engine_check(damaged, "leaks")
    # A refcount of 0 needs the refcount structure rebuilt: only -r all may do that.
    assert report.exit_code == 1 and report.error == "Check failed: Input/output error"
    assert report.messages[-1] == "ERROR need to rebuild refcount structures"
    code, _, stderr = qemu_check_all(tmp_path / "theirs.qcow2", "leaks")
    assert code == 1 and stderr.endswith("qemu-img: Check failed: Input/output error\n")
    # Nothing was changed: the refcount and the COPIED flag it contradicts are still wrong.
    assert qemu_check(damaged)[1]["corruptions"] == 2
    report = engine_check(damaged, "all")
    assert report.exit_code == 0 and report.corruptions_fixed
    assert_clean(damaged)


def test_repaired_image_stays_usable(bases, tmp_path):
    damaged, raw_before, _ = damaged_copy(bases, tmp_path, "snapshot", "reftable_entry_zeroed")
    with qcow2lib.open(str(damaged), "r+") as img:
        report = check_image(img, "all")
        assert report.exit_code == 0 and report.repaired
        assert "Rebuilding refcount structure" in report.messages
        img.write(7 << 20, b"\x77" * 65536)
        img.write(64 << 10, b"\x78" * 4096)
        again = check_image(img)
        assert again.exit_code == 0 and not again.messages
    assert_clean(damaged)
    after = to_raw(damaged, tmp_path / "after.raw")
    expected = bytearray(raw_before)
    expected[7 << 20 : (7 << 20) + 65536] = b"\x77" * 65536
    expected[64 << 10 : (64 << 10) + 4096] = b"\x78" * 4096
    assert after == expected
    snap = qemu_img(
        "convert", "-O", "raw", "-l", "snapshot.name=snap1", damaged, tmp_path / "snap.raw"
    )
    assert snap.returncode == 0


def test_human_output_after_repair(bases, tmp_path):
    damaged, _, _ = damaged_copy(bases, tmp_path, "default", "leak_free_cluster")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(damaged, theirs)
    report = check_path(str(damaged), "leaks")
    result = qemu_img("check", "-r", "leaks", theirs, check=False)
    text = format_check_human(report)
    assert text == result.stdout
    assert text.startswith(
        "The following inconsistencies were found and repaired:\n\n"
        "    1 leaked clusters\n    0 corruptions\n\n"
        "Double checking the fixed image now...\nNo errors were found"
    )
    assert format_check_stderr(report) == result.stderr


def test_check_errors_and_unopenable_images(tmp_path):
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    # A snapshot table offset that is not aligned: QEMU opens the image for the check
    # and fails the check (exit 1, nothing on stdout).
    Img(path).write(60, struct.pack(">IQ", 1, 4096 + 8))
    report = check_path(str(path))
    result = qemu_img("check", path, check=False)
    assert report.exit_code == result.returncode == 1
    assert format_check_human(report) == result.stdout == ""
    assert format_check_stderr(report) == result.stderr
    # Not a qcow2 image at all when qcow2 is asked for: the open fails.
    bogus = tmp_path / "bogus.img"
    bogus.write_bytes(bytes(65536))
    report = check_path(str(bogus), fmt="qcow2")
    assert report.exit_code == qemu_img("check", "-f", "qcow2", bogus, check=False).returncode == 1
    assert report.error.startswith(f"Could not open '{bogus}'")
    # Raw images cannot be checked.
    report = check_path(str(bogus))
    result = qemu_img("check", bogus, check=False)
    assert report.exit_code == result.returncode == 63
    assert format_check_stderr(report) == result.stderr


def test_tables_past_end_are_reported_not_refused(tmp_path):
    """QEMU opens an image whose L1 table lies past the end for a check, and reports it."""
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 1 0 128k")
    Img(path).w64(40, 1 << 20)  # l1_table_offset past the end of the file
    with pytest.raises(qcow2lib.Qcow2Error):
        qcow2lib.open(str(path))
    theirs = tmp_path / "theirs.qcow2"
    for repair in (None, "leaks", "all"):
        shutil.copy(path, theirs)
        ours = tmp_path / "ours.qcow2"
        shutil.copy(path, ours)
        report = check_path(str(ours), repair)
        assert_same_as_qemu(report, qemu_check_all(theirs, repair), ours, theirs)
        assert ours.read_bytes() == theirs.read_bytes()


def test_repair_needs_read_write(bases):
    path, _ = bases("default")
    with qcow2lib.open(str(path)) as img:
        with pytest.raises(qcow2lib.ReadOnlyError):
            check_image(img, "all")
        with pytest.raises(qcow2lib.InvalidArgumentError):
            check_image(img, "everything")


def test_image_check_method(bases, tmp_path):
    """Qcow2Image.check forwards to check_image."""
    damaged, _, _ = damaged_copy(bases, tmp_path, "default", "leak_free_cluster")
    with qcow2lib.open(str(damaged), "r+") as img:
        assert img.check().exit_code == 3
        report = img.check(repair="leaks")
        assert (report.exit_code, report.leaks_fixed) == (0, 1)
    assert_clean(damaged)


def test_json_shape():
    report = CheckReport(
        filename="x.qcow2",
        image_end_offset=655360,
        total_clusters=160,
        allocated_clusters=5,
        leaks=1,
    )
    text = format_check_json(report)
    assert text == (
        '{\n    "image-end-offset": 655360,\n    "total-clusters": 160,\n'
        '    "check-errors": 0,\n    "leaks": 1,\n    "allocated-clusters": 5,\n'
        '    "filename": "x.qcow2",\n    "format": "qcow2"\n}\n'
    )
    assert report.exit_code == 3
