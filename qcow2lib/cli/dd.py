"""`dd`: copy (part of) an image into a new image, dd(1)-style operands."""

from __future__ import annotations

from qcow2lib import Qcow2Error, Qcow2IOError
from qcow2lib.cli.common import Cli, cvtnum
from qcow2lib.drivers import creation_refusal
from qcow2lib.cli.convert import create_convert_target
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    ImageSpec,
    OpenFailure,
    image_spec,
    open_spec,
    report_failure,
)
from qcow2lib.cli.qemuopts import (
    FORMAT_CREATE_OPTS,
    CreateError,
    CreateOptions,
    merged_create_opts,
)
from qcow2lib.cli.secrets import process_object
from qcow2lib.ops import error_text, host_path, virtual_size
from qcow2lib.sizes import INT64_MAX, SizeError, parse_size


def cmd_dd(cli: Cli, argv: list[str]) -> int:
    """`dd`: copy (part of) an image into a new image, dd(1)-style operands."""
    fmt = None
    out_fmt = "raw"
    image_opts = force_share = False
    getopt = GetoptLong(
        argv,
        ":hf:O:U",
        (
            LongOpt("help", False, "h"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("force-share", False, "U"),
        ),
    )
    while (c := getopt.next()) is not None:
        if c == "O":
            out_fmt = getopt.optarg
        elif c == "f":
            fmt = getopt.optarg
        elif c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "U":
            force_share = True
        elif c == "object":
            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
    block_size = 512
    count = skip = None
    in_name = out_name = None
    for operand in getopt.argv[getopt.optind :]:
        key, eq, value = operand.partition("=")
        if not eq:
            cli.error_report(f"unrecognized operand {operand}")
            return 1
        if key not in ("bs", "count", "if", "of", "skip"):
            cli.error_report(f"unrecognized operand {key}")
            return 1
        if key == "bs":
            try:
                parsed = parse_size(value, warn=cli.warn_report)
            except SizeError as exc:
                if not exc.out_of_range:
                    cli.error_report(
                        "Invalid bs specified. You may use k, M, G, T, P or E suffixes for"
                    )
                    cli.error_report(
                        "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
                    )
                    return 1
                parsed = INT64_MAX + 1
            if not 1 <= parsed <= (1 << 31) - 1:
                cli.error_report(f"Invalid bs specified. Must be between 1 and {(1 << 31) - 1}.")
                return 1
            block_size = parsed
        elif key == "count":
            count = cvtnum(cli, "count", value)
            if count is None:
                return 1
        elif key == "skip":
            skip = cvtnum(cli, "skip", value)
            if skip is None:
                return 1
        elif key == "if":
            in_name = value
        else:
            out_name = value
    if in_name is None or out_name is None:
        cli.error_report("Must specify both input and output files")
        return 1
    try:
        source = open_spec(cli, image_spec(in_name, image_opts, fmt, force_share))
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with source:
        if out_fmt not in FORMAT_CREATE_OPTS:
            cli.error_report(creation_refusal(out_fmt) or "Unknown file format")
            return 1
        try:
            out_path = host_path(out_name)
        except Qcow2Error as exc:
            cli.error_report(error_text(exc))
            return 1
        size = virtual_size(source)
        if count is not None and count <= INT64_MAX // block_size and count * block_size < size:
            size = count * block_size
        beyond = skip is not None and (skip > INT64_MAX // block_size or size < block_size * skip)
        out_size = 0 if beyond else size - block_size * (skip or 0)
        opts = CreateOptions(merged_create_opts(out_fmt), cli.warn_report)
        opts.set_number("size", out_size)
        try:
            _create_dd_target(cli, out_name, out_fmt, opts)
        except CreateError as exc:
            report_failure(cli, exc)
            return 1
        try:
            target = open_spec(cli, ImageSpec(out_name, out_path, out_fmt), "r+")
        except OpenFailure as exc:
            report_failure(cli, exc)
            return 1
        with target:
            if beyond:
                cli.error_report(f"{in_name}: cannot skip to specified offset")
                in_pos = size
            else:
                in_pos = (skip or 0) * block_size
            out_pos = 0
            step = max(block_size, 0)
            while in_pos < size:
                n = min(step, size - in_pos)
                try:
                    inside = max(0, min(n, source.size - in_pos))  # a raw file's last sector
                    data = (source.read(in_pos, inside) if inside else b"").ljust(n, b"\0")
                except Qcow2Error as exc:
                    cli.error_report(
                        f"error while reading from input image file: {_request_error(exc)}"
                    )
                    return 1
                in_pos += n
                try:
                    target.write(out_pos, data)
                except Qcow2Error as exc:
                    cli.error_report(
                        f"error while writing to output image file: {_request_error(exc)}"
                    )
                    return 1
                out_pos += n
            target.flush()
    return 0


def _create_dd_target(cli: Cli, filename: str, fmt: str, opts: CreateOptions) -> None:
    try:
        create_convert_target(cli, filename, fmt, opts)
    except CreateError as exc:
        message = exc.message.replace(
            f"error while converting {fmt}: ", "error while creating output image: ", 1
        )
        raise CreateError(message, exc.hint) from exc


def _request_error(exc: Qcow2Error) -> str:
    """qemu-img dd's strerror(-ret) for a failed read or write (our other errors say
    what was wrong in their own words)."""
    return exc.errno_text() if isinstance(exc, Qcow2IOError) else error_text(exc)
