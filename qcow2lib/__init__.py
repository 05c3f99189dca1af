"""qcow2lib: a QCOW2 storage engine.

    import qcow2lib
    qcow2lib.create("disk.qcow2", 1 << 30)
    with qcow2lib.open("disk.qcow2", "r+") as disk:
        disk.write(0, b"hello")

Every image, raw or qcow2, alone or with its backing chain, is a `BlockDevice`.
"""

from .blockdev import BlockDevice, BlockFile, Extent, RawDevice
from .chain import open_image as open
from .chain import probe_format
from .create import create
from .errors import (
    BadSecretError,
    CorruptImageError,
    ImageLockedError,
    InvalidArgumentError,
    Qcow2Error,
    Qcow2IOError,
    ReadOnlyError,
    UnsupportedFeatureError,
    UntrustedImageError,
)
from .image import Qcow2Image

__all__ = [
    "open",
    "create",
    "probe_format",
    "BlockDevice",
    "BlockFile",
    "Extent",
    "RawDevice",
    "Qcow2Image",
    "Qcow2Error",
    "CorruptImageError",
    "UnsupportedFeatureError",
    "Qcow2IOError",
    "InvalidArgumentError",
    "ImageLockedError",
    "BadSecretError",
    "ReadOnlyError",
    "UntrustedImageError",
]
