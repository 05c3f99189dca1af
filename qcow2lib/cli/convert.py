"""`convert`: copy one or more images (concatenated) into a new or existing target."""

from __future__ import annotations

import errno
import os
import sys

import qcow2lib
from qcow2lib import ImageLockedError, Qcow2Error
from qcow2lib.bitmaps import FLAG_AUTO as BITMAP_AUTO
from qcow2lib.bitmaps import FLAG_IN_USE as BITMAP_IN_USE
from qcow2lib.cli.common import Cli, cvtnum, parse_strtol
from qcow2lib.cli.create import format_arguments, print_create_option_help
from qcow2lib.drivers import creation_refusal
from qcow2lib.hostfile import HostFile
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    SNAPSHOT_OPT_BASE,
    ImageSpec,
    OpenFailure,
    check_cache_mode,
    image_spec,
    load_snapshot,
    open_spec,
    parse_snapshot_param,
)
from qcow2lib.cli.progress import Progress
from qcow2lib.cli.qemuopts import (
    join_option_list,
    FORMAT_CREATE_OPTS,
    CreateError,
    CreateOptions,
    int64,
    merged_create_opts,
    split_option_list,
)
from qcow2lib.cli.secrets import process_object
from qcow2lib.ops import error_text, host_path, virtual_size

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import NoReturn

MAX_COROUTINES = 16
MAX_BUF_SECTORS = 32768


class ConvertStop(Exception):
    """Ends `convert` after an error was reported; `code` is the exit status."""

    def __init__(self, code: int = 1):
        super().__init__(code)
        self.code = code


def create_convert_target(cli: Cli, filename: str, fmt: str, opts: CreateOptions) -> None:
    """bdrv_create() of convert's target (no "Formatting" line, no backing file check)."""
    path = host_path(filename)
    try:
        arguments = format_arguments(fmt, opts, cli.secrets)
        size = int64(opts.value("size"))
        if fmt != "luks":  # a LUKS payload keeps its byte size, as in QEMU
            size = (size + 511) // 512 * 512
        if fmt == "vmdk":
            from qcow2lib.vmdk import create_vmdk

            create_vmdk(path, size, **arguments)
            return
        qcow2lib.create(path, size, **arguments)
    except CreateError as exc:
        raise CreateError(
            f"{filename}: error while converting {fmt}: {exc.message}", exc.hint
        ) from exc
    except ImageLockedError as exc:
        raise CreateError(
            f"{filename}: error while converting {fmt}: {error_text(exc)}",
            f"Is another process using the image [{path}]?\n",
        ) from exc
    except Qcow2Error as exc:
        raise CreateError(f"{filename}: error while converting {fmt}: {error_text(exc)}") from exc


def cmd_convert(cli: Cli, argv: list[str]) -> int:
    """`convert`: copy one or more images (concatenated) into a new or existing target."""
    fmt = out_fmt = out_baseimg = snapshot_name = backing_fmt = options = None
    snapshot_opts: dict | None = None
    cache, src_cache = "unsafe", "writeback"
    image_opts = skip_create = progress = tgt_image_opts = force_share = False
    explicit_sparse = bitmaps = skip_broken = salvage = compressed = copy_range = False
    quiet = has_zero_init = False
    min_sparse = 8
    rate_limit = 0
    num_coroutines = 8
    in_order = True
    getopt = GetoptLong(
        argv,
        ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
        (
            LongOpt("help", False, "h"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("force-share", False, "U"),
            LongOpt("target-image-opts", False, "target-image-opts"),
            LongOpt("salvage", False, "salvage"),
            LongOpt("target-is-zero", False, "target-is-zero"),
            LongOpt("bitmaps", False, "bitmaps"),
            LongOpt("skip-broken-bitmaps", False, "skip-broken-bitmaps"),
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
        elif c == "O":
            out_fmt = arg
        elif c == "B":
            out_baseimg = arg
        elif c == "C":
            copy_range = True
        elif c == "c":
            compressed = True
        elif c == "F":
            backing_fmt = arg
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
        elif c == "S":
            value = cvtnum(cli, "buffer size for sparse output", arg)
            if value is None:
                return 1
            if value % 512 or value // 512 > MAX_BUF_SECTORS:
                cli.error_report(
                    "Invalid buffer size for sparse output specified. Valid sizes "
                    f"are multiples of 512 up to {MAX_BUF_SECTORS * 512}. Select 0 "
                    "to disable sparse detection (fully allocates output)."
                )
                return 1
            min_sparse = value // 512
            explicit_sparse = True
        elif c == "p":
            progress = True
        elif c == "t":
            cache = arg
        elif c == "T":
            src_cache = arg
        elif c == "q":
            quiet = True
        elif c == "n":
            skip_create = True
        elif c == "m":
            value = parse_strtol(arg)
            if value is None or not 1 <= value <= MAX_COROUTINES:
                cli.error_report(
                    "Invalid number of coroutines. Allowed number of coroutines is "
                    f"between 1 and {MAX_COROUTINES}"
                )
                return 1
            num_coroutines = value
        elif c == "W":
            in_order = False
        elif c == "U":
            force_share = True
        elif c == "r":
            rate = cvtnum(cli, "rate limit", arg)
            if rate is None:
                return 1
            rate_limit = rate
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "salvage":
            salvage = True
        elif c == "target-image-opts":
            tgt_image_opts = True
        elif c == "target-is-zero":
            has_zero_init = True
        elif c == "bitmaps":
            bitmaps = True
        elif c == "skip-broken-bitmaps":
            skip_broken = True
    if out_fmt is None and not tgt_image_opts:
        out_fmt = "raw"
    for bad, message in (
        (skip_broken and not bitmaps, "Use of --skip-broken-bitmaps requires --bitmaps"),
        (compressed and copy_range, "Cannot enable copy offloading when -c is used"),
        (explicit_sparse and copy_range, "Cannot enable copy offloading when -S is used"),
        (copy_range and salvage, "Cannot use copy offloading in salvaging mode"),
        (tgt_image_opts and not skip_create, "--target-image-opts requires use of -n flag"),
        (skip_create and options is not None, "-o has no effect when skipping image creation"),
        (has_zero_init and not skip_create, "--target-is-zero requires use of -n flag"),
    ):
        if bad:
            cli.error_report(message)
            return 1
    argv, optind = getopt.argv, getopt.optind
    src_num = len(argv) - optind - 1
    out_filename = argv[-1] if src_num >= 1 else None
    if options is not None and any(is_help for _, _, is_help in split_option_list(options)):
        if out_fmt is None:
            cli.error_report("Option help requires a format be specified")
            return 1
        return print_create_option_help(cli, out_filename, out_fmt)
    if src_num < 1:
        cli.error_report("Must specify image file name")
        return 1
    if not check_cache_mode(cli, src_cache, True):
        return 1
    meter = Progress(cli, progress and not quiet, 1.0)
    meter.print(0, 100)
    devices: list = []
    try:
        code = _convert(
            cli,
            argv[optind : optind + src_num],
            argv[-1],  # the output file name (src_num >= 1 here)
            devices,
            meter,
            fmt=fmt,
            out_fmt=out_fmt,
            out_baseimg=out_baseimg,
            backing_fmt=backing_fmt,
            options=options,
            snapshot_opts=snapshot_opts,
            snapshot_name=snapshot_name,
            cache=cache,
            image_opts=image_opts,
            skip_create=skip_create,
            tgt_image_opts=tgt_image_opts,
            force_share=force_share,
            bitmaps=bitmaps,
            skip_broken=skip_broken,
            compressed=compressed,
            copy_range=copy_range,
            has_zero_init=has_zero_init,
            min_sparse=min_sparse,
            num_coroutines=num_coroutines,
            in_order=in_order,
            salvage=_salvage_warnings(cli, quiet) if salvage else None,
            rate_limit=rate_limit,
        )
    except ConvertStop as stop:
        code = stop.code
    finally:
        for device in reversed(devices):
            try:
                device.close()
            except Qcow2Error:
                pass
    if code == 0:
        meter.print(100, 0)
    meter.end()
    return code


def _salvage_warnings(cli: Cli, quiet: bool):
    """--salvage: each source error the copy goes past, as qemu-img warns of it."""

    def warn(what: str, offset: int, exc: Qcow2Error) -> None:
        if not quiet:
            where = "block status at offset" if what == "block status" else "offset"
            # broken metadata is EIO to qemu-img (its notice told what is broken)
            text = error_text(exc) if isinstance(exc, OSError) else os.strerror(errno.EIO)
            cli.warn_report(f"error while reading {where} {offset}: {text}")

    return warn


def _convert(
    cli: Cli,
    sources: list[str],
    out_filename: str,
    devices: list,
    meter: Progress,
    *,
    fmt,
    out_fmt,
    out_baseimg,
    backing_fmt,
    options,
    snapshot_opts,
    snapshot_name,
    cache,
    image_opts,
    skip_create,
    tgt_image_opts,
    force_share,
    bitmaps,
    skip_broken,
    compressed,
    copy_range,
    has_zero_init,
    min_sparse,
    num_coroutines,
    in_order,
    salvage,
    rate_limit,
) -> int:
    """img_convert() after its argument checks; opened devices are appended to `devices`
    (the caller closes them). Returns the exit status or raises ConvertStop."""

    def fail(message: str, hint: str = "") -> NoReturn:
        cli.error_report(message)
        sys.stderr.write(hint)
        raise ConvertStop(1)

    src_devices = []
    for name in sources:
        try:
            device = open_spec(cli, image_spec(name, image_opts, fmt, force_share), "r")
        except OpenFailure as exc:
            fail(exc.message, exc.hint)
        devices.append(device)
        src_devices.append(device)
    total_sectors = sum(virtual_size(device) // 512 for device in src_devices)
    if snapshot_opts is not None or snapshot_name is not None:
        if snapshot_opts is None and len(src_devices) > 1:
            fail("No support for concatenating multiple snapshot")
        try:
            view = load_snapshot(src_devices[0], snapshot_opts, snapshot_name)
        except OpenFailure as exc:
            fail(exc.message)
        src_devices[0] = view

    opts = None
    if not skip_create:
        if out_fmt not in FORMAT_CREATE_OPTS:
            fail(creation_refusal(out_fmt) or f"Unknown file format '{out_fmt}'")
        try:
            host_path(out_filename)
        except Qcow2Error as exc:
            fail(error_text(exc))
        opts = CreateOptions(merged_create_opts(out_fmt), cli.warn_report)
        try:
            for name, value, _ in split_option_list(options or ""):
                if name != "id":
                    opts.set(name, value)
        except CreateError as exc:
            fail(exc.message, exc.hint)
        opts.set_number("size", total_sectors * 512)
        if out_baseimg is not None:
            if "backing_file" not in opts.descs:
                fail(f"Backing file not supported for file format '{out_fmt}'")
            opts.set("backing_file", out_baseimg)
        if backing_fmt is not None:
            if "backing_fmt" not in opts.descs:
                fail(f"Backing file format not supported for file format '{out_fmt}'")
            opts.set("backing_fmt", backing_fmt)
    baseimg_param = opts.get("backing_file") if opts is not None else None
    if baseimg_param is not None:
        out_baseimg = baseimg_param
    has_backing = bool(out_baseimg)
    if has_zero_init and has_backing:
        cli.error_report(
            "Cannot use --target-is-zero when the destination image has a backing file"
        )
        return 0  # qemu-img's exit status here is that of its last successful step
    if len(src_devices) > 1 and out_baseimg:
        fail(
            "Having a backing file for the target makes no sense when concatenating "
            "multiple input images"
        )
    if opts is not None and baseimg_param is not None and not opts.get("backing_fmt"):
        fail("Use of backing file requires explicit backing format")
    if compressed and opts is not None:
        if out_fmt != "qcow2":
            fail("Compression not supported for this file format")
        if opts.is_set("encryption") and opts.value("encryption") or opts.get("encrypt.format"):
            fail("Compression and encryption not supported at the same time")
        preallocation = opts.get("preallocation")
        if preallocation and preallocation != "off":
            fail("Compression and preallocation not supported at the same time")
    if bitmaps:
        if len(src_devices) > 1:
            fail("Copying bitmaps only possible with single source")
        source = src_devices[0]
        if source.format != "qcow2" or source.header.version < 3:
            fail("Source lacks bitmap support")
        for entry in reversed(source._bitmap_entries):  # (QEMU's list order)
            if entry.flags & BITMAP_IN_USE and not skip_broken:
                fail(
                    f"Cannot copy inconsistent bitmap '{entry.name}'",
                    "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it\n",
                )

    passphrase = None
    if opts is not None:
        secret_ids = [opts.get(name) for name in opts.names() if name.endswith("key-secret")]
        try:
            create_convert_target(cli, out_filename, out_fmt, opts)
        except CreateError as exc:
            fail(exc.message, exc.hint)
        if secret_ids and secret_ids[-1] in cli.secrets:
            passphrase = cli.secrets[secret_ids[-1]]
    if not check_cache_mode(cli, cache, False):
        raise ConvertStop(1)
    try:
        if skip_create:
            spec = image_spec(out_filename, tgt_image_opts, out_fmt)
        else:
            spec = ImageSpec(out_filename, out_filename, out_fmt)
        target = open_spec(cli, spec, "r+", passphrase=passphrase, cache=cache)
    except OpenFailure as exc:
        fail(exc.message, exc.hint)
    devices.append(target)
    if bitmaps and target.format != "qcow2":
        fail(f"Format driver '{target.format}' does not support bitmaps")
    if compressed and target.format != "qcow2":
        fail("Compression not supported for this file format")
    if getattr(target, "compressed", False) is True and target.format == "vmdk":
        compressed = True  # a streamOptimized target takes compressed grains only
    if skip_create and virtual_size(target) // 512 < total_sectors:
        fail("output file is smaller than input file")
    target_backing = target.backing if has_backing else None
    if not skip_create and target_backing is None and _reads_zeros_when_new(target):
        has_zero_init = True  # (QEMU's bdrv_has_zero_init of the target it made)
    from qcow2lib.convert import ConvertError, convert

    try:
        convert(
            src_devices,
            target,
            compress=compressed,
            sparse_size=min_sparse * 512,
            target_is_zero=has_zero_init,
            target_backing=target_backing,
            parallel=num_coroutines,
            out_of_order=not in_order,
            progress=meter.callback if meter.enabled else None,
            copy_range=copy_range,
            salvage=salvage,
            existing_target=skip_create,
            rate_limit=rate_limit,
        )
    except ConvertError as exc:
        fail(error_text(exc))
    except Qcow2Error as exc:
        fail(error_text(exc))
    if bitmaps:
        _convert_copy_bitmaps(cli, src_devices[0], target, skip_broken)
    return 0


def _reads_zeros_when_new(target) -> bool:
    """Whether a target convert has just made reads zeros wherever nothing is written, as
    QEMU's bdrv_has_zero_init tells it: a raw image or a qcow2 image (preallocated or not,
    its data file too) in a regular file, but not an encrypted one that is preallocated
    (its reserved clusters do not decrypt to zeros), a device (its old bytes) or another
    format. qemu-img then writes no zeros at all: its preallocated space stays allocated,
    where zero writes that may unmap would give it back."""
    host_file = getattr(target, "file", None)
    if not isinstance(host_file, HostFile) or host_file.is_device:
        return False
    if target.format == "raw":
        return True
    if target.format != "qcow2":
        return False
    data_file = target.data_host
    if data_file is not None and (not isinstance(data_file, HostFile) or data_file.is_device):
        return False
    l1 = target.map.l1
    return not (target.encrypted and l1.count(0) != len(l1))  # (preallocated: tables)


def _convert_copy_bitmaps(cli: Cli, source, target, skip_broken: bool) -> None:
    """convert --bitmaps: each persistent bitmap of the source, with its granularity,
    state and bits, into the target (an inconsistent one skipped with a warning)."""
    from qcow2lib.ops import bitmap as bitmap_ops

    for entry in reversed(source._bitmap_entries):  # (QEMU's list order)
        if entry.flags & BITMAP_IN_USE:
            cli.warn_report(f"Skipping inconsistent bitmap '{entry.name}'")
    # one session: QEMU creates and fills them all in memory and stores them on close
    with bitmap_ops.BitmapSession(target) as session:
        for entry in source._bitmap_entries:  # (the target's directory keeps the source's order)
            if entry.flags & BITMAP_IN_USE:
                continue
            try:
                session.add(
                    entry.name,
                    1 << entry.granularity_bits,
                    enabled=bool(entry.flags & BITMAP_AUTO),
                )
            except Qcow2Error as exc:
                cli.error_report(f"Failed to create bitmap {entry.name}: {error_text(exc)}")
                raise ConvertStop(1) from exc
            try:
                session.merge(entry.name, source, entry.name)
            except Qcow2Error as exc:
                cli.error_report(f"Failed to populate bitmap {entry.name}: {error_text(exc)}")
                session.remove(entry.name)
                raise ConvertStop(1) from exc
