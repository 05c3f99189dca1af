"""Images above QEMU's quorum driver (copies read by vote), against the real qemu-img 7.2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qemutools import assert_same_result, qemu_img, qemu_io, run
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
    assert_same_result(ours, theirs, args)


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


# --- quorum as a node of its own (driver=quorum), and as a backing node ---------------------


def _children(count: int) -> str:
    return ",".join(
        f"children.{index}.driver=qcow2,children.{index}.file.filename=c{index}.qcow2"
        for index in range(count)
    )


@pytest.mark.parametrize(
    "args",
    [
        ["info", "--image-opts", f"driver=quorum,vote-threshold=1,{_children(1)}"],
        ["info", "--output=json", "--image-opts", f"driver=quorum,vote-threshold=2,{_children(2)}"],
        ["map", "--image-opts", f"driver=quorum,vote-threshold=1,{_children(1)}"],
        ["map", "--output=json", "--image-opts", f"driver=quorum,vote-threshold=2,{_children(3)}"],
        ["check", "--image-opts", f"driver=quorum,vote-threshold=1,{_children(1)}"],
        ["compare", "--image-opts", f"driver=quorum,vote-threshold=2,{_children(2)}", "c0.qcow2"],
        [
            "info",
            'json:{"driver":"quorum","vote-threshold":1,"read-pattern":"fifo","children":'
            '[{"driver":"raw","file":{"driver":"file","filename":"c0.qcow2"}}]}',
        ],
        ["info", "--image-opts", f"driver=quorum,vote-threshold=4,{_children(3)}"],
    ],
)
def test_quorum_node_as_qemu(tmp_path: Path, args: list[str]):
    """A quorum of qcow2 copies, each with data in different places (two agree on each
    byte): what it reads, its size, its block status (zero only where every copy says
    so, no offsets), its name, and check's refusal, as qemu-img's."""
    for index in range(3):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / f"c{index}.qcow2", "4M")
        qemu_io(tmp_path / f"c{index}.qcow2", "write -P 7 0 64k", f"write -P 9 {index + 1}M 64k")
    ours, theirs = both(tmp_path, *args)
    assert_same_result(ours, theirs, args)


def test_quorum_node_reads_writes_and_backs_an_image(tmp_path: Path):
    """convert reads by vote; a write reaches every copy; an overlay over a quorum backing
    node (named in its header, or given by options) reads through it as QEMU's does."""
    for index in range(3):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / f"c{index}.qcow2", "4M")
        qemu_io(tmp_path / f"c{index}.qcow2", "write -P 7 0 64k")
    qemu_io(tmp_path / "c2.qcow2", "write -P 8 0 512")  # outvoted
    node = f"driver=quorum,vote-threshold=2,{_children(3)}"
    ours, theirs = both(tmp_path, "convert", "--image-opts", node, "-O", "raw", "ours.raw")
    run(["qemu-img", "convert", "--image-opts", node, "-O", "raw", "theirs.raw"], False, tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert (tmp_path / "ours.raw").read_bytes() == (tmp_path / "theirs.raw").read_bytes()
    import qcow2lib
    from qemutools import inside

    from qcow2lib.chain import json_image_target

    target, fmt = json_image_target(quorum_node_name(3))
    with inside(tmp_path), qcow2lib.open(target, "r+", fmt) as device:
        assert device.format == "quorum"
        device.write(1 << 20, b"\x33" * 4096)
    for index in range(3):
        qemu_io(tmp_path / f"c{index}.qcow2", "read -P 0x33 1M 4k")
        assert qemu_img("check", tmp_path / f"c{index}.qcow2", check=False).returncode == 0
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "plain.qcow2", "4M")  # (no backing name)
    backing = quorum_node_name(2)
    for tool, overlay in (("qimg", "ov-ours.qcow2"), ("qemu-img", "ov-theirs.qcow2")):
        args = ["create", "-q", "-f", "qcow2", "-b", backing, "-F", "quorum", overlay]
        result = (
            run_qimg(tmp_path, *args)
            if tool == "qimg"
            else run(["qemu-img", *args], False, tmp_path)
        )
        assert result.returncode == 0, result.stderr
    for args in (
        ["info", "--backing-chain", "ov-theirs.qcow2"],
        ["map", "--output=json", "ov-theirs.qcow2"],
        [
            "map",
            "--output=json",
            "--image-opts",
            "file.filename=plain.qcow2,backing.driver=quorum,backing.vote-threshold=1,"
            "backing.children.0.driver=qcow2,backing.children.0.file.filename=c0.qcow2",
        ],
        ["compare", "ov-ours.qcow2", "ov-theirs.qcow2"],
    ):
        ours, theirs = both(tmp_path, *args)
        assert_same_result(ours, theirs, args)


def quorum_node_name(count: int) -> str:
    children = [
        {"driver": "qcow2", "file": {"driver": "file", "filename": f"c{index}.qcow2"}}
        for index in range(count)
    ]
    return "json:" + json.dumps({"driver": "quorum", "vote-threshold": 2, "children": children})
