"""Opening images as qemu-img names them: a filename or an --image-opts option string,
with the secrets of each encrypted layer, and qemu-img's messages when that fails."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NoReturn

import qcow2lib
from qcow2lib.bitmaps import check_qemu_constraints
from qcow2lib import ImageLockedError, Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.qemuopts import CreateError, parse_qemu_opts, split_option_list
from qcow2lib.cli.qobject import qemu_json_compact
from qcow2lib.cli.secrets import secret_value
from qcow2lib.ops import error_text, full_backing_filename, host_path

CACHE_MODES = ("none", "off", "directsync", "writeback", "unsafe", "writethrough")
# --image-opts options qimg accepts and ignores (they tune QEMU's I/O, not content).
IGNORED_IMAGE_OPTS = ("read-only", "auto-read-only", "cache.direct", "cache.no-flush",
                      "discard", "detect-zeroes", "file.locking", "file.aio",
                      "file.cache.direct", "file.cache.no-flush", "file.discard",
                      "file.detect-zeroes", "node-name", "file.node-name")
RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


class OpenFailure(Exception):
    """An image could not be opened: qemu-img's message (without the program name) and
    the hint lines it prints after it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


def report_failure(cli: Cli, exc: OpenFailure | CreateError) -> None:
    cli.error_report(exc.message)
    sys.stderr.write(exc.hint)


@dataclass
class ImageSpec:
    """An image argument: `name` is how messages call it, `path` the host file."""
    name: str
    path: str
    fmt: str | None = None
    key_secret: str | None = None
    force_share: bool = False
    backing_secrets: tuple = ()  # backing[.backing...].encrypt.key-secret, nearest first


def image_spec(text: str, image_opts: bool, fmt: str | None,
               force_share: bool = False) -> ImageSpec:
    """Turn a filename (or with --image-opts an option string) into an ImageSpec."""
    if not image_opts:
        return ImageSpec(text, text, fmt, None, force_share)
    if fmt is not None:
        raise OpenFailure("--image-opts and --format are mutually exclusive")
    opts = dict(parse_qemu_opts(text, "file"))

    def fail(message: str) -> NoReturn:
        raise OpenFailure(f"Could not open '{text}': {message}")

    driver = opts.pop("driver", None)
    if driver is not None and driver not in ("qcow2", "raw", "file"):
        fail(f"Unknown driver '{driver}'")
    if "file" in opts:
        name = opts["file"]
        fail(f"Cannot find device='{name}' nor node-name='{name}'")
    filename = None
    if driver == "file":
        filename = opts.pop("filename", None)
        if filename is None:
            fail("The 'file' block driver requires a file name")
    else:
        if opts.pop("file.driver", "file") != "file":
            fail("qimg only opens images in plain files (file.driver=file)")
        filename = opts.pop("file.filename", None)
        if filename is None:
            if driver is None:
                fail("Must specify either driver or file")
            fail('A block device must be specified for "file"')
    key_secret = opts.pop("encrypt.key-secret", None)
    backing_secrets = []
    prefix = "backing."
    while f"{prefix}encrypt.key-secret" in opts or any(name.startswith(prefix + "backing.")
                                                      for name in opts):
        backing_secrets.append(opts.pop(f"{prefix}encrypt.key-secret", None))
        prefix += "backing."
    share = opts.pop("force-share", None)
    if share is not None:
        if share not in ("on", "off"):
            fail("Parameter 'force-share' expects 'on' or 'off'")
        if force_share and share != "on":
            raise OpenFailure("--force-share/-U conflicts with image options")
        force_share = share == "on"
    for name in opts:
        if name in IGNORED_IMAGE_OPTS:
            continue
        fail(f"Block format '{driver or 'raw'}' does not support the option '{name}'")
    return ImageSpec(text, filename, "raw" if driver == "file" else driver, key_secret,
                     force_share, tuple(backing_secrets))


def _chain_layers(device):
    layer = device
    while layer is not None:
        yield layer
        layer = getattr(layer, "backing", None)


def spec_passphrases(cli: Cli, spec: ImageSpec) -> list[bytes | None]:
    """The secrets' values for each layer of the chain, the image's first."""
    return [None if name is None else secret_value(cli, name)
            for name in (spec.key_secret, *spec.backing_secrets)]


def open_spec(cli: Cli, spec: ImageSpec, mode: str = "r", backing: bool = True,
              passphrase: bytes | None = None, warn_probe: bool = True,
              cache: str = "writeback"):
    """Open an image like qemu-img's img_open(); raises OpenFailure with its message.

    As in QEMU, each encrypted layer needs its own key-secret option (the top's is
    encrypt.key-secret, a backing file's backing.encrypt.key-secret, ...); `passphrase`
    is the top's when the caller has it from elsewhere (a target just created).
    """
    explicit = passphrase is not None
    try:
        path = host_path(spec.path)
        if not path:
            raise qcow2lib.InvalidArgumentError("The 'file' block driver requires a file name")
        passphrases = spec_passphrases(cli, spec)
        if explicit:
            passphrases[0] = passphrase
        device = qcow2lib.open(path, mode, fmt=spec.fmt, backing=backing,
                               force_share=spec.force_share, passphrase=passphrases,
                               cache="none" if cache == "off" else cache)
        try:
            check_qemu_constraints(getattr(device, "_bitmap_entries", []))
        except Qcow2Error:
            device.close()
            raise
    except ImageLockedError as exc:
        raise OpenFailure(f"Could not open '{spec.name}': {error_text(exc)}",
                          f"Is another process using the image [{host_path(spec.path)}]?\n") \
            from exc
    except Qcow2Error as exc:
        raise OpenFailure(f"Could not open '{spec.name}': {error_text(exc)}",
                          exc.qemu_hint) from exc
    given = [spec.key_secret is not None or explicit,
             *(name is not None for name in spec.backing_secrets)]
    for depth, layer in enumerate(_chain_layers(device)):
        keyed = given[depth] if depth < len(given) else False
        if getattr(layer, "encrypted", False) and (
                not keyed or getattr(layer, "crypto", None) is None):
            device.close()
            raise OpenFailure(f"Could not open '{spec.name}': "
                              + "Could not open backing file: " * depth
                              + "Parameter 'encrypt.key-secret' is required for cipher")
    if warn_probe and mode == "r+" and spec.fmt is None and device.format == "raw":
        sys.stderr.write(RAW_PROBE_WARNING.format(path))
    return device


def json_filename(spec: ImageSpec, fmt: str) -> str:
    """The "json:{...}" name QEMU gives an image opened with options beyond its file name;
    options for backing files nest each backing layer's under "backing"."""
    path = host_path(spec.path)
    top = layer = _json_layer(spec.key_secret, fmt, spec.path)
    for secret in spec.backing_secrets:
        with qcow2lib.open(path, "r", fmt=fmt, backing=False, force_share=True,
                           open_data_file=False) as image:
            backing_name, backing_fmt = image.backing_filename, image.backing_format
        if not backing_name:
            break
        path = full_backing_filename(path, backing_name)
        fmt = backing_fmt or qcow2lib.probe_format(path)
        layer["backing"] = layer = _json_layer(secret, fmt, path)
    return "json:" + qemu_json_compact(top)


def _json_layer(key_secret: str | None, fmt: str, filename: str) -> dict:
    options: dict = {}
    if key_secret is not None:
        options["encrypt.key-secret"] = key_secret
    options["driver"] = fmt
    options["file"] = {"driver": "file", "filename": filename}
    return options


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
        raise OpenFailure(f"Failed to load snapshot: Block format '{source.format}' used by "
                          f"device '' does not support temporarily loading internal snapshots")
    try:
        if snapshot_opts is not None:
            view = SnapshotView(source, id=snapshot_opts.get("snapshot.id"),
                                name=snapshot_opts.get("snapshot.name"))
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
