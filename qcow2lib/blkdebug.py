"""QEMU's blkdebug fault injection: rules that make chosen I/O fail after chosen events.

A rule set comes from a config file (`blkdebug:CONFIG:IMAGE`, sections [inject-error]
and [set-state] with `key = "value"` lines) and from options (json:{"driver": "blkdebug",
"inject-error": [{...}], ...}). The qcow2 engine reports named events (read_aio,
write_aio, l1_update, cluster_free, ...) to the file it writes through; an
[inject-error] rule whose event fired (in the rule's state, if it names one) stays active
and fails every later request of its I/O types that covers its sector (every request
when it names none), until another event activates other rules. `once` removes it after
its first failure; [set-state] rules move the state machine that `state` matches.

Two placements, as in QEMU: `BlkdebugFile` sits between an image and its host file (the
image's events and metadata I/O are seen), `BlkdebugDevice` above any block device (its
reads, writes and block-status queries are seen; "event": "none" rules are active from
the start).
"""

from __future__ import annotations

import errno as errno_codes
import os
import threading

from .blockdev import BlockDevice, FilterDevice
from .errors import InvalidArgumentError, Qcow2IOError
from .hostfile import HostFileFilter
from .records import field, record
from .sizes import SIZE_SUFFIX_HINT

EVENTS = (
    "l1_update l1_grow_alloc_table l1_grow_write_table l1_grow_activate_table l2_load "
    "l2_update l2_update_compressed l2_alloc_cow_read l2_alloc_write read_aio "
    "read_backing_aio read_compressed write_aio write_compressed vmstate_load vmstate_save "
    "cow_read cow_write reftable_load reftable_grow reftable_update refblock_load "
    "refblock_update refblock_update_part refblock_alloc refblock_alloc_hookup "
    "refblock_alloc_write refblock_alloc_write_blocks refblock_alloc_write_table "
    "refblock_alloc_switch_table cluster_alloc cluster_alloc_bytes cluster_free flush_to_os "
    "flush_to_disk pwritev_rmw_head pwritev_rmw_after_head pwritev_rmw_tail "
    "pwritev_rmw_after_tail pwritev pwritev_zero pwritev_done empty_image_prepare "
    "l1_shrink_write_table l1_shrink_free_l2_clusters cor_write cluster_alloc_space none"
).split()
IO_TYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
# Without an iotype a rule fails every kind of request but block-status queries.
DEFAULT_IO_TYPES = frozenset(IO_TYPES[:5])
SECTOR = 512
_RULE_KEYS = {
    "inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
    "set-state": ("event", "state", "new_state"),
}
_BOOL_WORDS = {"on": True, "yes": True, "true": True, "y": True}
_BOOL_WORDS.update({"off": False, "no": False, "false": False, "n": False})


@record
class Rule:
    """One [inject-error] or [set-state] section."""

    action: str
    event: str
    state: int = 0  # 0: any state
    errno: int = errno_codes.EIO
    once: bool = False
    offset: int = -1  # the byte offset of `sector`; -1: any request
    io_types: frozenset = DEFAULT_IO_TYPES
    new_state: int = 0


# The options QEMU's blkdebug keeps in a json: name of the node, in its order.
_STRONG_RUNTIME_OPTIONS = (
    "config",
    "inject-error.",
    "set-state.",
    "align",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
)


@record
class BlkdebugTarget:
    """What a blkdebug node opens: its rules' sources and its child.

    `image` is the child: a host file name (the `x-image` of a blkdebug: name) or the
    child's own options (the "image" object, flattened).
    """

    name: str
    config: str | None
    image: str | dict[str, str]
    rule_options: dict[str, str] = field(default_factory=dict)
    other_options: bool = False  # options beyond config and image: QEMU keeps a json: name
    options: dict[str, str] = field(default_factory=dict)  # all of them, flattened

    def child_filename(self) -> str:
        """The child's name as QEMU shows it (a file name, or null-co://)."""
        if isinstance(self.image, str):
            return self.image
        driver = self.image.get("driver", "file")
        if driver in ("null-co", "null-aio"):
            return f"{driver}://"
        return self.image.get("filename") or self.image.get("file.filename", "")

    def display_name(self) -> str:
        """blkdebug:CONFIG:CHILD, QEMU's reconstructed name of the node."""
        return f"blkdebug:{self.config or ''}:{self.child_filename()}"

    def json_name(self, format_name: str | None) -> str:
        """QEMU's json: name for a node with options beyond config and image: "driver",
        its strong runtime options (typed as a json: name gave them) and the child spelled
        out under "image"; with `format_name`, that of the image of that format above the
        node. The options pass through QEMU's dicts as they do in QEMU (flattened, joined,
        taken by the child node, gathered by prefix), which orders keys sharing a bucket."""
        from .qobject import node_tree, qdict_flatten, qdict_items, qemu_json_compact, reinserted

        prefix = "" if format_name is None else "file."
        tree = self._given_tree()
        if tree is not None:  # a json: name is flattened into the open's options
            top = qdict_flatten(tree)
        else:  # options (--image-opts, in the order given) are joined into them
            top = reinserted({prefix + key: value for key, value in self.options.items()})
        options = reinserted(top, prefix)  # the node's: taken from its parent's
        own = {
            key: value
            for strong in _STRONG_RUNTIME_OPTIONS
            for key, value in qdict_items(options)
            if (key.startswith(strong) if strong.endswith(".") else key == strong)
        }
        child = node_tree({k[6:]: v for k, v in options.items() if k.startswith("image.")})
        node = {"driver": "blkdebug", **own, "image": child}
        tree_out = node if format_name is None else {"driver": format_name, "file": node}
        return "json:" + qemu_json_compact(tree_out)

    def _given_tree(self) -> dict | None:
        """The object of the json: name the node was given by, unless it only holds flat
        options (qimg's spelling of --image-opts)."""
        if not self.name.startswith("json:"):
            return None
        from .chain import json_text_tree

        tree = json_text_tree(self.name)
        if all(not isinstance(value, (dict, list)) for value in tree.values()):
            return None
        return tree


def parse_blkdebug_name(name: str) -> BlkdebugTarget:
    """blkdebug:CONFIG:IMAGE (CONFIG may be empty: no config file)."""
    rest = name[len("blkdebug:") :]
    config, sep, image = rest.partition(":")
    if not sep:
        raise InvalidArgumentError("blkdebug requires both config file and image path")
    return BlkdebugTarget(name, config or None, image)


def target_from_options(name: str, options: dict[str, str]) -> BlkdebugTarget:
    """A blkdebug node given as options (json: or --image-opts, keys flattened, without
    "driver"): config, image (a name, or image.* for the child), inject-error.N.* and
    set-state.N.* rules, and QEMU's alignment and limit options (checked; they shape how
    QEMU splits requests, which qimg does not do), and permission options (accepted)."""
    config = options.get("config")
    reference = options.get("image")  # a string names another node, which qimg has none of
    if reference is not None:
        raise InvalidArgumentError(f"Cannot find device='{reference}' nor node-name='{reference}'")
    image: str | dict[str, str] | None = options.get("x-image")
    child = {key[6:]: value for key, value in options.items() if key.startswith("image.")}
    rules = {
        key: value
        for key, value in options.items()
        if key.startswith(("inject-error", "set-state"))
    }
    limits: tuple[str, ...] = ("align", "max-transfer", "opt-write-zero", "max-write-zero")
    limits += ("opt-discard", "max-discard")
    for key in options:
        if key in ("config", "image", "x-image") or key.startswith(("image.",) + tuple(_RULE_KEYS)):
            continue
        if key in limits:
            _check_limit(key, options[key])
            continue
        if key.startswith(("take-child-perms", "unshare-child-perms")):
            continue
        raise InvalidArgumentError(f"Block protocol 'blkdebug' doesn't support the option '{key}'")
    if child:
        image = child
    if image is None:
        raise InvalidArgumentError('A block device must be specified for "image"')
    others = any(
        key not in ("config", "image", "x-image") for key in options if key[:6] != "image."
    )
    return BlkdebugTarget(name, config, image, rules, others, dict(options))


def _check_limit(key: str, value: str) -> None:
    from .sizes import parse_size

    try:
        size = parse_size(value)
    except (ValueError, InvalidArgumentError):
        raise InvalidArgumentError(
            f"Parameter '{key}' expects a non-negative number below 2^64",
            qemu_hint=SIZE_SUFFIX_HINT,
        ) from None
    if size and (size >= 1 << 31 or (key == "align" and size & (size - 1))):
        raise InvalidArgumentError(f"Cannot meet constraints with {key} {size}")


def _number(key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise InvalidArgumentError(f"Parameter '{key}' expects a number") from None


def _bool(key: str, value: str) -> bool:
    if value not in _BOOL_WORDS:
        raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")
    return _BOOL_WORDS[value]


def _rule(section: str, values: dict[str, str]) -> Rule:
    for key in values:
        if key not in _RULE_KEYS[section]:
            raise InvalidArgumentError(f"Invalid parameter '{key}'")
    event = values.get("event")
    if event is None:
        raise InvalidArgumentError("Missing event name for rule")
    if event not in EVENTS:
        raise InvalidArgumentError(f"invalid parameter value: {event}")
    rule = Rule(section, event, _number("state", values.get("state", "0")))
    if section == "set-state":
        rule.new_state = _number("new_state", values.get("new_state", "0"))
        return rule
    rule.errno = _number("errno", values.get("errno", str(errno_codes.EIO)))
    rule.once = _bool("once", values.get("once", "off"))
    _bool("immediately", values.get("immediately", "off"))  # timing only: no effect here
    sector = _number("sector", values.get("sector", "-1"))
    rule.offset = -1 if sector == -1 else sector * SECTOR
    iotype = values.get("iotype")
    if iotype is not None:
        if iotype not in IO_TYPES:
            raise InvalidArgumentError(f"invalid parameter value: {iotype}")
        rule.io_types = frozenset((iotype,))
    return rule


def parse_config_text(text: str) -> list[tuple[str, dict[str, str]]]:
    """The sections of a QEMU config file: ('inject-error', {key: value}), ..."""
    sections: list[tuple[str, dict[str, str]]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        stripped = line.strip()
        if line.startswith("[") and stripped.endswith("]"):
            group = stripped[1:-1].split()[0] if stripped[1:-1].split() else ""
            if group not in _RULE_KEYS:
                raise InvalidArgumentError(f"There is no option group '{group}'")
            sections.append((group, {}))
            continue
        key, sep, value = stripped.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or len(value) < 2 or value[0] != '"' or value[-1] != '"':
            raise InvalidArgumentError("parse error")
        if not sections:
            raise InvalidArgumentError("no group defined")
        sections[-1][1][key] = value[1:-1]
    return sections


def _option_sections(options: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """inject-error.N.key / set-state.N.key options (or one unnumbered section)."""
    sections: list[tuple[str, dict[str, str]]] = []
    for group in _RULE_KEYS:
        numbered: dict[int, dict[str, str]] = {}
        single: dict[str, str] = {}
        for key, value in options.items():
            if not key.startswith(group + "."):
                continue
            rest = key[len(group) + 1 :]
            index, dot, sub = rest.partition(".")
            if dot and index.isdigit():
                numbered.setdefault(int(index), {})[sub] = value
            else:
                single[rest] = value
        if single and numbered:
            raise InvalidArgumentError(f"Unknown option '{sorted(single)[0]}' for [{group}]")
        if single:
            sections.append((group, single))
        for section_index in sorted(numbered):
            sections.append((group, numbered[section_index]))
    return sections


class Blkdebug:
    """The rules of one blkdebug node and its state machine; thread-safe."""

    def __init__(self, rules: list[Rule]):
        self._lock = threading.Lock()
        self.state = 1
        self._rules: dict[str, list[Rule]] = {}
        for rule in rules:  # QEMU keeps each event's rules newest first
            self._rules.setdefault(rule.event, []).insert(0, rule)
        self._active: list[Rule] = []

    @classmethod
    def load(cls, target: BlkdebugTarget) -> "Blkdebug":
        """The rules of the config file (read now), then those given as options."""
        sections: list[tuple[str, dict[str, str]]] = []
        if target.config is not None:
            try:
                with open(target.config, encoding="utf-8", errors="replace") as handle:
                    text = handle.read()
            except OSError as exc:
                raise Qcow2IOError(
                    exc.errno,
                    f"Could not read blkdebug config file: {exc.strerror}",
                    target.config,
                ) from None
            sections += parse_config_text(text)
        sections += _option_sections(target.rule_options)
        # QEMU adds every [inject-error] rule before any [set-state] one.
        ordered = [s for s in sections if s[0] == "inject-error"]
        ordered += [s for s in sections if s[0] == "set-state"]
        return cls([_rule(section, values) for section, values in ordered])

    def event(self, name: str) -> None:
        """An engine event: activate its inject-error rules, apply its set-state rules."""
        rules = self._rules.get(name)
        if not rules:
            return
        with self._lock:
            new_state = self.state
            activated = False
            for rule in rules:
                if rule.state and rule.state != self.state:
                    continue
                if rule.action == "inject-error":
                    if not activated:
                        self._active = []
                        activated = True
                    self._active.insert(0, rule)
                else:
                    new_state = rule.new_state
            self.state = new_state

    def check(self, offset: int, length: int, io_type: str) -> None:
        """Raise the first active rule's error if it covers this request."""
        if not self._active:
            return
        with self._lock:
            for rule in self._active:
                if io_type not in rule.io_types:
                    continue
                if rule.offset == -1 or (length and offset <= rule.offset < offset + length):
                    break
            else:
                return
            if not rule.errno:
                return
            if rule.once:
                self._active.remove(rule)
                self._rules[rule.event].remove(rule)
        raise Qcow2IOError(rule.errno, os.strerror(rule.errno))


class BlkdebugFile(HostFileFilter):
    """A host file seen through blkdebug: HostFile's interface, each request checked
    against the active rules first. The image above reports its events to `blkdebug`."""

    def __init__(self, file, blkdebug: Blkdebug, node_filename: str | None = None):
        super().__init__(file)
        self.blkdebug = blkdebug
        self.node_filename = node_filename  # QEMU's name of the node, where map shows it
        # the name of the node beneath an image format, which map shows for its data
        self.node_name: str | None = None
        # Whether anything was written since the last flush: QEMU's block layer does not
        # pass a flush on (nor fail it) when nothing was (write_gen == flushed_gen).
        self._unflushed = True

    def pread(self, length: int, offset: int) -> bytes:
        self.blkdebug.check(offset, length, "read")
        return self._file.pread(length, offset)

    def readinto(self, buf, offset: int) -> None:
        self.blkdebug.check(offset, len(buf), "read")
        self._file.readinto(buf, offset)

    def pwrite(self, data, offset: int) -> None:
        self.blkdebug.check(offset, memoryview(data).nbytes, "write")
        self._file.pwrite(data, offset)
        self._unflushed = True

    def pwritev(self, buffers: list, offset: int) -> None:
        total = sum(memoryview(b).nbytes for b in buffers)
        self.blkdebug.check(offset, total, "write")
        self._file.pwritev(buffers, offset)
        self._unflushed = True

    def flush(self) -> None:
        if not self._unflushed:
            return
        self.blkdebug.check(0, 0, "flush")
        self._file.flush()
        self._unflushed = False

    def punch_hole(self, offset: int, length: int) -> bool:
        self.blkdebug.check(offset, length, "discard")
        self._unflushed = True
        return self._file.punch_hole(offset, length)

    def truncate(self, length: int) -> None:
        self._unflushed = True
        self._file.truncate(length)

    def allocate(self, offset: int, length: int) -> None:
        self._unflushed = True
        self._file.allocate(offset, length)

    def data_run(self, offset: int, end: int) -> tuple[bool, int]:
        self.blkdebug.check(offset, end - offset, "block-status")
        return self._file.data_run(offset, end)


class BlkdebugDevice(FilterDevice):
    """blkdebug as a node of its own above `child` (json:{"driver": "blkdebug", ...}):
    the child's content, with the rules applied to reads, writes and block status (the
    query of a whole range fails first if a rule covers it, as QEMU's blkdebug answers
    before its child)."""

    format = "blkdebug"

    def __init__(self, child: BlockDevice, blkdebug: Blkdebug, filename: str):
        super().__init__(child, filename)
        self.blkdebug = blkdebug
        blkdebug.event("none")

    def intercept(self, kind: str, offset: int, length: int) -> None:
        self.blkdebug.check(offset, length, kind)


def _open_protocol_file(name: str, writable: bool):
    """The file beneath blkdebug: a host file (a "file:" prefix allowed), or another
    blkdebug: layer above one (only the top one hears the image's events, as in QEMU)."""
    from .hostfile import open_host_file

    if name.startswith("blkdebug:"):
        inner = parse_blkdebug_name(name)
        assert isinstance(inner.image, str)  # (a blkdebug: name's image is a file name)
        rules = Blkdebug.load(inner)
        file = BlkdebugFile(_open_protocol_file(inner.image, writable), rules)
        rules.event("none")
        return file
    if name.startswith("file:"):
        name = name[len("file:") :]
    if not name:
        raise InvalidArgumentError("The 'file' block driver requires a file name")
    return open_host_file(name, writable=writable)


def open_blkdebug(
    target: "BlkdebugTarget | str",
    mode: str,
    fmt: str | None,
    *,
    force_share: bool = False,
    passphrase=None,
    backing: bool = True,
    open_data_file: bool = True,
    cache: str = "writeback",
) -> BlockDevice:
    """Open a blkdebug node: with fmt "blkdebug" the node itself above its child (any
    device), else the image format `fmt` (probed when None) above blkdebug above the
    child's host file, the image reporting its events to the rules."""
    from . import chain
    from . import structs as S
    from .blockdev import RawDevice
    from .image import Qcow2Image
    from .nodes import is_node_name

    if isinstance(target, str):
        target = parse_blkdebug_name(target)
    rules = Blkdebug.load(target)
    if fmt == "blkdebug":
        child_target: chain.ImageTarget
        if isinstance(target.image, str):  # a file, or a node's name (null-co://, blkdebug:)
            child_target = target.image
            child_fmt = None if is_node_name(child_target) else "file"
        else:
            child_options = dict(target.image)
            child_options.setdefault("driver", "file")  # (a file name: QEMU's file protocol)
            child_target, child_fmt = chain.options_image_target(child_options, target.name)
        child = chain.open_image(
            child_target, mode, child_fmt, backing, force_share=force_share, cache=cache
        )
        name = target.json_name(None) if target.other_options else target.display_name()
        return BlkdebugDevice(child, rules, name)
    image = target.image
    if isinstance(image, dict):
        if image.get("driver", "file") not in chain.RAW_PROTOCOLS or "filename" not in image:
            raise InvalidArgumentError(
                f"qimg puts blkdebug beneath an image format only above a host file, "
                f"not '{image.get('driver')}'"
            )
        image = image["filename"]
    host = _open_protocol_file(image, mode == "r+")
    file = BlkdebugFile(host, rules)
    # QEMU names an image above a blkdebug node by that node's blkdebug:CONFIG:FILE name
    # (map too names it for a qcow2 image's data; raw passes through to the host file)
    if not target.other_options:
        file.node_name = target.display_name()
    probed = fmt is None
    try:
        rules.event("none")
        if probed:
            fmt = "qcow2" if file.pread(4, 0) == S.QCOW_MAGIC.to_bytes(4, "big") else "raw"
        name = target.json_name(fmt) if target.other_options else target.display_name()
        if fmt in ("raw", "file"):
            device = RawDevice(name, mode, force_share, probed, file=file)
            device.file.no_flush = cache == "unsafe"
            return device
        if fmt != "qcow2":
            raise InvalidArgumentError(f"Unknown driver '{fmt}'")
    except BaseException:
        host.close()
        raise
    own, backing_passphrase = chain._split_passphrase(passphrase)
    qcow2 = Qcow2Image(name, mode, force_share=force_share, passphrase=own, file=file)
    qcow2.file.no_flush = cache == "unsafe"
    return chain._finish_image(  # relative backing names resolve beside the host file
        qcow2,
        file.path,
        backing,
        force_share,
        backing_passphrase,
        open_data_file,
        (os.path.realpath(file.path),),
        None,
    )
