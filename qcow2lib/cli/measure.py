"""`measure`: the size a new image of a format would need (for --size N or a source)."""

from __future__ import annotations

import sys

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli, cvtnum
from qcow2lib.drivers import creation_refusal
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    SNAPSHOT_OPT_BASE,
    OpenFailure,
    image_spec,
    load_snapshot,
    open_spec,
    parse_snapshot_param,
    report_failure,
)
from qcow2lib.cli.qemuopts import (
    join_option_list,
    FORMAT_CREATE_OPTS,
    CreateError,
    CreateOptions,
    merged_create_opts,
    split_option_list,
)
from qcow2lib.cli.secrets import process_object
from qcow2lib.ops import error_text


def cmd_measure(cli: Cli, argv: list[str]) -> int:
    """`measure`: the size a new image of a format would need (for --size N or a source)."""
    from qcow2lib.ops.measure import measure, measure_human, measure_json

    fmt = filename = options = snapshot_name = None
    snapshot_opts: dict | None = None
    out_fmt = "raw"
    output = "human"
    force_share = image_opts = False
    img_size = None
    getopt = GetoptLong(
        argv,
        "hf:O:o:l:U",
        (
            LongOpt("help", False, "h"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("object", True, "object"),
            LongOpt("output", True, "output"),
            LongOpt("size", True, "size"),
            LongOpt("force-share", False, "U"),
        ),
    )
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in "?:":  # measure lets getopt print its own complaint, then shows the help
            sys.stderr.write(f"{argv[0]}: {getopt.error_message}\n")
            cli.help()
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = arg
        elif c == "O":
            out_fmt = arg
        elif c == "o":
            options = join_option_list(options, arg, cli.error_report)
            if options is None:
                return 1
        elif c == "l":
            if arg.startswith(SNAPSHOT_OPT_BASE):
                snapshot_opts = parse_snapshot_param(cli, arg)
                if snapshot_opts is None:
                    return 1
            else:
                snapshot_name = arg
        elif c == "U":
            force_share = True
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "output":
            if arg not in ("json", "human"):
                cli.error_report("--output must be used with human or json as argument.")
                return 1
            output = arg
        elif c == "size":
            img_size = cvtnum(cli, "image size", arg)
            if img_size is None:
                return 1
    rest = getopt.argv[getopt.optind :]
    if len(rest) > 1:
        cli.error_report("At most one filename argument is allowed.")
        return 1
    filename = rest[0] if rest else None
    if filename is None and (
        image_opts or fmt is not None or snapshot_name is not None or snapshot_opts is not None
    ):
        cli.error_report("--image-opts, -f, and -l require a filename argument.")
        return 1
    if filename is not None and img_size is not None:
        cli.error_report("--size N cannot be used together with a filename.")
        return 1
    if filename is None and img_size is None:
        cli.error_report("Either --size N or one filename must be specified.")
        return 1
    devices = []
    try:
        source = None
        if filename is not None:
            try:
                source = open_spec(cli, image_spec(filename, image_opts, fmt, force_share))
                devices.append(source)
                if snapshot_opts is not None or snapshot_name is not None:
                    source = load_snapshot(source, snapshot_opts, snapshot_name)
            except OpenFailure as exc:
                report_failure(cli, exc)
                return 1
        if out_fmt not in FORMAT_CREATE_OPTS:
            cli.error_report(creation_refusal(out_fmt) or f"Unknown file format '{out_fmt}'")
            return 1
        opts = CreateOptions(merged_create_opts(out_fmt), cli.warn_report)
        try:
            for name, value, _ in split_option_list(options or ""):
                opts.set(name, value)
        except CreateError as exc:
            report_failure(cli, exc)
            cli.error_report(f"Invalid options for file format '{out_fmt}'")
            return 1
        if out_fmt not in ("qcow2", "raw", "luks"):  # "file" and vmdk cannot measure
            cli.error_report(f"Block driver '{out_fmt}' does not support size measurement")
            return 1
        given = {name: opts.get(name) for name in opts.names()}
        if out_fmt == "raw":  # QEMU's raw driver looks at the size only
            given = {name: value for name, value in given.items() if name == "size"}
        if given.get("encrypt.format") == "luks":  # QEMU builds a LUKS header to measure it
            secret_id = given.get("encrypt.key-secret")
            if secret_id is None:
                cli.error_report("Parameter 'encrypt.key-secret' is required for cipher")
                return 1
            if secret_id not in cli.secrets:
                cli.error_report(f"No secret with id '{secret_id}'")
                return 1
        if out_fmt == "luks":  # issue 14: QEMU checks the options and the secret first
            from qcow2lib.cli.create import LUKS_CREATE_ENUMS

            for name, allowed in LUKS_CREATE_ENUMS.items():
                if name in given and given[name] not in allowed:
                    cli.error_report(f"Parameter '{name}' does not accept value '{given[name]}'")
                    return 1
            secret_id = given.get("key-secret")
            if secret_id is None:
                cli.error_report("Parameter 'key-secret' is required for cipher")
                return 1
            if secret_id not in cli.secrets:
                cli.error_report(f"No secret with id '{secret_id}'")
                return 1
        try:
            info = measure(size=img_size, source=source, fmt=out_fmt, options=given)
        except Qcow2Error as exc:
            for line in error_text(exc).split("\n"):
                cli.error_report(line)
            return 1
    finally:
        for device in devices:
            device.close()
    cli.out(measure_json(info) if output == "json" else measure_human(info))
    return 0
