"""`check`: consistency check, optionally repairing (-r leaks|all), as qemu-img check."""

from __future__ import annotations

import sys

import qcow2lib
from qcow2lib import ImageLockedError, Qcow2Error
from qcow2lib.errors import UntrustedImageError
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    ImageSpec,
    OpenFailure,
    image_spec,
    open_spec,
    report_failure,
    untrusted,
)
from qcow2lib.ops import error_text, host_path

# Nodes given by options whose drivers have no check: the filters and the null device.
UNCHECKED_NODES = ("blkdebug", "null-aio", "null-co", "throttle")


def cmd_check(cli: Cli, argv: list[str]) -> int:
    """`check`: consistency check, optionally repairing (-r leaks|all), as qemu-img check."""
    from qcow2lib.check import check_path, format_check_human, format_check_json

    fmt = output = repair = None
    quiet = force_share = image_opts = False
    getopt = GetoptLong(
        argv,
        ":hf:r:T:qU",
        (
            LongOpt("help", False, "h"),
            LongOpt("format", True, "f"),
            LongOpt("repair", True, "r"),
            LongOpt("output", True, "output"),
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
        elif c == "r":
            if getopt.optarg not in ("leaks", "all"):
                cli.error_exit(
                    f"Unknown option value for -r (expecting 'leaks' or 'all'): {getopt.optarg}"
                )
            repair = getopt.optarg
        elif c == "output":
            output = getopt.optarg
        elif c == "q":
            quiet = True
        elif c == "U":
            force_share = True
        elif c == "object":
            from qcow2lib.cli.secrets import process_object  # (start-up time: --object only)

            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
        # -T src_cache: accepted and ignored (qimg has no cache modes)
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if output not in (None, "json", "human"):
        cli.error_report("--output must be used with human or json as argument.")
        return 1
    try:
        spec = image_spec(filename, image_opts, fmt, force_share)
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    if spec.target is not None and spec.fmt in UNCHECKED_NODES:
        try:  # opened first: a bad node fails as it does in qemu-img
            open_spec(cli, spec, "r+" if repair else "r").close()
        except OpenFailure as exc:
            report_failure(cli, exc)
            return 1
        cli.error_report("This image format does not support checks")
        return 63
    if spec.target is not None:  # an image above a blkdebug, throttle or quorum node
        return _check_over_node(cli, spec, repair, output, quiet)
    try:
        path = host_path(spec.path)  # ("file:" prefix taken off, other protocols refused)
    except Qcow2Error as exc:
        cli.error_report(f"Could not open '{spec.name}': {error_text(exc)}")
        return 1
    failure = _check_open_failure(cli, spec, repair)
    if failure is not None:
        report_failure(cli, failure)
        return 1
    report = check_path(path, repair, spec.fmt, spec.force_share, prog=cli.prog)
    report.filename = spec.name
    prefix = f"Could not open '{path}': "
    if report.error and spec.name != path and report.error.startswith(prefix):
        report.error = f"Could not open '{spec.name}': " + report.error[len(prefix) :]
    messages = report.messages  # (millions of lines for a badly damaged image)
    for start in range(0, len(messages), 4096):
        sys.stderr.write("\n".join(messages[start : start + 4096]) + "\n")
    if not quiet:
        cli.out(format_check_json(report) if output == "json" else format_check_human(report))
    if report.error:
        cli.error_report(report.error)
    return report.exit_code


def _check_over_node(
    cli: Cli, spec: ImageSpec, repair: str | None, output: str | None, quiet: bool
) -> int:
    """Check an image whose file is a filter node (blkdebug, throttle) or a quorum: QEMU
    opens the node tree, then checks the image through its file node, so the image is
    opened (failing as qemu-img fails) and checked as open."""
    from qcow2lib.check import check_image, format_check_human, format_check_json

    try:
        image = open_spec(cli, spec, "r+" if repair else "r", warn_probe=bool(repair))
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with image:
        try:
            report = check_image(image, repair, prog=cli.prog)
        except Qcow2Error as exc:
            cli.error_report(error_text(exc))
            return 1
    report.filename = spec.name
    messages = report.messages
    if messages:
        sys.stderr.write("\n".join(messages) + "\n")
    if not quiet and not report.not_supported:
        cli.out(format_check_json(report) if output == "json" else format_check_human(report))
    if report.error:
        cli.error_report(report.error)
    return report.exit_code


def _check_open_failure(cli: Cli, spec: ImageSpec, repair: str | None) -> OpenFailure | None:
    """qemu-img check opens the image (and its backing chain, its encryption) before it
    checks anything: the failure it reports there, else None.

    The check itself reads the metadata with its own tolerant code, so only what QEMU's
    open refuses before checking counts here: a lock another process holds, a backing
    chain that cannot be opened (or loops), a data file node given by options that cannot,
    an encrypted image without its key.
    Anything else is left for the check to report.
    """
    if spec.data_file is not None:  # a data file node given by options opens first
        from qcow2lib.containers import open_data_file

        try:
            open_data_file(spec.data_file, False, spec.force_share).close()
        except Qcow2Error as exc:
            return OpenFailure(f"Could not open '{spec.name}': {error_text(exc)}", exc.qemu_hint)
    try:
        probe = qcow2lib.open(
            host_path(spec.path),
            "r",
            fmt=spec.fmt,
            backing=False,
            force_share=True,
            untrusted=untrusted(),
        )
    except UntrustedImageError as exc:  # (QIMG_UNTRUSTED) nothing it names is opened
        return OpenFailure(f"Could not open '{spec.name}': {error_text(exc)}")
    except Qcow2Error:
        return None  # the check reports what is wrong with the file itself
    # QEMU opens an image to check it without the repair-on-open of a dirty (lazy
    # refcounts) image: the check is to report what the crash left and repair it itself.
    # qcow2lib's read-write open would rebuild the refcounts first, so a dirty image is
    # opened read-only here and its write lock taken on its own.
    dirty = bool(getattr(probe, "dirty", False))
    probe.close()
    mode = "r+" if repair and not dirty else "r"
    try:
        # (qemu-img warns of a probed raw image it opens for writing, here to repair it)
        open_spec(cli, spec, mode, warn_probe=bool(repair)).close()
        if repair and dirty:
            _lock_for_repair(spec)
    except OpenFailure as exc:
        from qcow2lib.cli.secrets import InvalidSecret

        cause = exc.__cause__
        text = exc.message
        if (
            isinstance(
                cause,
                (ImageLockedError, InvalidSecret, qcow2lib.BadSecretError, UntrustedImageError),
            )
            or "Could not open backing file" in text
            or "loop" in text.lower()
            or "too deep" in text
            or "key-secret" in text  # encrypt.key-secret (qcow2) or key-secret (luks)
            or "L2 cache entry size" in text
        ):
            return exc
    return None


def _lock_for_repair(spec: ImageSpec) -> None:
    """Take (and release) the locks a read-write open takes: OpenFailure when another
    process holds the image."""
    from qcow2lib.hostfile import HostFile

    path = host_path(spec.path)
    try:
        file = HostFile(path, writable=True)
    except Qcow2Error as exc:
        raise OpenFailure(f"Could not open '{spec.name}': {error_text(exc)}") from exc
    try:
        file.lock_for_use(spec.force_share)
    except ImageLockedError as exc:
        raise OpenFailure(
            f"Could not open '{spec.name}': {error_text(exc)}",
            f"Is another process using the image [{path}]?\n",
        ) from exc
    finally:
        file.close()
