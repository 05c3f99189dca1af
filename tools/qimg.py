"""qimg: a drop-in replacement for `qemu-img` 7.2, built on qcow2lib.

Scripts and management tools drive qemu-img by its exact options, messages, exit codes
and output layout, so this module reproduces them: GNU getopt_long() argument handling
(permutation, abbreviations, error wording), QEMU's "-o name=value" option lists, its
messages prefixed with the program name taken from argv[0], and its JSON/human output
(including the hash-table key order of QEMU's JSON dicts). Every action is a qcow2lib
call; this module only parses arguments and prints.

Subcommands live in COMMANDS; each takes (cli, argv) with argv[0] the command name and
returns the exit code.
"""
from __future__ import annotations

import base64
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import qcow2lib
from qcow2lib import ImageLockedError, Qcow2Error
from qcow2lib.ops import (FORMATS, error_text, full_backing_filename, host_path, open_by_name,
                          virtual_size)
from qcow2lib.ops.info import ImageOpenError, image_info_list
from qcow2lib.sizes import INT64_MAX, SizeError, format_size, parse_number, parse_size

QIMG_VERSION = "0.1.0"
QEMU_VERSION = "7.2.22"
VERSION_TEXT = (f"qemu-img version {QEMU_VERSION} (qimg {QIMG_VERSION})\n"
                "qimg is built on qcow2lib; it is not part of the QEMU project.\n")

# (command, synopsis) in the order qemu-img's help lists them.
SYNOPSES = (
    ("amend", "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] "
              "[--force] -o options filename"),
    ("bench", "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] "
              "[-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] "
              "[-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename"),
    ("bitmap", "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | "
               "--disable)... [-b source_file [-F source_fmt]] [-g granularity] "
               "[--object objectdef] [--image-opts | -f fmt] filename bitmap"),
    ("check", "check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] "
              "[-r [leaks | all]] [-T src_cache] [-U] filename"),
    ("commit", "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] "
               "[-b base] [-r rate_limit] [-d] [-p] filename"),
    ("compare", "compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] "
                "[-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2"),
    ("convert", "convert [--object objectdef] [--image-opts] [--target-image-opts] "
                "[--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] "
                "[-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] "
                "[-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] "
                "[-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] "
                "output_filename"),
    ("create", "create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] "
               "[-u] [-o options] filename [size]"),
    ("dd", "dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] "
           "[skip=blocks] if=input of=output"),
    ("info", "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] "
             "[--backing-chain] [-U] filename"),
    ("map", "map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] "
            "[--max-length=len] [--output=ofmt] [-U] filename"),
    ("measure", "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | "
                "[--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]"),
    ("snapshot", "snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | "
                 "-c snapshot | -d snapshot] filename"),
    ("rebase", "rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] "
               "[-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename"),
    ("resize", "resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] "
               "[-q] [--shrink] filename [+ | -]size"),
)

HELP_INTRO = """\
usage: qemu-img [standard options] command [command options]
QEMU disk image utility

    '-h', '--help'       display this help and exit
    '-V', '--version'    output version information and exit
    '-T', '--trace'      [[enable=]<pattern>][,events=<file>][,file=<file>]
                         specify tracing options

Command syntax:
"""

HELP_PARAMETERS = """\

Command parameters:
  'filename' is a disk image filename
  'objectdef' is a QEMU user creatable object definition. See the qemu(1)
    manual page for a description of the object properties. The most common
    object type is a 'secret', which is used to supply passwords and/or
    encryption keys.
  'fmt' is the disk image format. It is guessed automatically in most cases
  'cache' is the cache mode used to write the output disk image, the valid
    options are: 'none', 'writeback' (default, except for convert), 'writethrough',
    'directsync' and 'unsafe' (default for convert)
  'src_cache' is the cache mode used to read input disk images, the valid
    options are the same as for the 'cache' option
  'size' is the disk image size in bytes. Optional suffixes
    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),
    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are
    supported. 'b' is ignored.
  'output_filename' is the destination disk image filename
  'output_fmt' is the destination format
  'options' is a comma separated list of format specific options in a
    name=value format. Use -o help for an overview of the options supported by
    the used format
  'snapshot_param' is param used for internal snapshot, format
    is 'snapshot.id=[ID],snapshot.name=[NAME]', or
    '[ID_OR_NAME]'
  '-c' indicates that target image must be compressed (qcow format only)
  '-u' allows unsafe backing chains. For rebasing, it is assumed that old and
       new backing file match exactly. The image doesn't need a working
       backing file before rebasing in this case (useful for renaming the
       backing file). For image creation, allow creating without attempting
       to open the backing file.
  '-h' with or without a command shows this help and lists the supported formats
  '-p' show progress of command (only certain commands)
  '-q' use Quiet mode - do not print any output (except errors)
  '-S' indicates the consecutive number of bytes (defaults to 4k) that must
       contain only zeros for qemu-img to create a sparse image during
       conversion. If the number of bytes is 0, the source will not be scanned for
       unallocated or zero sectors, and the destination image will always be
       fully allocated
  '--output' takes the format in which the output must be done (human or json)
  '-n' skips the target volume creation (useful if the volume is created
       prior to running qemu-img)

Parameters to bitmap subcommand:
  'bitmap' is the name of the bitmap to manipulate, through one or more
       actions from '--add', '--remove', '--clear', '--enable', '--disable',
       or '--merge source'
  '-g granularity' sets the granularity for '--add' actions
  '-b source' and '-F src_fmt' tell '--merge' actions to find the source
       bitmaps from an alternative file

Parameters to check subcommand:
  '-r' tries to repair any inconsistencies that are found during the check.
       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all
       kinds of errors, with a higher risk of choosing the wrong fix or
       hiding corruption that has already occurred.

Parameters to convert subcommand:
  '--bitmaps' copies all top-level persistent bitmaps to destination
  '-m' specifies how many coroutines work in parallel during the convert
       process (defaults to 8)
  '-W' allow to write to the target out of order rather than sequential

Parameters to snapshot subcommand:
  'snapshot' is the name of the snapshot to create, apply or delete
  '-a' applies a snapshot (revert disk to saved state)
  '-c' creates a snapshot
  '-d' deletes a snapshot
  '-l' lists all snapshots in the given image

Parameters to compare subcommand:
  '-f' first image format
  '-F' second image format
  '-s' run in Strict mode - fail on different image size or sector allocation

Parameters to dd subcommand:
  'bs=BYTES' read and write up to BYTES bytes at a time (default: 512)
  'count=N' copy only N input blocks
  'if=FILE' read from FILE
  'of=FILE' write to FILE
  'skip=N' skip N bs-sized blocks at the start of input
"""

HELP_BOTTOM = "Report qimg bugs to the qcow2lib project; qimg is not maintained by QEMU.\n"


# --- process plumbing ----------------------------------------------------------------------

class CliExit(Exception):
    """Ends the command with an exit code (qemu-img calls exit() from deep inside)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class Cli:
    """Output channels and qemu-img's message conventions for one invocation."""

    def __init__(self, prog: str):
        self.prog = prog
        self.secrets: dict[str, bytes] = {}  # --object secret,id=ID,... values

    def out(self, text: str) -> None:
        """Write to the current stdout (looked up each time, so capturing works)."""
        sys.stdout.write(text)

    def error_report(self, message: str) -> None:
        """One error line prefixed with the program name, like QEMU's error_report()."""
        sys.stderr.write(f"{self.prog}: {message}\n")

    def warn_report(self, message: str) -> None:
        """A warning line; qemu-img goes on after it."""
        sys.stderr.write(f"{self.prog}: warning: {message}\n")

    def error_exit(self, message: str) -> NoReturn:
        """A usage error: the message, the pointer to --help, exit status 1."""
        self.error_report(message)
        sys.stderr.write("Try 'qemu-img --help' for more information\n")
        raise CliExit(1)

    def help(self) -> NoReturn:
        """qemu-img's full help (any -h, global or per command), then exit status 0."""
        syntax = "".join(f"  {synopsis}\n" for _, synopsis in SYNOPSES)
        formats = "".join(f" {name}" for name in FORMATS)
        self.out(f"{VERSION_TEXT}{HELP_INTRO}{syntax}{HELP_PARAMETERS}\n"
                 f"Supported formats:{formats}\n\n{HELP_BOTTOM}")
        raise CliExit(0)

    def option_error(self, getopt: "GetoptLong", code: str) -> NoReturn:
        """Report a getopt error (':' missing argument, '?' unknown) as qemu-img does."""
        culprit = getopt.argv[getopt.optind - 1]
        if code == ":":
            self.error_exit(f"missing argument for option '{culprit}'")
        self.error_exit(f"unrecognized option '{culprit}'")

    def unsupported(self, what: str) -> NoReturn:
        """Refuse a qemu-img feature qimg does not implement yet, plainly and with status 1."""
        self.error_report(f"{what} is not supported yet")
        raise CliExit(1)


# --- GNU getopt_long() -----------------------------------------------------------------------

@dataclass(frozen=True)
class LongOpt:
    """One entry of getopt_long()'s option table; `val` is what next() returns for it."""
    name: str
    has_arg: bool
    val: str


class GetoptLong:
    """glibc's getopt_long(), including the argv permutation qemu-img's messages expose.

    qemu-img reports errors with argv[optind - 1], so which argument gets blamed depends
    on glibc's exact optind bookkeeping (e.g. "-xU" blames the argument before it); this
    class keeps the same state. next() returns the option character or long option value,
    ':' for a missing argument, '?' for an unknown option, None at the end; self.argv is
    permuted in place so that non-options end up from self.optind on.
    """

    def __init__(self, argv: list[str], shortopts: str, longopts: tuple[LongOpt, ...] = ()):
        self.argv = list(argv)
        self.optind = 1
        self.optarg: str | None = None
        self._longopts = longopts
        self._nextchar = ""
        self._first_nonopt = self._last_nonopt = 1
        self._require_order = shortopts.startswith("+") or "POSIXLY_CORRECT" in os.environ
        self._shortopts = shortopts[1:] if shortopts.startswith("+") else shortopts
        self._colon = self._shortopts.startswith(":")

    @staticmethod
    def _nonoption(arg: str) -> bool:
        return not arg.startswith("-") or arg == "-"

    def _exchange(self) -> None:
        bottom, middle, top = self._first_nonopt, self._last_nonopt, self.optind
        self.argv[bottom:top] = self.argv[middle:top] + self.argv[bottom:middle]
        self._first_nonopt += top - middle
        self._last_nonopt = top

    def next(self) -> str | None:
        """The next option (see the class docstring); sets optarg for options with one."""
        self.optarg = None
        argv, argc = self.argv, len(self.argv)
        if not self._nextchar:
            self._last_nonopt = min(self._last_nonopt, self.optind)
            self._first_nonopt = min(self._first_nonopt, self.optind)
            if not self._require_order:
                if self._first_nonopt != self._last_nonopt and self._last_nonopt != self.optind:
                    self._exchange()
                elif self._last_nonopt != self.optind:
                    self._first_nonopt = self.optind
                while self.optind < argc and self._nonoption(argv[self.optind]):
                    self.optind += 1
                self._last_nonopt = self.optind
            if self.optind != argc and argv[self.optind] == "--":
                self.optind += 1
                if self._first_nonopt != self._last_nonopt and self._last_nonopt != self.optind:
                    self._exchange()
                elif self._first_nonopt == self._last_nonopt:
                    self._first_nonopt = self.optind
                self._last_nonopt = argc
                self.optind = argc
            if self.optind == argc:
                if self._first_nonopt != self._last_nonopt:
                    self.optind = self._first_nonopt
                return None
            if self._nonoption(argv[self.optind]):
                return None  # only reached in REQUIRE_ORDER mode
            if argv[self.optind].startswith("--"):
                return self._long_option(argv[self.optind][2:])
            self._nextchar = argv[self.optind][1:]
        char, self._nextchar = self._nextchar[0], self._nextchar[1:]
        if not self._nextchar:
            self.optind += 1
        pos = self._shortopts.find(char)
        if pos < 0 or char in ":;":
            return "?"
        if self._shortopts[pos + 1:pos + 2] == ":":
            if self._nextchar:
                self.optarg = self._nextchar
                self.optind += 1
            elif self.optind == argc:
                char = ":" if self._colon else "?"
            else:
                self.optarg = argv[self.optind]
                self.optind += 1
            self._nextchar = ""
        return char

    def _long_option(self, text: str) -> str:
        name, eq, value = text.partition("=")
        found = next((opt for opt in self._longopts if opt.name == name), None)
        if found is None:
            candidates = [opt for opt in self._longopts if opt.name.startswith(name)]
            if candidates and any((opt.has_arg, opt.val) != (candidates[0].has_arg,
                                                             candidates[0].val)
                                  for opt in candidates[1:]):
                self.optind += 1
                return "?"  # ambiguous abbreviation
            found = candidates[0] if candidates else None
        self.optind += 1
        if found is None:
            return "?"
        if eq:
            if not found.has_arg:
                return "?"
            self.optarg = value
        elif found.has_arg:
            if self.optind >= len(self.argv):
                return ":" if self._colon else "?"
            self.optarg = self.argv[self.optind]
            self.optind += 1
        return found.val


# --- QEMU's JSON and human dict output ------------------------------------------------------

def _tdb_hash(key: str) -> int:
    data = key.encode("utf-8", "surrogateescape")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_items(d: dict) -> list[tuple[str, Any]]:
    """The items of `d` (filled in QEMU's insertion order) in QDict iteration order.

    QEMU stores dicts in a 512-bucket hash table, each bucket a list with the newest
    entry first, and prints them bucket by bucket; scripts diffing output see that order.
    """
    buckets: dict[int, list[tuple[str, Any]]] = {}
    for key, value in d.items():
        buckets.setdefault(_tdb_hash(key) % 512, []).insert(0, (key, value))
    return [item for bucket in sorted(buckets) for item in buckets[bucket]]


def _codepoints(data: bytes):
    """Decode like QEMU's mod_utf8_codepoint(): invalid sequences yield -1, byte-wise."""
    i = 0
    while i < len(data):
        byte = data[i]
        i += 1
        if byte < 0x80:
            yield byte
            continue
        if byte >= 0xFE or not byte & 0x40:
            yield -1
            continue
        length = 0
        mask = 0x80
        while byte & mask:
            length += 1
            mask >>= 1
        cp = byte & (mask - 1)
        for _ in range(1, length):
            if i >= len(data) or data[i] & 0xC0 != 0x80:
                cp = -1
                break
            cp = (cp << 6) | (data[i] & 0x3F)
            i += 1
        else:
            min_cp = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
            if cp > 0x10FFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE \
                    or 0xD800 <= cp <= 0xDFFF or (cp < min_cp and not (cp == 0 and length == 2)):
                cp = -1
        yield cp


_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r",
            0x09: "\\t"}


def _json_string(text: str) -> str:
    parts = ['"']
    for cp in _codepoints(text.encode("utf-8", "surrogateescape")):
        if cp in _ESCAPES:
            parts.append(_ESCAPES[cp])
            continue
        if cp < 0:
            cp = 0xFFFD
        if cp > 0xFFFF:
            parts.append("\\u%04X\\u%04X" % (0xD800 + ((cp - 0x10000) >> 10),
                                             0xDC00 + ((cp - 0x10000) & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            parts.append("\\u%04X" % cp)
        else:
            parts.append(chr(cp))
    parts.append('"')
    return "".join(parts)


def qemu_json(value: Any, depth: int = 0) -> str:
    """Pretty JSON exactly as qemu-img prints it (4-space indent, QDict key order)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _json_string(value)
    pad = "\n" + " " * 4 * (depth + 1)
    if isinstance(value, dict):
        members = [f"{_json_string(k)}: {qemu_json(v, depth + 1)}" for k, v in qdict_items(value)]
        opening, closing = "{", "}"
    else:
        members = [qemu_json(v, depth + 1) for v in value]
        opening, closing = "[", "]"
    body = "".join(("," if i else "") + pad + member for i, member in enumerate(members))
    return f"{opening}{body}\n{' ' * 4 * depth}{closing}"


def dump_qobject(value: Any, indent: int) -> str:
    """QEMU's human rendering of a nested dict/list ("Format specific information")."""
    lines = []
    items = ([(key.replace("-", " "), v) for key, v in qdict_items(value)]
             if isinstance(value, dict) else [(f"[{i}]", v) for i, v in enumerate(value)])
    for label, item in items:
        if isinstance(item, (dict, list)):
            lines.append(f"{' ' * 4 * indent}{label}:\n{dump_qobject(item, indent + 1)}")
        else:
            text = ("true" if item else "false") if isinstance(item, bool) else str(item)
            lines.append(f"{' ' * 4 * indent}{label}: {text}\n")
    return "".join(lines)


# --- "-o" option lists -----------------------------------------------------------------------

@dataclass(frozen=True)
class OptDesc:
    """One creation option as qemu-img declares it: name, type, help, default."""
    name: str
    kind: str  # "str", "bool", "num" or "size"
    help: str
    default: str | None = None


_KIND_LABEL = {"str": "str", "bool": "bool (on/off)", "num": "num", "size": "size"}
_SIZE_OPT = OptDesc("size", "size", "Virtual disk size")

QCOW2_CREATE_OPTS = (
    OptDesc("encryption", "bool", "Encrypt the image with format 'aes'. (Deprecated in favor "
                                  "of encrypt.format=aes)"),
    OptDesc("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    OptDesc("encrypt.key-secret", "str", "ID of secret providing qcow AES key or LUKS passphrase"),
    OptDesc("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    OptDesc("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    OptDesc("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    OptDesc("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    OptDesc("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    OptDesc("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
    OptDesc("cluster_size", "size", "qcow2 cluster size", "65536"),
    OptDesc("extended_l2", "bool", "Extended L2 tables", "off"),
    OptDesc("preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, "
                                    "full)"),
    OptDesc("compression_type", "str", "Compression method used for image cluster compression",
            "zlib"),
    _SIZE_OPT,
    OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "str", "File name of a base image"),
    OptDesc("backing_fmt", "str", "Image format of the base image"),
    OptDesc("data_file", "str", "File name of an external data file"),
    OptDesc("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    OptDesc("refcount_bits", "num", "Width of a reference count entry in bits", "16"),
)
RAW_CREATE_OPTS = (_SIZE_OPT,)
# Options of the host file (QEMU's "file" protocol) that every image format inherits.
FILE_CREATE_OPTS = (
    _SIZE_OPT,
    OptDesc("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
    OptDesc("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
    OptDesc("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
)
FORMAT_CREATE_OPTS = {"qcow2": QCOW2_CREATE_OPTS, "raw": RAW_CREATE_OPTS}

# QEMU's block driver names: the values its create path accepts for backing_fmt with -u.
BLOCKDEV_DRIVERS = frozenset((
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps",
    "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs",
    "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
    "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc",
    "vvfat"))
PREALLOC_MODES = ("off", "metadata", "falloc", "full")
UINT32_MAX = (1 << 32) - 1


class CreateError(Exception):
    """A failure of image creation: qemu-img prints "<prog>: <file>: <message>" + hint."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


def valid_option_list(text: str) -> bool:
    """Whether several -o arguments can be joined with ',' without changing meaning."""
    if not text or text.startswith(","):
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def split_option_list(params: str) -> list[tuple[str, str, bool]]:
    """Split "a=b,,c,flag,nofoo" into (name, value, is_help) as QEMU's option parser does.

    ",," inside a value is a literal comma; a bare "flag" means flag=on, "noflag" means
    flag=off, and a bare "help" or "?" asks for the option list.
    """
    items = []
    pos = 0
    while pos < len(params):
        end = pos
        while end < len(params) and params[end] not in "=,":
            end += 1
        if end < len(params) and params[end] == "=":
            name = params[pos:end]
            value_parts = []
            pos = end + 1
            while True:
                comma = params.find(",", pos)
                if comma < 0:
                    comma = len(params)
                if params[comma + 1:comma + 2] == ",":
                    value_parts.append(params[pos:comma + 1])
                    pos = comma + 2
                    continue
                value_parts.append(params[pos:comma])
                pos = comma
                break
            items.append((name, "".join(value_parts), False))
        else:
            name = params[pos:end]
            pos = end
            if name.startswith("no"):
                items.append((name[2:], "off", False))
            else:
                items.append((name, "on", name in ("help", "?")))
        if pos < len(params):
            pos += 1  # the ',' separating this option from the next
    return items


def _int64(value: int) -> int:
    return value - (1 << 64) if value > INT64_MAX else value


class CreateOptions:
    """A set of -o values checked against the format's option table (QEMU's QemuOpts)."""

    def __init__(self, descs: tuple[OptDesc, ...], warn: Callable[[str], None]):
        self.descs = {desc.name: desc for desc in descs}
        self._warn = warn
        self._values: dict[str, tuple[str, Any]] = {}
        self._from_text: set[str] = set()

    def set(self, name: str, text: str) -> None:
        """Set an option from text, parsed per its type; errors carry QEMU's wording."""
        desc = self.descs.get(name)
        if desc is None:
            raise CreateError(f"Invalid parameter '{name}'")
        if desc.kind == "bool":
            if text in ("on", "yes", "true", "y"):
                parsed: Any = True
            elif text in ("off", "no", "false", "n"):
                parsed = False
            else:
                raise CreateError(f"Parameter '{name}' expects 'on' or 'off'")
        elif desc.kind == "num":
            try:
                parsed = parse_number(text)
            except SizeError as exc:
                if exc.out_of_range:
                    raise CreateError(f"Value '{text}' is too large for parameter '{name}'") \
                        from None
                raise CreateError(f"Parameter '{name}' expects a number") from None
        elif desc.kind == "size":
            try:
                parsed = parse_size(text, warn=self._warn)
            except SizeError as exc:
                if exc.out_of_range:
                    raise CreateError(f"Value '{text}' is out of range for parameter "
                                      f"'{name}'") from None
                raise CreateError(f"Parameter '{name}' expects a non-negative number below 2^64",
                                  "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                                  "tera-, peta-\nand exabytes, respectively.\n") from None
        else:
            parsed = text
        self._values[name] = (text, parsed)
        self._from_text.add(name)

    def set_number(self, name: str, value: int) -> None:
        """Set a size option from a number (the size argument, a backing file's size)."""
        self._values[name] = (str(_int64(value)), value & ((1 << 64) - 1))
        self._from_text.discard(name)

    def reparse(self, name: str) -> None:
        """Parse a size given as text once more, as QEMU does when it passes options on.

        Only observable through the deprecation warning for hex sizes with a suffix,
        which qemu-img repeats once per parse.
        """
        if name in self._from_text and self.descs[name].kind == "size":
            parse_size(self._values[name][0], warn=self._warn)

    def is_set(self, name: str) -> bool:
        """Whether the option was given (defaults do not count)."""
        return name in self._values

    def names(self) -> list[str]:
        """The options that were set, first-set first."""
        return list(self._values)

    def get(self, name: str) -> str | None:
        """The text given for an option, else its default text, else None."""
        if name in self._values:
            return self._values[name][0]
        desc = self.descs.get(name)
        return desc.default if desc else None

    def value(self, name: str) -> Any:
        """The parsed value of an option (its default parsed when unset), or None."""
        if name in self._values:
            return self._values[name][1]
        text = self.get(name)
        if text is None:
            return None
        kind = self.descs[name].kind
        if kind == "bool":
            return text == "on"
        return int(text) if kind in ("num", "size") else text

    def render(self) -> str:
        """The "name=value ..." part of qemu-img's "Formatting" line, in table order."""
        parts = []
        for name, desc in self.descs.items():
            text = self.get(name)
            if text is None:
                continue
            if desc.kind == "str":
                parts.append(f"{name}={text.replace(',', ',,')}")
            elif desc.kind in ("num", "size") and self.is_set(name):
                parts.append(f"{name}={_int64(self._values[name][1])}")
            else:
                parts.append(f"{name}={text}")
        return " ".join(parts)


def merged_create_opts(fmt: str) -> tuple[OptDesc, ...]:
    """The format's options followed by the host file's, the format winning on a clash."""
    descs = list(FORMAT_CREATE_OPTS[fmt])
    names = {desc.name for desc in descs}
    descs += [desc for desc in FILE_CREATE_OPTS if desc.name not in names]
    return tuple(descs)


def option_help_lines(descs: tuple[OptDesc, ...]) -> str:
    """The option table of `create -o help`: one aligned line per option, sorted."""
    lines = []
    for desc in descs:
        line = f"  {desc.name}=<{_KIND_LABEL[desc.kind]}>"
        lines.append(f"{line:<24} - {desc.help}")
    return "".join(f"{line}\n" for line in sorted(lines, key=lambda s: s.encode()))


# --- create ----------------------------------------------------------------------------------

def print_create_option_help(cli: Cli, filename: str | None, fmt: str) -> int:
    """`create -o help`: the options of the format (and of the host file, given a name)."""
    if fmt not in FORMAT_CREATE_OPTS:
        cli.error_report(f"Unknown file format '{fmt}'")
        return 1
    if filename is None:
        cli.out(f"Supported {fmt} options:\n{option_help_lines(FORMAT_CREATE_OPTS[fmt])}\n"
                "The protocol level may support further options.\n"
                "Specify the target filename to include those options.\n")
        return 0
    try:
        host_path(filename)
    except Qcow2Error as exc:
        cli.error_report(error_text(exc))
        return 1
    cli.out(f"Supported options:\n{option_help_lines(merged_create_opts(fmt))}")
    return 0


def _open_backing(filename: str, backing_file: str, backing_fmt: str | None):
    """Open the backing chain a new image will use (qemu-img checks it and takes its size)."""
    hint = "Could not open backing image.\n"
    try:
        full = full_backing_filename(filename, backing_file)
    except Qcow2Error as exc:
        raise CreateError(error_text(exc)) from exc
    try:
        return open_by_name(full, backing_fmt, force_share=True)
    except Qcow2Error as exc:
        raise CreateError(error_text(exc), hint) from exc


def _qcow2_arguments(opts: CreateOptions) -> dict:
    """Turn checked -o values into qcow2lib.create() arguments.

    This is the string-to-type step of QEMU's qcow2 creation, with its messages and in its
    order; semantic checks (cluster size, version conflicts, ...) are qcow2lib's.
    """
    encryption = opts.get("encryption") if opts.is_set("encryption") else None
    if encryption == "off":
        encryption = None
    if encryption is not None and opts.is_set("encrypt.format"):
        raise CreateError("'encrypt.format' and its alias 'encryption' can't be used at the "
                          "same time")
    opts.reparse("extent_size_hint")
    hint_size = opts.value("extent_size_hint")
    if hint_size is not None and hint_size > UINT32_MAX:
        raise CreateError("Extent size hint is too large")
    opts.reparse("size")
    compat = opts.get("compat")
    versions = {None: "1.1", "0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}
    if compat not in versions:
        raise CreateError(f"Parameter 'version' does not accept value '{compat}'")
    backing_fmt = opts.get("backing_fmt")
    if backing_fmt is not None and backing_fmt not in BLOCKDEV_DRIVERS:
        raise CreateError(f"Parameter 'backing-fmt' does not accept value '{backing_fmt}'")
    if encryption is not None or any(opts.is_set(name) for name in opts.descs
                                     if name.startswith("encrypt.")):
        raise CreateError("Image encryption is not supported by qimg yet")
    opts.reparse("cluster_size")
    preallocation = opts.get("preallocation") or "off"
    if preallocation not in PREALLOC_MODES:
        raise CreateError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    try:
        refcount_bits = parse_number(opts.get("refcount_bits"), signed=True)
    except SizeError:
        raise CreateError("Parameter 'refcount-bits' expects integer") from None
    compression_type = opts.get("compression_type")
    if compression_type not in ("zlib", "zstd"):
        raise CreateError(f"Parameter 'compression-type' does not accept value "
                          f"'{compression_type}'")
    return {
        "fmt": "qcow2",
        "cluster_size": opts.value("cluster_size"),
        "compat": versions[compat],
        "backing_file": opts.get("backing_file"),
        "backing_fmt": backing_fmt,
        "refcount_bits": refcount_bits,
        "lazy_refcounts": opts.value("lazy_refcounts"),
        "extended_l2": opts.value("extended_l2"),
        "preallocation": preallocation,
        "data_file": opts.get("data_file"),
        "data_file_raw": bool(opts.value("data_file_raw")),
        "compression_type": compression_type,
    }


def _raw_arguments(opts: CreateOptions) -> dict:
    """Turn checked -o values into qcow2lib.create() arguments for a raw image."""
    for name, _ in qdict_items(dict.fromkeys(opts.names())):  # QEMU passes them on in a QDict
        opts.reparse(name)
    preallocation = opts.get("preallocation") or "off"
    if preallocation not in PREALLOC_MODES:
        raise CreateError(f"invalid parameter value: {preallocation}")
    hint_size = opts.value("extent_size_hint")
    if hint_size is not None and hint_size > UINT32_MAX:
        raise CreateError("Extent size hint is too large")
    return {"fmt": "raw", "preallocation": preallocation}


def img_create(cli: Cli, filename: str, fmt: str, base_filename: str | None,
               base_fmt: str | None, options: str | None, img_size: int | None,
               unsafe: bool, quiet: bool) -> None:
    """Everything `qemu-img create` does after reading its arguments; raises CreateError."""
    if fmt not in FORMAT_CREATE_OPTS:
        raise CreateError(f"Unknown file format '{fmt}'")
    try:
        path = host_path(filename)
    except Qcow2Error as exc:
        raise CreateError(error_text(exc)) from exc
    opts = CreateOptions(merged_create_opts(fmt), cli.warn_report)
    for name, value, _ in split_option_list(options or ""):
        if name != "id":
            opts.set(name, value)
    if not opts.is_set("size"):
        opts.set_number("size", -1 if img_size is None else img_size)
    elif img_size is not None:
        raise CreateError("The image size must be specified only once")
    if base_filename is not None:
        if "backing_file" not in opts.descs:
            raise CreateError(f"Backing file not supported for file format '{fmt}'")
        opts.set("backing_file", base_filename)
    if base_fmt is not None:
        if "backing_fmt" not in opts.descs:
            raise CreateError(f"Backing file format not supported for file format '{fmt}'")
        opts.set("backing_fmt", base_fmt)

    backing_file = opts.get("backing_file")
    if backing_file is not None:
        if backing_file == filename:
            raise CreateError("Error: Trying to create an image with the same filename as the "
                              "backing file")
        if backing_file == "":
            raise CreateError("Expected backing file name, got empty string")
    backing_fmt = opts.get("backing_fmt")
    size = _int64(opts.value("size"))
    if backing_file is not None and not unsafe:
        with _open_backing(filename, backing_file, backing_fmt) as backing:
            if backing_fmt is None:
                raise CreateError("Backing file specified without backing format",
                                  f"Detected format of {backing.format}.")
            if size == -1:
                size = virtual_size(backing)
                opts.set_number("size", size)
    elif backing_file is not None and backing_fmt is None:
        raise CreateError("Backing file specified without backing format")
    if size == -1:
        raise CreateError("Image creation needs a size parameter")

    if not quiet:
        cli.out(f"Formatting '{filename}', fmt={fmt} {opts.render()}\n")
        sys.stdout.flush()
    arguments = _qcow2_arguments(opts) if fmt == "qcow2" else _raw_arguments(opts)
    size = (size + 511) // 512 * 512  # QEMU rounds every new image up to whole sectors
    try:
        qcow2lib.create(path, size, **arguments)
    except ImageLockedError as exc:
        raise CreateError(error_text(exc), f"Is another process using the image [{path}]?\n") \
            from exc
    except Qcow2Error as exc:
        raise CreateError(error_text(exc)) from exc


def cmd_create(cli: Cli, argv: list[str]) -> int:
    """`create`: read the arguments, then img_create() or the -o help listing."""
    fmt = "raw"
    base_fmt = base_filename = options = None
    quiet = unsafe = False
    getopt = GetoptLong(argv, ":F:b:f:ho:qu",
                        (LongOpt("help", False, "h"), LongOpt("object", True, "object")))
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "F":
            base_fmt = getopt.optarg
        elif c == "b":
            base_filename = getopt.optarg
        elif c == "f":
            fmt = getopt.optarg
        elif c == "o":
            if not valid_option_list(getopt.optarg):
                cli.error_report(f"Invalid option list: {getopt.optarg}")
                return 1
            options = getopt.optarg if options is None else f"{options},{getopt.optarg}"
        elif c == "q":
            quiet = True
        elif c == "u":
            unsafe = True
        elif c == "object":
            cli.unsupported("--object")
    argv, optind = getopt.argv, getopt.optind
    filename = argv[optind] if optind < len(argv) else None
    if options is not None and any(is_help for _, _, is_help in split_option_list(options)):
        return print_create_option_help(cli, filename, fmt)
    if filename is None:
        cli.error_exit("Expecting image file name")
    optind += 1
    img_size = None
    if optind < len(argv):
        img_size = cvtnum(cli, "image size", argv[optind])
        if img_size is None:
            return 1
        optind += 1
    if optind != len(argv):
        cli.error_exit(f"Unexpected argument: {argv[optind]}")
    try:
        img_create(cli, filename, fmt, base_filename, base_fmt, options, img_size, unsafe, quiet)
    except CreateError as exc:
        sys.stderr.write(f"{cli.prog}: {filename}: {exc.message}\n{exc.hint}")
        return 1
    return 0


def cvtnum(cli: Cli, name: str, text: str) -> int | None:
    """Parse a size argument, reporting errors as qemu-img does; None after an error."""
    try:
        value = parse_size(text, warn=cli.warn_report)
    except SizeError as exc:
        if not exc.out_of_range:
            cli.error_report(f"Invalid {name} specified. You may use k, M, G, T, P or E "
                             "suffixes for")
            cli.error_report("kilobytes, megabytes, gigabytes, terabytes, petabytes and "
                             "exabytes.")
            return None
        value = INT64_MAX + 1
    if value > INT64_MAX:
        cli.error_report(f"Invalid {name} specified. Must be between 0 and {INT64_MAX}.")
        return None
    return value


# --- info ------------------------------------------------------------------------------------

def _ljust(text: str, width: int) -> str:
    """Left-justify to a width in bytes, as C's printf("%-Ns") pads UTF-8 text."""
    return text + " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))


def human_snapshot_table(snapshots: list[dict]) -> str:
    """The "Snapshot list:" table of `qemu-img info` / `qemu-img snapshot -l`."""
    lines = ["%-10s%-17s%8s%20s%13s%11s\n" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK",
                                               "ICOUNT")]
    for snap in snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["date-sec"]))
        secs = snap["vm-clock-sec"]
        clock = "%02d:%02d:%02d.%03d" % (secs // 3600, secs // 60 % 60, secs % 60,
                                         snap["vm-clock-nsec"] // 1_000_000 % 1000)
        icount = str(snap["icount"]) if "icount" in snap else ""
        lines.append(f"{_ljust(snap['id'], 9)} {_ljust(snap['name'], 16)} "
                     f"{format_size(snap['vm-state-size']):>8}{date:>20}{clock:>13}"
                     f"{icount:>11}\n")
    return "".join(lines)


def human_image_info(info: dict) -> str:
    """One image of `qemu-img info` in human form."""
    text = (f"image: {info['filename']}\n"
            f"file format: {info['format']}\n"
            f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)\n"
            f"disk size: {format_size(info['actual-size'])}\n")
    if info.get("encrypted"):
        text += "encrypted: yes\n"
    if "cluster-size" in info:
        text += f"cluster_size: {info['cluster-size']}\n"
    if info.get("dirty-flag"):
        text += "cleanly shut down: no\n"
    if "backing-filename" in info:
        backing, full = info["backing-filename"], info["full-backing-filename"]
        text += f"backing file: {backing}"
        if full != backing:
            text += f" (actual path: {full})"
        text += "\n"
        if "backing-filename-format" in info:
            text += f"backing file format: {info['backing-filename-format']}\n"
    if "snapshots" in info:
        text += "Snapshot list:\n" + human_snapshot_table(info["snapshots"])
    if "format-specific" in info:
        text += "Format specific information:\n"
        text += dump_qobject(info["format-specific"]["data"], 1)
    return text


def cmd_info(cli: Cli, argv: list[str]) -> int:
    """`info`: the image (and with --backing-chain its backing files) in human or JSON form."""
    fmt = output = None
    chain = force_share = image_opts = False
    getopt = GetoptLong(argv, ":f:hU", (
        LongOpt("help", False, "h"), LongOpt("format", True, "f"),
        LongOpt("output", True, "output"), LongOpt("backing-chain", False, "backing-chain"),
        LongOpt("object", True, "object"), LongOpt("image-opts", False, "image-opts"),
        LongOpt("force-share", False, "U")))
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = getopt.optarg
        elif c == "output":
            output = getopt.optarg
        elif c == "backing-chain":
            chain = True
        elif c == "object":
            cli.unsupported("--object")
        elif c == "image-opts":
            image_opts = True
        elif c == "U":
            force_share = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if output not in (None, "json", "human"):
        cli.error_report("--output must be used with human or json as argument.")
        return 1
    if image_opts:
        cli.unsupported("--image-opts")
    try:
        infos = image_info_list(filename, fmt, chain, force_share)
    except ImageOpenError as exc:
        cli.error_report(str(exc))
        sys.stderr.write(exc.hint)
        return 1
    except Qcow2Error as exc:
        cli.error_report(error_text(exc))
        return 1
    if output == "json":
        cli.out(qemu_json(infos if chain else infos[0]) + "\n")
    else:
        cli.out("\n".join(human_image_info(info) for info in infos))
    return 0


def cmd_check(cli: Cli, argv: list[str]) -> int:
    """`check`: consistency check, optionally repairing (-r leaks|all), as qemu-img check."""
    from qcow2lib.check import check_path, format_check_human, format_check_json

    fmt = output = repair = None
    quiet = force_share = image_opts = False
    getopt = GetoptLong(argv, ":hf:r:T:qU", (
        LongOpt("help", False, "h"), LongOpt("format", True, "f"),
        LongOpt("repair", True, "r"), LongOpt("output", True, "output"),
        LongOpt("object", True, "object"), LongOpt("image-opts", False, "image-opts"),
        LongOpt("force-share", False, "U")))
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = getopt.optarg
        elif c == "r":
            if getopt.optarg not in ("leaks", "all"):
                cli.error_exit(f"Unknown option value for -r (expecting 'leaks' or 'all'): "
                               f"{getopt.optarg}")
            repair = getopt.optarg
        elif c == "output":
            output = getopt.optarg
        elif c == "q":
            quiet = True
        elif c == "U":
            force_share = True
        elif c == "object":
            cli.unsupported("--object")
        elif c == "image-opts":
            image_opts = True
        # -T src_cache: accepted and ignored (qimg has no cache modes)
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if output not in (None, "json", "human"):
        cli.error_report("--output must be used with human or json as argument.")
        return 1
    if image_opts:
        cli.unsupported("--image-opts")
    report = check_path(filename, repair, fmt, force_share, prog=cli.prog)
    for line in report.messages:
        sys.stderr.write(line + "\n")
    if not quiet:
        cli.out(format_check_json(report) if output == "json" else format_check_human(report))
    if report.error:
        cli.error_report(report.error)
    return report.exit_code


def cmd_snapshot(cli: Cli, argv: list[str]) -> int:
    """`snapshot`: list (-l), create (-c), apply (-a) or delete (-d) internal snapshots."""
    from qcow2lib import snapshots as snaps
    from qcow2lib.ops.info import _snapshot_list
    action = name = None
    force_share = image_opts = False
    getopt = GetoptLong(argv, ":la:c:d:hqU", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("force-share", False, "U")))
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c in "lacd":
            if action:
                cli.error_exit("Cannot mix '-l', '-a', '-c', '-d'")
            action, name = c, getopt.optarg
        elif c == "q":
            continue  # only quiets messages qcow2lib does not print
        elif c == "U":
            force_share = True
        elif c == "object":
            cli.unsupported("--object")
        elif c == "image-opts":
            image_opts = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if image_opts:
        cli.unsupported("--image-opts")
    try:
        img = qcow2lib.open(host_path(filename), "r" if action == "l" else "r+",
                            force_share=force_share)
    except Qcow2Error as exc:
        cli.error_report(f"Could not open '{filename}': {error_text(exc)}")
        return 1
    with img:
        qcow2 = img.format == "qcow2" and not img.header.incompatible_features & 4
        if action == "l":
            if qcow2 and img.header.nb_snapshots:
                cli.out("Snapshot list:\n" + human_snapshot_table(_snapshot_list(img)))
        elif action == "c":
            if not qcow2:
                cli.error_report(f"Could not create snapshot '{name}': -95 (Operation not "
                                 f"supported)")
                return 1
            now = time.time_ns() // 1000  # g_get_real_time(): microseconds
            try:
                snaps.create_snapshot(img, name, date=(now // 10**6, now % 10**6 * 1000),
                                      icount=0)
            except Qcow2Error as exc:
                code = -27 if "too many" in str(exc) else -22
                cli.error_report(f"Could not create snapshot '{name}': {code} "
                                 f"({os.strerror(-code)})")
                return 1
        elif action == "a":
            if not qcow2:
                cli.error_report(f"Could not apply snapshot '{name}': Block driver does not "
                                 f"support snapshots")
                return 1
            if snaps.find_snapshot(img, name) is None:
                reason = "No such file or directory"
            else:
                try:
                    snaps.apply_snapshot(img, name)
                    reason = None
                except qcow2lib.InvalidArgumentError:  # refcount overflow: QEMU's EINVAL
                    reason = "Invalid argument"
                except Qcow2Error as exc:
                    reason = error_text(exc)
            if reason:
                cli.error_report(f"Could not apply snapshot '{name}': Failed to load "
                                 f"snapshot: {reason}")
                return 1
        elif action == "d":
            found = snaps.find_snapshot(img, name=name) if qcow2 else None
            if found is None:
                cli.error_report(f"Could not delete snapshot '{name}': snapshot not found")
                return 1
            try:
                snaps.delete_snapshot(img, id=found.id, name=found.name)
            except Qcow2Error as exc:
                cli.error_report(f"Could not delete snapshot '{name}': {error_text(exc)}")
                return 1
    return 0


# --- entry point -----------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Cli, list[str]], int]] = {
    "create": cmd_create,
    "info": cmd_info,
    "check": cmd_check,
    "snapshot": cmd_snapshot,
}


def run(cli: Cli, argv: list[str]) -> int:
    """qemu-img's main(): global options, then dispatch to the subcommand."""
    if len(argv) < 2:
        cli.error_exit("Not enough arguments")
    getopt = GetoptLong(argv, "+:hVT:", (LongOpt("help", False, "h"),
                                         LongOpt("version", False, "V"),
                                         LongOpt("trace", True, "T")))
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "V":
            cli.out(VERSION_TEXT)
            return 0
        elif c == "T":
            cli.unsupported("-T/--trace")
    if getopt.optind >= len(getopt.argv):
        return 0
    command = getopt.argv[getopt.optind]
    handler = COMMANDS.get(command)
    if handler is None:
        cli.error_exit(f"Command not found: {command}")
    return handler(cli, getopt.argv[getopt.optind:])


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run qimg with `argv` (default sys.argv[1:]); messages name `prog` (default argv[0])."""
    if prog is None:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "qimg"
        prog = prog.removesuffix(".py")  # `python -m qimg` and `python qimg.py` say "qimg"
    args = sys.argv[1:] if argv is None else list(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    try:
        return run(Cli(prog), [prog, *args])
    except CliExit as exc:
        return exc.code
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
