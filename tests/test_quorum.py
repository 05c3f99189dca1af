"""Images above QEMU's quorum driver (copies read by vote), against the real qemu-img 7.2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qemutools import qemu_img, run
from qemutools import run_qimg_in as run_qimg


def quorum_name(fmt: str, threshold: int, files: list[Path]) -> str:
    children = [{"driver": "file", "filename": str(path)} for path in files]
    file = {"driver": "quorum", "vote-threshold": threshold, "children": children}
    return "json:" + json.dumps({"driver": fmt, "file": file})


def both(directory: Path, *args):
    ours = run_qimg(directory, *args)
    theirs = run(["qemu-img", *map(str, args)], check=False, cwd=directory)
    return ours, theirs


@pytest.mark.parametrize(
    "threshold, copies, expect_ok",
    [(1, "ab", True), (2, "ab", False), (2, "aab", True), (2, "aba", True), (3, "aab", False)],
)
def test_convert_reads_by_vote(tmp_path: Path, threshold: int, copies: str, expect_ok: bool):
    """Two versions of one raw disk (one byte differs); the version most copies agree on
    is read if enough do (a tie goes to the later copy's, as QEMU's), else EIO."""
    a = bytearray(range(256)) * 4096
    b = bytearray(a)
    b[70000] ^= 0xFF
    files = []
    for index, version in enumerate(copies):
        path = tmp_path / f"copy{index}.raw"
        path.write_bytes(a if version == "a" else b)
        files.append(path)
    name = quorum_name("raw", threshold, files)
    ours, theirs = both(tmp_path, "convert", "-O", "raw", name, "ours.raw")
    theirs = run(["qemu-img", "convert", "-O", "raw", name, "theirs.raw"], False, tmp_path)
    assert (ours.returncode, ours.stderr) == (theirs.returncode, theirs.stderr)
    assert (ours.returncode == 0) == expect_ok
    if expect_ok:
        assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "theirs.raw").read_bytes()


def test_info_over_quorum_cannot_resolve_backing(tmp_path: Path):
    """qemu-iotests 110: relative backing names have no directory to resolve in."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "t.base", "64M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "t.base", "-F", "qcow2", tmp_path / "t.qcow2")
    shutil.copy(tmp_path / "t.qcow2", tmp_path / "t.copy")
    name = quorum_name("qcow2", 1, [tmp_path / "t.qcow2", tmp_path / "t.copy"])
    ours, theirs = both(tmp_path, "info", name)
    assert ours.returncode == theirs.returncode == 0
    assert ours.stdout == theirs.stdout  # (the name: the node's options re-serialized)
    assert "backing file: t.base (cannot determine actual path)" in ours.stdout


def test_bad_quorum_options(tmp_path: Path):
    (tmp_path / "a.raw").write_bytes(bytes(4096))
    for threshold in (0, 2):
        ours, theirs = both(tmp_path, "info", quorum_name("raw", threshold, [tmp_path / "a.raw"]))
        assert ours.returncode == theirs.returncode == 1
        assert ours.stderr == theirs.stderr


CHILD_A = "file.children.0.driver=file,file.children.0.filename=a.qcow2"
CHILD_B = "file.children.1.driver=file,file.children.1.filename=b.qcow2"


@pytest.mark.parametrize(
    "options",
    [
        "driver=qcow2,file.driver=quorum",
        "driver=qcow2,file.driver=quorum,file.vote-threshold=0",
        f"file.driver=quorum,file.vote-threshold=0,{CHILD_A}",
        f"file.driver=quorum,{CHILD_A}",  # (a missing threshold is 0)
        f"file.driver=quorum,file.vote-threshold=x,{CHILD_A}",
        f"file.driver=quorum,file.vote-threshold=2,{CHILD_A}",
        "file.driver=quorum,file.vote-threshold=1,file.children.0.driver=file",
        "file.driver=quorum,file.vote-threshold=1,file.children.0.filename=a.qcow2",
        f"file.driver=quorum,file.vote-threshold=1,{CHILD_B}",  # (no child 0)
        f"file.driver=quorum,file.vote-threshold=1,file.read-pattern=x,{CHILD_A}",
        f"file.driver=quorum,file.vote-threshold=1,file.blkverify=on,{CHILD_A}",
        f"file.driver=quorum,file.vote-threshold=1,file.blkverify=yes,{CHILD_A}",
        f"file.driver=quorum,file.vote-threshold=2,file.blkverify=on,"
        f"file.rewrite-corrupted=on,{CHILD_A},{CHILD_B}",
        f"file.driver=quorum,file.vote-threshold=1,file.foo=1,{CHILD_A}",
        "file.driver=quorum,file.vote-threshold=1,file.foo=1,file.children.0.driver=file",
        # accepted: the image's name is the node's options as QEMU re-serializes them
        f"file.driver=quorum,file.vote-threshold=2,{CHILD_A},{CHILD_B}",
        f"driver=qcow2,file.driver=quorum,file.vote-threshold=1,file.read-pattern=fifo,"
        f"file.rewrite-corrupted=on,{CHILD_A},{CHILD_B}",
        'json:{"file":{"driver":"quorum","vote-threshold":2,"read-pattern":"quorum",'
        '"children":[{"driver":"file","filename":"a.qcow2"},'
        '{"filename":"b.qcow2","driver":"file"}]}}',
    ],
)
def test_quorum_options_checked_and_named_as_qemu(tmp_path: Path, options: str):
    """QEMU's checks in its order (children array, counts, option types, threshold, read
    pattern, blkverify, each child, unknown options), and its json: name of the image."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    shutil.copy(tmp_path / "a.qcow2", tmp_path / "b.qcow2")
    args = ("info", options) if options.startswith("json:") else ("info", "--image-opts", options)
    ours, theirs = both(tmp_path, *args)
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        theirs.returncode,
        theirs.stdout,
        theirs.stderr,
    )


def test_fifo_reads_the_first_child_that_answers(tmp_path: Path):
    """read-pattern=fifo takes the first child's content without a vote."""
    for name, byte in (("a.raw", 1), ("b.raw", 2)):
        (tmp_path / name).write_bytes(bytes([byte]) * 65536)
    options = (
        "driver=raw,file.driver=quorum,file.vote-threshold=1,file.read-pattern=fifo,"
        "file.children.0.driver=file,file.children.0.filename=a.raw,"
        "file.children.1.driver=file,file.children.1.filename=b.raw"
    )
    ours = run_qimg(tmp_path, "convert", "--image-opts", options, "-O", "raw", "ours.raw")
    theirs = run(
        ["qemu-img", "convert", "--image-opts", options, "-O", "raw", "theirs.raw"],
        False,
        tmp_path,
    )
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "theirs.raw").read_bytes()
    assert (tmp_path / "ours.raw").read_bytes() == bytes([1]) * 65536
