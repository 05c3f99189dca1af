"""`qemu-img commit`: write an overlay's changes down into a backing file.

Everything the layers above the base provide (as `qemu-img commit` decides it: ranges
allocated above the base, zero runs included, and ranges past the end of a shorter
intermediate layer, which read as zeros) is written into the base, which first grows to
the top's size if it is smaller. Then, unless `drop` is set, the top image is emptied:
all its clusters are released, so it reads entirely through its backing file again (the
file is cut back to its metadata). As in qemu-img, naming a base (-b) implies drop:
the images between it and the top are no longer consistent, so the top is kept.
"""

from __future__ import annotations

import os

from ..blockdev import BlockDevice
from ..chain import (
    MAX_CHAIN_DEPTH,
    _given_backing,
    backing_format,
    json_image_target,
    open_image,
    resolve_backing_path,
    untrusted_backing_path,
)
from ..containers import NodeReference
from ..errors import CorruptImageError, InvalidArgumentError, Qcow2Error, Qcow2IOError
from ..hostfile import io_buffer
from ..image import Qcow2Image
from ..nodes import is_node_name
from ..throttle import RateLimiter
from . import chain_layer, extents_above
from .empty import can_start_afresh, start_afresh
from .resize import resize

TYPE_CHECKING = False  # typing's, without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

IO_BUF_SIZE = 2 << 20


class CommitError(Qcow2Error):
    """A commit failed; the message is qemu-img's."""


def _matches(base: str, layer_filename: str, path: str) -> bool:
    """bdrv_find_backing_image: `base`, resolved against the directory of the layer that
    names the backing file, is that backing file (canonical paths compared)."""
    candidate = resolve_backing_path(layer_filename, base)
    if not os.path.exists(candidate):
        return False
    return os.path.realpath(candidate) == os.path.realpath(path)


def _host_name(layer) -> str:
    """The file a layer's relative backing name resolves against: its host file (beneath
    blkdebug too), else the name it was opened by."""
    return getattr(getattr(layer, "file", None), "path", None) or layer.filename


def _open_chain(
    top,
    base_name: str | None,
    passphrases: tuple,
    untrusted: bool,
    backing_node=None,
    top_name: str | None = None,
) -> int:
    """Open the layers below `top` down to the base read-only, the base read-write (with
    its own chain read-only), and hang them under top. Returns the base's depth.
    backing_node: the backing node options give the top in place of its header's (as
    open_image takes it); a layer opened from options may give the next one the same way.
    top_name: the top's name in messages (its filename by default)."""
    top_name = top_name or top.filename
    try:
        layer, depth = top, 0
        seen = {os.path.realpath(_host_name(top))}
        given = backing_node
        while True:
            if isinstance(given, NodeReference) and not given.name:
                given = None  # "backing": null: the chain ends here
                name = None
            else:
                name = getattr(layer, "backing_filename", None)
            if given is not None:
                depth += 1
                layer, found, given = _open_given_layer(
                    layer, given, base_name, depth, passphrases, untrusted
                )
                if found:
                    return depth
                continue
            if not name:
                if base_name is None and depth == 0:
                    raise CommitError("Image does not have a backing file")
                raise CommitError(
                    f"Did not find '{base_name}' in the backing chain of '{top_name}'"
                )
            if not untrusted and (name.startswith("json:") or is_node_name(name)):
                # opened as named: options, or a blkdebug / null-co node
                target, stated = json_image_target(name) if name[0] == "j" else (name, None)
                depth += 1
                is_base = depth == 1 if base_name is None else base_name == name
                layer.backing = open_image(
                    target,
                    "r+" if is_base else "r",
                    stated or layer.backing_format,
                    backing=is_base,
                    passphrase=passphrases[depth - 1 :],
                )
                if is_base:
                    return depth
                layer = layer.backing
                continue
            if untrusted:
                path = untrusted_backing_path(_host_name(layer), name, layer.backing_format)
            else:
                path = resolve_backing_path(_host_name(layer), name)
            real = os.path.realpath(path)
            if real in seen or depth >= MAX_CHAIN_DEPTH:
                raise CorruptImageError(f"Backing file '{path}' creates an infinite loop.")
            seen.add(real)
            depth += 1
            is_base = (
                _matches(base_name, _host_name(layer), path)
                if base_name is not None
                else depth == 1
            )
            if not os.path.exists(path):
                raise CommitError(
                    f"Could not open backing file: Could not open '{path}': "
                    f"No such file or directory"
                )
            if is_base:
                layer.backing = open_image(
                    path,
                    "r+",
                    backing_format(path, layer.backing_format, name, layer.filename),
                    passphrase=passphrases[depth - 1 :],
                    backing_of=layer.filename,
                    untrusted=untrusted,
                )
                return depth
            layer.backing = open_image(
                path,
                "r",
                backing_format(path, layer.backing_format, name, layer.filename),
                backing=False,
                passphrase=passphrases[depth - 1 : depth],
                backing_of=layer.filename,
                untrusted=untrusted,
            )
            layer = layer.backing
    except BaseException:
        if top.backing is not None:
            top.backing.close()  # what was opened so far; the caller closes the top
            top.backing = None
        raise


def _open_given_layer(layer, options, base_name, depth: int, passphrases: tuple, untrusted):
    """Open the backing node options give `layer` (chain._given_backing: the node's own
    file, or the header's name opened with the options' driver) and hang it under it:
    read-write with its chain when it is the base, else read-only alone. The base is
    the first backing node without -b; with -b, a node the options name a file for (or
    whose header name resolves to another string) is the base when -b is that name as
    given (QEMU compares the names of overridden nodes as strings), one opened from the
    header's name as stored when -b matches that name as the header's own would.
    Returns the node, whether it is the base, and the options it gives the level below
    it (None: its header's)."""
    if isinstance(options, NodeReference):
        raise options.missing()
    target, fmt, opened = _given_backing(layer, _host_name(layer), options, untrusted)
    if base_name is None:
        is_base = depth == 1
    elif opened.get("backing_of") is None or target != layer.backing_filename:
        # a file the options name, or the header's name resolved to another string (a
        # layer in another directory): QEMU takes the node as overridden
        is_base = base_name == target
    else:
        is_base = isinstance(target, str) and _matches(base_name, _host_name(layer), target)
    layer.backing = open_image(
        target,
        "r+" if is_base else "r",
        fmt,
        backing=is_base,
        data_file=opened.get("data_file"),
        passphrase=passphrases[depth - 1 :] if is_base else passphrases[depth - 1 : depth],
        backing_of=opened.get("backing_of"),
        untrusted=untrusted and opened.get("backing_of") is not None,
        locking=opened.get("locking", True),
        backing_node=opened.get("backing_node") if is_base else None,
    )
    return layer.backing, is_base, None if is_base else opened.get("backing_node")


def commit(
    top: BlockDevice,
    base_name: str | None = None,
    *,
    drop: bool = False,
    progress: Callable[[int, int], None] | None = None,
    backing_passphrases: Sequence[str | bytes | None] = (),
    untrusted: bool = False,
    rate_limit: int = 0,
    clock=None,
    sleep=None,
    backing_node=None,
    name: str | None = None,
) -> None:
    """Commit `top` into its backing file, or into the image named `base_name` further
    down its chain (which implies drop, as qemu-img's -b does). Unless drop, the top is
    emptied afterwards. qemu-img then prints "Image committed.".

    `top` is opened read-write *without* its backing chain (backing=False; the caller
    closes it): commit opens the chain itself, because the base must be opened read-write
    and the layers between it and the top read-only. base_name is a name, matched as
    qemu-img matches -b: resolved against the directory of each layer naming a backing
    file. progress(done_bytes, total_bytes) is called while copying.
    backing_passphrases unlock encrypted layers below the top: its backing file's first,
    and so on. untrusted: the chain is opened as open_image(untrusted=True) opens it.
    rate_limit: bytes per second copied (-r; 0: no limit), as QEMU's commit job limits its
    speed (throttle.RateLimiter: 100 ms slices, zero runs not counted); clock and sleep
    replace the limiter's time.monotonic_ns and time.sleep (tests). backing_node: the
    top's backing node given by options in place of its header's, as open_image takes it
    (NodeReference("") for none): the commit goes into it, as qemu-img's does. name: the
    top's name in messages, as the user gave it (its filename by default).
    """
    timing = {"clock": clock, "sleep": sleep}
    limiter = RateLimiter(rate_limit, **{k: v for k, v in timing.items() if v})
    if top.backing is not None:
        raise InvalidArgumentError("commit needs the top image opened without its backing chain")
    if base_name is not None:
        drop = True
    base_depth = _open_chain(
        top, base_name, tuple(backing_passphrases), untrusted, backing_node, name
    )
    try:
        base = chain_layer(top, base_depth)
        if base.size < top.size:
            resize(base, top.size)
        try:
            _copy_down(top, base, base_depth, progress, limiter)
        except Qcow2IOError as exc:  # qemu-img runs the copy as a block job
            raise CommitError(f"Block job failed: {exc.errno_text()}") from exc
        if not drop and isinstance(top, Qcow2Image):
            try:
                if can_start_afresh(top):
                    start_afresh(top)
                else:
                    top.resize_drop_clusters(0)
                    top.resize_truncate_file()
                    top.flush()
            except Qcow2IOError as exc:
                raise CommitError(f"Failed to empty {top.filename}: {exc.strerror}") from exc
    finally:
        if top.backing is not None:
            top.backing.close()  # the chain this commit opened
            top.backing = None


def _copy_down(top, base, base_depth: int, progress, limiter: RateLimiter) -> None:
    """Write what the layers above the base provide into the base, and flush it."""
    total = top.size
    done = 0
    buf = io_buffer(IO_BUF_SIZE)
    zero_start = zero_end = 0  # a run of zero extents not yet written: one request for all

    def write_zeroes() -> None:
        if zero_end > zero_start:
            base.write_zeroes(zero_start, zero_end - zero_start, may_unmap=True)

    for ext in extents_above(top, base_depth, total):
        end = ext.offset + ext.length
        if not ext.present and ext.depth == base_depth - 1:
            done += ext.length
            continue  # the base (or what is below it) provides this: nothing above does
        # (a range past the end of a layer above the base read zeros: a lower depth)
        if ext.is_zero:
            if ext.offset != zero_end:
                write_zeroes()
                zero_start = ext.offset
            zero_end = end
            done += ext.length
        else:
            write_zeroes()
            zero_start = zero_end = 0
            offset = ext.offset
            while offset < end:
                n = min(IO_BUF_SIZE, end - offset)
                view = memoryview(buf)[:n]
                top.readinto(offset, view)
                base.write(offset, view)
                limiter.account(n)
                offset += n
                done += n
                if progress is not None:
                    progress(done, total)
    write_zeroes()
    base.flush()
    if progress is not None:
        progress(total, total)
