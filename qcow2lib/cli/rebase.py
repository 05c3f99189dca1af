"""`rebase`: change the backing file, keeping the guest content unless -u."""

from __future__ import annotations

import qcow2lib
from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    OpenFailure,
    check_cache_mode,
    image_spec,
    json_filename,
    open_spec,
    overlay_filename,
    report_failure,
    spec_passphrases,
    untrusted,
)
from qcow2lib.cli.progress import Progress
from qcow2lib.cli.secrets import process_object
from qcow2lib.drivers import KNOWN_DRIVERS
from qcow2lib.ops import error_text, full_backing_filename, host_path


def cmd_rebase(cli: Cli, argv: list[str]) -> int:
    """`rebase`: change the backing file, keeping the guest content unless -u."""
    from qcow2lib.ops.rebase import rebase

    fmt = out_basefmt = out_baseimg = None
    cache = src_cache = "writeback"
    unsafe = progress = quiet = image_opts = force_share = False
    getopt = GetoptLong(
        argv,
        ":hf:F:b:upt:T:qU",
        (
            LongOpt("help", False, "h"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("force-share", False, "U"),
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
        elif c == "F":
            out_basefmt = arg
        elif c == "b":
            out_baseimg = arg
        elif c == "u":
            unsafe = True
        elif c == "p":
            progress = True
        elif c == "t":
            cache = arg
        elif c == "T":
            src_cache = arg
        elif c == "q":
            quiet = True
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "U":
            force_share = True
    if quiet:
        progress = False
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    if not unsafe and out_baseimg is None:
        cli.error_exit("Must specify backing file (-b) or use unsafe mode (-u)")
    filename = getopt.argv[getopt.optind]
    meter = Progress(cli, progress, 2.0)
    meter.print(0, 100)
    try:
        if not check_cache_mode(cli, cache, False) or not check_cache_mode(cli, src_cache, True):
            return 1
        try:
            spec = image_spec(filename, image_opts, fmt)
            if unsafe and spec.backing_secrets:  # -u opens no backing file to take them
                raise OpenFailure(
                    f"Could not open '{filename}': Block format 'qcow2' does not "
                    f"support the option 'backing.encrypt.key-secret'"
                )
            open_spec(cli, spec, "r+", backing=not unsafe).close()
        except OpenFailure as exc:
            report_failure(cli, exc)
            return 1
        if out_basefmt is not None and out_basefmt not in KNOWN_DRIVERS:
            cli.error_report(f"Invalid format name: '{out_basefmt}'")
            return 1
        try:
            if not unsafe and out_baseimg and spec.backing_secrets:
                # options for the backing file turn the image's name into a json: one,
                # against which a relative new backing name cannot be resolved
                fmt_used = spec.fmt or qcow2lib.probe_format(host_path(spec.path))
                try:
                    full_backing_filename(json_filename(spec, fmt_used), out_baseimg)
                except qcow2lib.InvalidArgumentError as exc:
                    cli.error_report(f"Could not resolve backing filename: {error_text(exc)}")
                    return 1
            with qcow2lib.open(
                spec.target or host_path(spec.path),
                "r+",
                spec.fmt,
                backing=not unsafe,
                data_file=spec.data_file,
                passphrase=spec_passphrases(cli, spec),
                untrusted=untrusted(),
                locking=spec.locking,
                backing_node=None if unsafe else spec.backing_node,
            ) as image:
                if not unsafe and out_baseimg and spec.backing_node is not None:
                    # so may a backing node given by options that is not the header's
                    name = overlay_filename(spec, image, image.format)
                    try:
                        full_backing_filename(name, out_baseimg)
                    except qcow2lib.InvalidArgumentError as exc:
                        cli.error_report(f"Could not resolve backing filename: {error_text(exc)}")
                        return 1
                rebase(
                    image,
                    out_baseimg or None,
                    out_basefmt,
                    unsafe=unsafe,
                    progress=meter.callback if meter.enabled else None,
                    force_share=force_share,
                    untrusted=untrusted(),
                )
        except Qcow2Error as exc:
            cli.error_report(error_text(exc))
            return 1
        meter.print(100, 0)
        return 0
    finally:
        meter.end()
