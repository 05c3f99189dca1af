"""The standalone `luks` image format (QEMU's luks driver), against the real qemu-img/qemu-io.

qemu-img makes LUKS volumes that qcow2lib reads byte for byte and the reverse; qimg's
create, info, convert, compare, check, resize, measure and amend print what qemu-img
prints and exit as it exits. Headers hold random salts and machine-calibrated iteration
counts, so images are compared on everything else (layout, parameters, content).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import luks_image
from qcow2lib.crypto import luks as crypto_luks
from qcow2lib.errors import BadSecretError, CorruptImageError
from qemutools import run, run_qimg_in
from shared import build_once

PASSWORD = "luks-pw"
SECRET = ["--object", f"secret,id=sec0,data={PASSWORD}"]
OTHER = ["--object", "secret,id=sec1,data=other-pw"]
FAST = "iter-time=10"


def opts(name: str, secret: str = "sec0") -> str:
    return f"driver=luks,file.filename={name},key-secret={secret}"


def qemu_img(directory: Path, *args, check: bool = True):
    """The real qemu-img in `directory`, retried when QEMU's PBKDF calibration gives up."""
    return run(["qemu-img", *map(str, args)], check=check, cwd=directory)


def qemu_io(directory: Path, name: str, *commands: str, secret: list = SECRET) -> str:
    args = ["qemu-io", *secret, "--image-opts", opts(name)]
    for command in commands:
        args += ["-c", command]
    result = run(args, cwd=directory)
    assert "failed" not in result.stdout.lower(), result.stdout + result.stderr
    return result.stdout


def plain_bytes(directory: Path, name: str) -> bytes:
    """The guest content as qemu-img decrypts it."""
    qemu_img(directory, "convert", *SECRET, "-O", "raw", "--image-opts", opts(name), "plain.raw")
    data = (directory / "plain.raw").read_bytes()
    (directory / "plain.raw").unlink()
    return data


def both(tmp_path: Path, *args):
    """(qemu-img's, qimg's) result of the same command, each in its own directory."""
    results = []
    for side in ("qemu", "qimg"):
        directory = tmp_path / side
        directory.mkdir(exist_ok=True)
        if side == "qemu":
            results.append(qemu_img(directory, *args, check=False))
        else:
            results.append(run_qimg_in(directory, *args))
    assert "Traceback" not in results[1].stderr, results[1].stderr
    return results


def seen(result) -> tuple:
    return result.returncode, result.stdout, result.stderr


CIPHERS = [
    "",  # aes-256, xts, plain64, sha256
    ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1",
    ",cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha512",
]


@pytest.mark.parametrize("cipher", CIPHERS)
def test_qemu_made_volume_reads_and_writes_byte_for_byte(tmp_path, cipher):
    qemu_img(
        tmp_path,
        "create",
        "-q",
        "-f",
        "luks",
        *SECRET,
        "-o",
        f"key-secret=sec0,{FAST}{cipher}",
        "v.luks",
        "3M",
    )
    qemu_io(tmp_path, "v.luks", "write -P 0x5a 1000 70000", "write -P 0xc3 2M 4097")
    expected = bytearray(plain_bytes(tmp_path, "v.luks"))
    with qcow2lib.open(str(tmp_path / "v.luks"), passphrase=PASSWORD) as disk:
        assert disk.format == "luks" and disk.size == 3 << 20
        assert disk.read(0, disk.size) == expected
        assert disk.read(1001, 3) == b"\x5a" * 3  # unaligned, inside one sector
    with qcow2lib.open(str(tmp_path / "v.luks"), "r+", fmt="luks", passphrase=PASSWORD) as disk:
        disk.write(513, b"\x11" * 700)  # two partial sectors
        disk.write(3 * 512 + 7, b"\x22" * 3)  # inside one sector
        disk.write_zeroes(2 << 20, 8192)
        disk.write((3 << 20) - 5, b"\x33" * 5)  # the last bytes
    expected[513:1213] = b"\x11" * 700
    expected[3 * 512 + 7 : 3 * 512 + 10] = b"\x22" * 3
    expected[2 << 20 : (2 << 20) + 8192] = bytes(8192)
    expected[-5:] = b"\x33" * 5
    assert plain_bytes(tmp_path, "v.luks") == expected


def test_qimg_made_volume_opens_in_qemu(tmp_path):
    result = run_qimg_in(
        tmp_path, "create", "-f", "luks", *SECRET, "-o", f"key-secret=sec0,{FAST}", "v.luks", "2M"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "Formatting 'v.luks', fmt=luks size=2097152 key-secret=sec0 iter-time=10\n"
    )
    data = os.urandom(200_000)
    with qcow2lib.open(str(tmp_path / "v.luks"), "r+", passphrase=PASSWORD) as disk:
        disk.write(12345, data)
        ours = disk.read(0, disk.size)
    theirs = plain_bytes(tmp_path, "v.luks")
    assert theirs[12345 : 12345 + len(data)] == data
    assert theirs == ours  # (never written: the zeros of a hole, decrypted to noise)
    qemu_io(tmp_path, "v.luks", "write -P 0x44 1M 512")
    with qcow2lib.open(str(tmp_path / "v.luks"), passphrase=PASSWORD) as disk:
        assert disk.read(1 << 20, 513) == b"\x44" * 512 + ours[(1 << 20) + 512 : (1 << 20) + 513]


@pytest.mark.parametrize(
    "options",
    [
        f"key-secret=sec0,{FAST}",
        f"key-secret=sec0,{FAST},cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
        f"key-secret=sec0,{FAST},preallocation=full",
    ],
)
def test_create_layout_and_info_as_qemu_img(tmp_path, options):
    expected, actual = both(
        tmp_path, "create", "-f", "luks", *SECRET, "-o", options, "v.luks", "1000"
    )
    assert seen(actual) == seen(expected)
    infos = []
    for side in ("qemu", "qimg"):
        path = tmp_path / side / "v.luks"
        info = json.loads(qemu_img(tmp_path, "info", "--output=json", path).stdout)
        data = info["format-specific"]["data"]
        del data["uuid"], data["master-key-iters"], data["slots"][0]["iters"]
        del info["filename"], info["actual-size"]
        infos.append((info, path.stat().st_size))
    assert infos[1] == infos[0]
    assert infos[0][0]["virtual-size"] == 1024  # a partial last sector counts whole
    # (qimg's own info of the same file is qemu-img's, text and JSON)
    for output in ("human", "json"):
        args = ("info", f"--output={output}", tmp_path / "qemu" / "v.luks")
        assert seen(run_qimg_in(tmp_path, *args)) == seen(qemu_img(tmp_path, *args))


def test_partial_last_sector(tmp_path):
    qemu_img(
        tmp_path,
        "create",
        "-q",
        "-f",
        "luks",
        *SECRET,
        "-o",
        f"key-secret=sec0,{FAST}",
        "v.luks",
        "1000",
    )
    with qcow2lib.open(str(tmp_path / "v.luks"), "r+", passphrase=PASSWORD) as disk:
        assert disk.size == 1024
        disk.write(1000, b"\x77" * 24)  # past the file's end: it grows to the whole sector
    assert plain_bytes(tmp_path, "v.luks")[1000:] == b"\x77" * 24


def test_probe_and_metadata_without_secret(tmp_path):
    qemu_img(
        tmp_path,
        "create",
        "-q",
        "-f",
        "luks",
        *SECRET,
        "-o",
        f"key-secret=sec0,{FAST}",
        "v.luks",
        "1M",
    )
    assert qcow2lib.probe_format(str(tmp_path / "v.luks")) == "luks"
    assert luks_image.LUKS_MAGIC == crypto_luks.LUKS_MAGIC  # (kept apart for start-up time)
    with qcow2lib.open(str(tmp_path / "v.luks")) as disk:
        assert disk.info()["cipher-alg"] == "aes-256"
        with pytest.raises(BadSecretError):
            disk.read(0, 512)
    with pytest.raises(BadSecretError):
        qcow2lib.open(str(tmp_path / "v.luks"), passphrase="wrong")
    (tmp_path / "plain.raw").write_bytes(bytes(4096))
    with pytest.raises(CorruptImageError):
        qcow2lib.open(str(tmp_path / "plain.raw"), fmt="luks")


def test_threads_write_neighbouring_bytes_of_one_sector(tmp_path):
    """Concurrent partial-sector writes each read, merge and rewrite the sector: none may
    lose another's bytes."""
    qcow2lib.create(
        str(tmp_path / "v.luks"),
        4096,
        fmt="luks",
        passphrase=PASSWORD,
        encrypt_options={"iter-time": 10},
    )
    with qcow2lib.open(str(tmp_path / "v.luks"), "r+", passphrase=PASSWORD) as disk:

        def writer(index: int) -> None:
            for _ in range(20):
                disk.write(index * 8, bytes([index + 1]) * 8)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    expected = b"".join(bytes([i + 1]) * 8 for i in range(16))
    assert plain_bytes(tmp_path, "v.luks")[:128] == expected


@pytest.fixture(scope="module")
def volume_source(tmp_path_factory):
    """A qemu-made volume with data and a raw image of the same content, made once."""
    return build_once(tmp_path_factory, "luks-source", build_volume_source)


def build_volume_source(directory: Path) -> None:
    qemu_img(
        directory,
        "create",
        "-q",
        "-f",
        "luks",
        *SECRET,
        "-o",
        f"key-secret=sec0,{FAST}",
        "v.luks",
        "2M",
    )
    qemu_io(directory, "v.luks", "write -P 0x66 64k 100k")
    qemu_img(directory, "create", "-q", "-f", "raw", "same.raw", "2M")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 64k 100k", "same.raw"], cwd=directory)


@pytest.fixture
def volume_pair(tmp_path, volume_source):
    """Copies of the source volume (and raw image) in tmp_path/qemu and tmp_path/qimg."""
    for side in ("qemu", "qimg"):
        (tmp_path / side).mkdir()
        for name in ("v.luks", "same.raw"):
            run(["cp", "--sparse=always", volume_source / name, tmp_path / side / name])
    return tmp_path


@pytest.mark.parametrize(
    "args",
    [
        ["info", "v.luks"],
        ["info", "--output=json", "v.luks"],
        ["check", *SECRET, "--image-opts", opts("v.luks")],
        ["check", "v.luks"],  # no secret: opening fails first
        ["convert", "-O", "raw", "v.luks", "out.raw"],
        [
            "convert",
            "--object",
            "secret,id=sec0,data=bad",
            "--image-opts",
            opts("v.luks"),
            "-O",
            "raw",
            "out.raw",
        ],
        ["convert", *SECRET, "--image-opts", opts("v.luks", "sec9"), "-O", "raw", "out.raw"],
        ["compare", *SECRET, "--image-opts", opts("v.luks"), "driver=raw,file.filename=same.raw"],
        ["compare", *SECRET, "-f", "luks", "-F", "raw", "v.luks", "same.raw"],
        ["map", "--output=json", *SECRET, "--image-opts", opts("v.luks")],
        ["map", *SECRET, "--image-opts", opts("v.luks")],
        ["resize", *SECRET, "--image-opts", opts("v.luks"), "3M"],
        ["resize", *SECRET, "--image-opts", opts("v.luks"), "1M"],
        ["resize", *SECRET, "--image-opts", opts("v.luks"), "--shrink", "1M"],
        ["resize", "v.luks", "3M"],
        ["measure", "-O", "luks", *SECRET, "-o", "key-secret=sec0", "-f", "raw", "same.raw"],
        ["measure", "-O", "luks", *SECRET, "-o", "key-secret=sec0,cipher-mode=cbc", "--size", "1G"],
        ["measure", "-O", "luks", "--size", "1G"],
        ["measure", "-O", "luks", *SECRET, "-o", "key-secret=sec0,cluster_size=4k", "--size", "1M"],
        ["amend", "-f", "luks", "-o", "help"],
        ["amend", *SECRET, "--image-opts", opts("v.luks"), "-o", "state=inactive,keyslot=0"],
        ["amend", *SECRET, "--image-opts", opts("v.luks"), "-o", "encrypt.state=active"],
        ["amend", *SECRET, "--image-opts", opts("v.luks"), "-o", "keyslot=1"],
        ["create", "-f", "luks", "-o", "help"],
        ["create", "-f", "luks", *SECRET, "-o", "key-secret=sec1", "new.luks", "1M"],
        ["create", "-f", "luks", *SECRET, "-o", "key-secret=sec0,cipher-alg=foo", "new.luks", "1M"],
        ["create", "-f", "luks", *SECRET, "-o", "key-secret=sec0,iter-time=x", "new.luks", "1M"],
        ["create", "-f", "luks", "new.luks", "1M"],
        ["create", "-f", "luks", *SECRET, "-o", "key-secret=sec0", "-b", "v.luks", "new.luks"],
    ],
)
def test_command_as_qemu_img(volume_pair, args):
    expected, actual = both(volume_pair, *args)
    assert seen(actual) == seen(expected), args
    for name in ("v.luks", "out.raw", "new.luks"):
        ours, theirs = volume_pair / "qimg" / name, volume_pair / "qemu" / name
        assert ours.exists() == theirs.exists(), name
        if ours.exists():
            assert ours.stat().st_size == theirs.stat().st_size, name
    out = volume_pair / "qimg" / "out.raw"
    if out.exists():
        assert out.read_bytes() == (volume_pair / "qemu" / "out.raw").read_bytes()


def test_convert_to_and_from_luks(volume_pair):
    qemu_dir, qimg_dir = volume_pair / "qemu", volume_pair / "qimg"
    create = [
        "convert",
        *SECRET,
        "-O",
        "luks",
        "-o",
        f"key-secret=sec0,{FAST}",
        "same.raw",
        "c.luks",
    ]
    expected, actual = both(volume_pair, *create)
    assert seen(actual) == seen(expected)
    assert plain_bytes(qimg_dir, "c.luks") == (qemu_dir / "same.raw").read_bytes()
    assert (qimg_dir / "c.luks").stat().st_size == (qemu_dir / "c.luks").stat().st_size
    # -n into an existing volume named by --target-image-opts, then out again to qcow2
    qemu_img(
        qimg_dir,
        "create",
        "-q",
        "-f",
        "luks",
        *SECRET,
        "-o",
        f"key-secret=sec0,{FAST}",
        "n.luks",
        "2M",
    )
    result = run_qimg_in(
        qimg_dir, "convert", "-n", *SECRET, "--target-image-opts", "same.raw", opts("n.luks")
    )
    assert result.returncode == 0, result.stderr
    assert plain_bytes(qimg_dir, "n.luks") == (qemu_dir / "same.raw").read_bytes()
    result = run_qimg_in(
        qimg_dir, "convert", *SECRET, "--image-opts", opts("n.luks"), "-O", "qcow2", "back.qcow2"
    )
    assert result.returncode == 0, result.stderr
    assert qemu_img(qimg_dir, "compare", "back.qcow2", "same.raw").returncode == 0
    json_name = 'json:{"driver":"luks","key-secret":"sec0","file":{"filename":"n.luks"}}'
    result = run_qimg_in(qimg_dir, "compare", *SECRET, json_name, "same.raw")
    assert (result.returncode, result.stdout) == (0, "Images are identical.\n")


def test_amend_key_slots_as_qemu_img(volume_pair):
    add = [
        "amend",
        *SECRET,
        *OTHER,
        "--image-opts",
        opts("v.luks"),
        "-o",
        f"state=active,new-secret=sec1,{FAST}",
    ]
    expected, actual = both(volume_pair, *add)
    assert seen(actual) == seen(expected)
    qemu_io(volume_pair / "qimg", "v.luks", "read -P 0x66 64k 100k")
    args = ["qemu-io", *OTHER, "--image-opts", opts("v.luks", "sec1"), "-c", "read -P 0x66 64k 1k"]
    assert "failed" not in run(args, cwd=volume_pair / "qimg").stdout
    erase = [
        "amend",
        *SECRET,
        *OTHER,
        "--image-opts",
        opts("v.luks"),
        "-o",
        "state=inactive,old-secret=sec1",
    ]
    expected, actual = both(volume_pair, *erase)
    assert seen(actual) == seen(expected)
    info = json.loads(qemu_img(volume_pair, "info", "--output=json", "qimg/v.luks").stdout)
    assert [slot["active"] for slot in info["format-specific"]["data"]["slots"]] == [True] + [
        False
    ] * 7


OVERLAY_OPEN = "driver=qcow2,file.filename=ov.qcow2,backing.key-secret=sec0"


def test_qcow2_overlay_over_a_luks_volume(volume_pair):
    """A luks backing file takes its secret as backing.key-secret (no "encrypt.")."""
    for side in ("qemu", "qimg"):
        qemu_img(
            volume_pair / side,
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "v.luks",
            "-F",
            "luks",
            "ov.qcow2",
        )
        run(
            ["qemu-io", *SECRET, "--image-opts", OVERLAY_OPEN, "-c", "write -P 0x12 1M 4k"],
            cwd=volume_pair / side,
        )
    for args in (
        ["info", "--backing-chain", "ov.qcow2"],
        ["convert", "-O", "raw", "ov.qcow2", "out.raw"],  # the base's secret is missing
        ["convert", *SECRET, "-O", "raw", "--image-opts", OVERLAY_OPEN, "out.raw"],
    ):
        expected, actual = both(volume_pair, *args)
        assert seen(actual) == seen(expected), args
    out = (volume_pair / "qimg" / "out.raw").read_bytes()
    assert out == (volume_pair / "qemu" / "out.raw").read_bytes()
    assert out[1 << 20 : (1 << 20) + 4096] == b"\x12" * 4096
    assert out[64 << 10 : 164 << 10] == b"\x66" * (100 << 10)


@pytest.mark.parametrize(
    "damage",
    [
        "short",  # the file ends inside the header
        "no-payload",  # the file ends before the payload offset
        "huge-payload-offset",
        "not-luks",
    ],
)
def test_damaged_volume_refused_as_qemu_img(volume_pair, damage):
    for side in ("qemu", "qimg"):
        path = volume_pair / side / "v.luks"
        data = bytearray(path.read_bytes())
        if damage == "short":
            data = data[:100]
        elif damage == "no-payload":
            data = data[:4096]
        elif damage == "huge-payload-offset":
            data[104:108] = b"\xff\xff\xff\xff"
        else:
            data[0:4] = b"XXXX"
        path.write_bytes(bytes(data))
    expected, actual = both(volume_pair, "info", "-f", "luks", "v.luks")
    assert (actual.returncode, actual.stdout) == (expected.returncode, expected.stdout) == (1, "")
    # the first words are QEMU's (qcow2lib adds the field and value it refused)
    assert actual.stderr.startswith(expected.stderr.rstrip("\n")), actual.stderr
