"""qimg against the real qemu-img on the cases QEMU 7.2's own iotests catch.

Each test names the iotest it mirrors. The guest content (read back with qemu-io or
converted with qemu-img) and, where the layout is deterministic, the image bytes are
compared with what the real qemu-img produces from the same input.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemutools import inside, qemu_img, qemu_io, qemu_map, run, to_raw
from qemutools import run_qimg_in as run_qimg


def run_qemu(directory: Path, *args) -> subprocess.CompletedProcess:
    """The real qemu-img in `directory`."""
    return run(["qemu-img", *args], check=False, cwd=directory)


def twin(tmp_path: Path, setup) -> tuple[Path, Path]:
    """Two directories holding the same input, made by `setup(directory)`: one for
    qemu-img, one for qimg."""
    ours, theirs = tmp_path / "qimg", tmp_path / "qemu"
    ours.mkdir()
    setup(ours)
    shutil.copytree(ours, theirs)
    return ours, theirs


def run_both_keeping_the_view(tmp_path, ours: Path, theirs: Path, args, image: str, before):
    """Run `args` with qimg in `ours` and qemu-img in `theirs`: both succeed, qimg's
    `image` then reads `before` (the guest's view) and maps as qemu-img's does."""
    for d, runner in ((ours, run_qimg), (theirs, run_qemu)):
        result = runner(d, *args)
        assert result.returncode == 0, result.stderr
    assert to_raw(ours / image, tmp_path / "after.raw") == before
    assert qemu_map(ours / image) == qemu_map(theirs / image)


# --- iotest 252: a safe rebase onto a new backing file never changes the guest's view ---


def test_rebase_without_old_backing_zeroes_what_the_new_one_would_show(tmp_path):
    cs = 65536

    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "t.qcow2", str(6 * cs))
        qemu_img("create", "-q", "-f", "qcow2", d / "base_new.qcow2", str(6 * cs))
        qemu_io(d / "t.qcow2", f"write -P 0x22 0 {2 * cs}", f"write -P 0x11 {2 * cs} {2 * cs}")
        qemu_io(
            d / "base_new.qcow2",
            f"write -P 0x11 0 {cs}",
            f"write -P 0x11 {2 * cs} {cs}",
            f"write -P 0x11 {4 * cs} {cs}",
        )

    ours, theirs = twin(tmp_path, setup)
    before = to_raw(ours / "t.qcow2", tmp_path / "before.raw")
    rebase = ("rebase", "-b", "base_new.qcow2", "-F", "qcow2", "t.qcow2")
    run_both_keeping_the_view(tmp_path, ours, theirs, rebase, "t.qcow2", before)


def test_rebase_within_the_chain_zeroes_what_lay_past_the_old_backing_file(tmp_path):
    """iotest 024: overlay (320K) -> base_old (256K) -> base_new (320K, data to its end).
    The overlay's last cluster read zeros (past base_old's end); rebased onto base_new,
    a layer of its own chain, it must still read zeros, so it is zeroed explicitly."""
    cs = 65536

    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "base_new.qcow2", str(5 * cs))
        qemu_img(
            "create", "-q", "-f", "qcow2", "-b", "base_new.qcow2", "-F", "qcow2",
            d / "base_old.qcow2", str(4 * cs),
        )  # fmt: skip
        qemu_img(
            "create", "-q", "-f", "qcow2", "-b", "base_old.qcow2", "-F", "qcow2",
            d / "t.qcow2", str(5 * cs),
        )  # fmt: skip
        qemu_io(d / "base_new.qcow2", f"write -P 0xa0 0 {5 * cs}")
        qemu_io(d / "base_old.qcow2", f"write -P 0xa1 {cs} {2 * cs}")

    ours, theirs = twin(tmp_path, setup)
    before = to_raw(ours / "t.qcow2", tmp_path / "before.raw")
    assert before[4 * cs :] == bytes(cs)
    rebase = ("rebase", "-b", "base_new.qcow2", "-F", "qcow2", "t.qcow2")
    run_both_keeping_the_view(tmp_path, ours, theirs, rebase, "t.qcow2", before)


@pytest.mark.parametrize(
    "options", ["cluster_size=4096", "extended_l2=on", "cluster_size=512"], ids=str
)
def test_rebase_allocates_the_units_qemu_does(tmp_path, options):
    """Old and new backing files differing in a few sectors here and there, some inside
    a (sub)cluster, some across the end of one, where the old chain has data, written
    zeros or a hole, and around what the overlay holds itself: qimg's rebase allocates
    the clusters (or subclusters) qemu-img's does, with the same content."""

    def setup(d: Path) -> None:
        for name in ("old.qcow2", "new.qcow2"):
            qemu_img("create", "-q", "-f", "qcow2", d / name, "1M")
        qemu_img(
            "create", "-q", "-f", "qcow2", "-o", options, "-b", "old.qcow2", "-F", "qcow2",
            d / "t.qcow2", "1M",
        )  # fmt: skip
        qemu_io(
            d / "old.qcow2",
            "write -P 0x11 0 24k",
            "write -z 40k 8k",
            "write -P 0 64k 16k",
            "write -P 0x12 300k 100k",
        )
        qemu_io(
            d / "new.qcow2",
            "write -P 0x11 0 24k",
            "write -P 0x5a 1k 1k",
            "write -P 0x5a 20k 1k",
            "write -P 0x5a 42k 4k",
            "write -P 0x5a 70k 3k",
            "write -P 0x12 300k 100k",
            "write -P 0x5a 319k 2k",
            "write -P 0x5a 511k 2k",
            "write -P 0x5a 600k 512",
        )
        qemu_io(d / "t.qcow2", "write -P 0x77 4k 2k", "write -P 0x77 320k 1k")

    ours, theirs = twin(tmp_path, setup)
    before = to_raw(ours / "t.qcow2", tmp_path / "before.raw")
    rebase = ("rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2")
    run_both_keeping_the_view(tmp_path, ours, theirs, rebase, "t.qcow2", before)


def test_commit_past_a_shorter_middle_layer_zeroes_the_base(tmp_path):
    """iotest 274: top (2M) -> mid (1M) -> base (2M of data). Past mid's end the chain
    read zeros, so `commit -b base top` writes zeros there; a range no layer above the base
    allocates is left alone; the base's result equals qemu-img's."""

    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "2M")
        qemu_img(
            "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
            d / "mid.qcow2", "1M",
        )  # fmt: skip
        qemu_img(
            "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
            d / "top.qcow2", "2M",
        )  # fmt: skip
        qemu_io(d / "base.qcow2", "write -P 1 0 2M")
        qemu_io(d / "top.qcow2", "write -P 2 0 64k")

    ours, theirs = twin(tmp_path, setup)
    before = to_raw(ours / "top.qcow2", tmp_path / "before.raw")
    assert before[1 << 20 :] == bytes(1 << 20)
    commit = ("commit", "-b", "base.qcow2", "top.qcow2")
    run_both_keeping_the_view(tmp_path, ours, theirs, commit, "base.qcow2", before)


# --- iotest 029: snapshots and the VM state area -----------------------------------------


def test_vm_state_past_one_tebibyte_survives_snapshot_and_revert(tmp_path):
    image = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    qemu_io(image, "write -b -P 0x11 1T 4k")
    for action in ("-c", "-a"):
        result = run_qimg(tmp_path, "snapshot", action, "foo", image)
        assert result.returncode == 0, result.stderr
    qemu_io(image, "read -b -P 0x11 1T 4k")  # raises on a pattern mismatch
    assert qemu_img("check", image).returncode == 0


def test_convert_of_a_snapshot_keeps_the_image_size_not_the_recorded_one(tmp_path):
    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", d / "t.qcow2", "64M")
        qemu_img("snapshot", "-c", "foo", d / "t.qcow2")
        with open(d / "t.qcow2", "r+b") as f:  # header: size 512, L1 table of one entry
            f.seek(24)
            f.write((512).to_bytes(8, "big"))
            f.seek(36)
            f.write((1).to_bytes(4, "big"))

    ours, theirs = twin(tmp_path, setup)
    mine = run_qimg(ours, "convert", "-l", "foo", "t.qcow2", "t.snap")
    real = run_qemu(theirs, "convert", "-l", "foo", "t.qcow2", "t.snap")
    assert (mine.returncode, mine.stderr) == (real.returncode, real.stderr) == (0, "")
    assert (ours / "t.snap").read_bytes() == (theirs / "t.snap").read_bytes()


# --- iotest 163: shrinking releases refcount blocks that count nothing any more ---------


def _empty_refcount_blocks(path: Path) -> list[int]:
    """Offsets of refcount blocks the table points at that hold only zeros."""
    data = path.read_bytes()
    cluster_size = 1 << int.from_bytes(data[20:24], "big")
    table_offset = int.from_bytes(data[48:56], "big")
    table_clusters = int.from_bytes(data[56:60], "big")
    table = data[table_offset : table_offset + table_clusters * cluster_size]
    offsets = [int.from_bytes(table[i : i + 8], "big") for i in range(0, len(table), 8)]
    return [o for o in offsets if o and not any(data[o : o + cluster_size])]


def test_shrink_with_512_byte_clusters_drops_empty_refcount_blocks(tmp_path):
    def setup(d: Path) -> None:
        qemu_img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            d / "t.qcow2",
            "3M",
        )
        qemu_io(
            d / "t.qcow2",
            *(f"write -P 0xff {offset} 256k" for offset in range(0, 3 << 20, 256 << 10)),
        )

    ours, theirs = twin(tmp_path, setup)
    for d, runner in ((ours, run_qimg), (theirs, run_qemu)):
        result = runner(d, "resize", "-f", "qcow2", "--shrink", "t.qcow2", "1M")
        assert result.returncode == 0, result.stderr
    assert _empty_refcount_blocks(ours / "t.qcow2") == []
    assert (ours / "t.qcow2").stat().st_size == (theirs / "t.qcow2").stat().st_size
    assert qemu_img("check", ours / "t.qcow2").returncode == 0
    assert qemu_img("compare", ours / "t.qcow2", theirs / "t.qcow2").returncode == 0


# --- iotest 271: preallocation with subclusters leaves the backing file visible ----------


def test_preallocation_over_a_backing_file_with_extended_l2(tmp_path):
    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "raw", d / "base", "512k")
        qemu_io(d / "base", "write -P 0xff 0 512k", fmt="raw")

    ours, theirs = twin(tmp_path, setup)
    for mode in ("metadata", "falloc", "full"):
        args = (
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            f"extended_l2=on,preallocation={mode}",
            "-b",
            "base",
            "-F",
            "raw",
            f"{mode}.qcow2",
            "512k",
        )
        for d, runner in ((ours, run_qimg), (theirs, run_qemu)):
            result = runner(d, *args)
            assert result.returncode == 0, result.stderr
        qemu_io(ours / f"{mode}.qcow2", "read -P 0xff 0 512k")  # raises on a mismatch
        assert qemu_map(ours / f"{mode}.qcow2") == qemu_map(theirs / f"{mode}.qcow2")
    # metadata preallocation lays the image out byte for byte as qemu-img does
    assert (ours / "metadata.qcow2").read_bytes() == (theirs / "metadata.qcow2").read_bytes()


# --- new images are laid out as qemu-img lays them out (190, 243, 303) ------------------

CREATE_CASES = [
    ("", "1G"),
    ("", "0"),
    ("compat=0.10", "1G"),
    ("extended_l2=on", "1G"),
    ("cluster_size=2M", "100T"),
    ("cluster_size=512", "256M"),
    ("cluster_size=512,refcount_bits=64", "2G"),  # L1 needs refcount blocks after it
    ("cluster_size=512,refcount_bits=1", "64M"),
    ("lazy_refcounts=on", "1G"),
    ("preallocation=metadata", "100M"),
]


def test_create_is_byte_identical_to_qemu_img(tmp_path):
    for index, (options, size) in enumerate(CREATE_CASES):
        ours, theirs = tmp_path / f"ours{index}.qcow2", tmp_path / f"theirs{index}.qcow2"
        extra = ["-o", options] if options else []
        result = run_qimg(tmp_path, "create", "-q", "-f", "qcow2", *extra, ours, size)
        assert result.returncode == 0, result.stderr
        qemu_img("create", "-q", "-f", "qcow2", *extra, theirs, size)
        assert ours.read_bytes() == theirs.read_bytes(), (options, size)


def test_resize_grows_the_l1_table_as_qemu_img_does(tmp_path):
    for index, (start, new_size) in enumerate((("0", "10G"), ("1G", "100G"))):
        ours, theirs = tmp_path / f"ours{index}.qcow2", tmp_path / f"theirs{index}.qcow2"
        for image in (ours, theirs):
            qemu_img("create", "-q", "-f", "qcow2", image, start)
        result = run_qimg(tmp_path, "resize", "-q", ours, new_size)
        assert result.returncode == 0, result.stderr
        qemu_img("resize", "-q", theirs, new_size)
        assert ours.read_bytes() == theirs.read_bytes(), (start, new_size)


# --- messages -------------------------------------------------------------------------

QIMG_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "qimg.py"


def qimg_program(tmp_path: Path, name: str) -> Path:
    """An executable called `name` that runs this worktree's qimg (argv[0] kept)."""
    program = tmp_path / name
    program.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"sys.path.insert(0, {str(QIMG_SCRIPT.parent.parent)!r})\n"
        "from qcow2lib.cli import main\nsys.exit(main())\n"
    )
    program.chmod(0o755)
    return program


def test_usage_pointers_name_the_program_as_invoked(tmp_path):
    for name in ("qimg", "qemu-img"):
        program = qimg_program(tmp_path, name)
        result = run([program], check=False)
        assert result.returncode == 1
        assert result.stderr == (
            f"{name}: Not enough arguments\nTry '{name} --help' for more information\n"
        )
        usage = run([program, "--help"]).stdout.splitlines()[2]
        assert usage == f"usage: {name} [standard options] command [command options]"
    # under its own name, exactly what qemu-img prints
    assert run([tmp_path / "qemu-img"], check=False).stderr == run(["qemu-img"], check=False).stderr


def test_ctrl_c_kills_quietly_by_sigint_like_qemu_img(tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "b.qcow2", "1G")
    program = qimg_program(tmp_path, "qemu-img")
    for command in (["qemu-img"], [str(program)]):
        process = subprocess.Popen(
            command + ["bench", "-c", "100000000", "-q", str(tmp_path / "b.qcow2")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.5)  # past start-up: Python installs its own handler early
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
        assert process.returncode == -signal.SIGINT, command  # a shell shows 130
        assert err == b"", command


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _add_feature_table(path: Path, table: bytes) -> None:
    """Replace the header extensions of a fresh v3 image by one feature name table."""
    data = (0x6803F857).to_bytes(4, "big") + len(table).to_bytes(4, "big") + table
    _poke(path, 112, data + bytes(-len(data) % 8) + bytes(8))


def test_open_failures_are_worded_as_qemu_img_words_them(tmp_path):
    """iotests 036 (feature names from the table, in its order), 054, 080, 261."""
    image = tmp_path / "t.qcow2"
    cases = []
    # 036: bits 61-63 set; a table naming 61 and 62 (entries padded as QEMU writes them)
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    _poke(image, 72, (0xE000000000000000).to_bytes(8, "big"))
    entry = b"\x00\x3d" + b"test1" + b"\0" + b" " * 40 + b"\x00\x3e" + b"test2" + b"\0" + b" " * 40
    _add_feature_table(image, entry)
    cases.append(("features", image.read_bytes()))
    # 036: a short, unpadded entry still names its bit
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    _poke(image, 72, (0x8000000000000000).to_bytes(8, "big"))
    _add_feature_table(image, b"\x00\x3fTest feature")
    cases.append(("short entry", image.read_bytes()))
    # 054: a virtual size no L1 table can cover
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    _poke(image, 24, (1 << 60).to_bytes(8, "big"))
    cases.append(("too big", image.read_bytes()))
    # 080: an L1 table smaller than the size needs
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    _poke(image, 36, (0).to_bytes(4, "big"))
    cases.append(("L1 too small", image.read_bytes()))
    # 261: a snapshot whose extra data is over QEMU's limit (with its hint)
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    qemu_img("snapshot", "-c", "s", image)
    snapshots_offset = int.from_bytes(image.read_bytes()[64:72], "big")
    _poke(image, snapshots_offset + 36, (65536).to_bytes(4, "big"))
    cases.append(("extra data", image.read_bytes()))
    for label, content in cases:
        image.write_bytes(content)
        mine = run_qimg(tmp_path, "info", image)
        real = run_qemu(tmp_path, "info", image)
        assert real.returncode == 1, label
        assert (mine.returncode, mine.stderr) == (real.returncode, real.stderr), label


def test_bitmap_with_an_unknown_flag_is_refused_like_qemu_img(tmp_path):
    """iotest 242: QEMU's open refuses a bitmap directory entry with a reserved flag."""
    image = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    qemu_img("bitmap", "--add", "-g", "16k", image, "bitmap-0")
    data = image.read_bytes()
    extension_at = data.find((0x23852875).to_bytes(4, "big"), 104)  # the bitmaps extension
    directory = int.from_bytes(data[extension_at + 8 + 16 : extension_at + 8 + 24], "big")
    flags = int.from_bytes(data[directory + 12 : directory + 16], "big")
    _poke(image, directory + 12, (flags | 4).to_bytes(4, "big"))
    for command in (["info", image], ["map", image]):  # (check: not yet, see the report)
        mine = run_qimg(tmp_path, *command)
        real = run_qemu(tmp_path, *command)
        assert (mine.returncode, mine.stderr) == (real.returncode, real.stderr), command
    assert "doesn't satisfy the constraints" in real.stderr


def test_repairing_a_refcount_block_past_any_possible_file_end(tmp_path):
    """iotest 108: a refblock offset so large that the file cannot grow to it."""
    for value in (0x7FFFFFFFFFFF0000, 0xFFFFFFFFFFFF0000):

        def setup(d: Path, value: int = value) -> None:
            qemu_img("create", "-q", "-f", "qcow2", d / "t.qcow2", "64M")
            _poke(d / "t.qcow2", 0x10008, value.to_bytes(8, "big"))

        case = tmp_path / f"{value:x}"
        case.mkdir()
        ours, theirs = twin(case, setup)
        mine = run_qimg(ours, "check", "-r", "all", "t.qcow2")
        real = run_qemu(theirs, "check", "-r", "all", "t.qcow2")
        assert "ERROR could not resize image: Invalid argument" in real.stderr
        assert (mine.returncode, mine.stdout, mine.stderr) == (
            real.returncode,
            real.stdout,
            real.stderr,
        )


def test_amend_data_file_renames_or_removes_the_external_data_file_name(tmp_path):
    """iotest 244: `amend -o data_file=` leaves an image that needs its data file given."""

    def setup(d: Path) -> None:
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=t.qcow2.data",
                "t.qcow2",
                "64M",
            ],
            cwd=d,
        )  # (a relative data file is taken from the cwd)

    ours, theirs = twin(tmp_path, setup)
    for d, runner in ((ours, run_qimg), (theirs, run_qemu)):
        result = runner(d, "amend", "-odata_file=", "t.qcow2")
        assert result.returncode == 0, result.stderr
    assert (ours / "t.qcow2").read_bytes() == (theirs / "t.qcow2").read_bytes()
    for command in (["check", "t.qcow2"],):  # (info: qimg refuses, qemu-img lists; see report)
        mine, real = run_qimg(ours, *command), run_qemu(theirs, *command)
        assert (mine.returncode, mine.stderr) == (real.returncode, real.stderr), command


def test_compressed_convert_to_an_external_data_file_fails_as_qemu_img(tmp_path):
    """iotest 244: the write fails with ENOTSUP, worded as qemu-img words write errors."""

    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "s.qcow2", "64M")
        qemu_io(d / "s.qcow2", "write -P 0x11 0 1M")

    ours, theirs = twin(tmp_path, setup)
    args = (
        "convert",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-c",
        "-odata_file=t.qcow2.data",
        "s.qcow2",
        "t.qcow2",
    )
    mine, real = run_qimg(ours, *args), run_qemu(theirs, *args)
    assert (mine.returncode, mine.stderr) == (real.returncode, real.stderr)
    assert real.stderr == "qemu-img: error while writing at byte 0: Operation not supported\n"


def test_directories_and_empty_files_are_refused_as_qemu_img_refuses_them(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "short.img").write_bytes(bytes(50))
    commands = [
        ["check", "dir"],
        ["check", "-f", "qcow2", "dir"],
        ["check", "-r", "all", "dir"],
        ["info", "dir"],
        ["info", "-f", "qcow2", "empty.img"],
        ["info", "-f", "qcow2", "short.img"],
        ["check", "-f", "qcow2", "empty.img"],
    ]
    for command in commands:
        mine, real = run_qimg(tmp_path, *command), run_qemu(tmp_path, *command)
        assert real.returncode == 1, command
        assert (mine.returncode, mine.stderr) == (real.returncode, real.stderr), command


# --- iotest 244: zeroing or discarding clusters gives the data file's space back too ----


@pytest.mark.parametrize("extended", ["off", "on"])
def test_unmapped_clusters_are_discarded_in_the_external_data_file(tmp_path, extended):
    """QEMU passes a discard on to the data file when an entry stops mapping its cluster
    (zeroing with unmap, or discard); zeroing that keeps the allocation keeps the data.
    (A relative data file name is taken from the cwd, by QEMU and qimg alike.)"""

    def qemu_io_in(d: Path, *commands: str) -> None:
        args = [arg for command in commands for arg in ("-c", command)]
        result = run(["qemu-io", *args, "t.qcow2"], cwd=d)
        assert "error" not in result.stdout.lower() + result.stderr.lower(), result

    def setup(d: Path) -> None:
        options = f"data_file=t.data,extended_l2={extended}"
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, "t.qcow2", "4M"], cwd=d)
        qemu_io_in(d, "write -P 1 0 2M")

    ours, theirs = tmp_path / "qimg", tmp_path / "qemu"
    for d in (ours, theirs):  # (each made afresh: a copy would fill the data file's holes)
        d.mkdir()
        setup(d)
    qemu_io_in(theirs, "write -z -u 0 256k", "discard 512k 256k", "write -z 1M 256k")
    import qcow2lib

    with inside(ours), qcow2lib.open("t.qcow2", "r+") as image:
        image.write_zeroes(0, 256 << 10, may_unmap=True)
        image.discard(512 << 10, 256 << 10)
        image.write_zeroes(1 << 20, 256 << 10)
    maps = []
    for d in (ours, theirs):
        assert run_qemu(d, "check", "t.qcow2").returncode == 0
        maps.append(run_qemu(d, "map", "--output=json", "t.qcow2").stdout)
        maps.append(run_qemu(d, "map", "--output=json", "-f", "raw", "t.data").stdout)
    assert maps[:2] == maps[2:], "\n".join(maps)
    assert '"data": false, "offset": 0}' in maps[1]  # the first 256 KiB went back
    assert (ours / "t.data").read_bytes() == (theirs / "t.data").read_bytes()


# --- broken metadata met by a read or a block-status query (iotests 060, 080) -------------


def _broken_image(directory: Path, case: str) -> None:
    """Clusters 0 and 1G written; then either guest cluster 0's L2 entry or the second
    L1 entry (of the unallocated range from 512M) is bent to an unaligned offset."""
    image = directory / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "2G")
    qemu_io(image, "write -P 0x11 0 64k", "write -P 0x12 1G 64k")
    data = image.read_bytes()
    l1_offset = int.from_bytes(data[40:48], "big")
    if case == "L2 entry":
        l2_offset = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & ((1 << 56) - 512)
        where, entry = l2_offset, int.from_bytes(data[l2_offset : l2_offset + 8], "big")
    else:  # the L1 entry of the second L2 table
        where, entry = l1_offset + 8, int.from_bytes(data[l1_offset + 8 : l1_offset + 16], "big")
    _poke(image, where, (entry + 0x200).to_bytes(8, "big"))


@pytest.mark.parametrize("case", ["L2 entry", "L1 entry"])
def test_broken_metadata_met_by_reads_as_qemu_img(tmp_path, case):
    """Each command that reads prints QEMU's one-time notice of the damage (an image
    opened read-only is reported corrupt, not marked) and fails with EIO in its own
    words; a read through an image open for writing marks it corrupt, as qemu-io's."""
    ours, theirs = twin(tmp_path, lambda directory: _broken_image(directory, case))
    offset = "0" if case == "L2 entry" else "536870912"  # (the second L2 table's range)
    for args in (
        ["convert", "-O", "raw", "t.qcow2", "out.raw"],
        ["compare", "t.qcow2", "t.qcow2"],
        ["map", "--output=json", "t.qcow2"],
        ["measure", "-O", "qcow2", "t.qcow2"],
        ["dd", "if=t.qcow2", "of=out.raw", "-O", "raw", f"skip={int(offset) // 4096}", "bs=4k"],
        ["bench", "-c", "1", "-s", "4k", "-o", offset, "t.qcow2"],
    ):
        mine, real = run_qimg(ours, *args), run_qemu(theirs, *args)
        assert (mine.returncode, mine.stderr) == (real.returncode, real.stderr), args
        assert real.stderr.startswith("qcow2: Image is corrupt: "), args
    import qcow2lib
    from qcow2lib.errors import CorruptImageError, Qcow2IOError

    with qcow2lib.open(str(ours / "t.qcow2"), "r+") as image:
        with pytest.raises(Qcow2IOError) as failed:
            image.read(int(offset), 4096)
    assert failed.value.errno == 5 and isinstance(failed.value, CorruptImageError)
    qemu = run(["qemu-io", "-c", f"read {offset} 4k", "t.qcow2"], check=False, cwd=theirs)
    assert failed.value.notice == qemu.stderr.splitlines()[0]
    assert failed.value.notice.startswith("qcow2: Marking image as corrupt: ")
    for directory in (ours, theirs):
        info = run_qemu(directory, "info", "t.qcow2").stdout
        assert "corrupt: true" in info, directory


@pytest.mark.parametrize(
    "case, offset, length",
    [("data", 0, 4096), ("data", 512, 512), ("data", 0, 131072), ("preallocated zero", 0, 4096)],
)
def test_broken_metadata_met_by_writes_as_qemu_io(tmp_path, case, offset, length):
    """A write into a cluster the image owns whose L2 entry holds an unaligned offset:
    QEMU's notice in its write path's words (a data or preallocated zero cluster, the
    guest offset written), the corrupt bit, and EIO."""
    import qcow2lib
    from qcow2lib.errors import CorruptImageError, Qcow2IOError

    image = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "2G")
    qemu_io(image, "write -P 0x11 0 128k", *(["write -z 0 64k"] if case != "data" else []))
    data = image.read_bytes()
    l1_offset = int.from_bytes(data[40:48], "big")
    l2_offset = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & ((1 << 56) - 512)
    entry = int.from_bytes(data[l2_offset : l2_offset + 8], "big")
    _poke(image, l2_offset, (entry + 0x200).to_bytes(8, "big"))
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(image, theirs)
    with qcow2lib.open(str(image), "r+") as device:
        with pytest.raises(Qcow2IOError) as failed:
            device.write(offset, b"\x5a" * length)
    assert failed.value.errno == 5 and isinstance(failed.value, CorruptImageError)
    qemu = run(["qemu-io", "-c", f"write -P 0x5a {offset} {length}", theirs], check=False)
    assert failed.value.notice == qemu.stderr.splitlines()[0]
    assert failed.value.notice.startswith(f"qcow2: Marking image as corrupt: {case.capitalize()}")
    for path in (image, theirs):
        assert "corrupt: true" in qemu_img("info", path).stdout
