"""`commit`: write an overlay's data into its backing file (or into -b further down)."""

from __future__ import annotations

import qcow2lib
from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli, cvtnum
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    OpenFailure,
    check_cache_mode,
    image_spec,
    open_spec,
    report_failure,
    spec_passphrases,
    untrusted,
)
from qcow2lib.cli.progress import Progress
from qcow2lib.cli.secrets import process_object
from qcow2lib.ops import error_text, host_path


def cmd_commit(cli: Cli, argv: list[str]) -> int:
    """`commit`: write an overlay's data into its backing file (or into -b further down)."""
    from qcow2lib.ops.commit import commit

    fmt = base = None
    cache = "writeback"
    progress = quiet = drop = image_opts = False
    rate_limit = 0
    getopt = GetoptLong(
        argv,
        ":f:ht:b:dpqr:",
        (
            LongOpt("help", False, "h"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
        ),
    )
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = arg
        elif c == "t":
            cache = arg
        elif c == "b":
            base = arg
            drop = True  # -b implies -d
        elif c == "d":
            drop = True
        elif c == "p":
            progress = True
        elif c == "q":
            quiet = True
        elif c == "r":
            rate = cvtnum(cli, "rate limit", arg)
            if rate is None:
                return 1
            rate_limit = rate
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
    if quiet:
        progress = False
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if not check_cache_mode(cli, cache, False):
        return 1
    try:
        spec = image_spec(filename, image_opts, fmt)
        open_spec(cli, spec, "r+").close()
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    meter = Progress(cli, progress, 1.0)
    meter.print(0, 100)
    try:
        passphrases = spec_passphrases(cli, spec)
        with qcow2lib.open(
            spec.target or host_path(spec.path),
            "r+",
            spec.fmt,
            backing=False,
            data_file=spec.data_file,
            passphrase=passphrases[:1],
            untrusted=untrusted(),
            locking=spec.locking,
        ) as top:
            commit(
                top,
                base,
                drop=drop,
                progress=meter.callback if meter.enabled else None,
                backing_passphrases=passphrases[1:],
                untrusted=untrusted(),
                rate_limit=rate_limit,
                backing_node=spec.backing_node,
                name=spec.name,
            )
    except Qcow2Error as exc:
        meter.end()
        cli.error_report(error_text(exc))
        return 1
    meter.print(100, 0)
    meter.end()
    if not quiet:
        cli.out("Image committed.\n")
    return 0
