"""`info`: the image (and with --backing-chain its backing files) in human or JSON form;
the human tables that `snapshot -l` shares."""

from __future__ import annotations

import sys
import time

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    OpenFailure,
    check_entry_size,
    image_spec,
    json_filename,
    report_failure,
    untrusted,
    warn_stale_bitmaps,
)
from qcow2lib.qobject import dump_qobject, qemu_json
from qcow2lib.ops import error_text
from qcow2lib.ops.info import ImageOpenError, image_info_list
from qcow2lib.sizes import format_size


def _ljust(text: str, width: int) -> str:
    """Left-justify to a width in bytes, as C's printf("%-Ns") pads UTF-8 text."""
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


def human_snapshot_table(snapshots: list[dict]) -> str:
    """The "Snapshot list:" table of `qemu-img info` / `qemu-img snapshot -l`."""
    lines = ["%-10s%-17s%8s%20s%13s%11s\n" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
    for snap in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["date-sec"]))
        secs = snap["vm-clock-sec"]
        clock = "%02d:%02d:%02d.%03d" % (
            secs // 3600,
            secs // 60 % 60,
            secs % 60,
            snap["vm-clock-nsec"] // 1_000_000 % 1000,
        )
        icount = str(snap["icount"]) if "icount" in snap else ""
        lines.append(
            f"{_ljust(snap['id'], 9)} {_ljust(snap['name'], 16)} "
            f"{format_size(snap['vm-state-size']):>8}{date:>20}{clock:>13}"
            f"{icount:>11}\n"
        )
    return "".join(lines)


def human_image_info(info: dict) -> str:
    """One image of `qemu-img info` in human form."""
    disk_size = format_size(info["actual-size"]) if "actual-size" in info else "unavailable"
    text = (
        f"image: {info['filename']}\n"
        f"file format: {info['format']}\n"
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)\n"
        f"disk size: {disk_size}\n"
    )
    if info.get("encrypted"):
        text += "encrypted: yes\n"
    if "cluster-size" in info:
        text += f"cluster_size: {info['cluster-size']}\n"
    if info.get("dirty-flag"):
        text += "cleanly shut down: no\n"
    if "backing-filename" in info:
        backing, full = info["backing-filename"], info.get("full-backing-filename")
        text += f"backing file: {backing}"
        if full is None:
            text += " (cannot determine actual path)"
        elif full != backing:
            text += f" (actual path: {full})"
        text += "\n"
        if "backing-filename-format" in info:
            text += f"backing file format: {info['backing-filename-format']}\n"
    if "snapshots" in info:
        text += "Snapshot list:\n" + human_snapshot_table(info["snapshots"])
    if "format-specific" in info:
        text += "Format specific information:\n"
        text += dump_qobject(info["format-specific"]["data"], 1)
    return text


def cmd_info(cli: Cli, argv: list[str]) -> int:
    """`info`: the image (and with --backing-chain its backing files) in human or JSON form."""
    fmt = output = None
    chain = force_share = image_opts = False
    getopt = GetoptLong(
        argv,
        ":f:hU",
        (
            LongOpt("help", False, "h"),
            LongOpt("format", True, "f"),
            LongOpt("output", True, "output"),
            LongOpt("backing-chain", False, "backing-chain"),
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
            fmt = getopt.optarg
        elif c == "output":
            output = getopt.optarg
        elif c == "backing-chain":
            chain = True
        elif c == "object":
            from qcow2lib.cli.secrets import process_object  # (start-up time: --object only)

            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
        elif c == "U":
            force_share = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if output not in (None, "json", "human"):
        cli.error_report("--output must be used with human or json as argument.")
        return 1
    spec = None
    locking = True
    if image_opts or filename.startswith("json:"):
        try:
            spec = image_spec(filename, image_opts, fmt, force_share)
        except OpenFailure as exc:
            report_failure(cli, exc)
            return 1
        filename, fmt, force_share = spec.path, spec.fmt, spec.force_share
        locking = spec.locking
        for warning in spec.warnings:
            cli.warn_report(warning)
    try:
        infos = image_info_list(
            filename,
            fmt,
            chain,
            force_share,
            untrusted(),
            locking,
            data_file=spec.data_file if spec is not None else None,
            backing_node=spec.backing_node if spec is not None else None,
            raw_window=spec.raw_window if spec is not None else None,
            opened=lambda device: warn_stale_bitmaps(cli, device),
        )
    except ImageOpenError as exc:
        message = str(exc)
        if spec is not None and message.startswith(f"Could not open '{spec.path}': "):
            message = f"Could not open '{spec.name}': " + message[len(spec.path) + 19 :]
        cli.error_report(message)
        sys.stderr.write(exc.hint)
        return 1
    except Qcow2Error as exc:
        cli.error_report(error_text(exc))
        return 1
    if spec is not None and "cluster-size" in infos[0]:
        try:
            check_entry_size(spec, infos[0]["cluster-size"])
        except OpenFailure as exc:
            report_failure(cli, exc)
            return 1
    if spec is not None and (spec.key_secret is not None or spec.raw_window is not None):
        infos[0]["filename"] = json_filename(spec, infos[0]["format"])
    if output == "json":
        cli.out(qemu_json(infos if chain else infos[0]) + "\n")
    else:
        cli.out("\n".join(human_image_info(info) for info in infos))
    return 0
