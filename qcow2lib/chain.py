"""Opening any image together with its backing chain.

Formats are probed only where the user or the image does not name them; relative
backing names resolve against the directory of the image that names them; a loop or a
chain deeper than MAX_CHAIN_DEPTH is refused before it can exhaust anything.
"""

from __future__ import annotations

import os
import stat

from . import nodes
from . import structs as S
from .blockdev import BlockDevice, RawDevice
from .errors import (
    CorruptImageError,
    InvalidArgumentError,
    Qcow2Error,
    Qcow2IOError,
    UnsupportedFeatureError,
    UntrustedImageError,
)
from .hostfile import open_host_file, refuse_special_file
from .image import Qcow2Image

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TypeAlias, TypeGuard

    from .blkdebug import BlkdebugTarget
    from .containers import DataFileTarget, NodeReference
    from .exports.nbd_client import NBDAddress
    from .nulldev import NullTarget
    from .quorum import QuorumTarget
    from .throttle import ThrottleTarget

    # what open_image opens: a host file or node name, an NBD export, or a node's options
    ImageTarget: TypeAlias = (
        str | NBDAddress | BlkdebugTarget | NullTarget | QuorumTarget | ThrottleTarget
    )

# a backing node given by options instead of the one the header names: the node's options
# (flattened, keys relative to it), or a reference (NodeReference("") for none)
BackingNode: TypeAlias = "dict[str, str] | NodeReference"

MAX_CHAIN_DEPTH = 16
FORMATS = ("luks", "qcow2", "raw")  # luks: luks_image.py (issue 14)
# Protocol driver names accepted where a format is: the device's bytes as they are.
RAW_PROTOCOLS = ("host_device", "file")
# Every block driver qimg implements (formats, protocols, nodes), sorted as qemu-img
# --help lists its "Supported formats".
DRIVERS = tuple(sorted(FORMATS + RAW_PROTOCOLS + ("nbd", "vmdk") + nodes.NODE_DRIVERS))


def probe_format(path: str, backing_of: str | None = None) -> str:
    """'qcow2' or 'luks' when the file starts with that format's magic, 'vmdk' for a VMDK
    sparse extent or descriptor (vmdk.is_vmdk), else 'raw'. backing_of: the image naming
    the file as its backing file (a special file is then refused)."""
    file = open_host_file(path, role="backing file" if backing_of else None, named_by=backing_of)
    try:
        first = file.pread(2048, 0)  # as much as QEMU's probe reads (a VMDK descriptor)
    finally:
        file.close()
    if first[:4] == S.QCOW_MAGIC.to_bytes(4, "big"):
        return "qcow2"
    from .luks_image import has_luks_magic  # (here and below: not for qcow2 images)

    if has_luks_magic(first[:6]):  # luks: issue 14
        return "luks"
    from .vmdk import is_vmdk

    return "vmdk" if is_vmdk(first) else "raw"


def backing_format(path: str, stated: str | None, name: str, backing_of: str) -> str:
    """The format a backing file is opened with: the one its image (`backing_of`) states,
    else qcow2 if the file has the qcow2 magic. A file that would be probed as raw is
    refused: a backing file name in an untrusted image must not expose any host file's
    bytes to the guest. A FIFO, socket or character device is refused before it is read."""
    refuse_special_file(path, "backing file", backing_of)
    if stated is not None:
        return stated
    if probe_format(path, backing_of) == "qcow2":
        return "qcow2"
    raise UnsupportedFeatureError(
        f"The image states no format for its backing file '{name}', which is not a qcow2 "
        f"image; it is not opened as raw unless the format is stated (qemu-img rebase -u "
        f"-b '{name}' -F raw)"
    )


def resolve_backing_path(image_path: str, backing_name: str) -> str:
    """A backing name as QEMU resolves it: relative to the directory of the image naming it."""
    if backing_name.startswith("file:"):  # QEMU's protocol prefix for plain files
        backing_name = backing_name[len("file:") :]
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(image_path), backing_name)


def untrusted_backing_path(image_path: str, backing_name: str, stated_format: str | None) -> str:
    """Where the backing file of an untrusted image is, if it may have one there: a qcow2
    image inside the directory of the image naming it (a relative name without '..' or a
    protocol, also once symlinks are resolved); else UntrustedImageError."""

    def refuse(why: str) -> UntrustedImageError:
        return UntrustedImageError(
            f"Untrusted image '{image_path}' names the backing file '{backing_name}': {why}"
        )

    if stated_format is not None and stated_format != "qcow2":
        raise refuse(
            f"its format is {stated_format}, and only a qcow2 backing file is "
            f"opened for an untrusted image"
        )
    if ":" in backing_name.split("/", 1)[0]:
        raise refuse("a protocol or json: name (only a file name is allowed)")
    if os.path.isabs(backing_name):
        raise refuse("an absolute name (only a file in the image's directory is allowed)")
    if ".." in backing_name.split("/"):
        raise refuse("a name with '..' (only a file in the image's directory is allowed)")
    directory = os.path.dirname(image_path)
    path = os.path.join(directory, backing_name)
    real_directory = os.path.realpath(directory or ".")
    if os.path.commonpath([os.path.realpath(path), real_directory]) != real_directory:
        raise refuse(
            f"it resolves to '{os.path.realpath(path)}', outside the image's "
            f"directory '{real_directory}'"
        )
    return path


def _double_quoted(text: str) -> str:
    """QEMU's JSON also takes 'single-quoted' strings: rewrite them as standard ones."""
    out = []
    quote = None
    index = 0
    while index < len(text):
        char = text[index]
        if quote is None:
            if char in "'\"":
                quote = char
                out.append('"')
            else:
                out.append(char)
        elif char == "\\" and index + 1 < len(text):
            escaped = text[index + 1]
            out.append("'" if escaped == "'" else char + escaped)
            index += 1
        elif char == quote:
            quote = None
            out.append('"')
        else:
            out.append('\\"' if char == '"' else char)
        index += 1
    return "".join(out)


def json_text_tree(name: str) -> dict:
    """The object of a "json:{...}" image name, as QEMU's JSON parser reads it."""
    import json

    try:
        tree = json.loads(_double_quoted(name[len("json:") :]))
    except (ValueError, RecursionError) as exc:
        raise InvalidArgumentError(
            f"Could not parse the JSON options: JSON parse error, {exc}"
        ) from None
    if not isinstance(tree, dict):
        raise InvalidArgumentError("Invalid JSON object given")
    return tree


def json_name_options(name: str) -> dict[str, str]:
    """The options of a "json:{...}" image name, nested objects flattened to dotted keys
    ({"file": {"filename": "x"}} -> {"file.filename": "x"}), values as option strings
    (null values dropped)."""
    return {key: value for key, value in json_option_values(name).items() if value is not None}


def json_option_values(name: str) -> dict[str, str | None]:
    """json_name_options() with JSON null values kept as None ("backing": null: none)."""
    tree = json_text_tree(name)
    options: dict[str, str | None] = {}

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}{key}.", item)
        elif isinstance(value, list):  # QEMU's qdict_flatten: one key per element
            for index, item in enumerate(value):
                flatten(f"{prefix}{index}.", item)
        elif isinstance(value, bool):
            options[prefix[:-1]] = "on" if value else "off"
        else:
            options[prefix[:-1]] = None if value is None else str(value)

    flatten("", tree)
    return options


def json_image_target(name: str) -> tuple[ImageTarget, str | None]:
    """What a "json:{...}" backing name opens (see options_image_target)."""
    return options_image_target(json_name_options(name), name)


def options_image_target(opts: dict[str, str], name: str) -> tuple[ImageTarget, str | None]:
    """What image options (flattened, as json_name_options gives them) open: a host file,
    an NBD export, a blkdebug, null-co or quorum node (nodes.py), and the format "driver"
    states (None when
    it states none). Only options naming the image are taken; any other is refused
    rather than silently dropped."""
    opts = dict(opts)
    driver = opts.pop("driver", None)
    if driver == "nbd":
        from .exports.nbd_client import nbd_address_from_options

        return nbd_address_from_options(opts, name), "nbd"
    if driver in nodes.NODE_DRIVERS or opts.get("file.driver") in nodes.FILE_NODE_DRIVERS:
        return nodes.node_target(driver, opts, name)  # blkdebug, null-co, quorum
    if driver in RAW_PROTOCOLS:
        filename = opts.pop("filename", None)
    else:
        file_driver = opts.pop("file.driver", "file")
        if file_driver == "nbd":
            from .exports.nbd_client import nbd_address_from_options

            nbd = {key[5:]: opts.pop(key) for key in list(opts) if key.startswith("file.")}
            if opts:
                raise UnsupportedFeatureError(
                    f"Option '{sorted(opts)[0]}' in the image name '{name}' is not supported"
                )
            return nbd_address_from_options(nbd, name), driver
        if file_driver not in RAW_PROTOCOLS:
            raise UnsupportedFeatureError(f"Unknown protocol driver '{file_driver}' in '{name}'")
        filename = opts.pop("file.filename", None)
    if opts:
        raise UnsupportedFeatureError(
            f"Option '{sorted(opts)[0]}' in the image name '{name}' is not supported"
        )
    if not filename:
        raise InvalidArgumentError(f"The image name '{name}' names no file (file.filename)")
    return filename, driver


# QEMU's cache modes; only "unsafe" changes what the engine does (no fdatasync).
CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")


def _in_backing_file(exc: Qcow2Error) -> Qcow2Error:
    """The same error, its message prefixed as QEMU prefixes it at each backing level."""
    prefix = "Could not open backing file: "
    wrapped: Qcow2Error
    if isinstance(exc, OSError):
        wrapped = Qcow2IOError(exc.errno, prefix + (exc.strerror or str(exc)), exc.filename)
    else:
        wrapped = type(exc)(prefix + str(exc))
    wrapped.qemu_hint = exc.qemu_hint
    return wrapped


_NBD_PREFIXES = ("nbd:", "nbd+tcp:", "nbd+unix:")


def is_nbd_name(name: str) -> bool:
    """Whether QEMU opens `name` with its nbd driver (nbd://..., nbd+unix://..., nbd:...)."""
    return name.startswith(_NBD_PREFIXES)


def _open_nbd(
    target,
    mode: str,
    fmt: str | None,
    snapshot: str | None,
    backing: bool,
    force_share: bool,
    passphrase,
    open_data_file: bool,
    cache: str,
) -> BlockDevice:
    """An NBD export (a name, or an NBDAddress): its raw content, the protocol itself when
    fmt is "nbd" (QEMU's driver=nbd), or the qcow2 image it holds (stated or probed)."""
    from .exports.nbd_client import NBDClient, NBDHostFile, parse_nbd_name
    from .luks_image import has_luks_magic, open_luks

    address = parse_nbd_name(target) if isinstance(target, str) else target
    if fmt not in (None, "raw", "nbd", "qcow2", "luks"):
        raise UnsupportedFeatureError(f"Unknown driver '{fmt}'")
    client = NBDClient(address, read_only=mode == "r", fmt="nbd" if fmt == "nbd" else "raw")
    if fmt is None:
        fmt = "raw"
        if client.size >= 4 and client.read(0, 4) == S.QCOW_MAGIC.to_bytes(4, "big"):
            fmt = "qcow2"
        elif client.size >= 6 and has_luks_magic(client.read(0, 6)):
            fmt = "luks"
    if fmt == "luks":  # issue 14: the luks format on the export's bytes
        return open_luks(client, _split_passphrase(passphrase)[0])
    if fmt != "qcow2":
        if snapshot is not None:
            client.close()
            raise UnsupportedFeatureError(f"Block driver does not support snapshots ({fmt})")
        return client
    own_passphrase, backing_passphrase = _split_passphrase(passphrase)
    try:
        image = Qcow2Image(
            client.filename,
            mode,
            passphrase=own_passphrase,
            open_data_file=open_data_file,
            file=NBDHostFile(client),
        )
    except BaseException:
        client.close()
        raise
    image.file.no_flush = cache == "unsafe"
    return _finish_image(
        image,
        None,
        backing,
        force_share,
        backing_passphrase,
        open_data_file,
        (client.filename,),
        snapshot,
    )


def open_image(
    path: ImageTarget,
    mode: str = "r",
    fmt: str | None = None,
    backing: bool = True,
    data_file: DataFileTarget | None = None,
    force_share: bool = False,
    passphrase: str | bytes | Sequence[str | bytes | None] | None = None,
    open_data_file: bool = True,
    snapshot: str | None = None,
    cache: str = "writeback",
    backing_of: str | None = None,
    untrusted: bool = False,
    locking: bool = True,
    backing_node: BackingNode | None = None,
    raw_window: tuple[int, int | None] | None = None,
) -> BlockDevice:
    """Open an image (and, unless backing=False, its whole backing chain, read-only).

    `path` is a host file, an NBD name (nbd://..., nbd+unix://..., nbd:...) or an
    NBDAddress; an export opens as its raw content.

    Images are locked the way QEMU locks them; force_share (qemu-img -U) reads an image
    another process is writing. `passphrase` unlocks encrypted (LUKS or legacy AES) images
    in the chain: one value for every layer, or a sequence with one per layer (the image
    first, then its backing file, ...; None or a missing entry for a layer without one).
    open_data_file=False opens a read-only image's metadata without its external data file
    (what `info` needs). snapshot="name or id" gives a read-only view of an internal
    snapshot's content. cache="unsafe" never makes writes durable (flush()
    only writes metadata back), as qemu-img convert treats its target by default.
    backing_of names the image whose backing file `path` is: a FIFO, socket or character
    device is then refused (named directly, a character device opens as a file).

    untrusted=True opens an image from an untrusted source: what it names must stay inside
    its directory. An external data file named by the image is refused, and a backing
    file (at every level) must be a qcow2 image named by a relative name without '..' or
    a protocol that stays in the naming image's directory once symlinks are resolved
    (UntrustedImageError). `path` itself, `fmt` and `data_file` come from the caller and
    are trusted. The default trusts the image as qemu-img does: it may name any host file
    as its backing file (a raw one only if it states the format) or data file.

    locking=False (QEMU's file.locking=off) neither takes nor tests the locks of the image's
    own file; its backing and data files are locked as always.

    data_file replaces the external data file the image names (QEMU's data-file option): a
    file name or a node's options (containers.py). backing_node replaces, at run time, the
    backing file the header names (QEMU's backing option; the header is not changed): the
    backing node's options ({"file.filename": ..., "driver": ..., "backing.file.filename":
    ... for the level below}; without a file name the header's name is opened with them),
    or NodeReference("") for no backing node (unallocated clusters read as zeros). A
    backing node given by the caller is trusted as `path` is: a file it names is probed
    (raw included) and may lie anywhere.

    raw_window (offset, size) opens a raw image as a window of its file (QEMU's raw options
    offset and size; size None: to the end of the file).
    """
    return _open(
        path,
        mode,
        fmt,
        backing,
        data_file,
        force_share,
        passphrase,
        open_data_file,
        (),
        snapshot,
        cache,
        backing_of,
        untrusted,
        locking,
        backing_node,
        raw_window,
    )


def _open(
    path,
    mode: str,
    fmt: str | None,
    backing: bool,
    data_file: DataFileTarget | None,
    force_share: bool,
    passphrase,
    open_data_file: bool,
    chain: tuple[str, ...],
    snapshot: str | None,
    cache: str,
    backing_of: str | None,
    untrusted: bool,
    locking: bool = True,
    backing_node: BackingNode | None = None,
    raw_window: tuple[int, int | None] | None = None,
) -> BlockDevice:
    """open_image() at one level of a chain: `chain` holds the real paths of the images
    above, for loop and depth checks."""
    if snapshot is not None and mode != "r":
        raise InvalidArgumentError("a snapshot can only be opened read-only (mode 'r')")
    if mode not in ("r", "r+"):
        raise InvalidArgumentError(f"mode must be 'r' or 'r+', not {mode!r}")
    if cache not in CACHE_MODES:
        raise InvalidArgumentError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    if (data_file is not None or _names_backing(backing_node)) and (
        not isinstance(path, str) or is_nbd_name(path) or nodes.is_node_name(path)
    ):
        raise UnsupportedFeatureError(
            "qimg takes a data-file or backing node given by options only for an image in a "
            "host file"
        )
    special = nodes.open_node(  # blkdebug, null-co, quorum (nodes.py)
        path,
        mode,
        fmt,
        force_share=force_share,
        passphrase=passphrase,
        backing=backing,
        open_data_file=open_data_file,
        cache=cache,
    )
    if special is not None:
        return special
    if not isinstance(path, str) or is_nbd_name(path):
        return _open_nbd(
            path, mode, fmt, snapshot, backing, force_share, passphrase, open_data_file, cache
        )
    probed = fmt is None
    if probed:
        fmt = probe_format(path, backing_of)
    if fmt not in FORMATS and fmt not in RAW_PROTOCOLS and fmt != "vmdk":
        raise UnsupportedFeatureError(f"Unknown driver '{fmt}'")
    if "\0" in path:
        raise CorruptImageError(f"Image file name {path!r} contains a NUL byte")
    real = os.path.realpath(path)
    if real in chain:
        raise CorruptImageError(
            f"Backing file loop: '{path}' is its own backing file "
            f"(chain: {' -> '.join(chain + (real,))})"
        )
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise CorruptImageError(
            f"Backing chain of '{chain[0]}' is too deep (more than {MAX_CHAIN_DEPTH} images)"
        )
    if fmt != "qcow2":
        _refuse_image_children(fmt, data_file, backing_node)
    if raw_window is not None and fmt != "raw":
        raise InvalidArgumentError(f"Block format '{fmt}' does not support the option 'offset'")
    if fmt == "luks":  # issue 14: a LUKS volume on the raw file (luks_image.py)
        if snapshot is not None:
            raise UnsupportedFeatureError("Block driver does not support snapshots (luks)")
        container = RawDevice(path, mode, force_share, False, backing_of, locking=locking)
        container.file.no_flush = cache == "unsafe"
        from .luks_image import open_luks

        return open_luks(container, _split_passphrase(passphrase)[0])
    if fmt == "vmdk":
        from .vmdk import open_vmdk

        if snapshot is not None:
            raise UnsupportedFeatureError("Block driver does not support snapshots (vmdk)")
        vmdk = open_vmdk(path, mode, force_share, backing_of, locking, untrusted)
        # (its parent image, parentFileNameHint, a VMDK backing file opened as qcow2's are)
        return _finish_image(
            vmdk, path, backing, force_share, None, True, chain + (real,), None, untrusted
        )
    if fmt == "raw" or fmt in RAW_PROTOCOLS:
        if snapshot is not None:
            raise UnsupportedFeatureError(f"Block driver does not support snapshots ({fmt})")
        offset, size = raw_window or (0, None)
        device = RawDevice(
            path, mode, force_share, probed, backing_of, locking=locking, offset=offset, size=size
        )
        if fmt == "host_device" and not device.file.is_device:
            device.close()
            raise InvalidArgumentError(
                f"'host_device' driver requires '{path}' to be either a character or block device"
            )
        if fmt == "file" and device.file.is_device:
            device.close()
            raise InvalidArgumentError(f"'file' driver requires '{path}' to be a regular file")
        device.format = fmt
        device.file.no_flush = cache == "unsafe"
        return device
    own_passphrase, backing_passphrase = _split_passphrase(passphrase)
    image = Qcow2Image(
        path,
        mode,
        data_file=data_file,
        force_share=force_share,
        passphrase=own_passphrase,
        open_data_file=open_data_file,
        backing_of=backing_of,
        untrusted=untrusted,
        locking=locking,
    )
    for host in (image.file, image.data_host):
        if host is not None:
            host.no_flush = cache == "unsafe"
    return _finish_image(
        image,
        path,
        backing,
        force_share,
        backing_passphrase,
        open_data_file,
        chain + (real,),
        snapshot,
        untrusted,
        backing_node,
    )


def _is_reference(node: BackingNode | None) -> TypeGuard[NodeReference]:
    """isinstance(node, NodeReference): only options make one, and containers.py is
    imported only where options give a node (start-up time)."""
    return nodes.loaded_instance(node, "containers", "NodeReference")


def _names_backing(backing_node: BackingNode | None) -> bool:
    """Whether options give a backing node (not none: "backing": null or "")."""
    if _is_reference(backing_node):
        return bool(backing_node.name)
    return bool(backing_node)


def _refuse_image_children(
    fmt: str, data_file: DataFileTarget | None, backing_node: BackingNode | None
) -> None:
    """A format without a data file or backing file given one by options (QEMU's words)."""
    if data_file is not None:
        from .containers import data_file_option

        raise InvalidArgumentError(
            f"Block format '{fmt}' does not support the option '{data_file_option(data_file)}'"
        )
    if _names_backing(backing_node):
        if fmt == "vmdk":  # (QEMU's vmdk driver has backing files; qimg's reads none)
            raise UnsupportedFeatureError(
                "qimg opens no backing node given by options beneath a vmdk image"
            )
        raise InvalidArgumentError("Driver doesn't support backing files")


def take_child_options(opts: dict[str, str], key: str) -> dict[str, str] | NodeReference | None:
    """Remove the options of child `key` from a node's flattened options: a reference
    ("key": name), else its own ("key.x": ... as {"x": ...}), or None when not given.
    Options beside a reference are left in `opts` (the caller refuses what is left)."""
    if key in opts:
        from .containers import NodeReference

        return NodeReference(opts.pop(key))
    child = {
        name[len(key) + 1 :]: opts.pop(name) for name in list(opts) if name.startswith(key + ".")
    }
    return child or None


_REFERENCE_WITH_OPTIONS = (
    "Cannot reference an existing block device with additional options or a new filename"
)
# backing node options that tune QEMU's I/O, not what it reads
_IGNORED_NODE_OPTIONS = ("node-name", "read-only", "auto-read-only", "discard", "detect-zeroes")
_IGNORED_PROTOCOL_OPTIONS = _IGNORED_NODE_OPTIONS + ("cache.direct", "cache.no-flush", "aio")


def _split_passphrase(passphrase):
    """(this layer's passphrase, what its backing chain gets)."""
    if isinstance(passphrase, (str, bytes, type(None))):
        return passphrase, passphrase
    layers = tuple(passphrase)
    return (layers[0] if layers else None), layers[1:]


def _finish_image(
    image,
    path: str | None,
    backing: bool,
    force_share: bool,
    backing_passphrase,
    open_data_file: bool,
    chain: tuple[str, ...],
    snapshot: str | None,
    untrusted: bool = False,
    backing_node: BackingNode | None = None,
) -> BlockDevice:
    """Open the backing chain of a qcow2 (or VMDK) image (`path` None: it is not in a host
    directory, so relative backing names mean nothing), the one options give instead of
    the header's when `backing_node` is set, then its snapshot view if asked."""
    if _is_reference(backing_node) and not backing_node.name:
        image.backing_dropped = True
    elif backing_node is not None and not backing:
        option = (
            "backing." + next(iter(backing_node)) if isinstance(backing_node, dict) else "backing"
        )
        image.close()
        raise InvalidArgumentError(f"Block format 'qcow2' does not support the option '{option}'")
    elif backing and (image.backing_filename or backing_node is not None):
        try:
            if backing_node is None:
                backing_path, backing_fmt = _named_backing(image, path, untrusted, None)
                opened: dict = {"backing_of": image.filename}
            else:
                backing_path, backing_fmt, opened = _given_backing(
                    image, path, backing_node, untrusted
                )
            if opened.get("backing_of") is None and isinstance(backing_path, str):
                # the caller's file may be one above (QEMU opens it again): the levels
                # below it, named by headers, are still checked against it
                real_path = os.path.realpath(backing_path)
                chain = tuple(level for level in chain if level != real_path)
            image.backing = _open(
                backing_path,
                "r",
                backing_fmt,
                True,
                opened.get("data_file"),
                force_share,
                backing_passphrase,
                open_data_file,
                chain,
                None,
                "writeback",
                opened.get("backing_of"),
                untrusted,
                opened.get("locking", True),
                opened.get("backing_node"),
                opened.get("raw_window"),
            )
        except Qcow2Error as exc:
            image.close()
            raise _in_backing_file(exc) from exc
        except BaseException:
            image.close()
            raise
    if snapshot is not None:
        from .snapshots import SnapshotView

        try:
            return SnapshotView(image, snapshot, close_image=True)
        except BaseException:
            image.close()
            raise
    return image


def _named_backing(
    image: Qcow2Image, path: str | None, untrusted: bool, stated: str | None
) -> tuple[ImageTarget, str | None]:
    """The backing file the header names and its format (`stated`, when options give
    one, else the header's, else probed), with the rules for untrusted images."""
    name = image.backing_filename
    assert name is not None  # (called only when the header names one)
    stated = stated or image.backing_format
    backing_path: ImageTarget
    if untrusted:
        if path is None:
            raise UntrustedImageError(
                f"Untrusted image '{image.filename}' names the "
                f"backing file '{name}' but lies in no directory"
            )
        backing_path = untrusted_backing_path(path, name, stated)
    elif name.startswith("json:"):
        backing_path, json_format = json_image_target(name)
        stated = json_format or stated
    elif nodes.is_node_name(name):  # blkdebug: or null-co:// (opened as named)
        backing_path = name
    elif path is None and not os.path.isabs(name) and not is_nbd_name(name):
        raise InvalidArgumentError(f"Cannot use relative backing file names for '{image.filename}'")
    else:
        backing_path = resolve_backing_path(path or "/", name)
    if nodes.is_node_target(backing_path):
        return backing_path, stated  # probed by open_blkdebug when not stated
    if not isinstance(backing_path, str) or is_nbd_name(backing_path):
        return backing_path, stated or "raw"
    if not os.path.exists(backing_path):
        raise Qcow2IOError(
            2, f"Could not open '{backing_path}': No such file or directory", backing_path
        )
    return backing_path, backing_format(backing_path, stated, name, image.filename)


def _given_backing(
    image: Qcow2Image, path: str | None, options: BackingNode, untrusted: bool
) -> tuple[ImageTarget, str | None, dict]:
    """The backing node options give: (target, format, what _open takes besides: its
    data_file, backing_of, locking, backing_node and raw_window). A file the options name is the
    caller's (probed, opened as named); without one, the header's name is opened with the
    options' driver, as the header's own would be."""
    from .containers import NodeReference
    from .drivers import KNOWN_DRIVERS

    if isinstance(options, NodeReference):
        raise options.missing()
    opts = dict(options)
    opened: dict = {
        "backing_node": take_child_options(opts, "backing"),
        "data_file": take_child_options(opts, "data-file"),
    }
    for key in _IGNORED_NODE_OPTIONS:
        opts.pop(key, None)
    driver = opts.pop("driver", None)
    if driver is not None and driver not in KNOWN_DRIVERS:
        raise InvalidArgumentError(f"Unknown driver '{driver}'")
    if driver in _NODE_BACKING_DRIVERS or opts.get("file.driver") in _NODE_BACKING_DRIVERS:
        return _given_node_backing(image, path, driver, opts, untrusted) + (opened,)
    if driver in RAW_PROTOCOLS:
        protocol, prefix, protocol_named = driver, "", True
    else:
        if driver is not None and driver not in FORMATS and driver != "vmdk":
            raise UnsupportedFeatureError(
                f"qimg opens a backing node given by options as qcow2, raw, luks or vmdk, "
                f"not '{driver}'"
            )
        if "file" in opts:  # (the header's name would be a new filename beside it)
            if image.backing_filename:
                raise InvalidArgumentError(_REFERENCE_WITH_OPTIONS)
            raise NodeReference(opts["file"]).missing()
        protocol, prefix = opts.pop("file.driver", "file"), "file."
        protocol_named = "file.driver" in options
        if protocol not in KNOWN_DRIVERS:
            raise InvalidArgumentError(f"Unknown driver '{protocol}'")
        if protocol not in RAW_PROTOCOLS:
            raise UnsupportedFeatureError(
                f"qimg opens a backing node given by options in a file or host device, "
                f"not in '{protocol}'"
            )
    filename = opts.pop(prefix + "filename", None)
    locking = opts.pop(prefix + "locking", "auto")
    if locking not in ("on", "off", "auto"):
        raise InvalidArgumentError(f"invalid parameter value: {locking}")
    opened["locking"] = locking != "off"
    for key in _IGNORED_PROTOCOL_OPTIONS:
        opts.pop(prefix + key, None)
    for key in opts:
        if prefix and key.startswith(prefix):
            raise InvalidArgumentError(
                f"Block protocol '{protocol}' doesn't support the option '{key[len(prefix) :]}'"
            )
    stated = driver or image.backing_format
    target: ImageTarget
    fmt: str | None
    if filename is not None:
        target, fmt = filename, stated or probe_format(filename)
    elif image.backing_filename:
        target, fmt = _named_backing(image, path, untrusted, driver)
        opened["backing_of"] = image.filename
    elif not protocol_named:
        raise InvalidArgumentError('A block device must be specified for "file"')
    else:
        raise InvalidArgumentError(f"The '{protocol}' block driver requires a file name")
    if protocol == "host_device" and isinstance(target, str) and os.path.exists(target):
        mode = os.stat(target).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            raise InvalidArgumentError(
                f"'host_device' driver requires '{target}' to be either a character or block device"
            )
    if fmt == "raw" and ("offset" in opts or "size" in opts):
        offset, size = (take_size_option(opts, key) for key in ("offset", "size"))
        opened["raw_window"] = (offset or 0, size)
    for key in opts:
        raise InvalidArgumentError(f"Block format '{fmt}' does not support the option '{key}'")
    return target, fmt, opened


def take_size_option(opts: dict[str, str], key: str) -> int | None:
    """Take the size option `key` of a node's options (None if not given), read and
    refused as QEMU's parse_option_size reads and words it."""
    from .sizes import SIZE_SUFFIX_HINT, SizeError, parse_size

    if key not in opts:
        return None
    value = opts.pop(key)
    try:
        return parse_size(value)
    except SizeError as exc:
        if exc.out_of_range:
            raise InvalidArgumentError(
                f"Value '{value}' is out of range for parameter '{key}'"
            ) from None
        raise InvalidArgumentError(
            f"Parameter '{key}' expects a non-negative number below 2^64",
            qemu_hint=SIZE_SUFFIX_HINT,
        ) from None


# drivers of backing nodes given by options that are nodes.py's or NBD's, not a format
# above a host file: as the backing node's driver, or as its file's
_NODE_BACKING_DRIVERS = ("blkdebug", "null-co", "null-aio", "nbd", "quorum")


def _given_node_backing(
    image: Qcow2Image, path: str | None, driver: str | None, opts: dict[str, str], untrusted
) -> tuple[ImageTarget, str | None]:
    """A backing node of a node driver (blkdebug, null-co, nbd, quorum), or a format
    above one, given by options: (target, format). When the header names a backing file,
    QEMU hands its name to the node as a file name: blkdebug alone opens it as its image,
    the others refuse it (each in its driver's words)."""
    file_driver = opts.get("file.driver")
    node_driver = driver if driver in _NODE_BACKING_DRIVERS else file_driver
    node_options = (
        {key[5:]: value for key, value in opts.items() if key.startswith("file.")}
        if node_driver is file_driver and driver not in _NODE_BACKING_DRIVERS
        else opts
    )
    if image.backing_filename:
        if (
            node_driver == "blkdebug"
            and driver == "blkdebug"
            and not any(key == "image" or key.startswith(("image.", "x-image")) for key in opts)
        ):
            target, fmt = _named_backing(image, path, untrusted, "raw")
            if not isinstance(target, str):
                raise UnsupportedFeatureError(
                    "qimg puts a blkdebug backing node only above a host file"
                )
            return options_image_target(
                {"driver": "blkdebug", "image.filename": target, **opts}, image.filename
            )
        assert node_driver is not None  # (the caller found one)
        raise InvalidArgumentError(_named_node_refusal(node_driver, node_options))
    if file_driver in ("null-co", "null-aio") and driver not in _NODE_BACKING_DRIVERS:
        if driver == "qcow2":  # (a null node holds no qcow2 magic)
            raise CorruptImageError("Image is not in qcow2 format")
        if driver not in (None, "raw"):
            raise UnsupportedFeatureError(
                f"qimg opens a null-co node beneath a raw backing node, not beneath {driver}"
            )
        return options_image_target(node_options | {"driver": file_driver}, image.filename)
    options = {"driver": driver, **opts} if driver is not None else dict(opts)
    return options_image_target(options, image.filename)


def _named_node_refusal(driver: str, options: dict[str, str]) -> str:
    """QEMU's error when a node of `driver` (options relative to it) is also given the
    header's backing file name as its file name."""
    if driver in ("null-co", "null-aio"):
        return f"The only allowed filename for this driver is '{driver}://'"
    if driver == "nbd":
        from .qobject import qdict_items

        for key, _ in qdict_items({"driver": driver, **options}):
            if key in ("host", "port", "path", "export") or key.startswith("server."):
                return f"Option '{key}' cannot be used with a file name"
        return "File name string for NBD must start with 'nbd:'"
    if driver == "blkdebug" and options.get("image.driver") in ("null-co", "null-aio", "nbd"):
        image = {key[6:]: value for key, value in options.items() if key.startswith("image.")}
        return _named_node_refusal(image.pop("driver"), image)
    if driver == "quorum":
        if not any(key.startswith("children.") for key in options):
            return "Number of provided children must be 1 or more"
        from .quorum import target_from_options

        try:  # (its own options are checked before the name is found unused)
            target_from_options("", {k: v for k, v in options.items() if k != "driver"})
        except InvalidArgumentError as exc:
            return str(exc)
        except UnsupportedFeatureError:
            pass
        return "Block format 'quorum' does not support the option 'file'"
    return "Can't specify 'file' and 'filename' options at the same time"
