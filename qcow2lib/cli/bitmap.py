"""`bitmap`: add, remove, clear, enable, disable or merge persistent bitmaps, in the
order given; each one done stays done when a later one fails (as in qemu-img)."""

from __future__ import annotations

import sys

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli, cvtnum
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import OpenFailure, image_spec, open_spec, report_failure
from qcow2lib.ops import error_text


def cmd_bitmap(cli: Cli, argv: list[str]) -> int:
    """`bitmap`: add, remove, clear, enable, disable or merge persistent bitmaps, in the
    order given; each one done stays done when a later one fails (as in qemu-img)."""
    from qcow2lib.ops import bitmap as bitmaps

    fmt = src_fmt = src_filename = None
    image_opts = add = merge = False
    granularity = 0
    actions: list[tuple[str, str | None]] = []
    getopt = GetoptLong(
        argv,
        ":b:f:F:g:h",
        (
            LongOpt("help", False, "h"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("add", False, "add"),
            LongOpt("remove", False, "remove"),
            LongOpt("clear", False, "clear"),
            LongOpt("enable", False, "enable"),
            LongOpt("disable", False, "disable"),
            LongOpt("merge", True, "merge"),
            LongOpt("granularity", True, "g"),
            LongOpt("source-file", True, "b"),
            LongOpt("source-format", True, "F"),
        ),
    )
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "b":
            src_filename = arg
        elif c == "f":
            fmt = arg
        elif c == "F":
            src_fmt = arg
        elif c == "g":
            value = cvtnum(cli, "granularity", arg)
            if value is None:
                return 1
            granularity = value
        elif c in ("add", "remove", "clear", "enable", "disable", "merge"):
            actions.append((c, arg))
            add = add or c == "add"
            merge = merge or c == "merge"
        elif c == "object":
            from qcow2lib.cli.secrets import process_object  # (start-up time: --object only)

            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
    problem = None
    if not actions:
        problem = "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
    elif granularity and not add:
        problem = "granularity only supported with --add"
    elif src_fmt and not src_filename:
        problem = "-F only supported with -b"
    elif src_filename and not merge:
        problem = "Merge bitmap source file only supported with --merge"
    elif getopt.optind != len(getopt.argv) - 2:
        problem = "Expecting filename and bitmap name"
    if problem:
        cli.error_report(problem)
        return 1
    filename, name = getopt.argv[getopt.optind :]
    source = None
    try:
        img = open_spec(cli, image_spec(filename, image_opts, fmt), "r+", backing=False)
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    try:
        if src_filename:
            try:
                source = open_spec(
                    cli, image_spec(src_filename, False, src_fmt), "r", backing=False
                )
            except OpenFailure as exc:
                report_failure(cli, exc)
                return 1
        if img.format != "qcow2":
            action = actions[0][0]
            cli.error_report(
                f"Operation {action} on bitmap {name} failed: "
                + (
                    f"Dirty bitmap '{name}' not found"
                    if action != "add"
                    else f"Can't store persistent bitmaps to {filename}: Operation not supported"
                )
            )
            return 1
        # one session: QEMU changes the bitmaps in memory and stores them on close
        action, entered = actions[0][0], False
        try:
            with bitmaps.BitmapSession(img) as session:
                entered = True
                for action, source_name in actions:
                    try:
                        if action == "add":  # (QEMU passes the granularity on as 32 bits)
                            session.add(name, granularity & 0xFFFFFFFF if granularity else None)
                        elif action == "remove":
                            session.remove(name)
                        elif action == "clear":
                            session.clear(name)
                        elif action in ("enable", "disable"):
                            session.set_enabled(name, action == "enable")
                        else:
                            assert source_name is not None  # (--merge takes an argument)
                            session.merge(name, source or img, source_name)
                    except Qcow2Error as exc:
                        cli.error_report(
                            f"Operation {action} on bitmap {name} failed: {error_text(exc)}"
                        )
                        if "is inconsistent" in str(exc):
                            sys.stderr.write(
                                "Try block-dirty-bitmap-remove to delete this bitmap from disk\n"
                            )
                        return 1
        except Qcow2Error as exc:  # reading the bitmaps, or storing them, failed
            if entered:
                cli.error_report(f"Lost persistent bitmaps: {error_text(exc)}")
            else:
                cli.error_report(f"Operation {action} on bitmap {name} failed: {error_text(exc)}")
            return 1
    finally:
        if source is not None:
            source.close()
        img.close()
    return 0
