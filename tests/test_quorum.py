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
    # QEMU names the node by its options re-serialized; the lines after the name agree
    assert ours.stdout.split("\n")[1:] == theirs.stdout.split("\n")[1:]
    assert "backing file: t.base (cannot determine actual path)" in ours.stdout


def test_bad_quorum_options(tmp_path: Path):
    (tmp_path / "a.raw").write_bytes(bytes(4096))
    for threshold in (0, 2):
        ours, theirs = both(tmp_path, "info", quorum_name("raw", threshold, [tmp_path / "a.raw"]))
        assert ours.returncode == theirs.returncode == 1
        assert ours.stderr == theirs.stderr
