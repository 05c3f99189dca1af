"""`map`: the allocation map of an image and its chain (human or JSON)."""

from __future__ import annotations

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli, cvtnum
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import OpenFailure, image_spec, open_spec, report_failure
from qcow2lib.ops import error_text, virtual_size


def cmd_map(cli: Cli, argv: list[str]) -> int:
    """`map`: the allocation map of an image and its chain (human or JSON)."""
    from qcow2lib.ops.mapping_report import write_map

    fmt = output = None
    image_opts = force_share = False
    start, max_length = 0, -1
    getopt = GetoptLong(
        argv,
        ":f:s:l:hU",
        (
            LongOpt("help", False, "h"),
            LongOpt("format", True, "f"),
            LongOpt("output", True, "output"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("force-share", False, "U"),
            LongOpt("start-offset", True, "s"),
            LongOpt("max-length", True, "l"),
        ),
    )
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = getopt.optarg
        elif c == "U":
            force_share = True
        elif c == "output":
            output = getopt.optarg
        elif c == "s":
            value = cvtnum(cli, "start offset", getopt.optarg)
            if value is None:
                return 1
            start = value
        elif c == "l":
            value = cvtnum(cli, "max length", getopt.optarg)
            if value is None:
                return 1
            max_length = value
        elif c == "object":
            from qcow2lib.cli.secrets import process_object  # (start-up time: --object only)

            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if output not in (None, "json", "human"):
        cli.error_report("--output must be used with human or json as argument.")
        return 1
    try:
        device = open_spec(cli, image_spec(filename, image_opts, fmt, force_share))
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with device:
        try:
            length = virtual_size(device)
            if max_length != -1:
                length = min(start + max_length, length)
            error = write_map(device, cli.out, start, max(0, length - start), output or "human")
        except Qcow2Error as exc:
            cli.error_report(f"Could not read file metadata: {error_text(exc)}")
            return 1
    if error is not None:
        cli.error_report(error)
        return 1
    return 0
