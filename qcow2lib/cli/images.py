"""Opening images as qemu-img names them: a filename or an --image-opts option string,
with the secrets of each encrypted layer, and qemu-img's messages when that fails."""

from __future__ import annotations

import os
import sys

import qcow2lib
from qcow2lib import ImageLockedError, Qcow2Error
from qcow2lib.chain import (
    BackingNode,
    json_option_values,
    json_text_tree,
    take_child_options,
    take_size_option,
    untrusted_backing_path,
)
from qcow2lib.nodes import FILE_NODE_DRIVERS, NODE_DRIVERS
from qcow2lib.cli.common import Cli
from qcow2lib.qobject import qemu_json_compact
from qcow2lib.image import Qcow2Image
from qcow2lib.ops import check_bitmap_constraints, error_text, full_backing_filename, host_path
from qcow2lib.records import record  # (not dataclasses: start-up time)

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:  # (the NBD client is imported only when an NBD export is opened)
    from collections.abc import Callable
    from typing import NoReturn

    from qcow2lib.exports.nbd_client import NBDAddress
    from qcow2lib.chain import ImageTarget
    from qcow2lib.containers import DataFileTarget
    from qcow2lib.cli.qemuopts import CreateError

CACHE_MODES = ("none", "off", "directsync", "writeback", "unsafe", "writethrough")
# --image-opts options qimg accepts and ignores (they tune QEMU's I/O, not content).
IGNORED_IMAGE_OPTS = (
    "read-only",
    "auto-read-only",
    "cache.direct",
    "cache.no-flush",
    "discard",
    "detect-zeroes",
    "file.aio",
    "file.cache.direct",
    "file.cache.no-flush",
    "file.discard",
    "file.detect-zeroes",
    "node-name",
    "file.node-name",
)
RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
)
# What QEMU says on opening a qcow2 image whose bitmaps extension has lost its autoclear
# bit (a v2 image has none): the bitmaps are ignored, and a writer drops the extension.
# The second line ends without a newline, as QEMU prints it.
STALE_BITMAPS_WARNINGS = (
    "This qcow2 v2 image contains bitmaps, but they may have been modified by a program "
    "without persistent bitmap support; so now they must all be considered inconsistent",
    "a program lacking bitmap support modified this file, so all bitmaps are now "
    "considered inconsistent",
)
STALE_BITMAPS_HINT = (
    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
)


def warn_stale_bitmaps(cli: Cli, device) -> None:
    """QEMU's warning for each layer of the chain opened with stale bitmaps."""
    for layer in _chain_layers(device):
        if getattr(layer, "stale_bitmaps", False):
            cli.warn_report(STALE_BITMAPS_WARNINGS[layer.header.version >= 3])
            sys.stderr.write(STALE_BITMAPS_HINT)


def untrusted() -> bool:
    """QIMG_UNTRUSTED (qimg's extension): open every image as untrusted (open_image). Any
    value but empty, 0, no, false or off turns it on: a misspelt 'yes' must not leave a
    stranger's image trusted."""
    value = os.environ.get("QIMG_UNTRUSTED", "").strip().lower()
    return value not in ("", "0", "no", "false", "off")


class OpenFailure(Exception):
    """An image could not be opened: qemu-img's message (without the program name) and
    the hint lines it prints after it."""

    def __init__(self, message: str, hint: str = "", warnings: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.warnings = warnings  # what qemu-img warned of before it failed


def report_failure(cli: Cli, exc: OpenFailure | CreateError) -> None:
    for warning in getattr(exc, "warnings", ()):
        cli.warn_report(warning)
    cli.error_report(exc.message)
    sys.stderr.write(exc.hint)


@record
class ImageSpec:
    """An image argument: `name` is how messages call it, `path` the host file (or the
    NBD export's name, `nbd` its address when options gave it)."""

    name: str
    path: str
    fmt: str | None = None
    key_secret: str | None = None
    force_share: bool = False
    backing_secrets: tuple = ()  # backing[.backing...].encrypt.key-secret, nearest first
    nbd: NBDAddress | None = None
    target: ImageTarget | None = None  # a blkdebug or null-co node's (options_image_target)
    l2_cache_entry_size: int | None = None
    locking: bool = True  # file.locking=off: neither take nor test the image's locks
    data_file: DataFileTarget | None = None  # data-file options: the external data file
    backing_node: BackingNode | None = None  # backing options: the backing node at run time
    warnings: tuple[str, ...] = ()  # what qemu-img warns of when it opens the image
    raw_window: tuple[int, int | None] | None = None  # raw's offset and size options


# qcow2 options that only tune QEMU's caches and checks: accepted once valid, ignored.
QCOW2_SIZE_OPTS = ("l2-cache-size", "refcount-cache-size", "cache-size")
QCOW2_NUMBER_OPTS = ("cache-clean-interval",)
QCOW2_BOOL_OPTS = (
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
)
OVERLAP_CHECK_MODES = ("none", "constant", "cached", "all")
OVERLAP_CHECK_KINDS = (
    "main-header",
    "active-l1",
    "active-l2",
    "refcount-table",
    "refcount-block",
    "snapshot-table",
    "inactive-l1",
    "inactive-l2",
    "bitmap-directory",
)


def image_spec(
    text: str, image_opts: bool, fmt: str | None, force_share: bool = False
) -> ImageSpec:
    """Turn a filename (or with --image-opts an option string) into an ImageSpec.

    A "json:{...}" filename gives the same options as --image-opts would, nested objects
    as dotted keys; a stated format then overrides its "driver".
    """
    if not image_opts and text.startswith("json:"):
        try:
            opts = json_option_values(text)
        except Qcow2Error as exc:
            raise OpenFailure(f"Could not open '{text}': {exc}") from exc
        if fmt is not None:
            opts["driver"] = fmt
        return _options_spec(text, opts, force_share)
    if not image_opts:
        return ImageSpec(text, text, fmt, None, force_share)
    if fmt is not None:
        raise OpenFailure("--image-opts and --format are mutually exclusive")
    from qcow2lib.cli.qemuopts import parse_qemu_opts  # (here and below: option strings only)

    return _options_spec(text, dict(parse_qemu_opts(text, "file")), force_share)


def _options_spec(text: str, values: dict[str, str | None], force_share: bool) -> ImageSpec:
    opts, warnings = _backing_none(values)

    def fail(message: str, hint: str = "") -> NoReturn:
        raise OpenFailure(f"Could not open '{text}': {message}", hint, warnings)

    share = opts.pop("force-share", None)
    if share is not None:
        if share not in ("on", "off"):
            fail("Parameter 'force-share' expects 'on' or 'off'")
        if force_share and share != "on":
            raise OpenFailure("--force-share/-U conflicts with image options")
        force_share = share == "on"
    for name in IGNORED_IMAGE_OPTS:
        opts.pop(name, None)
    driver = opts.pop("driver", None)
    if driver in NODE_DRIVERS or opts.get("file.driver") in FILE_NODE_DRIVERS:
        return _node_spec(text, driver, opts, force_share, fail)
    if driver == "ssh":
        _ssh_open(opts, fail)
    locking = opts.pop("locking" if driver in ("file", "host_device") else "file.locking", "auto")
    if locking not in ("on", "off", "auto"):
        fail(f"invalid parameter value: {locking}")
    if driver is not None and driver not in (
        "qcow2",
        "raw",
        "file",
        "host_device",
        "nbd",
        "luks",
        "vmdk",
    ):
        fail(f"Unknown driver '{driver}'")
    if driver == "nbd" or opts.get("file.driver") == "nbd":
        return _nbd_spec(text, driver, opts, force_share, fail)
    if "file" in opts:
        name = opts["file"]
        fail(f"Cannot find device='{name}' nor node-name='{name}'")
    filename = None
    if driver in ("file", "host_device"):
        filename = opts.pop("filename", None)
        if filename is None:
            fail(f"The '{driver}' block driver requires a file name")
    else:
        file_driver = opts.pop("file.driver", "file")
        if file_driver not in ("file", "host_device"):
            fail(f"qimg opens images in files, devices or NBD exports, not '{file_driver}'")
        filename = opts.pop("file.filename", None)
        if filename is None:
            if driver is None:
                fail("Must specify either driver or file")
            fail('A block device must be specified for "file"')
        for name in list(opts):
            if name.startswith("file.") and name not in IGNORED_IMAGE_OPTS:
                fail(
                    f"Block protocol '{file_driver}' doesn't support the option "
                    f"'{name[len('file.') :]}'"
                )
    data_file = take_child_options(opts, "data-file") if driver in (None, "qcow2") else None
    key_secret = opts.pop("key-secret" if driver == "luks" else "encrypt.key-secret", None)
    backing_secrets = []
    prefix = "backing."
    while any(name.startswith(prefix) for name in opts):
        secret = opts.pop(f"{prefix}encrypt.key-secret", None)  # a qcow2 layer's
        luks_secret = opts.pop(f"{prefix}key-secret", None)  # a luks layer's (issue 14)
        backing_secrets.append(secret if secret is not None else luks_secret)
        prefix += "backing."
    while backing_secrets and backing_secrets[-1] is None:  # levels with other options only
        backing_secrets.pop()
    backing_node = take_child_options(opts, "backing")
    fmt = driver
    if fmt is None and opts:  # what is left is the probed format's (QEMU probes first)
        try:
            fmt = qcow2lib.probe_format(host_path(filename))
        except Qcow2Error as exc:
            fail(error_text(exc))
    entry_size = _qcow2_tuning(text, opts, fail) if fmt == "qcow2" else None
    raw_window = None
    if fmt == "raw" and ("offset" in opts or "size" in opts):
        offset = _size_option(opts, "offset", fail)
        raw_window = (0 if offset is None else offset, _size_option(opts, "size", fail))
    for name in opts:
        fail(f"Block format '{fmt}' does not support the option '{name}'")
    return ImageSpec(
        text,
        filename,
        driver,
        key_secret,
        force_share,
        tuple(backing_secrets),
        l2_cache_entry_size=entry_size,
        locking=locking != "off",
        data_file=data_file,
        backing_node=backing_node,
        warnings=warnings,
        raw_window=raw_window,
    )


def _backing_none(opts: dict[str, str | None]) -> tuple[dict[str, str], tuple[str, ...]]:
    """QEMU's two spellings of "no backing node" at any level of the chain: JSON null
    (kept, as "", where json: names give it; other nulls are dropped) and the deprecated
    "" (warned of)."""
    warnings: list[str] = []
    options: dict[str, str] = {}
    for key, value in opts.items():
        at_backing = set(key.split(".")) == {"backing"}  # backing, backing.backing, ...
        if value is None:
            if at_backing:
                options[key] = ""
        else:
            if at_backing and value == "":
                warnings.append('Use of "backing": "" is deprecated; use "backing": null instead')
            options[key] = value
    return options, tuple(warnings)


def _size_option(opts: dict[str, str], name: str, fail: Callable[..., NoReturn]) -> int | None:
    """chain.take_size_option, its refusal passed to `fail` (with its hint)."""
    try:
        return take_size_option(opts, name)
    except Qcow2Error as exc:
        fail(str(exc), exc.qemu_hint)


def _qcow2_tuning(text: str, opts: dict[str, str], fail) -> int | None:
    """Check and take the qcow2 options that tune QEMU's caches and overlap checks (they
    change nothing qimg does); returns l2-cache-entry-size, checked once the image is open."""
    from qcow2lib.sizes import SizeError, parse_number

    for name in QCOW2_SIZE_OPTS:
        _size_option(opts, name, fail)
    entry_size = _size_option(opts, "l2-cache-entry-size", fail)
    for name in QCOW2_NUMBER_OPTS:
        if name in opts:
            value = opts.pop(name)
            try:  # (QEMU's parse_option_number: strtoull, "-1" wraps)
                number = parse_number(value)
            except SizeError as exc:
                if exc.out_of_range:
                    fail(f"Value '{value}' is too large for parameter '{name}'")
                fail(f"Parameter '{name}' expects a number")
            if name == "cache-clean-interval" and number > 0xFFFFFFFF:  # (UINT_MAX)
                fail("Cache clean interval too big")
    for name in QCOW2_BOOL_OPTS:
        if name in opts and opts.pop(name) not in ("on", "off"):
            fail(f"Parameter '{name}' expects 'on' or 'off'")
    for name in ("overlap-check", "overlap-check.template"):
        if name in opts:
            value = opts.pop(name)
            if value not in OVERLAP_CHECK_MODES:
                fail(
                    f"Unsupported value '{value}' for qcow2 option '{name}'. Allowed are any "
                    f"of the following: {', '.join(OVERLAP_CHECK_MODES)}"
                )
    for kind in OVERLAP_CHECK_KINDS:
        name = f"overlap-check.{kind}"
        if name in opts and opts.pop(name) not in ("on", "off"):
            fail(f"Parameter '{name}' expects 'on' or 'off'")
    return entry_size


def _node_spec(
    text: str, driver: str | None, opts: dict[str, str], force_share: bool, fail
) -> ImageSpec:
    """A blkdebug or null-co node (or an image above blkdebug or quorum): the engine opens it from
    its options, checked here so that a bad one fails as qemu-img's does."""
    from qcow2lib.chain import options_image_target

    if driver is not None:
        opts["driver"] = driver
    try:
        target, fmt = options_image_target(opts, text)
    except Qcow2Error as exc:
        raise OpenFailure(f"Could not open '{text}': {error_text(exc)}", exc.qemu_hint) from exc
    import json

    path = text if text.startswith("json:") else "json:" + json.dumps(opts)
    return ImageSpec(text, path, fmt, None, force_share, target=target)


def _ssh_open(opts: dict[str, str], fail) -> None:
    """driver=ssh: the options checked and the server connected as QEMU's ssh driver does
    first; qimg speaks no SSH, so an image behind a reachable server is refused."""
    from qcow2lib.exports.ssh_client import ssh_open_check

    try:
        ssh_open_check(opts)
    except Qcow2Error as exc:
        fail(error_text(exc))


def _nbd_spec(
    text: str, driver: str | None, opts: dict[str, str], force_share: bool, fail
) -> ImageSpec:
    """An NBD export given by options: driver=nbd (the protocol itself, format "nbd"), or
    a raw image whose file.driver is nbd."""
    from qcow2lib.exports.nbd_client import nbd_address_from_options

    if driver == "nbd":
        nbd_opts, fmt = opts, "nbd"
    else:
        if driver not in (None, "raw"):
            fail(f"qimg opens only the raw content of an NBD export, not '{driver}'")
        del opts["file.driver"]
        nbd_opts = {
            name[len("file.") :]: opts.pop(name) for name in list(opts) if name.startswith("file.")
        }
        for name in opts:
            fail(f"Block format 'raw' does not support the option '{name}'")
        fmt = "raw"
    try:
        address = nbd_address_from_options(nbd_opts, text)
    except Qcow2Error as exc:
        fail(str(exc))
    return ImageSpec(text, address.uri(), fmt, None, force_share, nbd=address)


def _chain_layers(device):
    layer = device
    while layer is not None:
        yield layer
        layer = getattr(layer, "backing", None)


def spec_passphrases(cli: Cli, spec: ImageSpec) -> list[bytes | None]:
    """The secrets' values for each layer of the chain, the image's first."""
    names = (spec.key_secret, *spec.backing_secrets)
    if all(name is None for name in names):
        return [None] * len(names)
    from qcow2lib.cli.secrets import secret_value  # (start-up time: images with secrets only)

    return [None if name is None else secret_value(cli, name) for name in names]


def open_spec(
    cli: Cli,
    spec: ImageSpec,
    mode: str = "r",
    backing: bool = True,
    passphrase: bytes | None = None,
    warn_probe: bool = True,
    cache: str = "writeback",
):
    """Open an image like qemu-img's img_open(); raises OpenFailure with its message.

    As in QEMU, each encrypted layer needs its own key-secret option (the top's is
    encrypt.key-secret, a backing file's backing.encrypt.key-secret, ...); `passphrase`
    is the top's when the caller has it from elsewhere (a target just created).
    """
    explicit = passphrase is not None
    for warning in spec.warnings:
        cli.warn_report(warning)
    try:
        path = spec.nbd if spec.nbd is not None else spec.target or host_path(spec.path)
        if not path:
            raise qcow2lib.InvalidArgumentError("The 'file' block driver requires a file name")
        passphrases = spec_passphrases(cli, spec)
        if explicit:
            passphrases[0] = passphrase
        device = qcow2lib.open(
            path,
            mode,
            fmt=spec.fmt,
            backing=backing,
            data_file=spec.data_file,
            force_share=spec.force_share,
            passphrase=passphrases,
            cache="none" if cache == "off" else cache,
            untrusted=untrusted(),
            locking=spec.locking,
            backing_node=spec.backing_node,
            raw_window=spec.raw_window,
        )
        warn_stale_bitmaps(cli, device)
        # (QEMU prints these while it repairs a dirty image on opening it read-write)
        for line in getattr(device, "repair_messages", ()):
            sys.stderr.write(line + "\n")
        try:
            check_bitmap_constraints(device)
        except Qcow2Error:
            device.close()
            raise
    except ImageLockedError as exc:
        raise OpenFailure(
            f"Could not open '{spec.name}': {error_text(exc)}",
            f"Is another process using the image [{host_path(spec.path)}]?\n",
        ) from exc
    except Qcow2Error as exc:
        raise OpenFailure(
            f"Could not open '{spec.name}': {error_text(exc)}", exc.qemu_hint
        ) from exc
    try:
        if isinstance(device, Qcow2Image):
            check_entry_size(spec, device.cluster_size)
    except OpenFailure:
        device.close()
        raise
    given = [
        spec.key_secret is not None or explicit,
        *(name is not None for name in spec.backing_secrets),
    ]
    for depth, layer in enumerate(_chain_layers(device)):
        keyed = given[depth] if depth < len(given) else False
        if getattr(layer, "encrypted", False) and (
            not keyed or getattr(layer, "crypto", None) is None
        ):
            device.close()
            option = "key-secret" if layer.format == "luks" else "encrypt.key-secret"
            raise OpenFailure(
                f"Could not open '{spec.name}': "
                + "Could not open backing file: " * depth
                + f"Parameter '{option}' is required for cipher"
            )
    if warn_probe and mode == "r+" and spec.fmt is None and device.format == "raw":
        display_name = getattr(spec.target, "display_name", None)  # QEMU's name of a node
        sys.stderr.write(RAW_PROBE_WARNING.format(display_name() if display_name else path))
    return device


def check_entry_size(spec: ImageSpec, cluster_size: int) -> None:
    """l2-cache-entry-size must fit the image's clusters (QEMU checks it on open)."""
    size = spec.l2_cache_entry_size
    if size is not None and (size < 512 or size > cluster_size or size & (size - 1)):
        raise OpenFailure(
            f"Could not open '{spec.name}': L2 cache entry size must be a power "
            f"of two between 512 and the cluster size ({cluster_size})"
        )


def json_filename(spec: ImageSpec, fmt: str) -> str:
    """The "json:{...}" name QEMU gives an image opened with options beyond its file name;
    options for backing files nest each backing layer's under "backing"."""
    path = host_path(spec.path)
    top = layer = _json_layer(spec.key_secret, fmt, spec.path, _raw_window_options(spec))
    for secret in spec.backing_secrets:
        with qcow2lib.open(
            path, "r", fmt=fmt, backing=False, force_share=True, open_data_file=False
        ) as image:
            backing_name, backing_fmt = image.backing_filename, image.backing_format
        if not backing_name:
            break
        if untrusted():
            untrusted_backing_path(path, backing_name, backing_fmt)
        named_by, path = path, full_backing_filename(path, backing_name)
        fmt = backing_fmt or qcow2lib.probe_format(path, backing_of=named_by)
        layer["backing"] = layer = _json_layer(secret, fmt, path)
    return "json:" + qemu_json_compact(top)


def overlay_filename(spec: ImageSpec, image, fmt: str) -> str:
    """The name QEMU gives an image opened with a backing node by options, which relative
    backing names resolve against: a json: name holding the backing node when it is not
    the one the header names (QEMU's bdrv_backing_overridden: the node's name is not the
    header's name as stored; "backing": null overrides any), else the image's file name."""
    backing = _backing_tree(spec.path, image, spec.backing_node)
    if backing is _NOT_OVERRIDDEN:
        return spec.path
    tree = {"driver": fmt, "file": {"driver": "file", "filename": spec.path}, "backing": backing}
    return "json:" + qemu_json_compact(tree)


_NOT_OVERRIDDEN = object()


def _backing_tree(overlay: str, image, given: BackingNode | None):
    """The options QEMU shows for the backing node of `image` (opened from `overlay`)
    that `given` (the backing options, nested levels included) opened: None for none,
    _NOT_OVERRIDDEN when it is the node the header names, opened as the header's own."""
    from qcow2lib.containers import NodeReference
    from qcow2lib.ops import path_combine

    header_name = getattr(image, "backing_filename", None)
    node = getattr(image, "backing", None)
    if isinstance(given, NodeReference) or node is None:
        return None if header_name else _NOT_OVERRIDDEN
    if given is None:
        return _NOT_OVERRIDDEN
    options = dict(given)
    below_given = take_child_options(options, "backing")
    driver = options.get("driver") or getattr(image, "backing_format", None) or node.format
    if driver in ("file", "host_device"):
        filename = options.get("filename") or path_combine(overlay, header_name or "")
        tree: dict = {"driver": driver, "filename": filename}
    else:
        filename = options.get("file.filename") or path_combine(overlay, header_name or "")
        file_driver = options.get("file.driver", "file")
        tree = {"driver": driver, "file": {"driver": file_driver, "filename": filename}}
    below = _backing_tree(filename, node, below_given)
    if below is not _NOT_OVERRIDDEN:
        tree["backing"] = below
    elif filename == header_name:
        return _NOT_OVERRIDDEN
    return tree


def _json_layer(key_secret: str | None, fmt: str, filename: str, others=None) -> dict:
    """One layer's options in a json: name: its key secret, driver, `others`, file."""
    options: dict = {}
    if key_secret is not None:
        options["key-secret" if fmt == "luks" else "encrypt.key-secret"] = key_secret
    options["driver"] = fmt
    options.update(others or {})
    options["file"] = {"driver": "file", "filename": filename}
    return options


def _raw_window_options(spec: ImageSpec) -> dict:
    """raw's offset and size options as the image's name gave them (a JSON number stays
    one, as in QEMU's json: names; an option string gives strings)."""
    if spec.raw_window is None:
        return {}
    if spec.name.startswith("json:"):
        given = json_text_tree(spec.name)
    else:
        from qcow2lib.cli.qemuopts import parse_qemu_opts

        given = dict(parse_qemu_opts(spec.name, "file"))
    return {key: given[key] for key in ("offset", "size") if key in given}


def check_cache_mode(cli: Cli, mode: str, source: bool) -> bool:
    """bdrv_parse_cache_mode(): False (after the error) for an unknown mode."""
    if mode in CACHE_MODES:
        return True
    cli.error_report(f"Invalid {'source ' if source else ''}cache option: {mode}")
    return False


SNAPSHOT_OPT_BASE = "snapshot."


def parse_snapshot_param(cli: Cli, text: str) -> dict[str, str] | None:
    """-l snapshot.id=ID,snapshot.name=NAME (QEMU's internal_snapshot_opts)."""
    result = {}
    from qcow2lib.cli.qemuopts import split_option_list

    bare = [token for token in text.replace(",,", "\0").split(",") if "=" not in token]
    for name, value, _ in split_option_list(text):
        if (name in bare and value == "on") or (f"no{name}" in bare and value == "off"):
            given = name if value == "on" else f"no{name}"
            cli.warn_report(f"short-form boolean option '{given}' deprecated")
            sys.stderr.write(f"Please use {name}={value} instead\n")
        if name not in ("snapshot.id", "snapshot.name"):
            cli.error_report(f"Invalid parameter '{name}'")
            cli.error_report(f"Failed in parsing snapshot param '{text}'")
            return None
        result[name] = value
    return result


def load_snapshot(source, snapshot_opts: dict | None, snapshot_name: str | None):
    """bdrv_snapshot_load_tmp(): a read-only view of an internal snapshot of `source`.

    Raises OpenFailure("Failed to load snapshot: ...") as qemu-img reports it.
    """
    from qcow2lib.snapshots import SnapshotView

    if source.format != "qcow2":
        raise OpenFailure(
            f"Failed to load snapshot: Block format '{source.format}' used by "
            f"device '' does not support temporarily loading internal snapshots"
        )
    try:
        if snapshot_opts is not None:
            view = SnapshotView(
                source, id=snapshot_opts.get("snapshot.id"), name=snapshot_opts.get("snapshot.name")
            )
        else:
            from qcow2lib import snapshots as snaps

            found = snaps.find_snapshot(source, id=snapshot_name)
            if found is None:
                found = snaps.find_snapshot(source, name=snapshot_name)
            if found is None:
                raise qcow2lib.InvalidArgumentError("Can't find snapshot")
            view = SnapshotView(source, id=found.id, name=found.name)
        # qemu-img swaps in the snapshot's L1 table only: the device keeps the image's
        # current size, whatever disk size the snapshot recorded.
        view.size = source.size
        return view
    except Qcow2Error as exc:
        text = error_text(exc)
        if "find" in text.lower() or "no snapshot" in text.lower() or "not found" in text:
            text = "Can't find snapshot"
        raise OpenFailure(f"Failed to load snapshot: {text}") from exc
