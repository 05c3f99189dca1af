"""QEMU block nodes that qimg opens besides host files, images and NBD exports.

blkdebug (fault injection, blkdebug.py), null-co/null-aio (nulldev.py), quorum (copies
read by vote, as a node or beneath an image: quorum.py) and the throttle filter
(throttle.py): their names
(blkdebug:CONFIG:IMAGE, null-co://), their json: or --image-opts options, and opening
them for open_image (chain.py), which asks open_node() first.
"""

from __future__ import annotations

import sys

from . import structs as S
from .blockdev import BlockDevice, RawDevice
from .errors import CorruptImageError, InvalidArgumentError, UnsupportedFeatureError
from .image import Qcow2Image

NODE_DRIVERS = ("blkdebug", "null-co", "null-aio", "quorum", "throttle")  # as "driver"
FILE_NODE_DRIVERS = ("blkdebug", "quorum", "throttle")  # as "file.driver", beneath an image


def is_node_name(name: str) -> bool:
    """blkdebug:CONFIG:IMAGE, null-co:// or null-aio://."""
    return name.startswith(("blkdebug:", "null-co:", "null-aio:"))


def loaded_instance(obj, module: str, class_name: str) -> bool:
    """isinstance(obj, qcow2lib.<module>.<class_name>), without importing that module when
    nothing has: then no object of the class exists. Nodes are rare, and importing their
    modules for every image opened would cost each qimg start-up time."""
    loaded = sys.modules.get(f"{__package__}.{module}")
    return loaded is not None and isinstance(obj, getattr(loaded, class_name))


_TARGET_CLASSES = (
    ("blkdebug", "BlkdebugTarget"),
    ("nulldev", "NullTarget"),
    ("quorum", "QuorumTarget"),
    ("throttle", "ThrottleTarget"),
)


def is_node_target(path) -> bool:
    """Whether open_image gets a node of this module from `path` (a name or a target)."""
    if isinstance(path, str):
        return is_node_name(path)
    return any(loaded_instance(path, module, name) for module, name in _TARGET_CLASSES)


def node_target(driver: str | None, opts: dict[str, str], name: str):
    """(target, format) of options naming a node (driver) or an image above one
    (file.driver), as chain.options_image_target returns them."""
    from . import blkdebug, nulldev

    if driver in nulldev.NULL_DRIVERS:
        return nulldev.target_from_options(driver, opts, name), driver
    if driver == "blkdebug":
        return blkdebug.target_from_options(name, opts), "blkdebug"
    if driver == "throttle":
        from . import throttle

        return throttle.target_from_options(name, opts), "throttle"
    if driver == "quorum":
        from . import quorum

        return quorum.target_from_options(name, opts, beneath=False), "quorum"
    file_driver = opts.pop("file.driver")
    file_opts = {key[5:]: opts.pop(key) for key in list(opts) if key.startswith("file.")}
    if opts:
        raise UnsupportedFeatureError(
            f"Option '{sorted(opts)[0]}' in the image name '{name}' is not supported"
        )
    if file_driver == "quorum":
        from . import quorum

        return quorum.target_from_options(name, file_opts), driver
    if file_driver == "throttle":
        from . import throttle

        return throttle.target_from_options(name, file_opts, beneath=True), driver
    return blkdebug.target_from_options(name, file_opts), driver


def open_node(path, mode: str, fmt: str | None, **kwargs) -> BlockDevice | None:
    """A blkdebug, null-co, quorum or throttle node when `path` or `fmt` names one, else
    None."""
    if loaded_instance(path, "throttle", "ThrottleTarget"):
        from . import throttle

        if path.beneath:
            return _open_over_throttle(path, mode, fmt, **kwargs)
        return throttle.open_throttle(path, mode, **kwargs)
    if loaded_instance(path, "quorum", "QuorumTarget"):
        if path.child_options:  # a node of its own
            from .quorum import open_quorum

            return open_quorum(path, mode, **kwargs)
        return _open_over_quorum(path, mode, fmt, **kwargs)
    named = path if isinstance(path, str) else ""
    null_node = loaded_instance(path, "nulldev", "NullTarget")
    if null_node or named.startswith("null-") or (fmt or "").startswith("null-"):
        device = _open_null(path, mode, fmt, null_node)
        if device is not None:
            return device
    if named.startswith("blkdebug:") or loaded_instance(path, "blkdebug", "BlkdebugTarget"):
        from . import blkdebug

        return blkdebug.open_blkdebug(path, mode, fmt, **kwargs)
    return None


def _open_null(path, mode: str, fmt: str | None, null_node: bool) -> BlockDevice | None:
    """A null-co/null-aio node, given by target, by name or as the format; None when
    `path` and `fmt` only looked like one."""
    from . import nulldev

    if null_node or fmt in nulldev.NULL_DRIVERS:
        if isinstance(path, str):
            path = nulldev.parse_null_name(path) if nulldev.is_null_name(path) else None
        if path is None:
            raise InvalidArgumentError(f"The only allowed filename for this driver is '{fmt}://'")
        return nulldev.NullDevice(path, mode)
    if isinstance(path, str) and nulldev.is_null_name(path):
        if fmt == "qcow2":  # QEMU reads no qcow2 magic from it
            raise CorruptImageError("Image is not in qcow2 format")
        if fmt not in (None, "raw"):
            raise UnsupportedFeatureError(f"qimg opens only raw content of '{path}', not {fmt}")
        device = nulldev.NullDevice(nulldev.parse_null_name(path), mode)
        device.format = "raw"  # named by its protocol, the node gets a (probed) format
        return device
    return None


def _open_over_quorum(target, mode: str, fmt: str | None, **kwargs) -> BlockDevice:
    """An image whose file is a quorum of copies (quorum.py)."""
    from .quorum import QuorumFile

    file = QuorumFile(target, writable=mode == "r+")
    return _open_over_file(file, target.display_name, None, (), mode, fmt, **kwargs)


def _open_over_throttle(target, mode: str, fmt: str | None, **kwargs) -> BlockDevice:
    """An image whose file is a throttle node above a host file (throttle.py): relative
    backing names resolve beside that file."""
    import os

    from .throttle import open_throttle_file

    file = open_throttle_file(target, writable=mode == "r+")
    chain = (os.path.realpath(file.path),)
    return _open_over_file(file, target.display_name, file.path, chain, mode, fmt, **kwargs)


def _open_over_file(
    file, name_of, host_path: str | None, chain: tuple, mode: str, fmt: str | None, **kwargs
) -> BlockDevice:
    """A raw or qcow2 image (probed when `fmt` is None) on `file`, a HostFile-like node;
    name_of(format) is the image's name, host_path where its relative backing names
    resolve (None: nowhere), chain the real paths for loop checks."""
    try:
        if fmt is None:
            fmt = "qcow2" if file.pread(4, 0) == S.QCOW_MAGIC.to_bytes(4, "big") else "raw"
        file.no_flush = kwargs.get("cache") == "unsafe"
        if fmt == "raw":
            return RawDevice(name_of(fmt), mode, kwargs.get("force_share", False), file=file)
        if fmt != "qcow2":
            raise InvalidArgumentError(f"Unknown driver '{fmt}'")
    except BaseException:
        file.close()
        raise
    from .chain import _finish_image, _split_passphrase

    own, backing_passphrase = _split_passphrase(kwargs.get("passphrase"))
    force_share = kwargs.get("force_share", False)
    image = Qcow2Image(name_of(fmt), mode, force_share=force_share, passphrase=own, file=file)
    return _finish_image(
        image,
        host_path,
        kwargs.get("backing", True),
        force_share,
        backing_passphrase,
        kwargs.get("open_data_file", True),
        chain,
        None,
    )
