"""`qemu-img resize`: change an image's virtual size, as qemu-img and QEMU's drivers do.

qcow2 growth enlarges the L1 table if needed (new table written and flushed, header
switched with one sector write, old table freed), preallocates the new area if asked,
zero-fills it where a larger backing file would otherwise show through, and writes the
new size last. Shrinking (only with shrink=True, as qemu-img's --shrink) releases every
cluster past the new end, then cuts the file after its last used cluster. Raw images are
truncated, with falloc/full preallocation of the new area.
"""

from __future__ import annotations


from ..errors import InvalidArgumentError, Qcow2IOError, UnsupportedFeatureError
from ..hostfile import preallocate
from ..sizes import BDRV_MAX_LENGTH
from . import virtual_size

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
SHRINK_WARNING = (
    "Shrinking an image will delete all data beyond the shrunken image's end. "
    "Before performing such an operation, make sure there is no important data "
    "there."
)


class ShrinkRefusedError(InvalidArgumentError):
    """A shrink without shrink=True. qemu-img prints the message as an error and
    `warning` as "qemu-img: warning: ..." after it."""

    def __init__(self):
        super().__init__("Use the --shrink option to perform a shrink operation.")
        self.warning = SHRINK_WARNING


def resize(image, new_size: int, *, shrink: bool = False, preallocation: str = "off") -> None:
    """Resize an image opened read-write (qcow2, raw or luks) to `new_size` bytes.

    Raises InvalidArgumentError (ShrinkRefusedError for a refused shrink) or another
    Qcow2Error with qemu-img's messages; on success qemu-img prints "Image resized.".
    """
    if preallocation not in PREALLOCATION_MODES:
        raise InvalidArgumentError(f"Invalid preallocation mode '{preallocation}'")
    current = virtual_size(image)
    if new_size <= 0:
        raise InvalidArgumentError("New image size must be positive")
    if new_size <= current and preallocation != "off":
        raise InvalidArgumentError("Preallocation can only be used for growing images")
    if new_size < current and not shrink:
        raise ShrinkRefusedError()
    if image.read_only:
        from ..errors import ReadOnlyError

        raise ReadOnlyError("Image is read-only")
    if new_size > BDRV_MAX_LENGTH:  # (QEMU's block layer, before any driver)
        raise InvalidArgumentError(f"offset({new_size}) exceeds maximum({BDRV_MAX_LENGTH})")
    if image.format in ("raw", "host_device", "file"):
        if image.file.is_device and new_size != image.size:
            raise UnsupportedFeatureError("Cannot resize device files")
        _resize_raw(image, new_size, preallocation)
    elif image.format == "qcow2":
        _resize_qcow2(image, new_size, preallocation)
    elif image.format == "luks":  # issue 14: its container is cut or grown with it
        container = image.container
        if container.format != "raw" or container.file.is_device:
            raise UnsupportedFeatureError("Cannot resize device files")
        _resize_raw(container, image.payload_offset + new_size, preallocation)
        image.resize(new_size)
    elif image.format in ("blkdebug", "throttle"):  # a filter: its child is resized
        resize(image.child, new_size, shrink=shrink, preallocation=preallocation)
        image.size = image.child.size
    else:
        raise UnsupportedFeatureError("Image format driver does not support resize")


def _resize_raw(image, new_size: int, preallocation: str) -> None:
    if preallocation == "metadata":
        raise InvalidArgumentError("Unsupported preallocation mode: metadata")
    old = image.size
    if image.fixed_size:  # (its raw option size)
        raise UnsupportedFeatureError("Cannot resize fixed-size raw disks")
    grown = (image.file_offset + old, new_size - old)  # (where the file grows, if it does)
    if preallocation == "falloc" and new_size > old:  # (QEMU grows the file by reserving)
        preallocate(image.file, *grown, preallocation)
    try:
        image.resize(new_size)
    except Qcow2IOError as exc:  # (as QEMU's file driver words it)
        raise exc.in_context("Could not resize file") from None
    if preallocation == "full" and new_size > old:
        preallocate(image.file, *grown, preallocation)
    image.flush()


def _resize_qcow2(image, new_size: int, preallocation: str) -> None:
    if new_size % 512:
        raise InvalidArgumentError("The new size must be a multiple of 512")
    if image.header.nb_snapshots and image.header.version < 3:
        raise UnsupportedFeatureError("Can't resize a v2 image which has snapshots")
    image.invalidate_bitmaps()  # they would need resizing (QEMU does it; we do not)
    old = image.size
    cs = image.cluster_size
    l2_span = cs * image.map.l2_entries
    new_l1_size = -(-new_size // l2_span)
    if new_size < old:
        image.resize_drop_clusters(-(-new_size // cs), shrink=True)
        if image.data_host is not None:
            image.data_host.truncate(new_size)
        image.resize_shrink_reftable()
        image.resize_truncate_file()
        image.resize_set_size(new_size)
        image.flush()
        return
    # Growing: a larger backing file must not show through in the new area.
    backing = image.backing
    zero_write = new_size > old and backing is not None and backing.size > old
    if zero_write and image.header.version < 3:
        raise UnsupportedFeatureError("Failed to zero out new clusters: Operation not supported")
    image.resize_grow_l1(new_l1_size)
    if image.data_file_raw and preallocation == "off":
        preallocation = "metadata"  # the tables must map the raw data file 1:1
    if preallocation == "off":
        if image.data_host is not None:
            image.data_host.truncate(new_size)
    else:
        if image.data_file_raw or image.data_host is not None:
            image.preallocate_range(old, new_size, preallocation)
        elif preallocation == "metadata":  # from the cluster holding the old end, as QEMU
            image.preallocate_range(old, new_size, preallocation, copy_head=True)
        else:  # QEMU reallocates the cluster holding the old end, copying its head
            image.preallocate_range(old, new_size, preallocation, cow_head=True, allocate=True)
        if image.data_host is not None and image.data_host.size() < new_size:
            image.data_host.truncate(new_size)
    image.resize_set_size(new_size)
    # falloc/full data clusters already read zeros (QEMU then sets no zero flags over them)
    if zero_write and (preallocation not in ("falloc", "full") or image.data_host is not None):
        image.write_zeroes(old, new_size - old)
    image.flush()


__all__ = ["resize", "ShrinkRefusedError", "SHRINK_WARNING"]
