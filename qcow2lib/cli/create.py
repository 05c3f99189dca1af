"""`create`, and the turning of -o values into qcow2lib.create() arguments (which convert
and dd use for their targets)."""

from __future__ import annotations

import errno
import sys

import qcow2lib
from qcow2lib import ImageLockedError, Qcow2Error
from qcow2lib.cli.common import Cli, cvtnum
from qcow2lib.drivers import BLOCKDEV_DRIVERS, creation_refusal
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import untrusted
from qcow2lib.cli.qemuopts import (
    join_option_list,
    FORMAT_CREATE_OPTS,
    PREALLOC_MODES,
    UINT32_MAX,
    CreateError,
    CreateOptions,
    int64,
    merged_create_opts,
    option_help_lines,
    split_option_list,
)
from qcow2lib.qobject import qdict_items
from qcow2lib.cli.secrets import process_object
from qcow2lib.ops import (
    error_text,
    full_backing_filename,
    host_path,
    open_by_name,
    virtual_size,
)
from qcow2lib.sizes import SizeError, parse_number

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import Any


def print_create_option_help(cli: Cli, filename: str | None, fmt: str) -> int:
    """`create -o help`: the options of the format (and of the host file, given a name)."""
    if fmt not in FORMAT_CREATE_OPTS:
        cli.error_report(creation_refusal(fmt) or f"Unknown file format '{fmt}'")
        return 1
    if filename is None:
        cli.out(
            f"Supported {fmt} options:\n{option_help_lines(FORMAT_CREATE_OPTS[fmt])}\n"
            "The protocol level may support further options.\n"
            "Specify the target filename to include those options.\n"
        )
        return 0
    try:
        host_path(filename)
    except Qcow2Error as exc:
        cli.error_report(error_text(exc))
        return 1
    cli.out(f"Supported options:\n{option_help_lines(merged_create_opts(fmt))}")
    return 0


def _open_backing(filename: str, backing_file: str, backing_fmt: str | None):
    """Open the backing chain a new image will use (qemu-img checks it and takes its size)."""
    hint = "Could not open backing image.\n"
    try:
        full = full_backing_filename(filename, backing_file)
    except Qcow2Error as exc:
        raise CreateError(error_text(exc)) from exc
    try:
        return open_by_name(full, backing_fmt, force_share=True, untrusted=untrusted())
    except Qcow2Error as exc:
        raise CreateError(error_text(exc), hint) from exc


CIPHER_ALGS = (
    "aes-128",
    "aes-192",
    "aes-256",
    "des",
    "3des",
    "cast5-128",
    "serpent-128",
    "serpent-192",
    "serpent-256",
    "twofish-128",
    "twofish-192",
    "twofish-256",
)
HASH_ALGS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
LUKS_CREATE_ENUMS = {
    "cipher-alg": CIPHER_ALGS,
    "cipher-mode": ("ecb", "cbc", "xts", "ctr"),
    "ivgen-alg": ("plain", "plain64", "essiv"),
    "ivgen-hash-alg": HASH_ALGS,
    "hash-alg": HASH_ALGS,
}


def _encrypt_options(opts: CreateOptions, encryption: str | None) -> tuple[str, dict] | None:
    """The encrypt.* create options as QEMU's visitor checks them: (format, options without
    the "encrypt." prefix, key-secret included) or None for an unencrypted image."""
    given: dict[str, Any] = {
        name[len("encrypt.") :]: opts.get(name)
        for name in opts.names()
        if name.startswith("encrypt.")
    }
    encrypt_format = given.pop("format", None)
    if encryption is not None:  # the deprecated "encryption=on": legacy AES
        encrypt_format = "aes"
    if encrypt_format is None:
        if given:
            raise CreateError("Parameter 'encrypt.format' is missing")
        return None
    if encrypt_format not in ("aes", "luks"):
        raise CreateError(f"Parameter 'format' does not accept value '{encrypt_format}'")
    if encrypt_format == "luks":
        for name, allowed in LUKS_CREATE_ENUMS.items():
            if name in given and given[name] not in allowed:
                raise CreateError(f"Parameter '{name}' does not accept value '{given[name]}'")
        if "iter-time" in given:
            try:
                given["iter-time"] = parse_number(given["iter-time"], signed=True)
            except SizeError:
                raise CreateError("Parameter 'iter-time' expects integer") from None
    else:
        for name in given:
            if name != "key-secret":
                raise CreateError(f"Parameter 'encrypt.{name}' is unexpected")
    return encrypt_format, given


def qcow2_arguments(opts: CreateOptions, secrets: dict[str, bytes] | None = None) -> dict:
    """Turn checked -o values into qcow2lib.create() arguments.

    This is the string-to-type step of QEMU's qcow2 creation, with its messages and in its
    order; semantic checks (cluster size, version conflicts, ...) are qcow2lib's.
    """
    encryption = opts.get("encryption") if opts.is_set("encryption") else None
    if encryption == "off":
        encryption = None
    if encryption is not None and opts.is_set("encrypt.format"):
        raise CreateError(
            "'encrypt.format' and its alias 'encryption' can't be used at the same time"
        )
    opts.reparse("extent_size_hint")
    hint_size = opts.value("extent_size_hint")
    if hint_size is not None and hint_size > UINT32_MAX:
        raise CreateError("Extent size hint is too large")
    opts.reparse("size")
    compat = opts.get("compat")
    versions = {None: "1.1", "0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}
    if compat not in versions:
        raise CreateError(f"Parameter 'version' does not accept value '{compat}'")
    backing_fmt = opts.get("backing_fmt")
    if backing_fmt is not None and backing_fmt not in BLOCKDEV_DRIVERS:
        raise CreateError(f"Parameter 'backing-fmt' does not accept value '{backing_fmt}'")
    encrypt = _encrypt_options(opts, encryption)
    opts.reparse("cluster_size")
    preallocation = opts.get("preallocation") or "off"
    if preallocation not in PREALLOC_MODES:
        raise CreateError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    refcount_text = opts.get("refcount_bits")
    assert refcount_text is not None  # the option has a default
    try:
        refcount_bits = parse_number(refcount_text, signed=True)
    except SizeError:
        raise CreateError("Parameter 'refcount-bits' expects integer") from None
    compression_type = opts.get("compression_type")
    if compression_type not in ("zlib", "zstd"):
        raise CreateError(
            f"Parameter 'compression-type' does not accept value '{compression_type}'"
        )
    encrypt_arguments = {}
    if encrypt is not None:
        encrypt_format, encrypt_options = encrypt
        secret_id = encrypt_options.pop("key-secret", None)
        if secret_id is None:
            raise CreateError("Parameter 'encrypt.key-secret' is required for cipher")
        if secrets is None or secret_id not in secrets:
            raise CreateError(f"No secret with id '{secret_id}'")
        encrypt_arguments = {
            "encrypt_format": encrypt_format,
            "passphrase": secrets[secret_id],
            "encrypt_options": encrypt_options,
        }
    return {
        **encrypt_arguments,
        "fmt": "qcow2",
        "cluster_size": opts.value("cluster_size"),
        "compat": versions[compat],
        "backing_file": opts.get("backing_file"),
        "backing_fmt": backing_fmt,
        "refcount_bits": refcount_bits,
        "lazy_refcounts": opts.value("lazy_refcounts"),
        "extended_l2": opts.value("extended_l2"),
        "preallocation": preallocation,
        "data_file": opts.get("data_file"),
        "data_file_raw": bool(opts.value("data_file_raw")),
        "compression_type": compression_type,
    }


def luks_arguments(opts: CreateOptions, secrets: dict[str, bytes] | None = None) -> dict:
    """Turn checked -o values into qcow2lib.create() arguments for a luks image, with
    QEMU's messages in its order (the options' values, then the secret)."""
    for name, allowed in LUKS_CREATE_ENUMS.items():
        value = opts.get(name)
        if value is not None and value not in allowed:
            raise CreateError(f"Parameter '{name}' does not accept value '{value}'")
    preallocation = opts.get("preallocation") or "off"
    if preallocation not in PREALLOC_MODES:
        raise CreateError(f"invalid parameter value: {preallocation}")
    secret_id = opts.get("key-secret")
    if secret_id is None:
        raise CreateError("Parameter 'key-secret' is required for cipher")
    if secrets is None or secret_id not in secrets:
        raise CreateError(f"No secret with id '{secret_id}'")
    options = {name: opts.get(name) for name in LUKS_CREATE_ENUMS if opts.get(name) is not None}
    if opts.is_set("iter-time"):
        options["iter-time"] = opts.value("iter-time")
    return {
        "fmt": "luks",
        "passphrase": secrets[secret_id],
        "encrypt_options": options,
        "preallocation": preallocation,
    }


def format_arguments(fmt: str, opts: CreateOptions, secrets: dict[str, bytes] | None) -> dict:
    """qcow2lib.create() arguments for a new image of `fmt` from its -o values."""
    if fmt == "qcow2":
        return qcow2_arguments(opts, secrets)
    if fmt == "luks":
        return luks_arguments(opts, secrets)
    if fmt == "vmdk":
        return vmdk_arguments(opts)
    return raw_arguments(opts)


def raw_arguments(opts: CreateOptions) -> dict:
    """Turn checked -o values into qcow2lib.create() arguments for a raw image."""
    for name, _ in qdict_items(dict.fromkeys(opts.names())):  # QEMU passes them on in a QDict
        opts.reparse(name)
    preallocation = opts.get("preallocation") or "off"
    if preallocation not in PREALLOC_MODES:
        raise CreateError(f"invalid parameter value: {preallocation}")
    hint_size = opts.value("extent_size_hint")
    if hint_size is not None and hint_size > UINT32_MAX:
        raise CreateError("Extent size hint is too large")
    return {"fmt": "raw", "preallocation": preallocation}


def vmdk_arguments(opts: CreateOptions) -> dict:
    """Turn checked -o values into qcow2lib.vmdk.create_vmdk() arguments, with QEMU's
    vmdk driver's checks (after the Formatting line) and messages."""
    backing_fmt = opts.get("backing_fmt")
    if backing_fmt is not None and backing_fmt != "vmdk":
        raise CreateError("backing_file must be a vmdk image")
    if opts.get("backing_file") is not None:
        raise CreateError("qimg creates VMDK images without a backing file")
    hwversion = opts.get("hwversion")
    return {
        "subformat": opts.get("subformat") or "monolithicSparse",
        "adapter_type": opts.get("adapter_type") or "ide",
        "hwversion": None if hwversion == "undefined" else hwversion,
        "toolsversion": opts.get("toolsversion"),
        "compat6": bool(opts.value("compat6")),
        "zeroed_grain": bool(opts.value("zeroed_grain")),
    }


def img_create(
    cli: Cli,
    filename: str,
    fmt: str,
    base_filename: str | None,
    base_fmt: str | None,
    options: str | None,
    img_size: int | None,
    unsafe: bool,
    quiet: bool,
) -> None:
    """Everything `qemu-img create` does after reading its arguments; raises CreateError."""
    if fmt not in FORMAT_CREATE_OPTS:
        raise CreateError(creation_refusal(fmt) or f"Unknown file format '{fmt}'")
    try:
        path = host_path(filename)
    except Qcow2Error as exc:
        raise CreateError(error_text(exc)) from exc
    opts = CreateOptions(merged_create_opts(fmt), cli.warn_report)
    for name, value, _ in split_option_list(options or ""):
        if name != "id":
            opts.set(name, value)
    if not opts.is_set("size"):
        opts.set_number("size", -1 if img_size is None else img_size)
    elif img_size is not None:
        raise CreateError("The image size must be specified only once")
    if base_filename is not None:
        if "backing_file" not in opts.descs:
            raise CreateError(f"Backing file not supported for file format '{fmt}'")
        opts.set("backing_file", base_filename)
    if base_fmt is not None:
        if "backing_fmt" not in opts.descs:
            raise CreateError(f"Backing file format not supported for file format '{fmt}'")
        opts.set("backing_fmt", base_fmt)

    backing_file = opts.get("backing_file")
    if backing_file is not None:
        if backing_file == filename:
            raise CreateError(
                "Error: Trying to create an image with the same filename as the backing file"
            )
        if backing_file == "":
            raise CreateError("Expected backing file name, got empty string")
    backing_fmt = opts.get("backing_fmt")
    size = int64(opts.value("size"))
    if backing_file is not None and not unsafe:
        with _open_backing(filename, backing_file, backing_fmt) as backing:
            if backing_fmt is None:
                raise CreateError(
                    "Backing file specified without backing format",
                    f"Detected format of {backing.format}.",
                )
            if size == -1:
                size = virtual_size(backing)
                opts.set_number("size", size)
    elif backing_file is not None and backing_fmt is None:
        raise CreateError("Backing file specified without backing format")
    if size == -1:
        raise CreateError("Image creation needs a size parameter")

    if not quiet:
        cli.out(f"Formatting '{filename}', fmt={fmt} {opts.render()}\n")
        sys.stdout.flush()
    arguments = format_arguments(fmt, opts, cli.secrets)
    if fmt != "luks":  # QEMU rounds every new image up to whole sectors, but a LUKS payload
        size = (size + 511) // 512 * 512
    try:
        if fmt == "vmdk":
            from qcow2lib.vmdk import create_vmdk

            create_vmdk(path, size, **arguments)
        else:
            qcow2lib.create(path, size, **arguments)
    except ImageLockedError as exc:
        raise CreateError(
            error_text(exc), f"Is another process using the image [{path}]?\n"
        ) from exc
    except Qcow2Error as exc:
        reported = getattr(exc, "reported", None)
        if getattr(exc, "errno", None) == errno.EFBIG:  # (QEMU's bdrv_img_create words it)
            hint = " (try using a larger cluster size)" if "cluster_size" in opts.descs else ""
            raise CreateError(f"The image size is too large for file format '{fmt}'{hint}") from exc
        raise CreateError(error_text(exc), reported=reported) from exc


def cmd_create(cli: Cli, argv: list[str]) -> int:
    """`create`: read the arguments, then img_create() or the -o help listing."""
    fmt = "raw"
    base_fmt = base_filename = options = None
    quiet = unsafe = False
    getopt = GetoptLong(
        argv, ":F:b:f:ho:qu", (LongOpt("help", False, "h"), LongOpt("object", True, "object"))
    )
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "F":
            base_fmt = getopt.optarg
        elif c == "b":
            base_filename = getopt.optarg
        elif c == "f":
            fmt = getopt.optarg
        elif c == "o":
            options = join_option_list(options, getopt.optarg, cli.error_report)
            if options is None:
                return 1
        elif c == "q":
            quiet = True
        elif c == "u":
            unsafe = True
        elif c == "object":
            process_object(cli, getopt.optarg)
    argv, optind = getopt.argv, getopt.optind
    filename = argv[optind] if optind < len(argv) else None
    if options is not None and any(is_help for _, _, is_help in split_option_list(options)):
        return print_create_option_help(cli, filename, fmt)
    if filename is None:
        cli.error_exit("Expecting image file name")
    optind += 1
    img_size = None
    if optind < len(argv):
        img_size = cvtnum(cli, "image size", argv[optind])
        if img_size is None:
            return 1
        optind += 1
    if optind != len(argv):
        cli.error_exit(f"Unexpected argument: {argv[optind]}")
    try:
        img_create(cli, filename, fmt, base_filename, base_fmt, options, img_size, unsafe, quiet)
    except CreateError as exc:
        if exc.reported:
            cli.error_report(exc.reported)
        sys.stderr.write(f"{cli.prog}: {filename}: {exc.message}\n{exc.hint}")
        return 1
    return 0
