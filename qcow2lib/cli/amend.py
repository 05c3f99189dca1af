"""`amend`: change qcow2 options of an existing image (compat, refcounts, LUKS slots...)."""

from __future__ import annotations

import sys

import qcow2lib
from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    OpenFailure,
    check_cache_mode,
    image_spec,
    open_spec,
    report_failure,
    untrusted,
)
from qcow2lib.cli.progress import Progress
from qcow2lib.cli.qemuopts import (
    join_option_list,
    SIZE_OPT,
    CreateError,
    CreateOptions,
    OptDesc,
    merged_create_opts,
    option_help_lines,
    split_option_list,
)
from qcow2lib.cli.secrets import process_object, secret_value
from qcow2lib.drivers import KNOWN_DRIVERS
from qcow2lib.ops import error_text, host_path

QCOW2_AMEND_OPTS = (
    SIZE_OPT,
    OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "str", "File name of a base image"),
    OptDesc("backing_fmt", "str", "Image format of the base image"),
    OptDesc("data_file", "str", "File name of an external data file"),
    OptDesc("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates"),
    OptDesc("refcount_bits", "num", "Width of a reference count entry in bits"),
    OptDesc("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
    OptDesc("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
    OptDesc("encrypt.old-secret", "str", "Select all keyslots that match this password"),
    OptDesc(
        "encrypt.new-secret",
        "str",
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    OptDesc("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
)
# The luks format's amend options: the key slot ones of qcow2, without "encrypt." (issue 14).
LUKS_AMEND_OPTS = tuple(
    OptDesc(desc.name[len("encrypt.") :], desc.kind, desc.help)
    for desc in QCOW2_AMEND_OPTS
    if desc.name.startswith("encrypt.")
)
AMEND_OPTS = {"qcow2": QCOW2_AMEND_OPTS, "luks": LUKS_AMEND_OPTS}


def print_amend_option_help(cli: Cli, fmt: str) -> int:
    if fmt not in KNOWN_DRIVERS:
        cli.error_report(f"Unknown file format '{fmt}'")
        return 1
    if fmt not in AMEND_OPTS:
        cli.error_report(f"Format driver '{fmt}' does not support option amendment")
        return 1
    cli.out(f"Amend options for '{fmt}':\n{option_help_lines(AMEND_OPTS[fmt])}")
    return 0


def _luks_amend_options(cli: Cli, opts: CreateOptions, prefix: str = "encrypt.") -> dict:
    """The encrypt.* amend options (the luks format's: prefix "") for the key slot
    amendment (secrets resolved)."""
    state = opts.get(f"{prefix}state") if opts.is_set(f"{prefix}state") else None
    if state is None:
        raise CreateError("Parameter 'state' is missing")
    if state not in ("active", "inactive"):
        raise CreateError(f"Parameter 'state' does not accept value '{state}'")
    result: dict = {"state": state}
    if opts.is_set(f"{prefix}keyslot"):
        result["keyslot"] = opts.value(f"{prefix}keyslot")
    if opts.is_set(f"{prefix}iter-time"):
        result["iter-time"] = opts.value(f"{prefix}iter-time")
    for name in ("new-secret", "old-secret"):
        secret_id = opts.get(f"{prefix}{name}") if opts.is_set(f"{prefix}{name}") else None
        if secret_id is None:
            continue
        wanted = (state == "active") == (name == "new-secret")
        if wanted and secret_id not in cli.secrets:
            raise CreateError(f"No secret with id '{secret_id}'")
        result[name] = cli.secrets.get(secret_id, b"")
    return result


def cmd_amend(cli: Cli, argv: list[str]) -> int:
    """`amend`: change qcow2 options of an existing image (compat, refcounts, LUKS slots...)."""
    from qcow2lib.ops.amend import amend

    fmt = options = None
    cache = "writeback"
    quiet = progress = image_opts = force = False
    getopt = GetoptLong(
        argv,
        ":ho:f:t:pq",
        (
            LongOpt("help", False, "h"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("force", False, "force"),
        ),
    )
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "o":
            options = join_option_list(options, arg, cli.error_report)
            if options is None:
                return 1
        elif c == "f":
            fmt = arg
        elif c == "t":
            cache = arg
        elif c == "p":
            progress = True
        elif c == "q":
            quiet = True
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "force":
            force = True
    if options is None:
        cli.error_exit("Must specify options (-o)")
    meter = Progress(cli, progress and not quiet, 1.0)
    try:
        return _amend(cli, getopt, options, fmt, cache, image_opts, force, meter, amend)
    finally:
        meter.end()


def _amend(cli, getopt, options, fmt, cache, image_opts, force, meter, amend) -> int:
    argv, optind = getopt.argv, getopt.optind
    wants_help = any(is_help for _, _, is_help in split_option_list(options))
    if fmt is not None and wants_help:
        return print_amend_option_help(cli, fmt)
    if optind != len(argv) - 1:
        cli.error_report("Expecting one image file name")
        return 1
    if not check_cache_mode(cli, cache, False):
        return 1
    try:
        spec = image_spec(argv[optind], image_opts, fmt)
        image = open_spec(cli, spec, "r+")
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with image:
        image_fmt = image.format
        encrypted = getattr(image, "encrypted", False)
        luks = encrypted and image_fmt == "qcow2" and image.header.crypt_method == 2
        passphrase = secret_value(cli, spec.key_secret) if spec.key_secret else None
    if wants_help:
        return print_amend_option_help(cli, image_fmt)
    if image_fmt == "luks":
        return _amend_luks_format(cli, spec, options, passphrase, force)
    if image_fmt != "qcow2":
        cli.error_report(f"Format driver '{image_fmt}' does not support option amendment")
        return 1
    opts = CreateOptions(QCOW2_AMEND_OPTS, cli.warn_report)
    try:
        for name, value, _ in split_option_list(options):
            opts.set(name, value)
    except CreateError as exc:
        hint = exc.hint
        try:
            everything = CreateOptions(
                QCOW2_AMEND_OPTS + merged_create_opts("qcow2"), lambda message: None
            )
            for name, value, _ in split_option_list(options):
                everything.set(name, value)
            hint += "This option is only supported for image creation\n"
        except CreateError:
            pass
        report_failure(cli, CreateError(exc.message, hint))
        return 1
    meter.print(0, 0)
    arguments: dict = {}
    for name in ("compat", "backing_file", "backing_fmt", "data_file"):
        if opts.is_set(name):
            arguments[name] = opts.get(name)
    for name in ("size", "refcount_bits", "lazy_refcounts", "data_file_raw"):
        if opts.is_set(name):
            arguments[name] = opts.value(name)
    try:
        code = _amend_image(
            cli, spec, opts, arguments, encrypted, luks, passphrase, force, meter, amend
        )
    finally:
        meter.print(100, 0)  # qemu-img reports 100% whether the amendment worked or not
    return code


def _amend_luks_format(cli: Cli, spec, options: str, passphrase, force: bool) -> int:
    """amend of a luks image: only its key slots (state, keyslot, old-secret, new-secret,
    iter-time), as qemu-img 7.2 amends them."""
    opts = CreateOptions(LUKS_AMEND_OPTS, cli.warn_report)
    try:
        for name, value, _ in split_option_list(options):
            opts.set(name, value)
        luks_options = _luks_amend_options(cli, opts, prefix="")
        with open_spec(cli, spec, "r+", passphrase=passphrase) as image:
            image.amend(passphrase, luks_options, force)
    except (CreateError, OpenFailure) as exc:
        report_failure(cli, exc)
        return 1
    except Qcow2Error as exc:
        cli.error_report(error_text(exc))
        return 1
    return 0


def _amend_image(
    cli, spec, opts, arguments, encrypted, luks, passphrase, force, meter, amend
) -> int:
    compat = arguments.get("compat")
    if compat is not None and compat not in ("0.10", "v2", "1.1", "v3"):
        cli.error_report(f"Unknown compatibility level {compat}")
        return 1
    bits = arguments.get("refcount_bits")
    if bits is not None and (bits <= 0 or bits > 64 or bits & (bits - 1)):
        cli.error_report("Refcount width must be a power of two and may not exceed 64 bits")
        return 1
    try:
        if any(name.startswith("encrypt.") for name in opts.names()):
            if not encrypted:
                raise CreateError("Can't amend encryption options - encryption not present")
            if not luks:
                raise CreateError("Only LUKS encryption options can be amended")
            luks_options = _luks_amend_options(cli, opts)
            from qcow2lib.crypto import amend_luks  # (here: it loads cryptography, construct)

            with open_spec(cli, spec, "r+", passphrase=passphrase) as image:
                hdr = image.header
                amend_luks(
                    lambda offset, length: image.file.pread(length, offset),
                    lambda offset, data: image.file.pwrite(data, offset),
                    hdr.crypto_offset,
                    hdr.crypto_length,
                    passphrase,
                    luks_options,
                    force,
                )
                image.file.flush()
        if arguments:
            with qcow2lib.open(
                spec.target or host_path(spec.path),
                "r+",
                spec.fmt,
                data_file=spec.data_file,
                untrusted=untrusted(),
                locking=spec.locking,
                backing_node=spec.backing_node,
            ) as image:
                amend(
                    image,
                    progress=(lambda done, total: meter.print(100.0 * done / total, 0))
                    if meter.enabled
                    else None,
                    **arguments,
                )
    except CreateError as exc:
        report_failure(cli, exc)
        return 1
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    except Qcow2Error as exc:
        notice = getattr(exc, "notice", None)
        if notice:
            sys.stderr.write(notice + "\n")
        reported = getattr(exc, "reported", None)
        if reported:
            cli.error_report(reported)
        for line in error_text(exc).split("\n")[:1]:
            cli.error_report(line)
        sys.stderr.write("".join(line + "\n" for line in error_text(exc).split("\n")[1:]))
        return 1
    return 0
