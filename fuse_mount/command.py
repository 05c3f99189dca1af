"""The mount and unmount commands: argument parsing, checks, daemonizing, messages.

`main(argv, prog)` is `python -m fuse_mount` (and `qimg mount`); `umount_main(argv, prog)`
is `qimg umount`. `mount_image()` and `unmount()` are the same actions for callers that
parse their own options (qimg's --object secrets become `passphrase`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

import qcow2lib
from qcow2lib.errors import ImageLockedError, Qcow2Error
from qcow2lib.ops import error_text, host_path

from .filesystem import DiskFilesystem, serve, server_pid

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
LIBFUSE_LOOP_ENDED = 8  # fuse_main's code when a signal (SIGINT, SIGTERM, SIGHUP) stops it
UNMOUNT_TIMEOUT = 120.0  # seconds an unmount waits for the server to close the image
ANSWER_TIMEOUT = 5.0  # seconds a server has to name itself (microseconds when it runs)

DESCRIPTION = """\
Mount a disk image (qcow2 or raw, with its backing chain) as a directory of files:

  MOUNTPOINT/disk.raw               the guest-visible disk, its virtual size
  MOUNTPOINT/info.json              `qimg info --output=json` of the image, as named here
  MOUNTPOINT/snapshots/NAME.raw     each internal snapshot, read-only
  MOUNTPOINT/snapshots/id-ID.raw    each internal snapshot by its ID, always there
  MOUNTPOINT/partitions/N.raw       each partition of the disk's MBR or GPT table

A snapshot appears as NAME.raw only when its name makes a valid, unique file name: names
that are empty, '.', '..', contain '/' or NUL, are too long, are shared by several
snapshots or equal another entry's id-ID are reachable only as id-ID.raw.
Partitions are numbered as Linux numbers them (MBR logical partitions from 5) and are
read again when the table is written through disk.raw.

The mount is read-only unless --rw is given; snapshots are always read-only. Writes go
through the image's engine: fsync makes them durable, the size cannot change. The kernel
caches disk.raw and each partition file apart: reopen a file to see what was written
through another. Without --foreground the command returns once the filesystem is
mounted, the server running on in the background. Unmount with
`%(prog)s --unmount MOUNTPOINT`, `fusermount3 -u` or `umount`, or stop the server with
SIGINT or SIGTERM: each closes the image cleanly. Only --unmount waits until the image
is closed; after the others, the server closes it just after they return."""

EPILOG = """\
exit status:
  0  mounted (or unmounted; with --foreground: served until unmounted or signalled)
  1  the image, the mount point or the mount failed; a one-line message says why and
     nothing is mounted
  2  bad command-line usage"""


class MountError(Exception):
    """A reason not to mount (or unmount), as the one line the user sees."""


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", nargs="?", help="the disk image")
    parser.add_argument("mountpoint", nargs="?", help="an existing, unused directory")
    parser.add_argument(
        "--rw",
        action="store_true",
        help="mount disk.raw and partitions read-write (default: read-only)",
    )
    parser.add_argument(
        "-s",
        "--snapshot",
        metavar="NAME",
        help="serve this internal snapshot (name or ID) as disk.raw, read-only",
    )
    parser.add_argument(
        "-f",
        "--format",
        metavar="FMT",
        help="the image format (qcow2 or "
        "raw; default: probe, a probed raw image cannot turn into qcow2)",
    )
    parser.add_argument(
        "--foreground", action="store_true", help="stay attached until unmounted or interrupted"
    )
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users than the mounting one use the mount",
    )
    parser.add_argument(
        "--passphrase-env",
        metavar="VAR",
        help="the environment variable holding the passphrase of an encrypted image",
    )
    parser.add_argument(
        "-u",
        "--unmount",
        metavar="MOUNTPOINT",
        help="unmount MOUNTPOINT and wait until its server has closed the image",
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    prog: str = "python -m fuse_mount",
    *,
    info_json: Callable[[dict], str] | None = None,
) -> int:
    """`prog IMAGE MOUNTPOINT [options]` or `prog --unmount MOUNTPOINT`; the exit status.

    info_json prints qimg's info dict as qimg does (default: the `qimg` module's
    qemu_json); qimg passes its own so that info.json is what it prints."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        if args.unmount is not None:
            if args.image is not None:
                parser.error("--unmount takes only the mount point")
        elif args.mountpoint is None:
            parser.error("an image and a mount point are required")
        if args.rw and args.snapshot is not None:
            parser.error("--rw cannot be used with --snapshot: snapshots are read-only")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.unmount is not None:
        return _report(prog, lambda: unmount(args.unmount))
    passphrase = None
    if args.passphrase_env is not None:
        passphrase = os.environ.get(args.passphrase_env)
        if passphrase is None:
            print(
                f"{prog}: the environment variable {args.passphrase_env} is not set",
                file=sys.stderr,
            )
            return EXIT_FAILURE
    if info_json is None:
        from qcow2lib.qobject import qemu_json as info_json  # qimg info's JSON printer
    return mount_image(
        args.image,
        args.mountpoint,
        writable=args.rw,
        fmt=args.format,
        snapshot=args.snapshot,
        foreground=args.foreground,
        allow_other=args.allow_other,
        passphrase=passphrase,
        info_json=info_json,
        prog=prog,
    )


def umount_main(argv: Sequence[str] | None = None, prog: str = "qimg umount") -> int:
    """`prog MOUNTPOINT`: unmount and wait for the server to close its image."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Unmount a disk image mounted by "
        "qimg mount (or python -m fuse_mount) and wait until the "
        "image is closed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mountpoint")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return _report(prog, lambda: unmount(args.mountpoint))


def _report(prog: str, action: Callable[[], None]) -> int:
    try:
        action()
    except MountError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# -- mounting --


def check_mountpoint(mountpoint: str) -> None:
    """Refuse what libfuse would refuse with a less clear message (or mount over)."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point '{mountpoint}' does not exist") from None
    except OSError as exc:
        raise MountError(f"mount point '{mountpoint}': {exc.strerror}") from None
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point '{mountpoint}' is not a directory")
    if _is_mountpoint(mountpoint) or os.path.ismount(mountpoint):
        raise MountError(f"mount point '{mountpoint}' is busy: something is mounted there")


def _is_mountpoint(path: str) -> bool:
    """Whether /proc/self/mountinfo lists `path` (also a dead FUSE mount, which stat fails).
    The path is first resolved without looking at its last component: a stat of a mount
    point asks its server, which may be stopped or hung."""
    try:
        with open("/proc/self/mountinfo", "rb") as mountinfo:
            lines = mountinfo.read().splitlines()
    except OSError:
        return False
    mounted = set()
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4:
            mounted.add(_unescape(fields[4]))
    absolute = os.path.abspath(path)
    head, name = os.path.split(absolute)
    if os.path.join(os.path.realpath(head), name) in mounted:
        return True
    return os.path.realpath(absolute) in mounted  # a symbolic link to the mount point


def _unescape(field: bytes) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    out = bytearray()
    index = 0
    while index < len(field):
        if field[index : index + 1] == b"\\" and field[index + 1 : index + 4].isdigit():
            out.append(int(field[index + 1 : index + 4], 8))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return os.fsdecode(bytes(out))


def open_for_mount(
    image: str, *, writable: bool, fmt: str | None, snapshot: str | None, passphrase
) -> qcow2lib.BlockDevice:
    """The image's disk as a device; errors worded as qemu-img words them."""
    try:
        path = host_path(image)
        device = qcow2lib.open(
            path, "r+" if writable else "r", fmt=fmt, passphrase=passphrase, snapshot=snapshot
        )
    except ImageLockedError as exc:
        raise MountError(
            f"Could not open '{image}': {error_text(exc)}\n"
            f"Is another process using the image [{host_path(image)}]?"
        ) from None
    except Qcow2Error as exc:
        raise MountError(f"Could not open '{image}': {error_text(exc)}") from None
    layer, depth = getattr(device, "image", device), 0
    while layer is not None:
        if getattr(layer, "encrypted", False) and getattr(layer, "crypto", None) is None:
            device.close()
            raise MountError(
                f"Could not open '{image}': "
                + "Could not open backing file: " * depth
                + "Parameter 'encrypt.key-secret' is required for cipher"
            )
        layer, depth = getattr(layer, "backing", None), depth + 1
    return device


def mount_image(
    image: str,
    mountpoint: str,
    *,
    writable: bool = False,
    fmt: str | None = None,
    snapshot: str | None = None,
    foreground: bool = False,
    allow_other: bool = False,
    passphrase=None,
    info_json: Callable[[dict], str] | None = None,
    prog: str = "python -m fuse_mount",
) -> int:
    """Mount `image` at `mountpoint`; the exit status (messages go to stderr as `prog: ...`).

    passphrase: what qcow2lib.open takes (one secret, or one per backing layer).
    info_json renders info.json from qimg's info dict (None: no info.json).
    Without foreground this returns in the calling process once the filesystem is
    mounted (0) or has failed (1); the server runs on in a forked, detached process.
    """
    try:
        check_mountpoint(mountpoint)
    except MountError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    options = dict(
        writable=writable,
        fmt=fmt,
        snapshot=snapshot,
        passphrase=passphrase,
        allow_other=allow_other,
        info_json=info_json,
        prog=prog,
    )
    if foreground:
        try:
            return _serve_image(image, os.path.abspath(mountpoint), on_ready=None, **options)
        except MountError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    return _daemonize(image, os.path.abspath(mountpoint), options, prog)


def _serve_image(
    image: str,
    mountpoint: str,
    *,
    on_ready,
    writable,
    fmt,
    snapshot,
    passphrase,
    allow_other,
    info_json,
    prog,
) -> int:
    device = open_for_mount(
        image, writable=writable, fmt=fmt, snapshot=snapshot, passphrase=passphrase
    )
    try:
        base = getattr(device, "image", device)  # the image behind a snapshot's view
        info_path = os.path.abspath(host_path(image))
        info_format = base.format

        def info_text() -> str:
            from qcow2lib.ops import full_backing_filename
            from qcow2lib.ops.info import image_info

            info = image_info(info_path, info_format, force_share=True)
            # named as the user named it, as `qimg info NAME` would from where the mount
            # was made (the server opens it by its absolute path: it runs from "/")
            info["filename"] = image
            if "full-backing-filename" in info:
                info["full-backing-filename"] = full_backing_filename(
                    host_path(image), info["backing-filename"]
                )
            return info_json(info) + "\n"

        try:
            filesystem = DiskFilesystem(
                device,
                snapshot_source=base if base.format == "qcow2" else None,
                info_text=info_text if info_json is not None else None,
                on_ready=on_ready,
                prog=prog,
            )
        except Qcow2Error as exc:  # a snapshot table that cannot be read
            raise MountError(f"Could not open '{image}': {error_text(exc)}") from None
        ready = []
        if on_ready is None:
            filesystem.on_ready = lambda: ready.append(True)
        code = serve(filesystem, mountpoint, allow_other=allow_other)
    finally:
        device.close()
    if code not in (0, LIBFUSE_LOOP_ENDED):
        raise MountError(f"could not mount '{image}' at '{mountpoint}' (libfuse error {code})")
    if on_ready is None and not ready:
        raise MountError(f"could not mount '{image}' at '{mountpoint}'")
    return EXIT_OK


def _daemonize(image: str, mountpoint: str, options: dict, prog: str) -> int:
    """Fork a detached server; wait until it reports the mount ready or its failure.

    The server is a grandchild in a session of its own (the child exits at once), so
    it is nobody's zombie and the terminal's ^C is not for it. The image is opened in
    the server only; the parent never holds it, the server never returns to the caller.
    """
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        os.waitpid(pid, 0)
        if report == b"ready":
            return EXIT_OK
        message = (
            report.decode("utf-8", "replace")
            or "the mount server exited before the mount was ready"
        )
        print(f"{prog}: {message}", file=sys.stderr)
        return EXIT_FAILURE
    os.close(read_end)
    code = EXIT_FAILURE
    try:
        os.setsid()
        if os.fork():
            os._exit(EXIT_OK)  # the server is forked: this child's part is done
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)

        def ready() -> None:
            os.chdir("/")  # keep no directory of the caller's busy
            os.dup2(null, 2)
            os.write(write_end, b"ready")
            os.close(write_end)

        try:
            _serve_image(image, mountpoint, on_ready=ready, **options)
            code = EXIT_OK
        except MountError as exc:
            os.write(write_end, str(exc).encode())
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


# -- unmounting --


def unmount(mountpoint: str, timeout: float = UNMOUNT_TIMEOUT) -> None:
    """Unmount, then wait until the serving process has closed the image (flushed, clean),
    so that whatever runs next sees the image whole. Raises MountError."""
    if not _is_mountpoint(mountpoint):
        raise MountError(f"'{mountpoint}' is not a mount point")
    server_pid = _server_pid(mountpoint)
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().rsplit(": ", 1)[-1] or f"status {result.returncode}"
        raise MountError(f"could not unmount '{mountpoint}': {reason}")
    if server_pid is None:
        return
    deadline = time.monotonic() + timeout
    while _running(server_pid):
        if time.monotonic() > deadline:
            raise MountError(
                f"'{mountpoint}' is unmounted but its server (pid {server_pid}) "
                f"has not exited after {timeout:.0f} s"
            )
        time.sleep(0.02)


def _server_pid(mountpoint: str) -> int | None:
    """The serving process's pid, asked of the mount itself (None: not served by
    fuse_mount, or its server is gone). A stopped or hung server never answers, and the
    question would then keep the mount busy: that is refused after ANSWER_TIMEOUT."""
    answer: list[int | None] = []

    def ask() -> None:
        try:
            answer.append(server_pid(mountpoint))
        except OSError:
            answer.append(None)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(ANSWER_TIMEOUT)
    if not answer:
        raise MountError(
            f"could not unmount '{mountpoint}': its server does not answer (stopped or "
            f"hung); `fusermount3 -u -z {shlex.quote(mountpoint)}` detaches the mount"
        )
    return answer[0]


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie has finished: it only waits for its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            state = stat_file.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
