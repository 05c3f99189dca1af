"""`qemu-img check` and the repair of dirty images, line for line against real qemu-img.

A lazy-refcounts image that was not closed cleanly (the dirty bit set) is reported by
`check` and repaired only by `check -r`; any other read-write open repairs it first,
printing QEMU's check lines and laying the rebuilt refcount structure out as QEMU does.
"""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from qemutools import QEMU_IO, qemu_img, qemu_io, run, run_qimg

DIRTY = 1  # incompatible_features bit 0


def dirty_image(tmp_path, name: str = "dirty.qcow2", writes: str = "write -P 0x5a 0 512"):
    """A lazy-refcounts image whose writer was killed: refcounts of its new clusters are
    missing and the dirty bit is set."""
    path = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=1.1,lazy_refcounts=on", path, "64M")
    subprocess.run(
        [QEMU_IO, "-c", writes, "-c", "flush", "-c", "sigraise 9", str(path)],
        capture_output=True,
    )
    (features,) = struct.unpack(">Q", path.read_bytes()[72:80])
    assert features & DIRTY
    return path


def copies(path, *names):
    out = []
    for name in names:
        target = path.with_name(name)
        shutil.copy(path, target)
        out.append(target)
    return out


def test_check_reports_a_dirty_image_without_repairing_it(tmp_path):
    ours, theirs = copies(dirty_image(tmp_path), "ours.qcow2", "theirs.qcow2")
    before = ours.read_bytes()
    expected = qemu_img("check", "-f", "qcow2", theirs, check=False)
    got = run_qimg("check", "-f", "qcow2", ours)
    assert "ERROR cluster 5 refcount=0 reference=1" in expected.stderr
    assert (got.returncode, got.stdout, got.stderr) == (
        expected.returncode,
        expected.stdout.replace(str(theirs), str(ours)),
        expected.stderr,
    )
    assert ours.read_bytes() == before


def test_check_repair_all_of_a_dirty_image_reports_then_rebuilds(tmp_path):
    ours, theirs = copies(dirty_image(tmp_path), "ours.qcow2", "theirs.qcow2")
    expected = qemu_img("check", "-r", "all", "-f", "qcow2", theirs, check=False)
    got = run_qimg("check", "-r", "all", "-f", "qcow2", ours)
    assert "Rebuilding refcount structure" in expected.stderr
    assert (got.returncode, got.stdout, got.stderr) == (
        expected.returncode,
        expected.stdout,
        expected.stderr,
    )
    assert ours.read_bytes() == theirs.read_bytes()


def test_read_write_open_of_a_dirty_image_repairs_as_qemu(tmp_path):
    """amend opens read-write: QEMU's repair lines on stderr, QEMU's rebuilt layout."""
    base = dirty_image(tmp_path, writes="write -P 0x2a 0 128k")
    ours, theirs = copies(base, "ours.qcow2", "theirs.qcow2")
    expected = qemu_img("amend", "-o", "compat=0.10", theirs, check=False)
    got = run_qimg("amend", "-o", "compat=0.10", ours)
    assert expected.stderr.splitlines() == [
        "ERROR cluster 5 refcount=0 reference=1",
        "ERROR cluster 6 refcount=0 reference=1",
        "Rebuilding refcount structure",
        "Repairing cluster 1 refcount=1 reference=0",
        "Repairing cluster 2 refcount=1 reference=0",
    ]
    assert (got.returncode, got.stderr) == (expected.returncode, expected.stderr)
    ours_header, theirs_header = ours.read_bytes()[:104], theirs.read_bytes()[:104]
    assert ours_header[48:56] == theirs_header[48:56]  # refcount_table_offset
    assert qemu_img("check", ours).returncode == 0
    assert run([QEMU_IO, "-c", "read -P 0x2a 0 128k", ours]).returncode == 0


def test_engine_open_hands_the_repair_lines_to_the_caller(tmp_path):
    import qcow2lib

    path = dirty_image(tmp_path)
    image = qcow2lib.open(str(path), "r+")
    try:
        assert image.repair_messages == [
            "ERROR cluster 5 refcount=0 reference=1",
            "Rebuilding refcount structure",
            "Repairing cluster 1 refcount=1 reference=0",
            "Repairing cluster 2 refcount=1 reference=0",
        ]
        assert image.read(0, 512) == b"\x5a" * 512
    finally:
        image.close()
    assert qemu_img("check", path).returncode == 0


def test_snapshot_names_end_at_a_nul_byte(tmp_path):
    """QEMU keeps snapshot IDs and names as C strings: NUL bytes stored after a name
    (the entry's name_size counting them) are not part of it."""
    path = tmp_path / "nul.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    qemu_io(path, "write -P 1 0 4k")
    qemu_img("snapshot", "-c", "sn", path)
    data = bytearray(path.read_bytes())
    (table,) = struct.unpack_from(">Q", data, 64)
    (name_size,) = struct.unpack_from(">H", data, table + 14)
    assert name_size == 2
    struct.pack_into(">H", data, table + 14, name_size + 6)  # the zeros after it
    path.write_bytes(bytes(data))
    expected = qemu_img("snapshot", "-l", path)
    got = run_qimg("snapshot", "-l", path)
    assert "\0" not in got.stdout
    assert (got.returncode, got.stdout) == (expected.returncode, expected.stdout)


@pytest.mark.parametrize("l2_entry", [0xBFFFFFFFFFFF0000, 0x800000FFFFFF0000])
def test_snapshot_create_refuses_a_data_cluster_past_the_end_as_qemu(tmp_path, l2_entry):
    """A data cluster far past the end of the file: QEMU fails with EFBIG where no refcount
    table could reach it, else EAGAIN (after growing its refcount structures, a sparse
    terabyte file); qimg refuses with the same errno before changing any count or table
    (the copy of the L1 table, made first as QEMU makes it, leaks as QEMU's does)."""
    ours = tmp_path / "ours.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", ours, "64M")
    qemu_io(ours, "write 0 512")
    data = bytearray(ours.read_bytes())
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, l2_offset, l2_entry)
    ours.write_bytes(bytes(data))
    (theirs,) = copies(ours, "theirs.qcow2")
    expected = qemu_img("snapshot", "-c", "test", theirs, check=False)
    got = run_qimg("snapshot", "-c", "test", ours)
    assert "Could not create snapshot 'test': -" in expected.stderr
    assert (got.returncode, got.stderr) == (expected.returncode, expected.stderr)
    after = ours.read_bytes()
    refcount_block = struct.unpack_from(">Q", data, struct.unpack_from(">Q", data, 48)[0])[0]
    assert after[:refcount_block] == data[:refcount_block]  # header, refcount table
    assert after[refcount_block + 65536 : len(data)] == data[refcount_block + 65536 :]


def test_snapshot_create_past_the_snapshot_limit(tmp_path):
    """65536 snapshots in a table past the end of the file (read as zeros): QEMU opens
    the image and refuses the snapshot with EFBIG (its iotest 080 expects this line; the
    real qemu-img takes seconds for this table, so its answer is not asked again here)."""
    path = tmp_path / "full.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    data = bytearray(path.read_bytes())
    struct.pack_into(">IQ", data, 60, 65536, 16 * 1024 * 1024)
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    got = run_qimg("snapshot", "-c", "test", path)
    assert got.returncode == 1
    assert got.stderr == "qemu-img: Could not create snapshot 'test': -27 (File too large)\n"
    assert path.read_bytes() == before


def test_refcount_width_change_carries_wrong_counts_over(tmp_path):
    """amend -o refcount_bits copies the refcounts (QEMU does not recount): a cluster
    referenced twice with refcount 1 is still reported, and repaired, afterwards."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "64M")
    qemu_io(base, "write 0 64k")
    data = bytearray(base.read_bytes())
    (l1_offset,) = struct.unpack_from(">Q", data, 40)
    l2_offset = struct.unpack_from(">Q", data, l1_offset)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", data, l2_offset + 8, struct.unpack_from(">Q", data, l2_offset)[0])
    base.write_bytes(bytes(data))
    ours, theirs = copies(base, "ours.qcow2", "theirs.qcow2")
    assert qemu_img("amend", "-o", "refcount_bits=32", theirs).returncode == 0
    assert run_qimg("amend", "-o", "refcount_bits=32", ours).returncode == 0
    expected = qemu_img("check", "-r", "all", theirs, check=False)
    got = qemu_img("check", "-r", "all", ours, check=False)
    assert "ERROR cluster 5 refcount=1 reference=2" in expected.stderr
    assert (got.returncode, got.stdout, got.stderr) == (
        expected.returncode,
        expected.stdout,
        expected.stderr,
    )


@pytest.mark.parametrize("with_snapshot", [False, True])
def test_amend_downgrade_progress_follows_l1_entries(tmp_path, with_snapshot):
    """amend -p -o compat=0.10 reports each L1 entry it visits (active and snapshots'),
    as qemu-img does."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4G")
    outputs = []
    for who, amend in (("theirs", qemu_img), ("ours", run_qimg)):
        top = tmp_path / f"{who}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "4G")
        qemu_io(top, *(f"write -z {g}G 64k" for g in range(4)))
        if with_snapshot:
            qemu_img("snapshot", "-c", "foo", top)
        result = amend("amend", "-p", "-o", "compat=0.10", top)
        assert result.returncode == 0
        outputs.append(result.stdout.splitlines())  # (qemu-img's \r, read as text: \n)
    assert outputs[1] == outputs[0]
    assert len(outputs[0]) == (18 if with_snapshot else 10)


def test_amend_clears_data_file_raw_and_refuses_to_set_it(tmp_path):
    """data_file_raw=on is accepted where it is on already, =off clears it, and setting it
    again is refused, with qemu-img's message; the headers end up identical."""
    images = []
    for who, amend in (("a", qemu_img), ("b", run_qimg)):
        (tmp_path / who).mkdir()
        path = tmp_path / who / "img.qcow2"
        options = f"compat=1.1,data_file={path}.data,data_file_raw=on"
        qemu_img("create", "-q", "-f", "qcow2", "-o", options, path, "64M")
        results = []
        for value in ("on", "off", "on"):
            args = ("amend", "-o", f"data_file_raw={value}", path)
            results.append(qemu_img(*args, check=False) if amend is qemu_img else amend(*args))
        images.append((path, [(r.returncode, r.stderr) for r in results]))
    (theirs, expected), (ours, got) = images
    assert expected[2] == (1, "qemu-img: data-file-raw cannot be set on existing images\n")
    assert got == expected
    header = ours.read_bytes()[:0x10000].replace(
        f"{tmp_path}/b/".encode(), f"{tmp_path}/a/".encode()
    )
    assert header == theirs.read_bytes()[:0x10000]


def test_external_data_file_given_in_image_options(tmp_path):
    """--image-opts data-file.filename=...: info and amend use that data file instead of
    the name the header stores (or lacks), as qemu-img does."""
    outputs = []
    for who, tool in (("a", qemu_img), ("b", run_qimg)):
        (tmp_path / who).mkdir()
        path = tmp_path / who / "img.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={path}.data", path, "64M")
        qemu_io(path, "write -P 0x11 0 4k")
        opts = f"data-file.filename={path}.data,file.filename={path}"
        steps = [
            ("amend", "-o", "data_file=foo", path),
            ("info", "--image-opts", opts),
            ("amend", "-o", "data_file=", "--image-opts", opts),
            ("info", "--image-opts", opts),
            ("info", "--output=json", "--image-opts", opts),
        ]
        results = []
        for args in steps:
            result = tool(*args, check=False) if tool is qemu_img else tool(*args)
            text = (result.stdout + result.stderr).replace(f"{tmp_path}/{who}/", "DIR/")
            results.append((result.returncode, text))
        outputs.append(results)
    assert "data file: foo" in outputs[0][1][1]
    assert outputs[1] == outputs[0]


def test_repair_that_meets_a_fatal_corruption_cannot_double_check(tmp_path):
    """A repair that marks the image corrupt on the way (an unaligned refcount block)
    leaves QEMU no driver to double-check with: `Check failed: No medium found`, exit 1;
    the next repair finishes the job. Line for line and byte for byte as qemu-img
    (iotest 060)."""
    path = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "64M")
    qemu_io(path, "write 0 128k")
    (reftable_offset,) = struct.unpack(">Q", path.read_bytes()[48:56])
    with open(path, "r+b") as f:
        f.seek(reftable_offset)
        f.write(struct.pack(">Q", 0x2A00))
    ours, theirs = copies(path, "ours.qcow2", "theirs.qcow2")
    exits = []
    for args in (["-q", "-r", "all"], ["-r", "all"]):
        expected = qemu_img("check", *args, theirs, check=False)
        got = run_qimg("check", *args, ours)
        assert (got.returncode, got.stdout, got.stderr) == (
            expected.returncode,
            expected.stdout.replace(str(theirs), str(ours)),
            expected.stderr,
        ), args
        exits.append((got.returncode, "Check failed: No medium found" in got.stderr))
    assert exits == [(1, True), (0, False)]
    assert ours.read_bytes() == theirs.read_bytes()
