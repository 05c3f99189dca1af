"""What `qemu-img info` reports about an image, as the same dict QEMU serialises.

Keys, nesting and presence rules follow QEMU's ImageInfo schema, and every dict is built
in schema order, so a caller can print it exactly like qemu-img (see qcow2lib/cli/info.py)
or hand it to programs that already parse `qemu-img info --output=json`.
"""

from __future__ import annotations

import os

from ..chain import BackingNode, is_nbd_name, untrusted_backing_path
from ..errors import CorruptImageError, ImageLockedError, Qcow2Error
from ..nodes import loaded_instance
from . import (
    check_bitmap_constraints,
    error_text,
    full_backing_filename,
    host_path,
    image_target,
    open_by_name,
    virtual_size,
)

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..blockdev import BlockDevice
    from ..containers import DataFileTarget

CRYPT_AES, CRYPT_LUKS = 1, 2  # qcow2 header crypt_method values
_LUKS_KEYS = (
    "cipher-alg",
    "cipher-mode",
    "ivgen-alg",
    "ivgen-hash-alg",
    "hash-alg",
    "payload-offset",
    "master-key-iters",
    "uuid",
    "slots",
)
_LUKS_SLOT_KEYS = ("active", "iters", "stripes", "key-offset")


class ImageOpenError(Qcow2Error):
    """An image of the chain could not be opened; the message names it like qemu-img.

    `hint` is the extra advice qemu-img prints on the following line(s), or "".
    """

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


def _qcow2_specific(img) -> dict:
    """The "format-specific" data of a qcow2 image, members in QEMU's schema order.

    Version 2 images report only what version 2 can express.
    """
    data: dict = {"compat": img.compat}
    if img.compat != "0.10":
        if img.header.data_file is not None:
            data["data-file"] = img.header.data_file
        if img.has_data_file:  # (even with no name stored: one was given at open)
            data["data-file-raw"] = img.data_file_raw
        data["extended-l2"] = img.extended_l2
        data["lazy-refcounts"] = img.lazy_refcounts
        data["corrupt"] = img.corrupt
    data["refcount-bits"] = img.refcount_bits
    if img.header.crypt_method:
        data["encrypt"] = _encryption(img)
    if img.bitmaps:
        data["bitmaps"] = [
            {"flags": b["flags"], "name": b["name"], "granularity": b["granularity"]}
            for b in img.bitmaps
        ]
    data["compression-type"] = img.compression_type
    return data


def _encryption(img) -> dict:
    """The "encrypt" member: the format, and for LUKS the header's parameters and key slots.

    Needs no passphrase: it describes the LUKS header, not the data.
    """
    hdr = img.header
    if hdr.crypt_method == CRYPT_AES:
        return {"format": "aes"}
    if hdr.crypt_method != CRYPT_LUKS:
        raise CorruptImageError(f"Unknown crypt_method {hdr.crypt_method} in the qcow2 header")
    from ..crypto import luks_info  # loaded for encrypted images only (start-up time)

    luks = luks_info(
        lambda offset, length: img.file.pread(length, offset), hdr.crypto_offset, hdr.crypto_length
    )
    luks["slots"] = [
        {key: slot[key] for key in _LUKS_SLOT_KEYS if key in slot} for slot in luks["slots"]
    ]
    return {"format": "luks", **{key: luks[key] for key in _LUKS_KEYS if key in luks}}


def _snapshot_list(img) -> list[dict]:
    """The internal snapshots of a qcow2 image as QEMU's SnapshotInfo dicts."""
    from ..snapshot_table import list_snapshots  # (images without snapshots skip it)

    infos = []
    for snap in list_snapshots(img):
        info = {
            "id": snap.id,
            "name": snap.name,
            "vm-state-size": snap.vm_state_size,
            "date-sec": snap.date_sec,
            "date-nsec": snap.date_nsec,
            "vm-clock-sec": snap.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": snap.vm_clock_nsec % 1_000_000_000,
        }
        if snap.icount is not None and snap.icount != (1 << 64) - 1:
            info["icount"] = snap.icount
        infos.append(info)
    return infos


def _describe(img, path: str) -> dict:
    """The info dict of an open image whose host file is `path`."""
    backing_base: str | None = path  # where relative backing names resolve
    info: dict = {
        "filename": path,
        "format": img.format,
        "dirty-flag": img.format == "qcow2" and img.dirty,
    }
    if is_nbd_name(path):  # QEMU names an export by its URI; no disk size (nor, raw, a dirty flag)
        info["filename"] = img.filename
        if img.format != "qcow2":
            del info["dirty-flag"]
    elif loaded_instance(img, "nulldev", "NullDevice"):  # stores nothing
        info["actual-size"] = 0
        del info["dirty-flag"]  # the null driver has no image information to give
    elif img.format == "quorum":  # its copies' disk usage; no image information
        info["actual-size"] = sum(
            _describe(child, child.filename).get("actual-size", 0) for child in img.children
        )
        del info["dirty-flag"]
        backing_base = None
    elif loaded_instance(getattr(img, "file", None), "quorum", "QuorumFile"):
        info["actual-size"] = img.file.allocated_bytes()
        backing_base = None  # its copies lie in no one directory: no relative name resolves
    elif img.format == "blkdebug":  # the node itself: no allocated size; as a filter it
        child = img.child  # gives its child's image information (null-co has none)
        if loaded_instance(child, "nulldev", "NullDevice"):
            del info["dirty-flag"]
        elif child.format == "qcow2":
            info["cluster-size"] = child.cluster_size
            info["dirty-flag"] = child.dirty
    elif img.format == "throttle":  # a filter: its child's disk usage and image information
        child = _describe(img.child, img.child.filename)
        for key in ("actual-size", "cluster-size", "dirty-flag"):
            if key in child:
                info[key] = child[key]
            else:
                info.pop(key, None)
    elif loaded_instance(getattr(img, "file", None), "throttle", "ThrottleFile"):  # beneath:
        info["actual-size"] = os.stat(img.file.path).st_blocks * 512  # its file's usage
        backing_base = img.file.path
    elif loaded_instance(getattr(img, "file", None), "blkdebug", "BlkdebugFile"):
        # blkdebug reports no allocated size ("unavailable"); relative backing names
        # resolve in the directory of the file beneath it
        backing_base = img.file.path
    else:
        info["actual-size"] = os.stat(path).st_blocks * 512
    info["virtual-size"] = virtual_size(img)
    if img.format in ("qcow2", "vmdk") and img.backing_filename:
        info["backing-filename"] = img.backing_filename
        if backing_base is not None:  # else qemu-img "cannot determine actual path"
            info["full-backing-filename"] = full_backing_filename(
                backing_base, img.backing_filename
            )
        if img.backing_format:
            info["backing-filename-format"] = img.backing_format
    if img.format == "qcow2":
        info["cluster-size"] = img.cluster_size
        if img.encrypted:
            info["encrypted"] = True
        if img.header.nb_snapshots:
            info["snapshots"] = _snapshot_list(img)
        info["format-specific"] = {"type": "qcow2", "data": _qcow2_specific(img)}
    elif img.format == "luks":  # issue 14: the header's parameters and key slots
        info["encrypted"] = True
        info["format-specific"] = {"type": "luks", "data": img.info()}
    elif img.format == "vmdk":
        if img.grain_size is not None:  # (flat extents, or sparse ones unlike each other)
            info["cluster-size"] = img.grain_size
        if hasattr(img, "allocated_bytes"):  # (a descriptor file and its extent files)
            info["actual-size"] = img.allocated_bytes()
        info["format-specific"] = {"type": "vmdk", "data": img.specific_info()}
    return info


def image_info(
    filename: str,
    fmt: str | None = None,
    force_share: bool = False,
    backing_of: str | None = None,
    untrusted: bool = False,
    locking: bool = True,
    data_file: DataFileTarget | None = None,
    backing_node: BackingNode | None = None,
    opened: Callable[[BlockDevice], None] | None = None,
    raw_window: tuple[int, int | None] | None = None,
) -> dict:
    """The `qemu-img info` dict of one image, its backing file left unopened.

    Unlike the other operations this takes a name, not a device: the dict reports the
    name (and the file's disk usage), and an image that cannot be opened is reported by
    the name qemu-img would show. `filename` is taken as qemu-img takes it (a "file:"
    prefix is allowed); `fmt` None probes the format; force_share reads an image another
    process has open for writing; backing_of names the image whose backing file this is;
    untrusted and locking (see open_image); data_file: its external data file as given
    (data-file options, not opened); backing_node: its backing as options give it (only
    none is taken: the backing file is not opened); opened(device) is called once it is
    open (where qemu-img warns of what it found); raw_window: raw's offset and size options.
    Raises ImageOpenError naming the file when it cannot be read.
    """
    try:
        with open_by_name(
            filename,
            fmt,
            backing=False,
            force_share=force_share,
            backing_of=backing_of,
            untrusted=untrusted,
            locking=locking,
            data_file=data_file,
            backing_node=backing_node,
            raw_window=raw_window,
        ) as img:
            if opened is not None:
                opened(img)
            check_bitmap_constraints(img)
            target = image_target(filename, fmt)[0]
            return _describe(img, target if isinstance(target, str) else img.filename)
    except Qcow2Error as exc:
        hint = exc.qemu_hint
        if isinstance(exc, ImageLockedError):
            hint = f"Is another process using the image [{host_path(filename)}]?\n"
        raise ImageOpenError(f"Could not open '{filename}': {error_text(exc)}", hint) from exc


def image_info_list(
    filename: str,
    fmt: str | None = None,
    backing_chain: bool = False,
    force_share: bool = False,
    untrusted: bool = False,
    locking: bool = True,
    data_file: DataFileTarget | None = None,
    backing_node: BackingNode | None = None,
    opened: Callable[[BlockDevice], None] | None = None,
    raw_window: tuple[int, int | None] | None = None,
) -> list[dict]:
    """`qemu-img info [--backing-chain]`: the top image, then each backing file in turn.
    data_file, backing_node and raw_window: the top image's data-file, backing, offset and
    size options; opened: as for image_info, for each image.

    By name, as image_info(): each backing file is opened on its own (without its own
    backing file) under the name its overlay records, as qemu-img does.

    Backing files are opened by their full backing filename with the recorded backing
    format (probed when none is recorded). A name seen twice is a loop and raises
    CorruptImageError with qemu-img's message. untrusted: each backing file must be one
    an untrusted image may name (chain.untrusted_backing_path).
    """
    seen: set[str] = set()
    infos: list[dict] = []
    name: str | None = filename
    named_by: str | None = None
    while name is not None:
        if name in seen:
            raise CorruptImageError(f"Backing file '{name}' creates an infinite loop.")
        seen.add(name)
        info = image_info(
            name,
            fmt,
            force_share,
            named_by,
            untrusted,
            locking,
            data_file,
            backing_node,
            opened,
            raw_window,
        )
        infos.append(info)
        # file.locking=off, data-file, backing, offset and size were the top image's options
        locking = True
        named_by, name, fmt, data_file, backing_node = name, None, None, None, None
        raw_window = None
        if backing_chain:
            name = info.get("full-backing-filename")
            fmt = info.get("backing-filename-format")
            if untrusted and name is not None:
                untrusted_backing_path(host_path(named_by), info["backing-filename"], fmt)
    return infos
