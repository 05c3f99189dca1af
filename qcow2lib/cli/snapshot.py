"""`snapshot`: list (-l), create (-c), apply (-a) or delete (-d) internal snapshots."""

from __future__ import annotations

import os
import sys
import time

import qcow2lib
from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    RAW_PROBE_WARNING,
    OpenFailure,
    image_spec,
    open_spec,
    report_failure,
)
from qcow2lib.ops import error_text, host_path


def cmd_snapshot(cli: Cli, argv: list[str]) -> int:
    """`snapshot`: list (-l), create (-c), apply (-a) or delete (-d) internal snapshots."""
    action: str | None = None
    name = ""  # what -a, -c or -d names
    force_share = image_opts = False
    getopt = GetoptLong(
        argv,
        ":la:c:d:hqU",
        (
            LongOpt("help", False, "h"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("force-share", False, "U"),
        ),
    )
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c in "lacd":
            if action:
                cli.error_exit("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = c, getopt.optarg
        elif c == "q":
            continue  # only quiets messages qcow2lib does not print
        elif c == "U":
            force_share = True
        elif c == "object":
            from qcow2lib.cli.secrets import process_object  # (start-up time: --object only)

            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    try:
        spec = image_spec(filename, image_opts, None, force_share)
        img = open_spec(cli, spec, "r" if action == "l" else "r+")
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with img:
        qcow2 = img.format == "qcow2" and not img.header.incompatible_features & 4
        if action == "l":
            if qcow2 and img.header.nb_snapshots:
                # (here: -c, -a and -d need none of info's formatting)
                from qcow2lib.cli.info import human_snapshot_table
                from qcow2lib.ops.info import _snapshot_list

                cli.out("Snapshot list:\n" + human_snapshot_table(_snapshot_list(img)))
            return 0
        # (not for -l: listing needs none of the machinery that changes snapshots)
        from qcow2lib import snapshots as snaps

        if action == "c":
            if not qcow2:
                cli.error_report(
                    f"Could not create snapshot '{name}': -95 (Operation not supported)"
                )
                return 1
            now = time.time_ns() // 1000  # g_get_real_time(): microseconds
            # qemu-img copies the name into a 256-byte buffer (pstrcpy): a longer one is
            # cut at 255 bytes, inside a character if it must be.
            stored = name.encode("utf-8", "surrogateescape")[: snaps.MAX_NAME_BYTES]
            date = (now // 10**6, now % 10**6 * 1000)
            try:
                snaps.create_snapshot(
                    img, stored.decode("utf-8", "surrogateescape"), date=date, icount=0
                )
            except Qcow2Error as exc:
                if isinstance(exc, OSError) and exc.errno:
                    code = -exc.errno
                else:
                    code = -27 if "too many" in str(exc) else -22
                cli.error_report(
                    f"Could not create snapshot '{name}': {code} ({os.strerror(-code)})"
                )
                return 1
        elif action == "a":
            if not qcow2:
                if img.format == "raw" and spec.fmt is None:  # QEMU reopens it, warning again
                    sys.stderr.write(RAW_PROBE_WARNING.format(host_path(spec.path)))
                cli.error_report(
                    f"Could not apply snapshot '{name}': Block driver does not support snapshots"
                )
                return 1
            if snaps.find_snapshot(img, name) is None:
                reason = "No such file or directory"
            else:
                try:
                    snaps.apply_snapshot(img, name)
                    reason = None
                except snaps.SnapshotL1Error as exc:  # told first, then its errno
                    cli.error_report(str(exc.strerror))
                    reason = exc.errno_text()
                except qcow2lib.InvalidArgumentError:  # refcount overflow: QEMU's EINVAL
                    reason = "Invalid argument"
                except Qcow2Error as exc:
                    reason = error_text(exc)
            if reason:
                cli.error_report(
                    f"Could not apply snapshot '{name}': Failed to load snapshot: {reason}"
                )
                return 1
        elif action == "d":
            found = snaps.find_snapshot(img, name=name) if qcow2 else None
            if found is None:
                cli.error_report(f"Could not delete snapshot '{name}': snapshot not found")
                return 1
            try:
                snaps.delete_snapshot(img, id=found.id, name=found.name)
            except Qcow2Error as exc:
                cli.error_report(f"Could not delete snapshot '{name}': {error_text(exc)}")
                return 1
    return 0
