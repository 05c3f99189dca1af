"""The byte container beneath an image's metadata that holds its guest data: an external
data file, as the image names it or as the user gives it by options (QEMU's "data-file"
child node).

A data file given by options is a node: a file or host device, raw above one, or blkdebug
above one (its rules fail the data file's requests; "event": "none" rules are active from
the start, since qcow2 reports its events to its own file, not to the data file). Each is
opened as the file-like object Qcow2Image keeps its data in; the options are checked and
refused in QEMU's words.
"""

from __future__ import annotations

from .drivers import KNOWN_DRIVERS
from .errors import InvalidArgumentError, UnsupportedFeatureError
from .hostfile import DeviceFile, open_host_file
from .records import frozen_record

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from typing import TypeAlias

    from .blkdebug import BlkdebugFile
    from .hostfile import HostFile


@frozen_record
class NodeReference:
    """An option naming another node by its node name instead of describing one (QEMU's
    "data-file": "name", "backing": "name"). qimg keeps no named nodes, so opening one
    fails as QEMU's does for a name it does not know. For "backing", QEMU reads the name ""
    (and JSON null) as "no backing node"."""

    name: str

    def missing(self) -> InvalidArgumentError:
        """The error of opening it."""
        return InvalidArgumentError(f"Cannot find device='{self.name}' nor node-name='{self.name}'")


# what a data file is given as: a host file name, a node's options (flattened, keys
# relative to the node: "driver", "filename", "image.filename", ...), or a reference
DataFileTarget: TypeAlias = "str | dict[str, str] | NodeReference"

PROTOCOL_DRIVERS = ("file", "host_device")
# options of a file or host device that tune how QEMU does I/O, not what it reads
_IGNORED_PROTOCOL_OPTIONS = (
    "node-name",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "cache.direct",
    "cache.no-flush",
    "aio",
)
_LOCKING_VALUES = ("on", "off", "auto")


def data_file_option(target: DataFileTarget) -> str:
    """The option a data file target comes from, as QEMU names it in messages."""
    if isinstance(target, dict) and target:
        return "data-file." + next(iter(target))
    return "data-file" if isinstance(target, NodeReference) else "data-file.filename"


def open_data_file(
    target: DataFileTarget, writable: bool, force_share: bool, named_by: str | None = None
) -> HostFile | BlkdebugFile | DeviceFile:
    """Open an external data file and lock it as qemu-img does (see
    HostFile.lock_for_use; a file node's locking=off takes no lock). `named_by`: the image
    whose header names `target` (a file name); a FIFO, socket or character device is then
    refused. A target the user gives (options, or a name passed to open_image) is opened
    as named."""
    if isinstance(target, NodeReference):
        raise target.missing()
    if isinstance(target, str):
        role = "external data file" if named_by is not None else None
        file = open_host_file(target, writable=writable, role=role, named_by=named_by)
        try:
            file.lock_for_use(force_share)
        except BaseException:
            file.close()
            raise
        return file
    return _open_node(dict(target), writable, force_share)


def _open_node(
    options: dict[str, str], writable: bool, force_share: bool
) -> HostFile | BlkdebugFile | DeviceFile:
    """A data file node from its options (see the module docstring)."""
    driver = options.pop("driver", None)
    if driver is None or driver in PROTOCOL_DRIVERS:
        return _open_protocol(driver, options, writable, force_share)
    if driver == "raw":
        return _open_raw(options, writable, force_share)
    if driver == "blkdebug":
        return _open_blkdebug(options, writable, force_share)
    if driver in ("null-co", "null-aio", "qcow2", "nbd"):
        return _open_device_node(driver, options, writable, force_share)
    if driver not in KNOWN_DRIVERS:
        raise InvalidArgumentError(f"Unknown driver '{driver}'")
    raise UnsupportedFeatureError(
        f"qimg keeps an external data file in a file or host device, a null-co, qcow2 or "
        f"nbd node (or raw or blkdebug above one), not in a '{driver}' node"
    )


def _open_device_node(
    driver: str, options: dict[str, str], writable: bool, force_share: bool
) -> DeviceFile:
    """A null-co/null-aio node (writes vanish, reads are zeros), a qcow2 image (its guest
    content holds the data) or an NBD export, opened as open_image opens the node."""
    from .chain import open_image, options_image_target

    if driver == "qcow2" and "file" in options:
        raise NodeReference(options["file"]).missing()
    if driver == "qcow2" and not any(key.startswith("file.") for key in options):
        raise InvalidArgumentError('A block device must be specified for "file"')
    target, fmt = options_image_target({"driver": driver, **options}, "data-file")
    device = open_image(target, "r+" if writable else "r", fmt, force_share=force_share)
    return DeviceFile(device)


def _open_protocol(
    driver: str | None, options: dict[str, str], writable: bool, force_share: bool
) -> HostFile:
    """A file or host device; without a driver, QEMU picks host_device for a device."""
    filename = options.pop("filename", None)
    locking = options.pop("locking", "auto")
    for key in _IGNORED_PROTOCOL_OPTIONS:
        options.pop(key, None)
    for key in options:
        raise InvalidArgumentError(
            f"Block protocol '{driver or 'file'}' doesn't support the option '{key}'"
        )
    if not filename:
        raise InvalidArgumentError(f"The '{driver or 'file'}' block driver requires a file name")
    if locking not in _LOCKING_VALUES:
        raise InvalidArgumentError(f"invalid parameter value: {locking}")
    file = open_host_file(filename, writable=writable)
    try:
        if driver == "host_device" and not file.is_device:
            raise InvalidArgumentError(
                f"'host_device' driver requires '{filename}' to be either a character or "
                f"block device"
            )
        if driver == "file" and file.is_device:
            raise InvalidArgumentError(f"'file' driver requires '{filename}' to be a regular file")
        if locking != "off":
            file.lock_for_use(force_share)
    except BaseException:
        file.close()
        raise
    return file


def _open_raw(
    options: dict[str, str], writable: bool, force_share: bool
) -> HostFile | BlkdebugFile | DeviceFile:
    """raw above a file node: the same bytes (an offset or size window is refused)."""
    if "file" in options:
        raise NodeReference(options["file"]).missing()
    child = {key[5:]: options.pop(key) for key in list(options) if key.startswith("file.")}
    for key in ("node-name", "read-only", "auto-read-only", "discard", "detect-zeroes"):
        options.pop(key, None)
    for key in options:
        if key in ("offset", "size"):
            raise UnsupportedFeatureError(
                f"qimg uses a raw node as an external data file only whole, not with "
                f"'{key}' ({options[key]})"
            )
        raise InvalidArgumentError(f"Block format 'raw' does not support the option '{key}'")
    if not child:
        raise InvalidArgumentError('A block device must be specified for "file"')
    return _open_node(child, writable, force_share)


def _open_blkdebug(options: dict[str, str], writable: bool, force_share: bool) -> BlkdebugFile:
    """blkdebug above the node its "image" options describe (a config file's rules and
    inject-error/set-state options)."""
    from .blkdebug import Blkdebug, BlkdebugFile, target_from_options

    target = target_from_options("data-file", options)
    rules = Blkdebug.load(target)
    child = target.image if isinstance(target.image, dict) else {"filename": target.image}
    child_file = _open_node(dict(child), writable, force_share)
    file = BlkdebugFile(child_file, rules, _blkdebug_filename(options, child, child_file))
    rules.event("none")
    return file


def _blkdebug_filename(options: dict[str, str], child: dict[str, str], child_file) -> str:
    """QEMU's name of a blkdebug node: blkdebug:CONFIG:CHILD, or with options beyond the
    config file and child, json: of its options (the child's as a file node's)."""
    child_name = getattr(child_file, "node_filename", None) or child_file.path
    others = {
        key: value
        for key, value in options.items()
        if key not in ("config", "image", "x-image") and not key.startswith("image.")
    }
    if not others:
        return f"blkdebug:{options.get('config', '')}:{child_name}"
    from .qobject import qemu_json_compact

    image = {"driver": child.get("driver", "file"), "filename": child_name}
    node = {"image": image, "driver": "blkdebug"}
    if "config" in options:
        node["config"] = options["config"]
    return "json:" + qemu_json_compact({**node, **others})
