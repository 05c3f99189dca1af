"""`qimg nbd` and `qimg vhost-user-blk` as commands: run as a user runs them (a process on a
Unix socket), driven by the real clients (nbdinfo, qemu-img, qemu-io, a QEMU guest), and
stopped by a signal. What the library does is tested in test_nbd.py and
test_vhost_user_blk.py; this is the command layer: options, messages, exit, clean image."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qcow2lib
from guest import boot_guest
from qemu_luks import BLANK, copy_image
from qemu_luks import PASS as LUKS_PASS
from qemutools import QEMU_IO, assert_clean, qemu_create, qemu_img, qemu_io, qemu_map, to_raw
from test_vhost_user_blk import (
    DISK_MIB,
    assert_image_matches,
    guest_checksums,
    known_pattern,
    vhost_disk_args,
    workload_script,
)

ROOT = Path(__file__).resolve().parent.parent
QIMG = [sys.executable, str(ROOT / "tools" / "qimg.py")]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
MIB = 1 << 20


def start_qimg(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [*QIMG, *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_qimg(*args, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QIMG, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout
    )


def wait_listening(process: subprocess.Popen, sock: Path, timeout: float = 30) -> None:
    """Until the server listens on `sock`, seen in /proc/net/unix (connecting to find out
    would make a client of its own, and a non-persistent server serves only one)."""
    deadline = time.monotonic() + timeout
    while not listening(sock):
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}: {process.communicate()[1]}")
        assert time.monotonic() < deadline, "the server did not listen in time"
        time.sleep(0.05)


def listening(sock: Path) -> bool:
    with open("/proc/net/unix") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(sock) and int(fields[3], 16) & 0x10000:
                return True
    return False


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> str:
    """Signal the server; it must exit 0 with no traceback. Returns its stderr."""
    process.send_signal(signum)
    try:
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "Traceback" not in err and out == "", err
    return err


def dirty_bit(image: Path) -> int:
    """The qcow2 header's incompatible "dirty" bit (refcounts not to be trusted)."""
    with open(image, "rb") as f:
        header = f.read(80)
    return struct.unpack(">Q", header[72:80])[0] & 1


def nbd_url(sock: Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def nbdinfo(url: str) -> dict:
    result = subprocess.run(
        ["nbdinfo", "--json", url], capture_output=True, text=True, timeout=30, check=True
    )
    return json.loads(result.stdout)["exports"][0]


def patterned_image(tmp_path: Path, name: str = "disk.qcow2") -> Path:
    image = tmp_path / name
    qemu_create(image, "16M")
    qemu_io(image, "write -P 0x41 0 1M", "write -P 0x42 5M 2M", "write -z 9M 1M", fmt="qcow2")
    return image


# -- qimg nbd --


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_nbd_serves_real_clients_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    image = patterned_image(tmp_path)
    expected = to_raw(image, tmp_path / "before.raw")
    sock = tmp_path / "nbd.sock"
    server = start_qimg("nbd", "-t", "-k", sock, "-x", "disk", "-D", "a test disk", image)
    try:
        wait_listening(server, sock)
        url = nbd_url(sock, "disk")
        export = nbdinfo(url)
        assert (
            export["export-name"],
            export["description"],
            export["export-size"],
            export["is_read_only"],
        ) == ("disk", "a test disk", 16 * MIB, False)
        qemu_img("convert", "-f", "raw", "-O", "raw", url, tmp_path / "copy.raw")
        assert (tmp_path / "copy.raw").read_bytes() == expected
        result = subprocess.run(
            [QEMU_IO, "-f", "raw", "-c", "write -P 0x5a 3M 192k", "-c", "write -z 5M 64k", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and "wrote" in result.stdout, result.stderr
    finally:
        err = stop(server, signum)
    lines = err.splitlines()  # one per client: nbdinfo, qemu-img convert, qemu-io
    assert len(lines) == 3 and all(
        line.startswith("qimg: NBD client unix#") and line.endswith(": client disconnected")
        for line in lines
    )
    assert not sock.exists()
    assert_clean(image)
    assert dirty_bit(image) == 0
    with qcow2lib.open(str(image)) as device:
        assert device.read(3 * MIB, 192 << 10) == b"\x5a" * (192 << 10)
        assert device.read(5 * MIB, 64 << 10) == bytes(64 << 10)
        assert device.read(0, MIB) == b"\x41" * MIB


def test_nbd_exits_after_its_only_client(tmp_path: Path) -> None:
    image = patterned_image(tmp_path)
    sock = tmp_path / "nbd.sock"
    server = start_qimg("nbd", "-k", sock, image)
    try:
        wait_listening(server, sock)
        assert nbdinfo(nbd_url(sock))["export-size"] == 16 * MIB
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0 and "Traceback" not in err, err
    assert err.count("NBD client") == 1 and not sock.exists()
    assert_clean(image)


def test_nbd_read_only_refuses_writes(tmp_path: Path) -> None:
    image = patterned_image(tmp_path)
    before = image.read_bytes()
    sock = tmp_path / "nbd.sock"
    server = start_qimg("nbd", "-r", "-t", "-k", sock, image)
    try:
        wait_listening(server, sock)
        assert nbdinfo(nbd_url(sock))["is_read_only"] is True
        result = subprocess.run(
            [QEMU_IO, "-f", "raw", "-c", "write -P 0x11 0 4k", nbd_url(sock)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1 and "wrote" not in result.stdout
        assert "Could not open image: Permission denied" in result.stderr  # as from qemu-nbd
        # Read-only takes no write lock: qemu-img may read the image meanwhile.
        assert qemu_img("info", image).returncode == 0
    finally:
        stop(server)
    assert image.read_bytes() == before


def test_nbd_tcp_port(tmp_path: Path) -> None:
    image = patterned_image(tmp_path)
    with socket.socket() as probe:  # a port free right now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_qimg("nbd", "-t", "-b", "127.0.0.1", "-p", port, image)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except ConnectionRefusedError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert nbdinfo(f"nbd://127.0.0.1:{port}")["export-size"] == 16 * MIB
    finally:
        stop(server)


@pytest.mark.parametrize(
    "args", [["--snapshot=first"], ["-l", "snapshot.name=first"], ["--load-snapshot=1"]]
)
def test_nbd_exports_an_internal_snapshot_read_only(tmp_path: Path, args: list) -> None:
    image = patterned_image(tmp_path)
    qemu_img("snapshot", "-c", "first", image)
    expected = to_raw(image, tmp_path / "first.raw")
    qemu_io(image, "write -P 0x77 0 2M", fmt="qcow2")
    sock = tmp_path / "nbd.sock"
    server = start_qimg("nbd", "-t", *args, "-k", sock, image)
    try:
        wait_listening(server, sock)
        assert nbdinfo(nbd_url(sock))["is_read_only"] is True
        qemu_img("convert", "-f", "raw", "-O", "raw", nbd_url(sock), tmp_path / "copy.raw")
    finally:
        stop(server)
    assert (tmp_path / "copy.raw").read_bytes() == expected
    with qcow2lib.open(str(image)) as device:
        assert device.read(0, 2 * MIB) == b"\x77" * (2 * MIB)  # the live disk as it was
    assert_clean(image)


def test_nbd_encrypted_image_with_object_and_image_opts(tmp_path: Path, tmp_path_factory) -> None:
    image = copy_image(tmp_path_factory, BLANK, tmp_path / "secret.qcow2")  # 4 MiB, empty
    secret_file = tmp_path / "passphrase"
    secret_file.write_text(LUKS_PASS)
    secret = f"secret,id=sec0,file={secret_file}"
    opts = f"driver=qcow2,file.filename={image},encrypt.key-secret=sec0"
    sock = tmp_path / "nbd.sock"
    server = start_qimg("nbd", "-t", "--object", secret, "--image-opts", opts, "-k", sock)
    try:
        wait_listening(server, sock)
        result = subprocess.run(
            [QEMU_IO, "-f", "raw", "-c", "write -P 0x3c 1M 256k", nbd_url(sock)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "wrote" in result.stdout, result.stderr
    finally:
        stop(server)
    assert qemu_img("check", "--object", secret, "--image-opts", opts).returncode == 0
    check = subprocess.run(
        [
            QEMU_IO,
            "--object",
            secret,
            "--image-opts",
            opts,
            "-c",
            "read -P 0x3c 1M 256k",
            "-c",
            "read -P 0 0 1M",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and "verification failed" not in check.stdout, check.stdout
    # Without its secret the image does not open: one line, exit 1.
    result = run_qimg("nbd", "-k", sock, image)
    assert result.returncode == 1 and result.stderr == (
        f"qimg: Failed to blk_new_open '{image}': Parameter 'encrypt.key-secret' is "
        f"required for cipher\n"
    )


def test_nbd_discard_and_detect_zeroes(tmp_path: Path) -> None:
    """qemu-nbd's defaults ignore discards; --discard=unmap frees, --detect-zeroes=unmap
    turns written zeros into unallocated zero clusters. qemu-nbd is the oracle."""
    results = {}
    for server_name, command in (
        ("qemu-nbd", ["qemu-nbd", "-f", "qcow2"]),
        ("qimg", [*QIMG, "nbd"]),
    ):
        for options in ([], ["--detect-zeroes=on"], ["--discard=unmap", "--detect-zeroes=unmap"]):
            image = patterned_image(tmp_path, f"{server_name}{len(options)}.qcow2")
            sock = tmp_path / f"{server_name}{len(options)}.sock"
            server = subprocess.Popen(
                [*command, "-t", *options, "-k", str(sock), str(image)],
                env=ENV,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_listening(server, sock)
                result = subprocess.run(
                    [
                        QEMU_IO,
                        "-f",
                        "raw",
                        "-c",
                        "discard 0 1M",
                        "-c",
                        "write -P 0 5M 1M",
                        nbd_url(sock),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert result.returncode == 0, result.stderr
            finally:
                stop(server)
            assert_clean(image)
            results[server_name, len(options)] = [
                (e["start"], e["length"], e["data"], e["zero"]) for e in qemu_map(image)
            ]
    for count in (0, 1, 2):
        assert results["qimg", count] == results["qemu-nbd", count], count
    assert len({tuple(results["qimg", count]) for count in (0, 1, 2)}) == 3


BAD_NBD_INPUT = {
    "missing image": (
        lambda t: (
            [t / "missing.qcow2"],
            f"qimg: Failed to blk_new_open "
            f"'{t / 'missing.qcow2'}': Could not open '{t / 'missing.qcow2'}': "
            f"No such file or directory\n",
        )
    ),
    "bad port": (
        lambda t: (
            ["-p", "70000", patterned_image(t)],
            "qimg: Invalid port '70000': a number from 0 to 65535 is expected\n",
        )
    ),
    "socket not creatable": (
        lambda t: (
            ["-k", t / "no" / "dir" / "s.sock", patterned_image(t)],
            f"qimg: Failed to bind socket to {t / 'no/dir/s.sock'}: No such file or directory\n",
        )
    ),
    "no image": (
        lambda t: (
            ["-k", t / "s.sock"],
            "qimg: Invalid number of arguments\nTry `qimg nbd --help' for more information.\n",
        )
    ),
    "unknown option": (
        lambda t: (
            ["--bogus", patterned_image(t)],
            "qimg: unrecognized option '--bogus'\n"
            "qimg: Try `qimg nbd --help' for more information.\n",
        )
    ),
    "bad shared": (
        lambda t: (["-e", "x", patterned_image(t)], "qimg: Invalid shared device number 'x'\n")
    ),
    "detect-zeroes unmap": (
        lambda t: (
            ["--detect-zeroes=unmap", patterned_image(t)],
            "qimg: setting detect-zeroes to unmap is not allowed "
            "without setting discard operation to unmap\n",
        )
    ),
    "missing snapshot": (
        lambda t: (
            ["-l", "nosuch", patterned_image(t)],
            "qimg: Failed to load snapshot: Can't find snapshot\n",
        )
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_NBD_INPUT))
def test_nbd_bad_input_is_one_message_and_exit_1(tmp_path: Path, case: str) -> None:
    args, message = BAD_NBD_INPUT[case](tmp_path)
    if not any(str(arg) in ("-k", "-p") for arg in args):
        args = ["-k", tmp_path / "s.sock", *args]
    result = run_qimg("nbd", *args)
    assert (result.returncode, result.stderr, result.stdout) == (1, message, "")
    assert not (tmp_path / "s.sock").exists()


def test_nbd_refuses_an_image_another_process_writes(tmp_path: Path) -> None:
    image = patterned_image(tmp_path)
    with qcow2lib.open(str(image), "r+"):  # a writer: this process holds the write lock
        result = run_qimg("nbd", "-k", tmp_path / "s.sock", image)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"qimg: Failed to blk_new_open '{image}': Failed to get "
        f'"write" lock\nIs another process using the image [{image}]?\n'
    )
    assert not (tmp_path / "s.sock").exists()


def test_nbd_help_names_the_snapshot_difference() -> None:
    result = run_qimg("nbd", "--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: qimg nbd [OPTIONS] IMAGE\n")
    assert "qemu-nbd's -s/--snapshot takes\n" in result.stdout
    for option in (
        "--socket=PATH",
        "--bind=IFACE",
        "--port=PORT",
        "--shared=NUM",
        "--persistent",
        "--export-name=NAME",
        "--description=TEXT",
        "--load-snapshot=SNAPSHOT_PARAM",
        "--snapshot=NAME",
        "--cache=MODE",
        "--discard=MODE",
        "--detect-zeroes=MODE",
        "--image-opts",
        "--object",
        "--read-only",
        "--force-share",
        "--format=FORMAT",
    ):
        assert option in result.stdout


# -- qimg vhost-user-blk --

BAD_VHOST_INPUT = {
    "no socket": (lambda t: ([patterned_image(t)], "qimg: --socket PATH is required\n")),
    "bad queue count": (
        lambda t: (
            ["--num-queues", "65", "--socket", t / "s.sock", patterned_image(t)],
            "qimg: Invalid num-queues '65': a number from 1 to 64 is expected\n",
        )
    ),
    "socket not creatable": (
        lambda t: (
            ["--socket", t / "no" / "s.sock", patterned_image(t)],
            f"qimg: Failed to bind socket to {t / 'no/s.sock'}: No such file or directory\n",
        )
    ),
    "missing image": (
        lambda t: (
            ["--socket", t / "s.sock", t / "nope.qcow2"],
            f"qimg: Could not open '{t / 'nope.qcow2'}': Could not open "
            f"'{t / 'nope.qcow2'}': No such file or directory\n",
        )
    ),
    "missing secret": (
        lambda t: (
            [
                "--socket",
                t / "s.sock",
                "--image-opts",
                f"driver=qcow2,file.filename={patterned_image(t)},encrypt.key-secret=sec9",
            ],
            f"qimg: Could not open 'driver=qcow2,file.filename="
            f"{t / 'disk.qcow2'},encrypt.key-secret=sec9': No secret "
            f"with id 'sec9'\n",
        )
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VHOST_INPUT))
def test_vhost_user_blk_bad_input(tmp_path: Path, case: str) -> None:
    args, message = BAD_VHOST_INPUT[case](tmp_path)
    result = run_qimg("vhost-user-blk", *args)
    assert (result.returncode, result.stderr, result.stdout) == (1, message, "")
    assert not (tmp_path / "s.sock").exists()


def test_vhost_user_blk_stops_cleanly_without_a_front_end(tmp_path: Path) -> None:
    image = patterned_image(tmp_path)
    sock = tmp_path / "vhost.sock"
    server = start_qimg("vhost-user-blk", "--socket", sock, image)
    wait_listening(server, sock)
    stop(server, signal.SIGINT)
    assert not sock.exists()
    assert_clean(image)
    assert dirty_bit(image) == 0


# -- a real guest on each export, started as a command --


def test_guest_on_qimg_nbd(tmp_path: Path) -> None:
    image = tmp_path / "guest.qcow2"
    qemu_create(image, f"{DISK_MIB}M")
    qemu_io(image, "write -P 0x5a 4M 4M", fmt="qcow2")
    sock = tmp_path / "nbd.sock"
    server = start_qimg("nbd", "-t", "-k", sock, image)
    try:
        wait_listening(server, sock)
        output = boot_guest(
            ["-drive", f"file=nbd:unix:{sock},if=virtio,format=raw"],
            workload_script(7),
            120,
            workdir=tmp_path,
        )
    finally:
        err = stop(server)
    assert "qimg: NBD client" in err
    pattern_md5 = hashlib.md5(known_pattern(MIB)).hexdigest()
    assert f"PATTERN {pattern_md5}" in output
    checksums = guest_checksums(output)  # after random writes, some maybe over the pattern
    assert dirty_bit(image) == 0
    assert_image_matches(image, checksums, tmp_path)


def test_guest_on_qimg_vhost_user_blk(tmp_path: Path) -> None:
    image = tmp_path / "guest.qcow2"
    qemu_create(image, f"{DISK_MIB}M")
    qemu_io(image, "write -P 0x3c 12M 2M", fmt="qcow2")
    sock = tmp_path / "vhost.sock"
    server = start_qimg("vhost-user-blk", "--num-queues", "2", "--socket", sock, image)
    try:
        wait_listening(server, sock)
        output = boot_guest(
            vhost_disk_args(str(sock), 2), workload_script(8), 120, workdir=tmp_path
        )
    finally:
        err = stop(server)
    assert "front-end" in err and "connected" in err
    pattern_md5 = hashlib.md5(known_pattern(MIB)).hexdigest()
    assert f"PATTERN {pattern_md5}" in output and "DISCARDED" in output
    checksums = guest_checksums(output)
    assert dirty_bit(image) == 0
    assert_image_matches(image, checksums, tmp_path)
