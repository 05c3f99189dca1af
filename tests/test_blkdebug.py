"""blkdebug fault injection and the null-co device, against the real qemu-img 7.2: the
same commands give the same exit code, output and resulting image bytes."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib.blkdebug import Blkdebug, BlkdebugTarget, parse_config_text
from qcow2lib.errors import InvalidArgumentError, Qcow2IOError
from qemutools import qemu_img, qemu_io, run
from qemutools import assert_same_in as assert_same
from qemutools import run_both_in as run_both
from qemutools import run_qimg_in as run_qimg


def write_conf(path: Path, *sections: dict) -> Path:
    text = ""
    for section in sections:
        section = dict(section)
        kind = section.pop("kind", "inject-error")
        text += f"[{kind}]\n" + "".join(f'{k} = "{v}"\n' for k, v in section.items()) + "\n"
    path.write_text(text)
    return path


def test_compare_read_error_after_read_aio(tmp_path: Path):
    """qemu-iotests 074: the first data read after the event fails, compare exits 4."""
    conf = write_conf(tmp_path / "bd.conf", {"event": "read_aio", "errno": 5, "once": "off"})
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1G")
    shutil.copy(tmp_path / "a.qcow2", tmp_path / "b.qcow2")
    qemu_io(tmp_path / "a.qcow2", "write -P 102 512 512")
    result = assert_same(tmp_path, "compare", f"blkdebug:{conf}:a.qcow2", "b.qcow2")
    assert result.returncode == 4
    assert "Input/output error" in result.stderr


@pytest.mark.parametrize("errno_value", [5, 28])
def test_read_error_errno_and_sector(tmp_path: Path, errno_value: int):
    """A rule limited to one sector fails only reads covering it, with its errno (raw:
    the sector is the guest's)."""
    conf = write_conf(
        tmp_path / "bd.conf", {"event": "read_aio", "errno": errno_value, "sector": 300}
    )
    (tmp_path / "a.raw").write_bytes(b"\1" * (1 << 20))
    name = f"blkdebug:{conf}:{tmp_path / 'a.raw'}"
    assert_same(tmp_path, "convert", "-f", "raw", "-O", "raw", name, "out.raw")
    with qcow2lib.open(name, fmt="raw") as image:
        assert image.read(0, 4096) == b"\1" * 4096
        with pytest.raises(Qcow2IOError) as caught:
            image.read(300 * 512, 512)
        assert caught.value.errno == errno_value


@pytest.mark.parametrize(
    "event", ["l1_update", "empty_image_prepare", "reftable_update", "refblock_alloc"]
)
def test_commit_empty_failure_leaves_qemus_state(tmp_path: Path, event: str):
    """qemu-iotests 098: emptying the top after commit fails at each step; the message and
    the image file left behind are byte for byte qemu-img's."""
    files = {}
    for who in ("ours", "theirs"):
        directory = tmp_path / who
        directory.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", directory / "base.qcow2", "64M")
        qemu_img(
            "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
            directory / "top.qcow2",
        )  # fmt: skip
        qemu_io(directory / "top.qcow2", "write -P 3 0 64k")
        conf = write_conf(directory / "bd.conf", {"event": event})
        args = ["commit", f"blkdebug:{conf.name}:top.qcow2"]
        if who == "ours":
            result = run_qimg(directory, *args)
        else:
            result = run(["qemu-img", *args], check=False, cwd=directory)
        assert result.returncode == 1
        assert result.stderr == (
            f"qemu-img: Failed to empty blkdebug:{conf.name}:top.qcow2: Input/output error\n"
        )
        files[who] = (directory / "top.qcow2").read_bytes(), (directory / "base.qcow2")
    assert files["ours"][0] == files["theirs"][0]
    assert qemu_img("compare", files["ours"][1], files["theirs"][1]).returncode == 0


@pytest.mark.parametrize("options", [[], ["-o", "cluster_size=4096,refcount_bits=1"]])
def test_commit_empties_top_like_qemu(tmp_path: Path, options: list):
    """A successful commit leaves the top image byte-identical to qemu-img's."""
    tops = []
    for who in ("ours", "theirs"):
        directory = tmp_path / who
        directory.mkdir()
        qemu_img("create", "-q", "-f", "qcow2", directory / "base", "64M")
        qemu_img(
            "create", "-q", "-f", "qcow2", *options, "-b", "base", "-F", "qcow2",
            directory / "top", "64M",
        )  # fmt: skip
        qemu_io(directory / "top", "write -P 7 0 64k", "write -P 9 10M 300k")
        if who == "ours":
            assert run_qimg(directory, "commit", "top").returncode == 0
        else:
            qemu_img("commit", directory / "top")
        tops.append((directory / "top").read_bytes())
    assert tops[0] == tops[1]


def test_commit_into_blkdebug_backing_reports_block_job(tmp_path: Path):
    """qemu-iotests 020: the base, a json: name with blkdebug under qcow2, fails its
    first data write with ENOSPC."""
    results = []
    for who in ("ours", "theirs"):
        directory = tmp_path / who
        directory.mkdir()
        base = directory / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, "1M")
        backing = json.dumps(
            {
                "driver": "qcow2",
                "file": {
                    "driver": "blkdebug",
                    "inject-error": [{"event": "write_aio", "errno": 28, "once": True}],
                    "image": {"driver": "file", "filename": str(base)},
                },
            }
        )
        top = directory / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "json:" + backing, "-F", "qcow2", top)
        qemu_io(top, "write -P 5 0 64k")
        if who == "ours":
            result = run_qimg(directory, "commit", top)
        else:
            result = run(["qemu-img", "commit", top], check=False)
        results.append((result.returncode, result.stderr))
    assert results[0] == results[1]
    assert results[0] == (1, "qemu-img: Block job failed: No space left on device\n")


def test_create_over_blkdebug_backing(tmp_path: Path):
    """qemu-iotests 041: a backing file named blkdebug:CONF:FILE (raw) gives its size."""
    qemu_img("create", "-q", "-f", "raw", tmp_path / "backing.img", "4M")
    conf = write_conf(tmp_path / "bd.conf", {"event": "read_aio", "state": 1, "once": "on"})
    assert_same(
        tmp_path,
        "create",
        "-f",
        "qcow2",
        "-o",
        f"backing_file=blkdebug:{conf}:{tmp_path / 'backing.img'},backing_fmt=raw",
        "top.qcow2",
    )
    assert_same(tmp_path, "info", "top.qcow2")


def test_info_of_blkdebug_and_null_nodes(tmp_path: Path):
    """qemu-iotests 162 and 153: blkdebug above null-co, and null-co itself."""
    (tmp_path / "42").write_text("")
    assert_same(
        tmp_path, "info", 'json:{"driver": "blkdebug", "config": 42, "image.driver": "null-co"}'
    )
    assert_same(tmp_path, "info", "-U", "--image-opts", "driver=null-co,force-share=on")
    assert_same(tmp_path, "info", "-U", "--image-opts", "driver=null-co,force-share=off")
    assert_same(tmp_path, "info", "null-aio://")
    assert_same(tmp_path, "convert", "-O", "raw", "--image-opts", "driver=null-co,size=1M", "n.raw")
    assert (tmp_path / "n.raw").read_bytes() == bytes(1 << 20)


def test_info_above_blkdebug_resolves_backing_by_its_file(tmp_path: Path):
    """qemu-iotests 110: a json: name with blkdebug (and a set-state list) beneath qcow2;
    the relative backing name resolves in the directory of the file beneath."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "t.base", "64M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "t.base", "-F", "qcow2", tmp_path / "t.qcow2")
    name = "json:" + json.dumps(
        {
            "driver": "qcow2",
            "file": {
                "driver": "blkdebug",
                "image": {"driver": "file", "filename": str(tmp_path / "t.qcow2")},
                "set-state": [{"event": "read_aio", "new_state": 42}],
            },
        }
    )
    ours, theirs = run_both(tmp_path, "info", name)
    assert ours.returncode == theirs.returncode == 0
    # QEMU names the node by json: options rebuilt in its hash table's order (qimg keeps
    # the name as given): the lines after the name agree
    assert ours.stdout.split("\n")[1:] == theirs.stdout.split("\n")[1:]
    assert f"(actual path: {tmp_path}/t.base)" in ours.stdout


def test_config_errors_as_qemu(tmp_path: Path):
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    assert_same(tmp_path, "info", f"blkdebug:{tmp_path / 'missing.conf'}:a.qcow2")
    assert_same(tmp_path, "info", "blkdebug:nocolon")
    write_conf(tmp_path / "bad.conf", {"event": "no_such_event"})
    assert_same(tmp_path, "info", "blkdebug:bad.conf:a.qcow2")
    (tmp_path / "noevent.conf").write_text('[inject-error]\nerrno = "5"\n')
    assert_same(tmp_path, "info", "blkdebug:noevent.conf:a.qcow2")


def test_state_machine_and_once():
    """set-state moves the state; a rule bound to state 2 fires only after it; once
    removes a rule after its first failure."""
    sections = parse_config_text(
        '[set-state]\nstate = "1"\nevent = "read_aio"\nnew_state = "2"\n\n'
        '[inject-error]\nstate = "2"\nevent = "read_aio"\nonce = "on"\nerrno = "28"\n'
    )
    assert [kind for kind, _ in sections] == ["set-state", "inject-error"]
    target = BlkdebugTarget("x", None, "unused", {})
    rules = Blkdebug.load(target)
    assert rules.state == 1
    config = {
        "set-state.0.state": "1",
        "set-state.0.event": "read_aio",
        "set-state.0.new_state": "2",
        "inject-error.0.state": "2",
        "inject-error.0.event": "read_aio",
        "inject-error.0.once": "on",
        "inject-error.0.errno": "28",
    }
    rules = Blkdebug.load(BlkdebugTarget("x", None, "unused", config))
    rules.event("read_aio")  # state 1: the error rule is not for this state
    rules.check(0, 512, "read")
    assert rules.state == 2
    rules.event("read_aio")
    with pytest.raises(Qcow2IOError) as caught:
        rules.check(0, 512, "read")
    assert caught.value.errno == errno.ENOSPC
    rules.check(0, 512, "read")  # once: gone
    rules.event("read_aio")
    rules.check(0, 512, "read")  # and not activated again
    rules = Blkdebug.load(
        BlkdebugTarget(
            "x", None, "unused", {"inject-error.event": "none", "inject-error.iotype": "write"}
        )
    )
    rules.event("none")
    rules.check(0, 512, "read")
    with pytest.raises(Qcow2IOError):
        rules.check(0, 512, "write")
    with pytest.raises(InvalidArgumentError, match="invalid parameter value: bogus"):
        Blkdebug.load(BlkdebugTarget("x", None, "u", {"inject-error.0.event": "bogus"}))


def test_ssh_options_and_refused_connection(tmp_path: Path):
    """qemu-iotests 162: qimg speaks no SSH, but validates and connects as qemu-img's
    ssh driver does (port 0 on the loopback refuses the connection)."""
    name = 'json:{"driver": "ssh", "host": "localhost", "port": "0", "path": "/foo"}'
    result = run_qimg(tmp_path, "info", name)
    assert (result.returncode, result.stderr) == (
        1,
        f"qemu-img: Could not open '{name}': Failed to connect to 'localhost:0': "
        f"Connection refused\n",
    )
    opts = "driver=ssh,host=localhost,port=0.42,path=/foo"
    result = run_qimg(tmp_path, "info", "--image-opts", opts)
    assert (
        result.stderr == f"qemu-img: Could not open '{opts}': Parameter 'port' expects a number\n"
    )


def test_commit_top_above_blkdebug_resolves_relative_backing(tmp_path: Path):
    """blkdebug::sub/top (no config): the relative backing name 'base' is found beside
    the top's file, not beside the blkdebug: name; the result is qemu-img's."""
    for who in ("ours", "theirs"):
        (tmp_path / who / "sub").mkdir(parents=True)
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / who / "sub" / "base", "1M")
        top = tmp_path / who / "sub" / "top"
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base", "-F", "qcow2", top)
        qemu_io(top, "write -P 3 0 64k")
    ours = run_qimg(tmp_path / "ours", "commit", "blkdebug::sub/top")
    theirs = run(["qemu-img", "commit", "blkdebug::sub/top"], check=False, cwd=tmp_path / "theirs")
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, "Image committed.\n", "")
    assert (theirs.returncode, theirs.stdout) == (0, "Image committed.\n")
    sub_ours, sub_theirs = tmp_path / "ours" / "sub", tmp_path / "theirs" / "sub"
    assert (sub_ours / "top").read_bytes() == (sub_theirs / "top").read_bytes()
    assert qemu_img("compare", sub_ours / "base", sub_theirs / "base").returncode == 0


def test_nested_blkdebug_and_empty_names(tmp_path: Path):
    """blkdebug: layers stack (only the top one hears the image's events, as in QEMU);
    an empty image name fails as qemu-img's."""
    conf = write_conf(tmp_path / "ok.conf", {"event": "read_aio"})
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    shutil.copy(tmp_path / "a.qcow2", tmp_path / "b.qcow2")
    qemu_io(tmp_path / "a.qcow2", "write 0 64k")
    assert_same(tmp_path, "compare", f"blkdebug:{conf.name}:blkdebug::a.qcow2", "b.qcow2")
    assert_same(tmp_path, "compare", f"blkdebug::blkdebug:{conf.name}:a.qcow2", "b.qcow2")
    assert_same(tmp_path, "info", f"blkdebug:{conf.name}:")
    assert_same(tmp_path, "info", "blkdebug::")


@pytest.mark.parametrize(
    "name",
    [
        'json:{"driver": "blkdebug", "config": "42", "image.driver": "null-co"}',
        'json:{"driver": "blkdebug", "image": {"driver": "file", "filename": "a.qcow2"}}',
        'json:{"driver": "blkdebug", "image": {"driver": "qcow2", "file.filename": "a.qcow2"}}',
        "blkdebug:42:a.qcow2",
        "null-co://",
        'json:{"driver": "blkdebug", "x-image": "null-co://"}',
        'json:{"driver": "blkdebug", "image": "a.qcow2"}',
    ],
)
def test_info_of_nodes_human_and_json(tmp_path: Path, name: str):
    """A blkdebug node gives its child's image information (cluster size, dirty flag;
    null-co has none), as QEMU's filters do."""
    (tmp_path / "42").write_text("")
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    assert_same(tmp_path, "info", name)
    assert_same(tmp_path, "info", "--output", "json", name)


def test_map_names_the_files_beneath_blkdebug(tmp_path: Path):
    """qemu-iotests 204: map of an image opened beneath a blkdebug node names the image's
    file and its backing file, as qemu-img does, not the blkdebug node."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "4M")
    qemu_io(tmp_path / "base.qcow2", "write -P 11 1M 1M")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2"
    )
    qemu_io(tmp_path / "top.qcow2", "write -P 22 0 64k")
    options = "driver=blkdebug,image.driver=qcow2,image.file.driver=file"
    result = assert_same(
        tmp_path, "map", "--image-opts", f"{options},image.file.filename=top.qcow2,align=4k"
    )
    assert "top.qcow2\n" in result.stdout and "base.qcow2\n" in result.stdout


def _random_blkdebug_name(rng, beneath: bool) -> list[str]:
    """info's arguments for a blkdebug node with random rules, as a json: name (nested,
    typed) or as --image-opts (flat, strings), keys in random order."""
    events = ["l2_load", "l1_update", "refblock_load", "read_aio", "write_aio", "flush_to_os"]
    values = {"errno": 28, "once": True, "state": 2, "sector": 7, "iotype": "read"}
    rules = []
    for _ in range(rng.randint(1, 3)):
        rule = {"event": rng.choice(events)}
        rule |= {key: values[key] for key in rng.sample(sorted(values), rng.randint(0, 4))}
        rules.append(dict(rng.sample(list(rule.items()), len(rule))))
    states = [{"event": rng.choice(events), "new_state": 3} for _ in range(rng.randint(0, 2))]
    node = {"driver": "blkdebug", "image": {"driver": "file", "filename": "a.qcow2"}}
    node |= {"inject-error": rules} | ({"set-state": states} if states else {})
    if rng.random() < 0.3:
        node["align"] = 512
    node = dict(rng.sample(list(node.items()), len(node)))
    if rng.random() < 0.5:
        tree = {"driver": "qcow2", "file": node} if beneath else node
        return ["json:" + json.dumps(tree, separators=(",", ":"))]
    flat = [f"image.{key}={value}" for key, value in node["image"].items()]
    for section in ("inject-error", "set-state"):
        for index, rule in enumerate(node.get(section, [])):
            for key, value in rule.items():
                text = str(value).lower() if isinstance(value, bool) else value
                flat.append(f"{section}.{index}.{key}={text}")
    prefix = "file." if beneath else ""
    options = [f"{prefix}{option}" for option in rng.sample(flat, len(flat))]
    options.append(f"{prefix}driver=blkdebug")
    if beneath:
        options.append("driver=qcow2")
    return ["--image-opts", ",".join(rng.sample(options, len(options)))]


@pytest.mark.parametrize("seed", range(12))
def test_blkdebug_json_names_are_qemus(tmp_path: Path, seed: int):
    """A blkdebug node with rules is named by QEMU's json: re-serialization: its strong
    options flattened, typed as given, in the order QEMU's dicts pass them on (which
    decides how keys sharing a hash bucket are listed), its child under "image"."""
    import random

    rng = random.Random(seed)
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "a.qcow2", "1M")
    for beneath in (True, False):
        args = _random_blkdebug_name(rng, beneath)
        assert_same(tmp_path, "info", *args)


@pytest.mark.parametrize("event", ["l2_load", "reftable_load"])
@pytest.mark.parametrize(
    "command",
    [
        ["map"],
        ["map", "--output=json"],
        ["info"],
        ["compare", "d.qcow2"],
        ["convert", "-O", "raw", "x.raw"],
        ["check"],
        ["measure", "-O", "qcow2"],
        ["snapshot", "-l"],
    ],
    ids=" ".join,
)
def test_metadata_load_events_fail_as_in_qemu(tmp_path: Path, event: str, command: list):
    """An error injected when an L2 table or the refcount table is loaded fails the
    commands that load one, in qemu-img's words (open: "Could not initialize refcount
    handling"; block status: map's, compare's, convert's and measure's messages)."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "d.qcow2", "4M")
    qemu_io(tmp_path / "d.qcow2", "write -P 7 0 64k")
    rule = {"event": event, "errno": 5}
    node = {"driver": "blkdebug", "inject-error": [rule], "image": {"filename": "d.qcow2"}}
    name = "json:" + json.dumps({"driver": "qcow2", "file": node})
    args = [*command, name] if command[0] != "compare" else ["compare", name, command[1]]
    if command[0] == "convert":
        args = ["convert", "-O", "raw", name, command[-1]]
    assert_same(tmp_path, *args)
