"""qimg create/info against the real qemu-img: same arguments, same bytes out.

Each comparison runs qemu-img in one scratch directory and qimg (through a launcher
named "qemu-img", so messages carry the same program name) in a twin directory with the
same contents, then compares exit code, stdout and stderr exactly. Only what legitimately
differs between two tools writing two files is masked: the "disk size" of an image, and
the version/bug-report lines of --help.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qimg
from qcow2lib.qobject import qdict_items, qemu_json
from qemutools import qemu_create, qemu_img, qemu_io
from qemutools import assert_same_in, both_on_small_disks, make_launcher, run_on_a_small_disk
from shared import build_once

ROOT = Path(__file__).resolve().parent.parent


class Twins:
    """Two scratch directories with identical contents, one per tool."""

    def __init__(self, tmp_path: Path, existing: bool = False):
        """New twins in `tmp_path`, or with `existing` those made there before."""
        self.qemu_dir = tmp_path / "qemu"
        self.qimg_dir = tmp_path / "qimg"
        bindir = tmp_path / "bin"
        if existing:
            self.launcher = bindir / "qemu-img"
            return
        self.qemu_dir.mkdir()
        self.qimg_dir.mkdir()
        bindir.mkdir()
        self.launcher = make_launcher(bindir, "qemu-img")

    def dirs(self) -> tuple[Path, Path]:
        return self.qemu_dir, self.qimg_dir

    def setup(self, action) -> None:
        """Run action(directory) in both directories (e.g. to create the same base image)."""
        for directory in self.dirs():
            with inside(directory):
                action(directory)

    def setup_copied(self, action) -> None:
        """Run action() in qemu's directory, then copy the result byte for byte to qimg's.

        For images whose bytes must not differ, e.g. those holding snapshot timestamps.
        """
        with inside(self.qemu_dir):
            action()
        self.qimg_dir.rmdir()
        subprocess.run(
            ["cp", "-a", "--sparse=always", str(self.qemu_dir), str(self.qimg_dir)], check=True
        )

    def qemu(self, *args) -> subprocess.CompletedProcess:
        with inside(self.qemu_dir):
            return qemu_img(*args, check=False)

    def qimg(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.launcher), *map(str, args)], cwd=self.qimg_dir, capture_output=True, text=True
        )

    def both(self, *args) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
        return self.qemu(*args), self.qimg(*args)

    def assert_same(self, *args, mask=None) -> subprocess.CompletedProcess:
        """Run both tools; exit code, stdout and stderr must match.

        Each tool's own directory name is replaced by "<dir>"; `mask` hides more.
        """
        expected, actual = self.both(*args)
        assert "Traceback" not in actual.stderr, actual.stderr

        def seen(result, directory):
            clean = [
                text.replace(str(directory), "<dir>") for text in (result.stdout, result.stderr)
            ]
            return (result.returncode, *(mask(text) if mask else text for text in clean))

        assert seen(actual, self.qimg_dir) == seen(expected, self.qemu_dir), args
        return actual


@contextlib.contextmanager
def inside(directory: Path):
    """Run a block with `directory` as the working directory (qemu-img takes no cwd)."""
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(cwd)


@pytest.fixture
def twins(tmp_path):
    return Twins(tmp_path)


def mask_disk_size(text: str) -> str:
    """The allocated size of two separately written files may differ; nothing else may."""
    text = re.sub(r"^disk size: .*$", "disk size: <masked>", text, flags=re.M)
    return re.sub(r'"actual-size": \d+', '"actual-size": <masked>', text)


# --- help, version, global options ----------------------------------------------------------


def help_body(text: str) -> list[str]:
    """--help minus the lines that name the program's own version, formats and bug tracker."""
    lines = text.splitlines()
    assert lines[0].startswith("qemu-img version 7.2")
    body = lines[2:]
    formats = [i for i, line in enumerate(body) if line.startswith("Supported formats:")]
    assert len(formats) == 1
    return body[: formats[0]]


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["-h"],
        ["--he"],
        ["create", "--help"],
        ["create", "-h"],
        ["info", "--help"],
        ["info", "-h"],
        ["create", "-q", "-h", "x"],
    ],
)
def test_help_matches_qemu_img(twins, args):
    expected, actual = twins.both(*args)
    assert actual.returncode == expected.returncode == 0
    assert actual.stderr == expected.stderr == ""
    assert help_body(actual.stdout) == help_body(expected.stdout)
    formats = [line for line in actual.stdout.splitlines() if line.startswith("Supported formats")]
    ours = "blkdebug file host_device luks nbd null-aio null-co qcow2 quorum raw throttle vmdk"
    ours = ours.split()
    assert formats == ["Supported formats: " + " ".join(ours)]
    # (each one qemu-img's, in its order)
    line = [line for line in expected.stdout.splitlines() if line.startswith("Supported formats")]
    theirs = line[0].split()[2:]
    assert [name for name in theirs if name in ours] == ours


@pytest.mark.parametrize("args", [["-V"], ["--version"], ["--vers"], ["-V", "create"]])
def test_version(twins, args):
    expected, actual = twins.both(*args)
    assert actual.returncode == expected.returncode == 0
    assert (
        actual.stdout.splitlines()[0].split(" (")[0]
        == expected.stdout.splitlines()[0].split(" (")[0]
        == "qemu-img version 7.2.22"
    )


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["foo"],
        ["-x"],
        ["--xyz"],
        ["-T"],
        ["--trace"],
        ["--help=x"],
        ["--"],
        ["-", "info"],
        ["create"],
        ["create", "-f"],
        ["create", "-x", "a"],
        ["create", "-qx", "a"],
        ["create", "-xq", "a"],
        ["create", "--obj"],
        ["create", "--help=1"],
        ["create", "a.img", "1G", "extra"],
        ["create", "-f", "qcow2", "--", "-a.img", "-1"],
        ["create", "-o", "", "a.img", "1G"],
        ["create", "-o", ",size=1G", "a.img"],
        ["create", "-o", "size=1G,", "a.img"],
        ["create", "-f", "qcow2", "-o", "size=1G,,", "a.img"],
        ["info"],
        ["info", "a", "b"],
        ["info", "-Ux", "a"],
        ["info", "-xU", "a"],
        ["info", "--help=x", "a"],
        ["info", "--f", "a"],
        ["info", "--fo", "raw"],
        ["info", "--output"],
        ["info", "a", "--output"],
        ["info", "a", "-f"],
        ["info", "--output=xml", "a"],
        ["info", "--output", "JSON", "a"],
    ],
)
def test_usage_errors(twins, args):
    twins.assert_same(*args)


# --- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        "1G",
        "1g",
        "1.5k",
        "1.",
        "1.k",
        "0x10",
        "0x10k",
        "12b",
        "12B",
        " 12",
        "+12",
        "1.5e",
        "1.99999999999999999999k",
        "0",
        "9223372036854775807",
        "0x1E",
        "1.0000000000000000001E",
        "1x",
        "-1",
        "-0",
        "1e3",
        "1.5",
        "1.5b",
        "16E",
        "8E",
        "0x",
        "0x1.8",
        ".5k",
        "k",
        "1kb",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775808",
    ],
)
def test_size_argument(twins, size):
    """Size spellings reach the same byte count (the Formatting line) or the same error."""
    twins.assert_same("create", "-f", "raw", "-o", "preallocation=foo", "img.raw", size)


@pytest.mark.parametrize(
    "value, text",
    [
        (0, "0 B"),
        (1, "1 B"),
        (999, "999 B"),
        (1000, "0.977 KiB"),
        (1023, "0.999 KiB"),
        (1024, "1 KiB"),
        (200704, "196 KiB"),
        (1536, "1.5 KiB"),
        (1 << 30, "1 GiB"),
        ((1 << 30) - 1, "1 GiB"),
        (1023 * 1024**2, "0.999 GiB"),
        (10**15, "909 TiB"),
        ((1 << 64) - 1, "16 EiB"),
        (123456789, "118 MiB"),
    ],
)
def test_format_size(value, text):
    from qcow2lib.sizes import format_size

    assert format_size(value) == text


# --- create ----------------------------------------------------------------------------------


def compare_images(twins: Twins, name: str, fmt: str | None = None, check: bool = True) -> None:
    """Both created images must look the same to the real qemu-img (info and check)."""
    infos = []
    for directory in twins.dirs():
        with inside(directory):
            args = ["info", "--output=json"] + (["-f", fmt] if fmt else []) + [name]
            info = json.loads(qemu_img(*args).stdout)
            data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
            if data_file:
                info["data file size"] = os.path.getsize(data_file)
            if check and info["format"] == "qcow2":
                assert qemu_img("check", name, check=False).returncode == 0
        info.pop("actual-size")
        infos.append(info)
    assert infos[1] == infos[0]


CREATE_CASES = [
    ["-f", "qcow2"],
    ["-f", "qcow2", "-q"],
    ["-f", "raw"],
    [],
    ["-f", "qcow2", "-o", "cluster_size=4k"],
    ["-f", "qcow2", "-o", "cluster_size=2M,lazy_refcounts=on"],
    ["-f", "qcow2", "-o", "compat=0.10"],
    ["-f", "qcow2", "-o", "compat=v2"],
    ["-f", "qcow2", "-o", "compat=v3,refcount_bits=1"],
    ["-f", "qcow2", "-o", "refcount_bits=64", "-o", "lazy_refcounts"],
    ["-f", "qcow2", "-o", "refcount_bits=0x8,nolazy_refcounts"],
    ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=32k"],
    ["-f", "qcow2", "-o", "compression_type=zstd"],
    ["-f", "qcow2", "-o", "preallocation=metadata"],
    ["-f", "qcow2", "-o", "preallocation=falloc"],
    ["-f", "qcow2", "-o", "preallocation=full"],
    ["-f", "qcow2", "-o", "preallocation=off,extended_l2=off,lazy_refcounts=off"],
    ["-f", "qcow2", "-o", "nocow=on,extent_size_hint=1M"],
    ["-f", "qcow2", "-o", "encryption=off"],
    ["-f", "qcow2", "-o", "id=foo,cluster_size=0x10k"],
    ["-f", "qcow2", "-o", "data_file=img.data"],
    ["-f", "qcow2", "-o", "data_file=img.data,data_file_raw=on"],
    ["-f", "raw", "-o", "preallocation=falloc"],
    ["-f", "raw", "-o", "preallocation=full,nocow=on"],
    ["-f", "raw", "-o", "extent_size_hint=0"],
    ["-f", "file"],
    ["-f", "file", "-o", "preallocation=falloc,nocow=on,extent_size_hint=1M"],
]


@pytest.mark.parametrize(
    "options", CREATE_CASES, ids=lambda o: " ".join(o) if isinstance(o, list) else None
)
@pytest.mark.parametrize("size", ["1M", "100"])
def test_create(twins, options, size):
    twins.assert_same("create", *options, "img", size)
    fmt = options[options.index("-f") + 1] if "-f" in options else "raw"
    compare_images(twins, "img", fmt)


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "qcow2", "-o", "size=1G", "img"],
        ["-f", "raw", "-o", "size=1G", "img"],
        ["-f", "qcow2", "-o", "size=0x10M", "img"],
        ["-f", "qcow2", "-o", "size=0x10M,extent_size_hint=0x1k,cluster_size=0x1M", "img"],
        ["-f", "raw", "-o", "size=0x1M,extent_size_hint=0x1k", "img"],
        ["-f", "qcow2", "file:img", "1M"],
    ],
)
def test_create_size_forms(twins, args):
    twins.assert_same("create", *args)
    compare_images(twins, "img")


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "qcow2", "img", "1G", "-o", "cluster_size=1000"],
        ["-f", "qcow2", "img", "1G", "-o", "cluster_size=0"],
        ["-f", "qcow2", "img", "1G", "-o", "cluster_size=4M"],
        ["-f", "qcow2", "img", "1G", "-o", "cluster_size=1.5k"],
        ["-f", "qcow2", "img", "1G", "-o", "cluster_size=x"],
        ["-f", "qcow2", "img", "1G", "-o", "cluster_size=16E"],
        ["-f", "qcow2", "img", "1G", "-o", "compat=foo"],
        ["-f", "qcow2", "img", "0x1M", "-o", "extent_size_hint=0x1k,cluster_size=0x10k,compat=foo"],
        ["-f", "qcow2", "img", "-o", "size=0x1M,cluster_size=0x10k,preallocation=foo"],
        ["-f", "qcow2", "img", "1G", "-o", "compat=0.10,lazy_refcounts=on"],
        ["-f", "qcow2", "img", "1G", "-o", "compat=0.10,extended_l2=on"],
        ["-f", "qcow2", "img", "1G", "-o", "compat=0.10,refcount_bits=8"],
        ["-f", "qcow2", "img", "1G", "-o", "compat=0.10,compression_type=zstd"],
        ["-f", "qcow2", "img", "1G", "-o", "compat=0.10,data_file=d.raw"],
        ["-f", "qcow2", "img", "1G", "-o", "refcount_bits=3"],
        ["-f", "qcow2", "img", "1G", "-o", "refcount_bits=128"],
        ["-f", "qcow2", "img", "1G", "-o", "refcount_bits=0"],
        ["-f", "qcow2", "img", "1G", "-o", "refcount_bits=-1"],
        ["-f", "qcow2", "img", "1G", "-o", "refcount_bits=foo"],
        ["-f", "qcow2", "img", "1G", "-o", "refcount_bits=18446744073709551615"],
        ["-f", "qcow2", "img", "1G", "-o", "refcount_bits=18446744073709551616"],
        ["-f", "qcow2", "img", "1G", "-o", "compression_type=foo"],
        ["-f", "qcow2", "img", "1G", "-o", "preallocation=foo"],
        ["-f", "qcow2", "img", "1G", "-o", "extended_l2=maybe"],
        ["-f", "qcow2", "img", "1G", "-o", "extended_l2=on,cluster_size=4k"],
        ["-f", "qcow2", "img", "1G", "-o", "foo=bar"],
        ["-f", "qcow2", "img", "1G", "-o", "size=1G"],
        ["-f", "qcow2", "img", "1G", "-o", "data_file_raw=on"],
        ["-f", "qcow2", "img", "1G", "-o", "backing_fmt=qcow2"],
        ["-f", "qcow2", "img", "1G", "-F", "qcow2"],
        ["-f", "qcow2", "img", "1G", "-o", "extent_size_hint=5G"],
        ["-f", "qcow2", "img", "1G", "-o", "encryption=on,encrypt.format=luks"],
        ["-f", "qcow2", "img", "-o", "size=1.5"],
        ["-f", "qcow2", "img", "-o", "size=16E"],
        ["-f", "qcow2", "img"],
        ["-f", "qcow2", "-u", "-b", "nonexist", "-F", "qcow2", "img"],
        ["-f", "qcow2", "-b", "nonexist", "img", "1G"],
        ["-f", "qcow2", "-b", "nonexist", "-F", "qcow2", "img", "1G"],
        ["-f", "qcow2", "-b", "img", "-F", "qcow2", "img", "1G"],
        ["-f", "qcow2", "-b", "", "-F", "qcow2", "img", "1G"],
        ["-f", "qcow2", "-u", "-b", "base", "-F", "foo", "img", "1G"],
        ["-f", "qcow2", "-u", "-b", "base", "img", "1G"],
        ["-f", "foo", "img", "1G"],
        ["-f", "raw", "img", "1G", "-o", "preallocation=foo"],
        ["-f", "file", "img", "1G", "-o", "preallocation=foo"],
        ["-f", "file", "-b", "base", "img", "1G"],
        ["-f", "raw", "img", "1G", "-o", "extent_size_hint=5G"],
        ["-f", "raw", "img", "1G", "-o", "cluster_size=64k"],
        ["-f", "raw", "-b", "base", "img", "1G"],
        ["-f", "raw", "-F", "raw", "img", "1G"],
        ["-f", "qcow2", "a:img", "1G"],
    ],
)
def test_create_errors(twins, args):
    twins.assert_same("create", *args)
    for directory in twins.dirs():
        assert not (directory / "img").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "qcow2", "-o", "help"],
        ["-f", "qcow2", "-o", "?"],
        ["-f", "qcow2", "-o", "help", "x.qcow2"],
        ["-f", "qcow2", "-o", "size=1G,help", "x.qcow2", "1G"],
        ["-o", "help"],
        ["-f", "raw", "-o", "help", "x.raw"],
        ["-f", "file", "-o", "help"],
        ["-f", "foo", "-o", "help"],
        ["-f", "qcow2", "-o", "help", "a:b"],
        ["-f", "qcow2", "-o", "nohelp", "x.qcow2", "1M"],
    ],
)
def test_create_option_help(twins, args):
    twins.assert_same("create", *args)


@pytest.fixture
def backing_twins(twins):
    def build(directory):
        qemu_create("base.qcow2", "64M", "qcow2")
        qemu_create("base.raw", "3M", "raw")
        (directory / "sub").mkdir()

    twins.setup(build)
    return twins


@pytest.mark.parametrize(
    "options, name, size",
    [
        (["-b", "base.qcow2", "-F", "qcow2"], "top1", []),
        (["-b", "base.qcow2", "-F", "qcow2"], "top2", ["1G"]),
        (["-b", "base.raw", "-F", "raw"], "top3", []),
        (["-b", "base.qcow2", "-F", "raw"], "top4", []),
        (["-b", "../base.qcow2", "-F", "qcow2"], "sub/top5", []),
        (["-o", "backing_file=base.qcow2,backing_fmt=qcow2"], "top6", []),
        (["-u", "-b", "missing.qcow2", "-F", "qcow2"], "top7", ["1M"]),
        (["-u", "-b", "base.qcow2", "-F", "vmdk"], "top8", ["1M"]),
        (
            ["-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on,preallocation=metadata"],
            "top9",
            [],
        ),
        (["-b", "file:base.qcow2", "-F", "qcow2"], "top10", []),
    ],
)
def test_create_with_backing(backing_twins, options, name, size):
    backing_twins.assert_same("create", "-f", "qcow2", *options, name, *size)
    compare_images(backing_twins, name, check=name not in ("top7", "top8"))


@pytest.mark.parametrize(
    "args",
    [
        ["-b", "base.qcow2", "bad"],
        ["-b", "base.raw", "-F", "qcow2", "bad"],
        ["-b", "base.qcow2", "-F", "qcow2", "-o", "preallocation=metadata", "bad"],
        ["-b", "base.qcow2", "-F", "qcow2", "-o", "data_file=d,data_file_raw=on", "bad"],
        ["-b", "base.qcow2", "-F", "qcow2", "sub/bad"],
        ["-b", "file:", "-F", "qcow2", "bad", "1M"],
        ["-b", "a:b", "-F", "qcow2", "bad", "1M"],
        ["-b", "sub", "-F", "qcow2", "bad"],
    ],
)
def test_create_with_backing_errors(backing_twins, args):
    backing_twins.assert_same("create", "-f", "qcow2", *args)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_create_into_missing_directory(twins, fmt):
    twins.assert_same("create", "-f", fmt, "nodir/img", "1G")


PREALLOC = ("off", "metadata", "falloc", "full")


@pytest.mark.parametrize(
    "args",
    [
        ["-f", "qcow2", "img", "4E"],
        ["-f", "qcow2", "-o", "cluster_size=512", "img", "1P"],
        # (the file system refuses the size: QEMU words any EFBIG of a creation so)
        ["-f", "raw", "img", "1E"],
        ["-f", "raw", "-o", "preallocation=falloc", "img", "1E"],
        # sizes near INT64_MAX, which QEMU's block layer checks as it grows the new image:
        # rounded up to a sector, INT64_MAX turns negative there; past BDRV_MAX_LENGTH
        ["-f", "qcow2", "img", str(2**63 - 1)],
        ["-f", "qcow2", "-o", "compat=0.10", "img", str(2**63 - 1)],
        ["-f", "qcow2", "img", str(2**63 - 2**30 + 512)],
        ["-f", "qcow2", "-o", "cluster_size=2M", "img", str(2**63 - 2**30 + 512)],
        ["-f", "qcow2", "-o", "cluster_size=2M", "img", str(2**63 - 2**30)],
        ["-f", "raw", "img", str(2**63 - 1)],
        ["-f", "raw", "img", str(2**63 - 512)],
        *(["-f", "raw", "-o", f"preallocation={mode}", "img", str(2**63 - 1)] for mode in PREALLOC),
    ],
)
def test_create_too_large(twins, args):
    twins.assert_same("create", *args)
    qemu_files, qimg_files = (sorted(os.listdir(d)) for d in twins.dirs())
    assert qimg_files == qemu_files  # (what a failed creation leaves behind)


def test_create_raw_metadata_preallocation(twins):
    twins.assert_same("create", "-f", "raw", "-o", "preallocation=metadata", "img", "1M")
    assert [os.path.getsize(d / "img") for d in twins.dirs()] == [0, 0]


def test_create_data_file_relative_to_cwd(twins):
    twins.setup(lambda d: (d / "sub").mkdir())
    twins.assert_same("create", "-f", "qcow2", "-o", "data_file=sub/d.raw", "sub/img", "1M")
    assert all((d / "sub" / "d.raw").exists() for d in twins.dirs())


def test_create_overwrites(twins):
    twins.setup(lambda d: (d / "img").write_bytes(b"x" * 100000))
    twins.assert_same("create", "-f", "qcow2", "img", "1M")
    compare_images(twins, "img")


# --- info ------------------------------------------------------------------------------------


def set_incompatible_bits(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(72)
        value = struct.unpack(">Q", f.read(8))[0] | bits
        f.seek(72)
        f.write(struct.pack(">Q", value))


def forget_backing_format(path: Path) -> None:
    """Turn the backing format header extension into an unknown one (as old images lack it)."""
    with open(path, "r+b") as f:
        header = f.read(4096)
        offset = struct.unpack_from(">I", header, 100)[0]  # header_length
        while True:
            ext_type, length = struct.unpack_from(">II", header, offset)
            if ext_type == 0:
                raise AssertionError("no backing format extension")
            if ext_type == 0xE2792ACA:
                f.seek(offset)
                f.write(struct.pack(">I", 0x0BADF00D))
                return
            offset += 8 + (length + 7) // 8 * 8


INFO_IMAGES = {
    "plain.qcow2": lambda: qemu_create("plain.qcow2", "1G"),
    "v2.qcow2": lambda: qemu_create("v2.qcow2", "10M", options={"compat": "0.10"}),
    "features.qcow2": lambda: qemu_create(
        "features.qcow2",
        "3G",
        options={
            "lazy_refcounts": "on",
            "extended_l2": "on",
            "compression_type": "zstd",
            "refcount_bits": "4",
            "cluster_size": "128k",
        },
    ),
    "odd.qcow2": lambda: qemu_create("odd.qcow2", "1234567"),
    "data.qcow2": lambda: qemu_create("data.qcow2", "4M", options={"data_file": "data.raw"}),
    "rawdata.qcow2": lambda: qemu_create(
        "rawdata.qcow2", "4M", options={"data_file": "rawdata.raw", "data_file_raw": "on"}
    ),
    "written.qcow2": lambda: (
        qemu_create("written.qcow2", "8M"),
        qemu_io("written.qcow2", "write -P 7 0 3M"),
    ),
    "disk.raw": lambda: qemu_create("disk.raw", "5M", "raw"),
    "empty.raw": lambda: Path("empty.raw").write_bytes(b""),
    "snap.qcow2": lambda: (
        qemu_create("snap.qcow2", "16M"),
        qemu_img("snapshot", "-c", "first", "snap.qcow2"),
        qemu_io("snap.qcow2", "write 0 64k"),
        qemu_img("snapshot", "-c", "second snapshot", "snap.qcow2"),
    ),
    "dirty.qcow2": lambda: (
        qemu_create("dirty.qcow2", "1M", options={"lazy_refcounts": "on"}),
        set_incompatible_bits(Path("dirty.qcow2"), 1),
    ),
    "corrupt.qcow2": lambda: (
        qemu_create("corrupt.qcow2", "1M"),
        set_incompatible_bits(Path("corrupt.qcow2"), 2),
    ),
    "top.qcow2": lambda: (
        qemu_create("mid.qcow2", "2M", backing="disk.raw", backing_fmt="raw"),
        qemu_create("top.qcow2", "2M", backing="mid.qcow2", backing_fmt="qcow2"),
    ),
    "nofmt.qcow2": lambda: (
        qemu_create("nofmt.qcow2", "5M", backing="disk.raw", backing_fmt="raw"),
        forget_backing_format(Path("nofmt.qcow2")),
    ),
    "sub/rel.qcow2": lambda: (
        Path("sub").mkdir(exist_ok=True),
        qemu_create("sub/rel.qcow2", "5M", backing="../disk.raw", backing_fmt="raw"),
    ),
    "dangling.qcow2": lambda: qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "gone.qcow2",
        "-F",
        "qcow2",
        "dangling.qcow2",
        "5M",
    ),
    'we"ird\\n\u00e9\u4e2d.qcow2': lambda: qemu_create('we"ird\\n\u00e9\u4e2d.qcow2', "1M"),
    "aes.qcow2": lambda: qemu_img(
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        "aes.qcow2",
        "1M",
    ),
    "luks.qcow2": lambda: qemu_img(
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "luks.qcow2",
        "1M",
    ),
    "essiv.qcow2": lambda: qemu_img(
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,"
        "encrypt.iter-time=10,encrypt.cipher-alg=aes-128,"
        "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
        "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
        "essiv.qcow2",
        "1M",
    ),
    "aes-v2.qcow2": lambda: qemu_img(
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=pw",
        "-f",
        "qcow2",
        "-o",
        "encryption=on,encrypt.key-secret=s0,compat=0.10",
        "aes-v2.qcow2",
        "1M",
    ),
}


def absolute_backing(directory: Path) -> None:
    qemu_create("abs.qcow2", "5M", backing=str(directory / "disk.raw"), backing_fmt="raw")


@pytest.fixture(scope="module")
def info_twins(tmp_path_factory):
    """The INFO_IMAGES, built once for the whole run; info only reads them."""
    return Twins(build_once(tmp_path_factory, "info-twins", build_info_twins), existing=True)


def build_info_twins(directory: Path) -> None:
    twins = Twins(directory)

    def build():
        for make in INFO_IMAGES.values():
            make()
        assert not Path("gone.qcow2").exists()

    twins.setup_copied(build)
    twins.setup(absolute_backing)  # names its own directory, so it cannot be copied


INFO_OPTIONS = [
    [],
    ["--output=json"],
    ["--backing-chain"],
    ["--output", "json", "--backing-chain"],
    ["-U"],
    ["--output=human", "--force-share"],
]


@pytest.mark.parametrize(
    "image,options",
    [
        (image, options)
        for image in [*INFO_IMAGES, "abs.qcow2"]
        for options in INFO_OPTIONS
        # a dangling backing file with --backing-chain is an error case: test_info_errors
        if not (image == "dangling.qcow2" and "--backing-chain" in options)
    ],
)
def test_info(info_twins, image, options):
    info_twins.assert_same("info", *options, image, mask=mask_disk_size)


@pytest.mark.parametrize(
    "args",
    [
        ["nonexist"],
        ["file:nonexist"],
        ["a:b"],
        [""],
        ["file:"],
        ["-f", "foo", "disk.raw"],
        ["-f", "foo", "nonexist"],
        ["-f", "qcow2", "disk.raw"],
        ["sub"],
        ["--output=xml", "plain.qcow2"],
        ["--output=", "plain.qcow2"],
        ["--backing-chain", "dangling.qcow2"],
        ["--backing-chain", "--output=json", "dangling.qcow2"],
        ["-f", "raw", "plain.qcow2"],
        ["file:plain.qcow2"],
        ["--backing-chain", "file:top.qcow2"],
    ],
)
def test_info_errors_and_variants(info_twins, args):
    info_twins.assert_same("info", *args, mask=mask_disk_size)


def test_info_without_data_file(twins):
    def build():
        qemu_create("img", "1M", options={"data_file": "img.data"})
        os.unlink("img.data")

    twins.setup_copied(build)
    twins.assert_same("info", "img", mask=mask_disk_size)


def test_info_bitmaps(twins):
    def build():
        qemu_create("img", "1M")
        qemu_img("bitmap", "--add", "img", "b0")
        qemu_img("bitmap", "--add", "-g", "128k", "--disable", "img", "b1")

    twins.setup_copied(build)
    twins.assert_same("info", "img", mask=mask_disk_size)
    twins.assert_same("info", "--output=json", "img", mask=mask_disk_size)


def _has_file_locks(path: Path) -> bool:
    """True once some process holds a byte-range lock on `path` (as listed in /proc/locks).

    Reading /proc/locks takes no lock itself: probing with qemu-img would, and a
    qemu-io starting at that moment would then fail to get its write lock and exit."""
    stat = os.stat(path)
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    with open("/proc/locks") as locks:
        return any(line.split()[5] == inode for line in locks if len(line.split()) > 5)


@contextlib.contextmanager
def held_by_qemu_io(twins: Twins, name: str):
    """Keep `name` open for writing by a qemu-io process in both directories."""
    # qemu-io sleeps in milliseconds: hold the lock for up to ten minutes (killed after use).
    procs = [
        subprocess.Popen(
            ["qemu-io", "-c", "sleep 600000", str(d / name)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for d in twins.dirs()
    ]
    try:
        for proc, directory in zip(procs, twins.dirs()):
            deadline = time.monotonic() + 60  # until qemu-io has taken its locks
            while not _has_file_locks(directory / name):
                if proc.poll() is not None:
                    raise AssertionError(f"qemu-io exited: {proc.stderr.read().decode()}")
                assert time.monotonic() < deadline, f"qemu-io never locked {directory / name}"
                time.sleep(0.05)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stderr.close()


@pytest.fixture
def locked_twins(twins):
    twins.setup(
        lambda d: (
            qemu_create("busy.qcow2", "1M"),
            qemu_create("top.qcow2", "1M", backing="busy.qcow2", backing_fmt="qcow2"),
        )
    )
    with held_by_qemu_io(twins, "busy.qcow2"):
        yield twins


@pytest.mark.parametrize(
    "args",
    [
        ["busy.qcow2"],
        ["-U", "busy.qcow2"],
        ["file:busy.qcow2"],
        ["--backing-chain", "top.qcow2"],
        ["--backing-chain", "--force-share", "top.qcow2"],
    ],
)
def test_info_of_image_in_use(locked_twins, args):
    locked_twins.assert_same("info", *args, mask=mask_disk_size)


def test_create_backed_by_image_in_use(locked_twins):
    locked_twins.assert_same("create", "-f", "qcow2", "-b", "busy.qcow2", "-F", "qcow2", "new")


def test_create_over_image_in_use(locked_twins):
    locked_twins.assert_same("create", "-f", "qcow2", "busy.qcow2", "1M")


def test_info_backing_loop(twins):
    def build(directory):
        qemu_create("a.qcow2", "1M")
        qemu_create("b.qcow2", "1M", backing="a.qcow2", backing_fmt="qcow2")
        qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2")

    twins.setup(build)
    twins.assert_same("info", "--backing-chain", "a.qcow2", mask=mask_disk_size)
    twins.assert_same("info", "a.qcow2", mask=mask_disk_size)


def test_info_of_created_images_matches(twins):
    """qimg-created images described by qimg: same as qemu-img on qemu-img's images."""
    for args in (
        ["-f", "qcow2", "q", "1G"],
        ["-f", "raw", "r", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10,cluster_size=512", "v2", "1M"],
    ):
        twins.assert_same("create", *args)
        twins.assert_same("info", args[-2], mask=mask_disk_size)
        twins.assert_same("info", "--output=json", args[-2], mask=mask_disk_size)


def _allocation(path: Path) -> tuple[int, int, list[tuple[int, int]]]:
    """(size, allocated bytes, data runs) of a file, as SEEK_DATA/SEEK_HOLE see it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = os.fstat(fd)
        runs, pos = [], 0
        while pos < stat.st_size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, pos))
        return stat.st_size, stat.st_blocks * 512, runs
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", ["64K", "1G", "100G", "4T"])
def test_create_allocates_what_qemu_img_allocates(twins, size):
    """Same bytes and the same blocks allocated: QEMU judges from the file's allocation
    whether an image has preallocated metadata, which changes what it maps (iotest 102)."""
    twins.assert_same("create", "-q", "-f", "qcow2", "img", size)
    theirs, ours = (directory / "img" for directory in twins.dirs())
    assert ours.read_bytes() == theirs.read_bytes()
    assert _allocation(ours) == _allocation(theirs)


@pytest.mark.parametrize(
    "args",
    [
        ["create", "-f", "qcow2", "-b", "null-co://", "-F", "raw", "img", "1440K"],
        ["create", "-f", "qcow2", "-b", "null-aio://", "-F", "raw", "img"],
        ["create", "-f", "qcow2", "-b", "null-co://", "img", "1M"],
        ["create", "-f", "qcow2", "-b", "null-co://", "-F", "qcow2", "img", "1M"],
        ["create", "-f", "qcow2", "-b", "null-co://x", "-F", "raw", "img", "1M"],
        ["info", "null-co://"],
        ["info", "--output=json", "null-aio://"],
        ["info", "null-co://foo"],
        ["map", "--output=json", "null-co://"],
    ],
)
def test_null_driver(twins, args):
    """QEMU's null-co/null-aio protocols: nothing stored, 1 GiB, openable as a backing file
    (iotest 155 backs a mirror target with one)."""
    twins.assert_same(*args, mask=mask_disk_size)
    if args[0] == "create" and (twins.qemu_dir / "img").exists():
        compare_images(twins, "img")
        twins.assert_same("info", "--backing-chain", "img", mask=mask_disk_size)
        twins.assert_same("map", "--output=json", "img")


# --- program name and in-process use ---------------------------------------------------------


def test_program_name_comes_from_argv0(tmp_path):
    launcher = make_launcher(tmp_path, "qimg")
    result = subprocess.run(
        [str(launcher), "info", str(tmp_path / "missing")], capture_output=True, text=True
    )
    missing = tmp_path / "missing"
    assert result.returncode == 1
    assert result.stderr == (
        f"qimg: Could not open '{missing}': Could not open '{missing}': No such file or directory\n"
    )
    result = subprocess.run([str(launcher), "frobnicate"], capture_output=True, text=True)
    # the pointer to --help names the program as invoked, too (issue 14)
    assert result.stderr == (
        "qimg: Command not found: frobnicate\nTry 'qimg --help' for more information\n"
    )


def test_python_m_qimg(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tools"), str(ROOT)]))
    result = subprocess.run(
        [sys.executable, "-m", "qimg", "create", "-f", "qcow2", str(tmp_path / "x.qcow2"), "1M"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Formatting '{tmp_path / 'x.qcow2'}', fmt=qcow2 ")


def test_main_in_process(tmp_path, capsys):
    image = tmp_path / "x.qcow2"
    assert qimg.main(["create", "-q", "-f", "qcow2", str(image), "2M"], prog="qemu-img") == 0
    assert qimg.main(["info", "--output=json", str(image)], prog="qemu-img") == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert json.loads(out)["virtual-size"] == 2 * 1024 * 1024
    assert qimg.main(["info", str(tmp_path / "nope")], prog="tool") == 1
    out, err = capsys.readouterr()
    assert err.startswith("tool: Could not open ")
    assert (
        qimg.main(["create", "-f", "qcow2", str(image), "1G", "-o", "cluster_size=3k"], prog="tool")
        == 1
    )
    out, err = capsys.readouterr()
    assert err == f"tool: {image}: Cluster size must be a power of two between 512 and 2048k\n"


def test_engine_errors_never_traceback(tmp_path, capsys):
    """A damaged header is reported in one line, whatever the engine's wording."""
    image = tmp_path / "bad.qcow2"
    qemu_create(image, "1M")
    with open(image, "r+b") as f:
        f.seek(20)
        f.write(struct.pack(">I", 40))  # cluster_bits 40
    assert qimg.main(["info", str(image)], prog="qemu-img") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"qemu-img: Could not open '{image}': ") and err.count("\n") == 1


def test_qemu_json_key_order():
    """QEMU prints dict members in its hash table's order, not insertion order."""
    info = {
        "filename": "f",
        "format": "qcow2",
        "dirty-flag": False,
        "actual-size": 1,
        "virtual-size": 2,
        "cluster-size": 3,
    }
    assert [k for k, _ in qdict_items(info)] == [
        "virtual-size",
        "filename",
        "cluster-size",
        "format",
        "actual-size",
        "dirty-flag",
    ]
    assert qemu_json({"a": [], "b": {}}) == '{\n    "a": [\n    ],\n    "b": {\n    }\n}'
    assert qemu_json('\x01é\U0001f600"\\') == '"\\u0001\\u00E9\\uD83D\\uDE00\\"\\\\"'


@pytest.mark.parametrize(
    "op", [["check", "-r", "all"], ["snapshot", "-c", "s1"], ["amend", "-o", "lazy_refcounts=on"]]
)
def test_bitmaps_survive_what_leaves_the_guest_content_alone(twins, op):
    """Opening for writing does not invalidate persistent bitmaps (qemu-img keeps them
    through check -r, snapshot -c and amend); only a change of the guest's content does."""

    def build():
        qemu_create("img", "4M")
        qemu_io("img", "write -P 7 0 1M")
        qemu_img("bitmap", "--add", "img", "b0")
        qemu_img("bitmap", "--add", "-g", "128k", "--disable", "img", "b1")

    twins.setup_copied(build)
    twins.assert_same(*op, "img")
    twins.assert_same(
        "info",
        "--output=json",
        "img",
        mask=lambda text: re.sub(r'"date-n?sec": \d+', "", mask_disk_size(text)),
    )
    # (QEMU rewrites the bitmaps it loaded when it closes the image, further on)
    twins.assert_same("check", "img", mask=lambda text: re.sub(r"end offset: \d+", "", text))


# (file system size, create arguments): the write of a new image that meets a full disk
# at each step QEMU names: the header cluster, the refcount table, the L1 table, the
# refcount blocks the L1 table needs (QEMU's refcount cache then fails to flush at close
# and says so first), with a data file (removed as well), and preallocation (its data).
FULL_DISK_CASES = [
    ("32k", ["-f", "qcow2", "img.qcow2", "1M"]),
    ("96k", ["-f", "qcow2", "img.qcow2", "1M"]),
    ("200k", ["-f", "qcow2", "img.qcow2", "1T"]),
    ("200k", ["-f", "qcow2", "-o", "refcount_bits=64,cluster_size=512", "img.qcow2", "64G"]),
    ("96k", ["-f", "qcow2", "-o", "data_file=d", "img.qcow2", "1M"]),
    ("2M", ["-f", "qcow2", "-o", "preallocation=full", "img.qcow2", "10M"]),
    ("500k", ["-f", "qcow2", "-o", "preallocation=full", "img.qcow2", "10M"]),
    ("500k", ["-f", "qcow2", "-o", "preallocation=falloc", "img.qcow2", "10M"]),
    ("200k", ["-f", "qcow2", "-o", "preallocation=metadata", "img.qcow2", "1M"]),
    ("32k", ["-f", "raw", "-o", "preallocation=full", "img", "1M"]),
]


@pytest.mark.parametrize("size, args", FULL_DISK_CASES)
def test_create_on_a_full_disk(tmp_path: Path, size: str, args: list[str]) -> None:
    """Creating an image on a file system too small for it: qemu-img's message for the
    step that failed, its exit code, and what is left behind (a qcow2 image and its data
    file are removed, as QEMU removes them)."""
    theirs, ours = both_on_small_disks(tmp_path, size, ["create", *args])
    assert (ours.stdout, ours.stderr) == (theirs.stdout, theirs.stderr)
    assert "exit 1" in theirs.stdout


@pytest.mark.parametrize(
    "size, args, message",
    [
        ("32k", ["-f", "luks", "-o", "key-secret=s"], "Could not write encryption header"),
        (
            "200k",
            ["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s"],
            "Could not zero fill encryption header",
        ),
    ],
)
def test_create_luks_on_a_full_disk(
    tmp_path: Path, size: str, args: list[str], message: str
) -> None:
    """As test_create_on_a_full_disk for LUKS volumes, against the text QEMU prints (it
    is not run side by side: QEMU's key-slot benchmark fails at random on this kind of
    machine, "Unable to get accurate CPU usage"): the new volume is removed."""
    program = make_launcher(tmp_path, "qemu-img")
    (tmp_path / "disk").mkdir()
    secret = ["--object", "secret,id=s,data=pw"]
    done = run_on_a_small_disk(
        tmp_path / "disk", size, [str(program), "create", *secret, *args, "img", "1M"]
    )
    assert done.stderr == f"qemu-img: img: {message}: No space left on device\n"
    assert done.stdout.splitlines()[1:] == ["exit 1"]  # (the Formatting line; no file)


def test_snapshot_names_longer_than_255_bytes_are_cut(twins):
    """qemu-img copies a new snapshot's name into a 256-byte buffer: a longer name is cut
    at 255 bytes (inside a UTF-8 character if it falls there), and the full name then
    names no snapshot."""
    twins.setup(lambda d: qemu_img("create", "-f", "qcow2", "a.qcow2", "1M"))
    long_ascii, long_utf8 = "x" * 300, "é" * 200
    for name in (long_ascii, long_utf8):
        twins.assert_same("snapshot", "-c", name, "a.qcow2")
    listings = []
    for directory in twins.dirs():
        info = json.loads(qemu_img("info", "--output=json", directory / "a.qcow2").stdout)
        names = [snapshot["name"] for snapshot in info["snapshots"]]
        assert names == ["x" * 255, "é" * 127 + "\ufffd"]  # (QEMU's JSON: U+FFFD for 0xc3)
        qemu_img("check", directory / "a.qcow2")
        listed = subprocess.run(
            ["qemu-img", "snapshot", "-l", str(directory / "a.qcow2")],
            capture_output=True,
            check=True,
        ).stdout
        listings.append(re.sub(rb" +\S+ B 20\d\d-.*", b"", listed))  # (the dates differ)
    assert listings[0] == listings[1]
    assert ("é" * 127).encode() + b"\xc3\n" in listings[0]
    twins.assert_same("snapshot", "-d", long_ascii, "a.qcow2")
    twins.assert_same("snapshot", "-d", "x" * 255, "a.qcow2")


@pytest.mark.parametrize(
    "args",
    [
        ["create", "-f", "qcow2", "/dev/null", "1M"],
        ["create", "-f", "qcow2", "-o", "preallocation=metadata", "/dev/zero", "1M"],
        ["convert", "-O", "qcow2", "a.qcow2", "/dev/null"],
        ["convert", "-O", "raw", "a.qcow2", "/dev/null"],
    ],
    ids=" ".join,
)
def test_a_qcow2_image_made_on_a_device_that_keeps_nothing(tmp_path, args):
    """/dev/null takes the writes and keeps nothing: qemu-img's creation fails when it
    opens the new image ("Image is not in qcow2 format", or for convert "error while
    converting qcow2: ..."), not at a flush (fdatasync's EINVAL: nothing to sync there)."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    result = assert_same_in(tmp_path, *args)
    assert result.returncode == 1
