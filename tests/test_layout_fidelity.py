"""qimg against the real qemu-img where the letter matters: driver names and refusals,
where bitmap metadata lands in the file, file: names, null-co sources.

Each test names the iotest it mirrors (031, 082, 126, 150, 190, 303). Both programs run
on the same input in twin directories; their output, and where the layout is
deterministic every cluster the image uses, must be the same.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib.bitmaps import bitmaps_extension, read_directory
from qemutools import qemu_img, qemu_io, run
from qemutools import assert_same_result
from qemutools import run_qimg_in as run_qimg

MiB = 1 << 20


def run_qemu(directory: Path, *args) -> subprocess.CompletedProcess:
    """The real qemu-img in `directory`."""
    return run(["qemu-img", *[str(a) for a in args]], check=False, cwd=directory)


def twin(tmp_path: Path, setup) -> tuple[Path, Path]:
    """Two directories holding the same input made by `setup(directory)`: qimg's, qemu's."""
    ours, theirs = tmp_path / "qimg", tmp_path / "qemu"
    ours.mkdir()
    setup(ours)
    shutil.copytree(ours, theirs)
    return ours, theirs


def both(ours: Path, theirs: Path, *args) -> subprocess.CompletedProcess:
    """Run one command with each program; their exit code, stdout and stderr must agree."""
    mine, real = run_qimg(ours, *args), run_qemu(theirs, *args)
    assert_same_result(mine, real, args)
    return mine


def used_clusters(path: Path) -> dict[int, bytes]:
    """Every cluster with a non-zero refcount, by host offset, with its bytes; of a
    cluster holding a bitmap table or directory only that structure's bytes (QEMU writes
    just those: the rest of the cluster keeps whatever a freed structure left there)."""
    with qcow2lib.open(str(path), "r", backing=False) as image:
        cs = image.cluster_size
        size = image.file.size()
        lengths = {}
        extension = bitmaps_extension(image.header)
        if extension is not None:
            lengths[extension.bitmap_directory_offset] = extension.bitmap_directory_size
            for entry in read_directory(image.file, image.header, cs):
                lengths[entry.table_offset] = entry.table_size * 8
        with open(path, "rb") as f:
            clusters = {}
            for offset in range(0, size, cs):
                if image.refcounts.get(offset // cs):
                    f.seek(offset)
                    clusters[offset] = f.read(min(cs, lengths.get(offset, cs)))
            return clusters


def assert_same_layout(ours: Path, theirs: Path) -> None:
    """The same clusters in use, holding the same bytes (free clusters may differ: QEMU
    leaves old metadata in them, qimg gives them back to the filesystem)."""
    mine, real = used_clusters(ours), used_clusters(theirs)
    assert sorted(mine) == sorted(real)
    for offset, data in real.items():
        assert mine[offset] == data, f"cluster at 0x{offset:x} differs"


# --- header updates rewrite the header cluster whole -------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["rebase", "-u", "-b", "", "img"],
        ["rebase", "-u", "-b", "other-base", "-F", "qcow2", "img"],
        ["bitmap", "--add", "img", "b0"],
        ["amend", "-o", "lazy_refcounts=on", "img"],
        ["bench", "-w", "-c", "1", "-s", "4k", "img"],  # (a lazy refcounts image: marked clean)
    ],
    ids=["rebase-none", "rebase-other", "bitmap-add", "amend", "lazy-write"],
)
def test_header_updates_zero_the_rest_of_the_header_cluster(tmp_path, command):
    """QEMU writes the header, its extensions and the backing name with zeros to the end of
    the cluster whenever it updates them: bytes left there before (an old backing name,
    anything) are gone, and the files end up byte for byte the same."""

    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "base", "64M")
        qemu_img("create", "-q", "-f", "qcow2", d / "other-base", "64M")
        lazy = ["-o", "lazy_refcounts=on"] if command[0] == "bench" else []
        qemu_img("create", "-q", "-f", "qcow2", *lazy, "-b", "base", "-F", "qcow2", d / "img")
        with open(d / "img", "r+b") as file:
            for offset in (3000, 60000):
                file.seek(offset)
                file.write(b"left over")

    ours, theirs = twin(tmp_path, setup)
    if command[0] == "bench":  # (its output holds the time it took)
        assert run_qimg(ours, *command).returncode == run_qemu(theirs, *command).returncode == 0
    else:
        both(ours, theirs, *command)
    mine, real = (ours / "img").read_bytes(), (theirs / "img").read_bytes()
    assert b"left over" not in real[:65536]
    assert mine == real


# --- whole files after the everyday commands ---------------------------------------------

_DATA = ["write -P 1 0 3M", "write -P 2 10M 1M"]
_SNAPSHOT = ["write -P 1 0 3M", "SNAPSHOT", "write -P 3 1M 1M"]
_OVERLAY = ["BACKING", "write -P 5 1M 2M"]
# Not here: `snapshot -c` (the snapshot's date differs), `amend -o refcount_bits=N` (qimg
# puts the new refcount table before the new blocks, QEMU after them: same end offset).


@pytest.mark.parametrize(
    "setup,command",
    [
        (_DATA, ["resize", "img", "128M"]),
        (_DATA, ["resize", "--shrink", "img", "32M"]),
        (_DATA, ["amend", "-o", "compat=0.10", "img"]),
        (_DATA, ["amend", "-o", "lazy_refcounts=on", "img"]),
        (_SNAPSHOT, ["snapshot", "-d", "s1", "img"]),
        (_SNAPSHOT, ["snapshot", "-a", "s1", "img"]),
        (_OVERLAY, ["commit", "img"]),
        (_OVERLAY, ["rebase", "-b", "", "img"]),
        (_OVERLAY, ["check", "-r", "all", "img"]),
    ],
    ids=[
        "resize-grow",
        "resize-shrink",
        "amend-compat",
        "amend-lazy",
        "snapshot-delete",
        "snapshot-apply",
        "commit",
        "rebase-flatten",
        "check-repair",
    ],
)
def test_everyday_commands_leave_the_files_qemu_img_leaves(tmp_path, setup, command):
    """Each of these commands, on the same image, leaves every file byte for byte as
    qemu-img leaves it: the same clusters allocated in the same places, the same tables."""

    def make(d: Path) -> None:
        if "BACKING" in setup:
            qemu_img("create", "-q", "-f", "qcow2", d / "base", "64M")
            qemu_io(d / "base", "write -P 1 0 3M")
            qemu_img("create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", d / "img")
        else:
            qemu_img("create", "-q", "-f", "qcow2", d / "img", "64M")
        for step in setup:
            if step == "SNAPSHOT":
                qemu_img("snapshot", "-c", "s1", d / "img")
            elif step != "BACKING":
                qemu_io(d / "img", step)

    ours, theirs = twin(tmp_path, make)
    both(ours, theirs, *command)
    for name in sorted(p.name for p in theirs.iterdir()):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


# --- iotest 031: rebase -u records any driver name QEMU knows as the backing format --------


def test_rebase_unsafe_takes_a_protocol_driver_as_backing_format(tmp_path):
    ours, theirs = twin(tmp_path, lambda d: qemu_img("create", "-q", "-f", "qcow2", d / "t", "64M"))
    both(ours, theirs, "rebase", "-u", "-b", "/some/backing/file/path", "-F", "host_device", "t")
    both(ours, theirs, "rebase", "-u", "-b", "/x", "-F", "no-such-driver", "t")
    both(ours, theirs, "info", "t")
    assert (ours / "t").read_bytes() == (theirs / "t").read_bytes()


# --- iotest 082: drivers without image creation or amendment refuse in qemu-img's words -----


@pytest.mark.parametrize("driver", ["bochs", "cloop", "dmg", "vvfat", "null-co", "quorum"])
def test_drivers_without_creation_refuse_it(tmp_path, driver):
    ours, theirs = twin(tmp_path, lambda d: qemu_img("create", "-q", "-f", "qcow2", d / "s", "1M"))
    both(ours, theirs, "create", "-f", driver, "new", "1M")
    both(ours, theirs, "create", "-f", driver, "-o", "help")
    both(ours, theirs, "convert", "-O", driver, "s", "new")
    both(ours, theirs, "convert", "-O", driver, "-o", "help")
    both(ours, theirs, "measure", "-O", driver, "--size", "1M")
    both(ours, theirs, "dd", "-O", driver, "if=s", "of=new")
    both(ours, theirs, "amend", "-f", driver, "-o", "help")
    assert not (ours / "new").exists()


@pytest.mark.parametrize("driver", ["vmdk", "vpc", "raw", "file"])
def test_drivers_without_amendment_refuse_it(tmp_path, driver):
    both(tmp_path, tmp_path, "amend", "-f", driver, "-o", "help")


def test_unknown_driver_names_stay_unknown(tmp_path):
    for args in (
        ["create", "-f", "nosuch", "new", "1M"],
        ["amend", "-f", "nosuch", "-o", "help"],
        ["measure", "-O", "nosuch", "--size", "1M"],
    ):
        both(tmp_path, tmp_path, *args)


# --- iotests 303 and 190: bitmap metadata where qemu-img puts it ----------------------------


def test_bitmap_commands_lay_out_metadata_as_qemu_img(tmp_path):
    """Each run stores every consistent bitmap anew (data, then table, in directory order)
    and a new directory, as QEMU does on close; remove writes its directory at once."""

    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "img", "64M")
        qemu_io(d / "img", "write -P 1 0 3M")

    ours, theirs = twin(tmp_path, setup)
    steps = [
        ["--add", "img", "a"],
        ["io", "write -P 2 8M 1M"],
        ["--add", "-g", "512", "--disable", "img", "b"],
        ["--add", "img", "c"],
        ["io", "write -P 3 20M 64k"],
        ["--merge", "a", "img", "b"],
        ["--remove", "img", "a"],
        ["--clear", "img", "c"],
        ["--enable", "--merge", "b", "img", "c"],
        ["--remove", "--add", "-g", "1M", "img", "b"],
        ["--remove", "img", "nosuch"],
        ["--add", "img", "c"],
        ["--disable", "img", "c"],
    ]
    for step in steps:
        if step[0] == "io":
            qemu_io(ours / "img", step[1])
            qemu_io(theirs / "img", step[1])
        else:
            both(ours, theirs, "bitmap", *step)
        assert_same_layout(ours / "img", theirs / "img")
    # (disk size aside: qimg punches the clusters it frees, QEMU only the bitmap data)
    mine, real = run_qimg(ours, "info", "img"), run_qemu(theirs, "info", "img")
    assert re.sub("disk size: .*", "", mine.stdout) == re.sub("disk size: .*", "", real.stdout)
    both(ours, theirs, "check", "img")


def test_bitmaps_of_a_huge_image_take_the_same_file_size(tmp_path):
    """iotest 190 measures the image file as raw: its size must be qemu-img's."""

    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", d / "t", "2T")

    ours, theirs = twin(tmp_path, setup)
    both(ours, theirs, "bitmap", "--add", "--granularity", "512", "-f", "qcow2", "t", "b1")
    both(ours, theirs, "bitmap", "--add", "-g", "2M", "-f", "qcow2", "t", "b2")
    assert (ours / "t").stat().st_size == (theirs / "t").stat().st_size
    assert_same_layout(ours / "t", theirs / "t")
    # (the required size follows the file's holes, which differ: iotest 190 masks it too)
    mine = run_qimg(ours, "measure", "-O", "qcow2", "-f", "raw", "t")
    real = run_qemu(theirs, "measure", "-O", "qcow2", "-f", "raw", "t")
    assert mine.stdout.splitlines()[1:] == real.stdout.splitlines()[1:]


def test_convert_bitmaps_lays_them_out_as_qemu_img(tmp_path):
    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "src", "32M")
        qemu_img("bitmap", "--add", d / "src", "first")
        qemu_io(d / "src", "write 1M 2M")
        qemu_img("bitmap", "--add", "-g", "512", "--disable", d / "src", "off")
        qemu_img("bitmap", "--add", d / "src", "last")
        qemu_io(d / "src", "write 20M 64k")

    ours, theirs = twin(tmp_path, setup)
    both(ours, theirs, "convert", "-O", "qcow2", "--bitmaps", "src", "dst")
    assert_same_layout(ours / "dst", theirs / "dst")


# --- iotest 126: a "file:" name whose rest looks like a protocol prefix --------------------


def test_file_prefixed_names_with_a_colon_resolve_beside_the_image(tmp_path):
    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", d / "base.qcow2", "1M")
        qemu_img(
            "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "image:top.qcow2"
        )

    ours, theirs = twin(tmp_path, setup)
    for args in (
        ["info", "file:image:top.qcow2"],
        ["info", "--output=json", "--backing-chain", "file:image:top.qcow2"],
        ["info", "file:no:such.qcow2"],
        ["check", "file:image:top.qcow2"],
        ["check", "file:base.qcow2"],
        ["check", "nosuch:proto"],
        ["map", "file:image:top.qcow2"],
    ):
        both(ours, theirs, *args)


# --- iotest 150: converting from QEMU's null-co driver --------------------------------------


def test_convert_from_null_co_as_qemu_img(tmp_path):
    for options, sparse in (
        ("'read-zeroes': true", "512"),
        ("'read-zeroes': true", "0"),
        ("'read-zeroes': false", "0"),
        ("'read-zeroes': false", "4k"),
    ):
        name = f"json:{{ 'driver': 'null-co', 'size': {MiB}, {options} }}"
        ours, theirs = tmp_path / "qimg", tmp_path / "qemu"
        for d in (ours, theirs):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        both(ours, theirs, "convert", "-O", "qcow2", "-S", sparse, name, "t")
        both(ours, theirs, "map", "t")
        assert_same_layout(ours / "t", theirs / "t")
        both(ours, theirs, "map", "--output=json", name)
    for options in ('"foo": 1', '"size": 1000', '"read-zeroes": "on", "size": "1M"'):
        both(
            tmp_path, tmp_path, "map", "--output=json", f'json:{{"driver": "null-aio", {options}}}'
        )


def test_info_of_null_devices_as_qemu_img(tmp_path):
    """iotest 153 asks for the info of a null-co device given by --image-opts."""
    for args in (
        ["-U", "--image-opts", "driver=null-co,force-share=on"],
        ["-U", "--image-opts", "driver=null-co,force-share=off"],
        ["--output=json", "--image-opts", "driver=null-co,size=1M,latency-ns=3"],
        ["--image-opts", "driver=null-aio,read-zeroes=on,size=1M"],
        ["--backing-chain", "--output=json", "--image-opts", "driver=null-co"],
        ["json:{'driver': 'null-co', 'size': 1048576, 'read-zeroes': true}"],
        ['json:{"driver": "null-co", "size": 1000, "latency-ns": 4}'],
    ):
        both(tmp_path, tmp_path, "info", *args)


# --- iotest 271: copy-on-write of subclusters after a snapshot ------------------------------


def test_subcluster_writes_after_snapshot_read_as_with_qemu_img(tmp_path):
    """The guest data and the snapshot after iotest 271's sequence are qemu-img's (where
    the snapshot's metadata lands differs: qimg commits a snapshot beside the old state)."""

    def setup(d: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", d / "t", "1M")
        for c in range(10):
            qemu_io(
                d / "t",
                f"write -q -z {64 * c + 14}k 2k",
                f"write -q -P {0xD0 + c} {64 * c + 26}k 2k",
                f"write -q -P {0xE0 + c} {64 * c + 36}k 2k",
            )

    ours, theirs = twin(tmp_path, setup)
    both(ours, theirs, "snapshot", "-c", "snap1", "t")
    writes = [
        f"write -q -P {0xF0 + c} {64 * c + offset}k 1k"
        for c, offset in enumerate((30, 20, 40, 26, 14, 1))
    ] + [
        f"write -q -z {64 * c + offset}k {n}k"
        for c, offset, n in ((6, 30, 3), (7, 26, 2), (8, 26, 1), (9, 12, 1))
    ]
    for d in (ours, theirs):
        qemu_io(d / "t", *writes)
    assert run_qemu(tmp_path, "compare", ours / "t", theirs / "t").returncode == 0
    for d in (ours, theirs):
        qemu_img("convert", "-l", "snap1", "-O", "raw", d / "t", d / "snap.raw")
        assert run_qemu(d, "check", "t").returncode == 0
    assert (ours / "snap.raw").read_bytes() == (theirs / "snap.raw").read_bytes()


# --- convert -c: the same compressed bytes, packed the same way, the file end aligned -------


@pytest.mark.parametrize(
    "options",
    ["cluster_size=64k", "cluster_size=2M", "cluster_size=4k", "cluster_size=512"]
    + ["cluster_size=64k,compression_type=zstd", "cluster_size=4k,compression_type=zstd"],
)
def test_compressed_convert_is_byte_identical(tmp_path, options):
    """zlib as QEMU runs it (4 KiB window, memory level 9) and zstd give the bytes
    qemu-img writes, packed alike, and the copy ends, as qemu-img's does, on a 512-byte
    boundary. (zstd with 2 MiB clusters is left out: the zstandard module bundles another
    libzstd than QEMU's, and for such clusters the two versions' output may differ.)"""

    def setup(directory: Path) -> None:
        source = directory / "src.raw"
        with open(source, "wb") as f:
            f.truncate(8 * MiB)
            f.seek(0)
            f.write(b"\x07" * (3 * MiB))
            f.seek(5 * MiB)
            f.write(b"text, repeated, compresses well; " * 3000)
            f.seek(6 * MiB)
            f.write(__import__("random").Random(5).randbytes(300_000))

    ours, theirs = twin(tmp_path, setup)
    both(ours, theirs, "convert", "-c", "-O", "qcow2", "-o", options, "src.raw", "out.qcow2")
    assert (ours / "out.qcow2").stat().st_size % 512 == 0
    assert (ours / "out.qcow2").read_bytes() == (theirs / "out.qcow2").read_bytes()
