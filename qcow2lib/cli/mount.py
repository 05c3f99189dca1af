"""`mount` and `umount`: an image as a FUSE directory of files (see fuse_mount)."""

from __future__ import annotations

import sys

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import OpenFailure, image_spec, spec_passphrases
from qcow2lib.cli.secrets import process_object
from qcow2lib.ops import error_text

MOUNT_HELP = """\
Usage: {prog} mount [OPTIONS] IMAGE MOUNTPOINT
Mount a disk image (qcow2 or raw, with its backing chain) as a directory of files:

  MOUNTPOINT/disk.raw               the guest-visible disk
  MOUNTPOINT/info.json              `{prog} info --output=json` of the image
  MOUNTPOINT/snapshots/NAME.raw     each internal snapshot, read-only (also id-ID.raw)
  MOUNTPOINT/partitions/N.raw       each partition of the disk's MBR or GPT table

A snapshot is there as NAME.raw only when its name makes a valid file name no other
entry has (not empty, '.', '..', with '/' or NUL, too long, shared or equal to an
id-ID.raw); id-ID.raw is always there.

The command returns once the filesystem is mounted, its server running on in the
background (unless --foreground). `{prog} umount MOUNTPOINT` unmounts and waits until the
image is closed cleanly; SIGINT or SIGTERM to the server do the same.

Options:
  --object type,id=ID,...   define a secret, e.g. the passphrase of an encrypted image:
                            --object secret,id=sec0,file=PATH with --image-opts
                            driver=qcow2,file.filename=IMAGE,encrypt.key-secret=sec0
  --image-opts              treat IMAGE as a full set of image options
  -f, --format=FORMAT       the image format (raw, qcow2; default: probed)
  --rw                      mount disk.raw and the partitions read-write (default:
                            read-only)
  -s, --snapshot=NAME       serve this internal snapshot (name or ID) as disk.raw,
                            read-only
  --foreground              stay attached until unmounted or signalled
  --allow-other             let other users than the mounting one use the mount

Exit status: 0 mounted (with --foreground: served until unmounted), 1 the image, the
mount point or the mount failed (one message says why; nothing is mounted).
"""

UMOUNT_HELP = """\
Usage: {prog} umount MOUNTPOINT
Unmount an image mounted by `{prog} mount` and wait until its server has closed the
image (flushed, clean). Exit status: 0 unmounted, 1 not unmounted (one message says why).
"""


def _usage_error(cli: Cli, command: str, message: str) -> int:
    cli.error_report(message)
    cli.error_report(f"Try `{cli.prog} {command} --help' for more information.")
    return 1


def cmd_mount(cli: Cli, argv: list[str]) -> int:
    """`mount`: mount IMAGE at MOUNTPOINT; returns once mounted (or failed)."""
    from fuse_mount.command import mount_image
    from qcow2lib.qobject import qemu_json

    fmt = snapshot = None
    image_opts = writable = foreground = allow_other = False
    getopt = GetoptLong(
        argv,
        "hf:s:",
        (
            LongOpt("help", False, "h"),
            LongOpt("format", True, "f"),
            LongOpt("snapshot", True, "s"),
            LongOpt("rw", False, "rw"),
            LongOpt("foreground", False, "foreground"),
            LongOpt("allow-other", False, "allow-other"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
        ),
    )
    while (c := getopt.next()) is not None:
        if c == "?":
            return _usage_error(cli, "mount", getopt.error_message)
        if c == "h":
            cli.out(MOUNT_HELP.format(prog=cli.prog))
            return 0
        if c == "f":
            fmt = getopt.optarg
        elif c == "s":
            snapshot = getopt.optarg
        elif c == "rw":
            writable = True
        elif c == "foreground":
            foreground = True
        elif c == "allow-other":
            allow_other = True
        elif c == "object":
            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
    if len(getopt.argv) - getopt.optind != 2:
        return _usage_error(cli, "mount", "Expecting an image and a mount point")
    if writable and snapshot is not None:
        cli.error_report("--rw cannot be used with --snapshot: snapshots are read-only")
        return 1
    filename, mountpoint = getopt.argv[getopt.optind :]
    try:
        spec = image_spec(filename, image_opts, fmt)
        passphrases = spec_passphrases(cli, spec)
    except OpenFailure as exc:
        cli.error_report(exc.message)
        return 1
    except Qcow2Error as exc:  # a key-secret naming no --object
        cli.error_report(f"Could not open '{filename}': {error_text(exc)}")
        return 1
    sys.stdout.flush()
    return mount_image(
        spec.path,
        mountpoint,
        writable=writable,
        fmt=spec.fmt,
        snapshot=snapshot,
        foreground=foreground,
        allow_other=allow_other,
        passphrase=passphrases if any(passphrases) else None,
        info_json=qemu_json,
        prog=cli.prog,
    )


def cmd_umount(cli: Cli, argv: list[str]) -> int:
    """`umount`: unmount MOUNTPOINT and wait until its image is closed."""
    from fuse_mount.command import MountError, unmount

    getopt = GetoptLong(argv, "h", (LongOpt("help", False, "h"),))
    while (c := getopt.next()) is not None:
        if c == "?":
            return _usage_error(cli, "umount", getopt.error_message)
        cli.out(UMOUNT_HELP.format(prog=cli.prog))
        return 0
    if len(getopt.argv) - getopt.optind != 1:
        return _usage_error(cli, "umount", "Expecting one mount point")
    try:
        unmount(getopt.argv[getopt.optind])
    except MountError as exc:
        cli.error_report(str(exc))
        return 1
    return 0
