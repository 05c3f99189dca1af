"""`resize`: set the virtual size ([+|-]size), shrinking only with --shrink."""

from __future__ import annotations

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import OpenFailure, image_spec, open_spec, report_failure
from qcow2lib.cli.qemuopts import (
    PREALLOC_MODES,
    SIZE_OPT,
    CreateError,
    CreateOptions,
    int64,
)
from qcow2lib.cli.secrets import process_object
from qcow2lib.ops import error_text, virtual_size


def cmd_resize(cli: Cli, argv: list[str]) -> int:
    """`resize`: set the virtual size ([+|-]size), shrinking only with --shrink."""
    from qcow2lib.ops.resize import ShrinkRefusedError, resize

    if len(argv) < 3:
        cli.error_exit("Not enough arguments")
    size_text = argv[-1]  # taken out first, so that "-1G" is not read as an option
    fmt = None
    quiet = image_opts = shrink = False
    prealloc = "off"
    getopt = GetoptLong(
        argv[:-1],
        ":f:hq",
        (
            LongOpt("help", False, "h"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("preallocation", True, "preallocation"),
            LongOpt("shrink", False, "shrink"),
        ),
    )
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = getopt.optarg
        elif c == "q":
            quiet = True
        elif c == "object":
            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
        elif c == "preallocation":
            if getopt.optarg not in PREALLOC_MODES:
                cli.error_report(f"Invalid preallocation mode '{getopt.optarg}'")
                return 1
            prealloc = getopt.optarg
        elif c == "shrink":
            shrink = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting image file name and size")
    filename = getopt.argv[getopt.optind]
    relative = {"+": 1, "-": -1}.get(size_text[:1], 0)
    if relative:
        size_text = size_text[1:]
    size_opts = CreateOptions((SIZE_OPT,), cli.warn_report)
    try:
        size_opts.set("size", size_text)
    except CreateError as exc:
        report_failure(cli, exc)
        return 1
    n = int64(size_opts.value("size"))
    try:
        image = open_spec(cli, image_spec(filename, image_opts, fmt), "r+")
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with image:
        current = virtual_size(image)
        total = current + n * relative if relative else n
        total = int64(total & ((1 << 64) - 1))
        if total <= 0:
            cli.error_report("New image size must be positive")
            return 1
        if total <= current and prealloc != "off":
            cli.error_report("Preallocation can only be used for growing images")
            return 1
        try:
            resize(image, total, shrink=shrink, preallocation=prealloc)
        except ShrinkRefusedError as exc:
            cli.error_report(str(exc))
            cli.warn_report(exc.warning)
            return 1
        except Qcow2Error as exc:
            cli.error_report(error_text(exc))
            return 1
    if not quiet:
        cli.out("Image resized.\n")
    return 0
