"""Thin wrappers around the real QEMU tools: the oracle every test compares against."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"


CALIBRATION_FLAKE = "Unable to get accurate CPU usage"


def run(args: list, check: bool = True, cwd=None, text: bool = True) -> subprocess.CompletedProcess:
    """Run a QEMU tool. QEMU's PBKDF2 calibration (LUKS create, amend, convert) gives up with
    "Unable to get accurate CPU usage" when the thread CPU clock has not ticked during its
    first measurement, which happens at random on fast or busy machines: such runs fail at
    once and are tried again, many times, since each failure costs milliseconds."""
    for attempt in range(100):
        result = subprocess.run([str(a) for a in args], capture_output=True, text=text, cwd=cwd)
        stderr = result.stderr if text else result.stderr.decode("utf-8", "surrogateescape")
        if CALIBRATION_FLAKE not in stderr:
            break
        time.sleep(min(0.01 * attempt, 0.1))
    if check and result.returncode:
        raise subprocess.CalledProcessError(
            result.returncode, result.args, result.stdout, result.stderr
        )
    return result


def qemu_img(*args, check: bool = True) -> subprocess.CompletedProcess:
    return run([QEMU_IMG, *args], check=check)


def qemu_io(image, *commands: str, fmt: str | None = None, extra: list[str] | None = None) -> None:
    """Run qemu-io commands (e.g. "write -P 0x41 0 4k") against an image."""
    args = [QEMU_IO]
    if fmt:
        args += ["-f", fmt]
    args += extra or []
    for command in commands:
        args += ["-c", command]
    args.append(str(image))
    result = run(args)
    if "error" in result.stdout.lower() or "failed" in result.stdout.lower():
        raise AssertionError(f"qemu-io failed: {result.stdout}{result.stderr}")


def random_io_command(
    rng, size: int, align: int, lengths: list[int], discard_below: float, zero_below: float
) -> str:
    """One qemu-io command at a random `align`-ed place of a `size`-byte image, of a
    length from `lengths` (cut at the end): with rng.random() below discard_below a
    discard, below zero_below a zero write, else a write of a random pattern."""
    offset = rng.randrange(0, size // align) * align
    length = min(size - offset, rng.choice(lengths))
    roll = rng.random()
    if roll < discard_below:
        return f"discard {offset} {length}"
    if roll < zero_below:
        return f"write -z {offset} {length}"
    return f"write -P {rng.randrange(1, 255)} {offset} {length}"


def qemu_create(
    path,
    size,
    fmt: str = "qcow2",
    options: dict | None = None,
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> None:
    args = ["create", "-q", "-f", fmt]
    if options:
        args += ["-o", ",".join(f"{k}={v}" for k, v in options.items())]
    if backing is not None:
        args += ["-b", backing]
        if backing_fmt:
            args += ["-F", backing_fmt]
    args += [path, str(size)]
    qemu_img(*args)


def to_raw(image, out: Path, fmt: str | None = None) -> bytes:
    """Convert an image to raw with qemu-img and return its bytes."""
    args = ["convert", "-O", "raw"]
    if fmt:
        args += ["-f", fmt]
    qemu_img(*args, image, out)
    return Path(out).read_bytes()


def qemu_map(image) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", image).stdout)


def qemu_check(image) -> tuple[int, dict]:
    """Return (exit code, parsed JSON report) of `qemu-img check`."""
    result = qemu_img("check", "--output=json", image, check=False)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = {"stderr": result.stderr}
    return result.returncode, report


def assert_clean(image) -> None:
    """qemu-img check must find no corruption and no leaks."""
    code, report = qemu_check(image)
    assert code == 0, f"qemu-img check exit {code}: {report}"
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report


def qemu_compare(a, b, fmt_a: str | None = None, fmt_b: str | None = None) -> int:
    args = ["compare"]
    if fmt_a:
        args += ["-f", fmt_a]
    if fmt_b:
        args += ["-F", fmt_b]
    return qemu_img(*args, a, b, check=False).returncode


def require_root(why: str) -> None:
    """Tests that mount filesystems or set up loop devices need root; CI runs as root."""
    import os
    import pytest

    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


@contextlib.contextmanager
def inside(directory: Path):
    """Run the block with `directory` as the working directory (qemu-img's relative names)."""
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(cwd)


def run_qimg(*args) -> subprocess.CompletedProcess:
    """qimg.main() in-process, named "qemu-img" as a linking user would, output captured."""
    import qimg

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = qimg.main([str(a) for a in args], prog="qemu-img")
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_qimg_in(directory: Path, *args) -> subprocess.CompletedProcess:
    """run_qimg() with `directory` as the working directory."""
    with inside(directory):
        return run_qimg(*args)


def run_both_in(directory: Path, *args) -> tuple[subprocess.CompletedProcess, ...]:
    """(qimg's result, qemu-img's result) of the same arguments, both run in `directory`."""
    ours = run_qimg_in(directory, *args)
    theirs = run([QEMU_IMG, *map(str, args)], check=False, cwd=directory)
    return ours, theirs


def assert_same_in(directory: Path, *args) -> subprocess.CompletedProcess:
    """qimg's exit code, stdout and stderr are qemu-img's, for the same arguments run in
    `directory`; qimg's result."""
    ours, theirs = run_both_in(directory, *args)
    assert_same_result(ours, theirs, args)
    return ours


def assert_same_result(
    ours: subprocess.CompletedProcess, theirs: subprocess.CompletedProcess, context
) -> None:
    """qimg's exit code, stdout and stderr are qemu-img's; `context` names the call."""
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        theirs.returncode,
        theirs.stdout,
        theirs.stderr,
    ), context


def run_on_a_small_disk(
    disk: Path, size: str, program: list, setup: str = ""
) -> subprocess.CompletedProcess:
    """Run `program` in a tmpfs of `size` mounted on the empty directory `disk`, in a mount
    namespace of its own (unshare, private propagation: nothing outlives the call), after
    the shell commands `setup` (run there too, their output dropped). Its stdout ends
    with "exit N" and the names left in the file system; then `qemu-img check` of each
    *.qcow2 there."""
    script = (
        'mount -t tmpfs -o size="$1" tmpfs "$2" && cd "$2" || exit 99\n'
        'eval "$3" >/dev/null 2>&1\n'
        "shift 3\n"
        '"$@"\n'
        'echo "exit $?"\n'
        "ls -A\n"
        'for image in *.qcow2; do [ -f "$image" ] && qemu-img check "$image" 2>&1; done\n'
        "exit 0\n"
    )
    # (root needs no user namespace, which a machine may not allow; others do)
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-Urm"]
    argv = [*unshare, "sh", "-c", script, "sh", size, str(disk), setup, *program]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


def both_on_small_disks(
    tmp_path: Path, size: str, args: list, setup: str = ""
) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """(qemu-img's, qimg's) run of `args`, each on a small disk of its own as
    run_on_a_small_disk makes it (qimg named "qemu-img", as its messages then are)."""
    qimg_program = make_launcher(tmp_path, "qemu-img")
    runs = []
    for index, program in enumerate(("qemu-img", str(qimg_program))):
        disk = tmp_path / f"disk-{index}"
        disk.mkdir()
        runs.append(run_on_a_small_disk(disk, size, [program, *args], setup))
    return runs[0], runs[1]


def make_launcher(directory: Path, name: str) -> Path:
    """An executable called `name` in `directory` that runs qimg from this checkout
    (argv[0] is the name qimg's messages give themselves, as qemu-img's do)."""
    root = Path(__file__).resolve().parent.parent
    path = directory / name
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path[:0] = [{str(root / 'tools')!r}, {str(root)!r}]\n"
        "import qimg\n"
        "sys.exit(qimg.main())\n"
    )
    path.chmod(0o755)
    return path


def wait_for_listener(sock: Path, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until the server `proc` accepts connections on the Unix socket `sock`. The
    socket file appears at bind(), before listen(): a client that comes in between is
    refused, so only a connection that succeeds says the server is ready."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the server exited: {proc.stderr and proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no server listening on {sock}"
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(sock))
                return
            except OSError:  # not there yet, or not listening yet
                time.sleep(0.02)


def bytes_without_dates(path: Path) -> bytes:
    """The file's bytes with the snapshots' date fields (the time each was taken) zeroed."""
    data = bytearray(path.read_bytes())
    count, table = struct.unpack(">IQ", data[60:72])
    position = table
    for _ in range(count):
        id_size, name_size = struct.unpack(">HH", data[position + 12 : position + 16])
        (extra_size,) = struct.unpack(">I", data[position + 36 : position + 40])
        data[position + 16 : position + 24] = bytes(8)
        position += 40 + extra_size + id_size + name_size
        position += -position % 8
    return bytes(data)
