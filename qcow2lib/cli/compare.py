"""`compare`: 0 identical, 1 different, 2 and more errors (qemu-img's code table)."""

from __future__ import annotations

import sys

from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    OpenFailure,
    check_cache_mode,
    image_spec,
    open_spec,
    report_failure,
)
from qcow2lib.cli.progress import Progress
from qcow2lib.cli.secrets import process_object
from qcow2lib.ops import virtual_size


def cmd_compare(cli: Cli, argv: list[str]) -> int:
    """`compare`: 0 identical, 1 different, 2 and more errors (qemu-img's code table)."""
    from qcow2lib.ops.compare import compare

    fmt1 = fmt2 = None
    cache = "writeback"
    progress = quiet = strict = image_opts = force_share = False
    getopt = GetoptLong(
        argv,
        ":hf:F:T:pqsU",
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
        elif c == "f":
            fmt1 = getopt.optarg
        elif c == "F":
            fmt2 = getopt.optarg
        elif c == "T":
            cache = getopt.optarg
        elif c == "p":
            progress = True
        elif c == "q":
            quiet = True
        elif c == "s":
            strict = True
        elif c == "U":
            force_share = True
        elif c == "object":
            process_object(cli, getopt.optarg, code=2)
        elif c == "image-opts":
            image_opts = True
    if quiet:
        progress = False
    if getopt.optind != len(getopt.argv) - 2:
        cli.error_exit("Expecting two image file names")
    filename1, filename2 = getopt.argv[getopt.optind :]
    meter = Progress(cli, progress, 2.0)
    devices = []
    try:
        if not check_cache_mode(cli, cache, True):
            return 2
        for name, fmt in ((filename1, fmt1), (filename2, fmt2)):
            try:
                devices.append(open_spec(cli, image_spec(name, image_opts, fmt, force_share)))
            except OpenFailure as exc:
                report_failure(cli, exc)
                return 2
        meter.print(0, 100)
        sizes = [virtual_size(device) for device in devices]
        warning = "Warning: Image size mismatch!"
        warned: list[bool] = []

        def progress_callback(done: int, total: int) -> None:
            # qemu-img prints the size warning when its scan passes the smaller image's end
            if done > min(sizes) and sizes[0] != sizes[1] and not warned:
                warned.append(True)
                if not quiet:
                    cli.out(warning + "\n")
            meter.callback(done, total)

        code, text = compare(
            devices[0],
            devices[1],
            strict=strict,
            name_a=filename1,
            name_b=filename2,
            progress=progress_callback if meter.enabled else None,
        )
        if warned and text.startswith(warning + "\n"):
            text = text[len(warning) + 1 :]
        if code in (0, 1):
            if not quiet:
                cli.out(text + "\n")
        else:
            lines = text.split("\n")
            # qemu-img's stdout is fully buffered unless it is a terminal: the lines it
            # printed before the failure reach a pipe after the error line
            before = "" if quiet else "".join(line + "\n" for line in lines[:-1])
            terminal = sys.stdout.isatty()
            if terminal:
                cli.out(before)
            cli.error_report(lines[-1])
            if not terminal:
                cli.out(before)
        return code
    finally:
        for device in devices:
            device.close()
        meter.end()
