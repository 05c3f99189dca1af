"""Whole-image operations behind the qimg subcommands, and the naming rules they share.

Each operation (one module each, e.g. ops.info) is a plain function returning plain data
(dicts, lists, ints), so the CLI only parses arguments and prints and other programs can
call the same functions. Operations take open devices (BlockDevice, opened in the mode
and with the chain their docstring asks for; the caller closes them). Names appear only
where the operation stores or follows a name: rebase's new backing file, commit's -b
base, and info, which opens each image of a chain on its own by name as qemu-img does.
This module holds what the CLI and those operations need to take image names the way
qemu-img does: protocol prefixes, backing name resolution, QEMU's sizes.
"""

from __future__ import annotations

from ..blockdev import BlockDevice
from ..chain import FORMATS, BackingNode, json_image_target, open_image
from ..errors import CorruptionIOError, InvalidArgumentError, Qcow2Error

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from ..containers import DataFileTarget

__all__ = [
    "FORMATS",
    "check_bitmap_constraints",
    "error_text",
    "virtual_size",
    "has_protocol",
    "host_path",
    "open_by_name",
    "path_combine",
    "full_backing_filename",
]


def error_text(exc: Qcow2Error) -> str:
    """The message of a qcow2lib error as qemu-img words it: its qemu_message if it has
    one, without OSError's "[Errno n]" decoration."""
    qemu_message = getattr(exc, "qemu_message", None)
    if qemu_message is not None:
        return qemu_message
    if isinstance(exc, CorruptionIOError):  # (its notice told what is broken)
        return exc.errno_text()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def chain_layer(top, depth: int):
    """The image `depth` backing steps below `top` (top itself at 0)."""
    layer = top
    for _ in range(depth):
        layer = layer.backing
    return layer


WINDOW_CLUSTERS = 8192  # extents_above lists this many clusters' extents at a time
WINDOW_MAX = 512 << 20  # (an L2 table's span with 64 KiB clusters), at most


def extents_above(top, depth: int, total: int):
    """The extents of [0, total) through the layers of top's chain above `depth`, as
    qemu-img asks "allocated above" for commit and rebase: the layers from `depth` down
    are left out (their metadata neither walked for nothing nor, if broken, a reason to
    fail). A range they would provide is not present, at the depth of the layer just
    above them; one past the end of a layer above reads zeros, not present at a lower
    depth. Each aligned window is listed before the caller acts on it: memory stays
    bounded, and what the caller writes in a window is not looked up again. (The chain
    is cut while a window is listed: no other thread may use it meanwhile.)"""
    window = min(WINDOW_MAX, WINDOW_CLUSTERS * getattr(top, "cluster_size", 65536))
    above = chain_layer(top, depth - 1)
    for start in range(0, total, window):
        below, above.backing = above.backing, None
        try:
            extents = top.extents(start, min(window, total - start))
        finally:
            above.backing = below
        yield from extents


def check_bitmap_constraints(img: BlockDevice) -> None:
    """Refuse a qcow2 image whose persistent bitmaps QEMU's open refuses, as qemu-img
    does (bitmaps.check_qemu_constraints; loaded only for an image that has bitmaps)."""
    entries = getattr(img, "_bitmap_entries", None)
    if entries:
        from ..bitmaps import check_qemu_constraints

        check_qemu_constraints(entries)


def virtual_size(img: BlockDevice) -> int:
    """The size QEMU's block layer shows for an image: whole 512-byte sectors.

    QEMU counts sizes in sectors: a raw file's partial last sector is rounded up (it
    reads as zeros past the end of the file), a qcow2 header size is rounded down.
    """
    if img.format in ("blkdebug", "throttle"):  # a filter: its child's length
        from ..blkdebug import BlkdebugDevice
        from ..throttle import ThrottleDevice

        assert isinstance(img, (BlkdebugDevice, ThrottleDevice))  # (the filter devices)
        return virtual_size(img.child)
    if img.format in ("raw", "host_device", "file"):
        return (img.size + 511) // 512 * 512
    return img.size // 512 * 512


def has_protocol(filename: str) -> bool:
    """True for names like "nbd:host" that QEMU reads as protocol:rest (a ':' before any '/')."""
    for char in filename:
        if char == "/":
            return False
        if char == ":":
            return True
    return False


def host_path(filename: str) -> str:
    """The host file a QEMU-style filename refers to.

    QEMU accepts an explicit "file:" protocol prefix; any other "proto:" prefix names a
    protocol qcow2lib does not implement, so it is refused with QEMU's wording. A name
    after "file:" that would itself read as "proto:..." becomes "./name", as QEMU names
    the file (so a relative backing name resolves beside it, not under a protocol).
    """
    if not has_protocol(filename):
        return filename
    protocol = filename.split(":", 1)[0]
    if protocol in ("nbd", "nbd+tcp", "nbd+unix", "null-co", "null-aio"):  # not host files
        return filename
    if protocol in ("blkdebug", "null-co", "null-aio"):  # opened by open_image (chain.py)
        return filename
    if protocol == "file":
        name = filename[len("file:") :]
        return "./" + name if has_protocol(name) else name
    raise InvalidArgumentError(f"Unknown protocol '{protocol}'")


def image_target(filename: str, fmt: str | None) -> tuple:
    """(what open_image takes, format) for a name as qemu-img takes it: a file (see
    host_path()), an NBD name, or "json:{...}" options whose driver gives the format
    unless `fmt` is stated."""
    if filename.startswith("json:"):
        target, stated = json_image_target(filename)
        return target, fmt or stated
    return host_path(filename), fmt


def open_by_name(
    filename: str,
    fmt: str | None = None,
    backing: bool = True,
    force_share: bool = False,
    backing_of: str | None = None,
    untrusted: bool = False,
    locking: bool = True,
    data_file: DataFileTarget | None = None,
    backing_node: BackingNode | None = None,
    raw_window: tuple[int, int | None] | None = None,
) -> BlockDevice:
    """Open an image read-only, named as qemu-img names images (see image_target()).

    `fmt` None probes the format; an empty name fails as QEMU's file driver fails.
    backing_of: the image naming this one as its backing file; untrusted: what the
    image names is confined to its directory; locking=False takes no locks (all as in
    open_image); data_file: the external data file given with the name
    (data-file.filename), not opened; backing_node: the backing node options give (with
    backing False, only "none" is taken, as qemu-img info takes it); raw_window: raw's
    offset and size options.
    """
    path, fmt = image_target(filename, fmt)
    if not path:
        raise InvalidArgumentError("The 'file' block driver requires a file name")
    return open_image(
        path,
        "r",
        fmt,
        backing,
        force_share=force_share,
        open_data_file=False,
        data_file=data_file,
        backing_of=backing_of,
        untrusted=untrusted,
        backing_node=backing_node,
        locking=locking,
        raw_window=raw_window,
    )


def path_combine(base: str, filename: str) -> str:
    """Resolve `filename` relative to the directory part of `base`, as QEMU does.

    The result is not normalised ("sub/top.qcow2" + "../base" gives "sub/../base"), which
    is what qemu-img shows as the actual backing path.
    """
    if filename.startswith("/"):
        return filename
    start = base.index(":") + 1 if has_protocol(base) else 0
    slash = base.rfind("/")
    if slash + 1 > start:
        start = slash + 1
    return base[:start] + filename


def full_backing_filename(image: str, backing: str) -> str:
    """The name under which a backing file is opened, relative names resolved against `image`."""
    if has_protocol(backing) or backing.startswith("/"):
        return backing
    if image == "" or image.startswith("json:"):
        raise InvalidArgumentError(f"Cannot use relative backing file names for '{image}'")
    return path_combine(image, backing)
