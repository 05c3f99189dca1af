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
from qcow2lib.bitmaps import FLAG_AUTO as BITMAP_AUTO, FLAG_IN_USE as BITMAP_IN_USE
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

HELP_BOTTOM = """\
qimg extension: a secret object can also take its data from an environment variable,
  '--object secret,id=ID,env=VARNAME' (instead of data=... or file=...), so that the
  passphrase appears neither on the command line nor in a file; format=base64 applies.

Report qimg bugs to the qcow2lib project; qimg is not maintained by QEMU.
"""


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
        self.error_message = ""  # what glibc prints for the last error (opterr mode)
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
            self.error_message = f"invalid option -- '{char}'"
            return "?"
        if self._shortopts[pos + 1:pos + 2] == ":":
            if self._nextchar:
                self.optarg = self._nextchar
                self.optind += 1
            elif self.optind == argc:
                self.error_message = f"option requires an argument -- '{char}'"
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
                names = "".join(f" '--{opt.name}'" for opt in candidates)
                self.error_message = f"option '--{name}' is ambiguous; possibilities:{names}"
                return "?"  # ambiguous abbreviation
            found = candidates[0] if candidates else None
        self.optind += 1
        if found is None:
            self.error_message = f"unrecognized option '--{text}'"
            return "?"
        if eq:
            if not found.has_arg:
                self.error_message = f"option '--{found.name}' doesn't allow an argument"
                return "?"
            self.optarg = value
        elif found.has_arg:
            if self.optind >= len(self.argv):
                self.error_message = f"option '--{found.name}' requires an argument"
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


def qemu_json_compact(value: Any) -> str:
    """QEMU's one-line JSON (qobject_to_json), dict members in QDict order."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json_string(k)}: {qemu_json_compact(v)}"
                               for k, v in qdict_items(value)) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(qemu_json_compact(v) for v in value) + "]"
    return qemu_json(value)


def json_filename(spec: "ImageSpec", fmt: str) -> str:
    """The "json:{...}" name QEMU gives an image opened with options beyond its file name;
    options for backing files nest each backing layer's under "backing"."""
    path = host_path(spec.path)
    top = layer = _json_layer(spec.key_secret, fmt, spec.path)
    for secret in spec.backing_secrets:
        with qcow2lib.open(path, "r", fmt=fmt, backing=False, force_share=True,
                           open_data_file=False) as image:
            backing_name, backing_fmt = image.backing_filename, image.backing_format
        if not backing_name:
            break
        path = full_backing_filename(path, backing_name)
        fmt = backing_fmt or qcow2lib.probe_format(path)
        layer["backing"] = layer = _json_layer(secret, fmt, path)
    return "json:" + qemu_json_compact(top)


def _json_layer(key_secret: str | None, fmt: str, filename: str) -> dict:
    options: dict = {}
    if key_secret is not None:
        options["encrypt.key-secret"] = key_secret
    options["driver"] = fmt
    options["file"] = {"driver": "file", "filename": filename}
    return options


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


CIPHER_ALGS = ("aes-128", "aes-192", "aes-256", "des", "3des", "cast5-128", "serpent-128",
               "serpent-192", "serpent-256", "twofish-128", "twofish-192", "twofish-256")
HASH_ALGS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "ripemd160")
LUKS_CREATE_ENUMS = {"cipher-alg": CIPHER_ALGS, "cipher-mode": ("ecb", "cbc", "xts", "ctr"),
                     "ivgen-alg": ("plain", "plain64", "essiv"), "ivgen-hash-alg": HASH_ALGS,
                     "hash-alg": HASH_ALGS}


def _encrypt_options(opts: CreateOptions, encryption: str | None) -> tuple[str, dict] | None:
    """The encrypt.* create options as QEMU's visitor checks them: (format, options without
    the "encrypt." prefix, key-secret included) or None for an unencrypted image."""
    given = {name[len("encrypt."):]: opts.get(name) for name in opts.names()
             if name.startswith("encrypt.")}
    encrypt_format = given.pop("format", None)
    if encryption is not None:  # the deprecated "encryption=on": legacy AES
        encrypt_format = "aes"
    if encrypt_format is None:
        if given:
            raise CreateError("Parameter 'encrypt.format' is missing")
        return None
    if encrypt_format not in ("aes", "luks"):
        raise CreateError(f"Parameter 'format' does not accept value '{encrypt_format}'")
    if encrypt_format == "luks":
        for name, allowed in LUKS_CREATE_ENUMS.items():
            if name in given and given[name] not in allowed:
                raise CreateError(f"Parameter '{name}' does not accept value '{given[name]}'")
        if "iter-time" in given:
            try:
                given["iter-time"] = parse_number(given["iter-time"], signed=True)
            except SizeError:
                raise CreateError("Parameter 'iter-time' expects integer") from None
    else:
        for name in given:
            if name != "key-secret":
                raise CreateError(f"Parameter 'encrypt.{name}' is unexpected")
    return encrypt_format, given


def _qcow2_arguments(opts: CreateOptions, secrets: dict[str, bytes] | None = None) -> dict:
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
    encrypt = _encrypt_options(opts, encryption)
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
    encrypt_arguments = {}
    if encrypt is not None:
        encrypt_format, encrypt_options = encrypt
        secret_id = encrypt_options.pop("key-secret", None)
        if secret_id is None:
            raise CreateError("Parameter 'encrypt.key-secret' is required for cipher")
        if secrets is None or secret_id not in secrets:
            raise CreateError(f"No secret with id '{secret_id}'")
        encrypt_arguments = {"encrypt_format": encrypt_format, "passphrase": secrets[secret_id],
                             "encrypt_options": encrypt_options}
    return {
        **encrypt_arguments,
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
    arguments = _qcow2_arguments(opts, cli.secrets) if fmt == "qcow2" else _raw_arguments(opts)
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
            process_object(cli, getopt.optarg)
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


def cvtnum(cli: Cli, name: str, text: str, maximum: int = INT64_MAX) -> int | None:
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
    if value > maximum:
        cli.error_report(f"Invalid {name} specified. Must be between 0 and {maximum}.")
        return None
    return value


# --- --object: secrets -----------------------------------------------------------------------

# QEMU's user creatable object types (`--object help`); qimg implements "secret".
OBJECT_TYPES = ("authz-list", "authz-list-file", "authz-simple", "main-loop",
                "pr-manager-helper", "secret", "secret_keyring", "thread-context",
                "throttle-group", "tls-cipher-suites", "tls-creds-anon", "tls-creds-psk",
                "tls-creds-x509")
# The properties of a secret object; "env" is qimg's own (the secret is read from an
# environment variable, so it appears neither on the command line nor in a file).
SECRET_PROPERTIES = ("data", "env", "file", "format", "iv", "keyid")
IDENTIFIER_HINT = ("Identifiers consist of letters, digits, '-', '.', '_', starting with a "
                   "letter.\n")


class ObjectError(Exception):
    """A bad --object: QEMU's message, and the hint lines printed after it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


def _keyval_key(text: str) -> bool:
    """A dotted key as QEMU's keyval parser accepts it (fragments start with a letter)."""
    return all(part and part[0].isascii() and part[0].isalpha()
               and all(c.isascii() and (c.isalnum() or c in "-_") for c in part)
               for part in text.split("."))


def keyval_parse(text: str, implied_key: str) -> tuple[dict[str, str], bool]:
    """QEMU's keyval_parse(): "type,key=value,,more,help" -> ({key: value}, help wanted).

    Only the first item may omit "key=" (it is then `implied_key`'s value, ending at the
    first comma); elsewhere ",," is a literal comma; a bare "help" or "?" asks for help.
    """
    values: dict[str, str] = {}
    want_help = False
    pos = 0
    first = True
    while pos < len(text) or first:
        end = pos
        while end < len(text) and text[end] not in "=,":
            end += 1
        key = text[pos:end]
        if key in ("help", "?") and (end == len(text) or text[end] == ","):
            want_help = True
            pos = end + 1
        elif first and key and (end == len(text) or text[end] == ","):
            values[implied_key] = key
            pos = end + 1
        else:
            if not _keyval_key(key):
                raise ObjectError(f"Invalid parameter '{key}'")
            if end == len(text) or text[end] != "=":
                raise ObjectError(f"Expected '=' after parameter '{key}'")
            pos = end + 1
            parts = []
            while True:
                comma = text.find(",", pos)
                if comma < 0:
                    parts.append(text[pos:])
                    pos = len(text) + 1
                    break
                if text[comma + 1:comma + 2] == ",":
                    parts.append(text[pos:comma + 1])
                    pos = comma + 2
                    continue
                parts.append(text[pos:comma])
                pos = comma + 1
                break
            values[key] = "".join(parts)
        first = False
        if pos >= len(text):
            break
    return values, want_help


def _is_identifier(text: str) -> bool:
    return bool(text) and text[0].isascii() and text[0].isalpha() and \
        all(c.isascii() and (c.isalnum() or c in "-._") for c in text)


def _read_secret_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except IsADirectoryError:
        raise ObjectError(f"Unable to read {path}: Error reading file \u201c{path}\u201d: "
                          f"Is a directory") from None
    except OSError as exc:
        raise ObjectError(f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                          f"{exc.strerror}") from None


def _base64_decode(data: bytes) -> bytes:
    """GLib's lenient base64 decoding, refusing what QEMU's qbase64_decode refuses."""
    text = data.decode("latin-1")
    body = text.rstrip("=")
    if any(not (c.isascii() and (c.isalnum() or c in "+/")) for c in body) or \
            len(text) - len(body) > 2:
        raise ObjectError("Base64 data contains invalid characters")
    body = body[:len(body) - len(body) % 4 if len(body) % 4 == 1 else len(body)]
    return base64.b64decode(body + "=" * (-len(body) % 4))


def add_object(cli: Cli, text: str) -> None:
    """--object TEXT: define a secret (or print the object help and exit 0)."""
    props, want_help = keyval_parse(text, "qom-type")
    qom_type = props.get("qom-type")
    if qom_type in ("help", "?") or (qom_type is None and want_help):
        cli.out("List of user creatable objects:\n"
                + "".join(f"  {name}\n" for name in OBJECT_TYPES))
        raise CliExit(0)
    if qom_type is None:
        raise ObjectError("Parameter 'qom-type' is missing")
    if qom_type not in OBJECT_TYPES:
        raise ObjectError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    if want_help and qom_type == "secret":
        names = {"data": "string", "env": "string", "file": "string",
                 "format": "QCryptoSecretFormat", "iv": "string", "keyid": "string"}
        cli.out("secret options:\n" + "".join(f"  {name}=<{kind}>\n"
                                               for name, kind in names.items()))
        raise CliExit(0)
    if "id" not in props:
        raise ObjectError("Parameter 'id' is missing")
    if qom_type != "secret":
        raise ObjectError(f"Object type '{qom_type}' is not supported yet")
    object_id = props["id"]
    if props.get("format", "raw") not in ("raw", "base64"):
        raise ObjectError(f"Parameter 'format' does not accept value '{props['format']}'")
    for name in props:
        if name == "loaded":
            raise ObjectError("Property 'secret.loaded' is not writable")
        if name not in SECRET_PROPERTIES and name not in ("qom-type", "id"):
            raise ObjectError(f"Parameter '{name}' is unexpected")
    if not _is_identifier(object_id):
        raise ObjectError("Parameter 'id' expects an identifier", IDENTIFIER_HINT)
    sources = [name for name in ("data", "file", "env") if name in props]
    if "env" in props and len(sources) > 1:
        raise ObjectError("'env' cannot be used together with 'data' or 'file'")
    if "data" in props and "file" in props:
        raise ObjectError("'file' and 'data' are mutually exclusive")
    if not sources:
        raise ObjectError("Either 'file' or 'data' must be provided")
    if "data" in props:
        value = props["data"].encode("utf-8", "surrogateescape")
    elif "file" in props:
        value = _read_secret_file(props["file"])
    else:
        name = props["env"]
        if name.encode("utf-8", "surrogateescape") not in os.environb:
            raise ObjectError(f"Environment variable '{name}' is not set")
        value = os.environb[name.encode("utf-8", "surrogateescape")]
    if "keyid" in props:
        if props["keyid"] not in cli.secrets:
            raise ObjectError(f"No secret with id '{props['keyid']}'")
        raise ObjectError("Encrypted secrets (keyid) are not supported by qimg yet")
    if props.get("format") == "base64":
        value = _base64_decode(value)
    if object_id in cli.secrets:
        raise ObjectError(f"attempt to add duplicate property '{object_id}' to object "
                          f"(type 'container')")
    cli.secrets[object_id] = value


def process_object(cli: Cli, text: str, code: int = 1) -> None:
    """--object as a command processes it: errors end qemu-img with `code`."""
    try:
        add_object(cli, text)
    except ObjectError as exc:
        cli.error_report(exc.message)
        sys.stderr.write(exc.hint)
        raise CliExit(code) from None


def secret_value(cli: Cli, secret_id: str) -> bytes:
    """The data of a secret object; QEMU's error when there is none."""
    if secret_id not in cli.secrets:
        raise InvalidSecret(f"No secret with id '{secret_id}'")
    return cli.secrets[secret_id]


class InvalidSecret(Qcow2Error):
    """A key-secret naming no --object secret."""


# --- opening images as qemu-img names them (filename or --image-opts) -------------------------

CACHE_MODES = ("none", "off", "directsync", "writeback", "unsafe", "writethrough")
# --image-opts options qimg accepts and ignores (they tune QEMU's I/O, not content).
IGNORED_IMAGE_OPTS = ("read-only", "auto-read-only", "cache.direct", "cache.no-flush",
                      "discard", "detect-zeroes", "file.locking", "file.aio",
                      "file.cache.direct", "file.cache.no-flush", "file.discard",
                      "file.detect-zeroes", "node-name", "file.node-name")
RAW_PROBE_WARNING = (
    "WARNING: Image format was not specified for '{0}' and probing guessed raw.\n"
    "         Automatically detecting the format is dangerous for raw images, write "
    "operations on block 0 will be restricted.\n"
    "         Specify the 'raw' format explicitly to remove the restrictions.\n")


class OpenFailure(Exception):
    """An image could not be opened: qemu-img's message (without the program name) and
    the hint lines it prints after it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint


def report_failure(cli: Cli, exc: "OpenFailure | CreateError") -> None:
    cli.error_report(exc.message)
    sys.stderr.write(exc.hint)


@dataclass
class ImageSpec:
    """An image argument: `name` is how messages call it, `path` the host file."""
    name: str
    path: str
    fmt: str | None = None
    key_secret: str | None = None
    force_share: bool = False
    backing_secrets: tuple = ()  # backing[.backing...].encrypt.key-secret, nearest first


def parse_qemu_opts(text: str, implied: str) -> list[tuple[str, str]]:
    """QemuOpts parsing ("flag" -> on, "noflag" -> off, ",," a literal comma) where a first
    item without "=" is the value of `implied` (as --image-opts takes "file")."""
    end = 0
    while end < len(text) and text[end] not in "=,":
        end += 1
    if end < len(text) and text[end] == "=":
        return [(name, value) for name, value, _ in split_option_list(text)]
    parts = []
    pos = 0
    while True:
        comma = text.find(",", pos)
        if comma < 0:
            parts.append(text[pos:])
            rest = ""
            break
        if text[comma + 1:comma + 2] == ",":
            parts.append(text[pos:comma + 1])
            pos = comma + 2
            continue
        parts.append(text[pos:comma])
        rest = text[comma + 1:]
        break
    return [(implied, "".join(parts))] + [(name, value) for name, value, _ in
                                          split_option_list(rest)]


def image_spec(text: str, image_opts: bool, fmt: str | None,
               force_share: bool = False) -> ImageSpec:
    """Turn a filename (or with --image-opts an option string) into an ImageSpec."""
    if not image_opts:
        return ImageSpec(text, text, fmt, None, force_share)
    if fmt is not None:
        raise OpenFailure("--image-opts and --format are mutually exclusive")
    opts = dict(parse_qemu_opts(text, "file"))

    def fail(message: str) -> NoReturn:
        raise OpenFailure(f"Could not open '{text}': {message}")

    driver = opts.pop("driver", None)
    if driver is not None and driver not in ("qcow2", "raw", "file"):
        fail(f"Unknown driver '{driver}'")
    if "file" in opts:
        name = opts["file"]
        fail(f"Cannot find device='{name}' nor node-name='{name}'")
    filename = None
    if driver == "file":
        filename = opts.pop("filename", None)
        if filename is None:
            fail("The 'file' block driver requires a file name")
    else:
        if opts.pop("file.driver", "file") != "file":
            fail("qimg only opens images in plain files (file.driver=file)")
        filename = opts.pop("file.filename", None)
        if filename is None:
            if driver is None:
                fail("Must specify either driver or file")
            fail('A block device must be specified for "file"')
    key_secret = opts.pop("encrypt.key-secret", None)
    backing_secrets = []
    prefix = "backing."
    while f"{prefix}encrypt.key-secret" in opts or any(name.startswith(prefix + "backing.")
                                                      for name in opts):
        backing_secrets.append(opts.pop(f"{prefix}encrypt.key-secret", None))
        prefix += "backing."
    share = opts.pop("force-share", None)
    if share is not None:
        if share not in ("on", "off"):
            fail("Parameter 'force-share' expects 'on' or 'off'")
        if force_share and share != "on":
            raise OpenFailure("--force-share/-U conflicts with image options")
        force_share = share == "on"
    for name in opts:
        if name in IGNORED_IMAGE_OPTS:
            continue
        fail(f"Block format '{driver or 'raw'}' does not support the option '{name}'")
    return ImageSpec(text, filename, "raw" if driver == "file" else driver, key_secret,
                     force_share, tuple(backing_secrets))


def _chain_layers(device):
    layer = device
    while layer is not None:
        yield layer
        layer = getattr(layer, "backing", None)


def spec_passphrases(cli: Cli, spec: ImageSpec) -> list[bytes | None]:
    """The secrets' values for each layer of the chain, the image's first."""
    return [None if name is None else secret_value(cli, name)
            for name in (spec.key_secret, *spec.backing_secrets)]


def open_spec(cli: Cli, spec: ImageSpec, mode: str = "r", backing: bool = True,
              passphrase: bytes | None = None, warn_probe: bool = True,
              cache: str = "writeback"):
    """Open an image like qemu-img's img_open(); raises OpenFailure with its message.

    As in QEMU, each encrypted layer needs its own key-secret option (the top's is
    encrypt.key-secret, a backing file's backing.encrypt.key-secret, ...); `passphrase`
    is the top's when the caller has it from elsewhere (a target just created).
    """
    explicit = passphrase is not None
    try:
        path = host_path(spec.path)
        if not path:
            raise qcow2lib.InvalidArgumentError("The 'file' block driver requires a file name")
        passphrases = spec_passphrases(cli, spec)
        if explicit:
            passphrases[0] = passphrase
        device = qcow2lib.open(path, mode, fmt=spec.fmt, backing=backing,
                               force_share=spec.force_share, passphrase=passphrases,
                               cache="none" if cache == "off" else cache)
    except ImageLockedError as exc:
        raise OpenFailure(f"Could not open '{spec.name}': {error_text(exc)}",
                          f"Is another process using the image [{host_path(spec.path)}]?\n") \
            from exc
    except Qcow2Error as exc:
        raise OpenFailure(f"Could not open '{spec.name}': {error_text(exc)}") from exc
    given = [spec.key_secret is not None or explicit,
             *(name is not None for name in spec.backing_secrets)]
    for depth, layer in enumerate(_chain_layers(device)):
        keyed = given[depth] if depth < len(given) else False
        if getattr(layer, "encrypted", False) and (
                not keyed or getattr(layer, "crypto", None) is None):
            device.close()
            raise OpenFailure(f"Could not open '{spec.name}': "
                              + "Could not open backing file: " * depth
                              + "Parameter 'encrypt.key-secret' is required for cipher")
    if warn_probe and mode == "r+" and spec.fmt is None and device.format == "raw":
        sys.stderr.write(RAW_PROBE_WARNING.format(path))
    return device


# --- progress (-p) ---------------------------------------------------------------------------

def _f32(value: float) -> float:
    """Round to C's float: qemu-img keeps its progress in single precision."""
    return struct.unpack("f", struct.pack("f", value))[0]


class Progress:
    """QEMU's qemu-progress.c: "    (12.34/100%)\\r" on stdout, each time the value moved by
    more than min_skip percent (and at 0 and 100), a newline at the end. Disabled (no -p,
    or -q) it prints nothing.

    On a terminal, where nobody parses the line, it goes further: when the work is counted
    in bytes the line also shows bytes done of the total, the throughput and the time left,
    refreshed a few times a second. Piped output stays exactly qemu-img's."""

    REFRESH_SECONDS = 0.25

    def __init__(self, cli: Cli, enabled: bool, min_skip: float):
        self.cli = cli
        self.enabled = enabled
        self.min_skip = _f32(min_skip)
        self.current = 0.0
        self.last_print = 0.0
        self.lock = threading.Lock()
        self._last_done = -1
        self.terminal = enabled and _stdout_is_terminal()
        self._started = time.monotonic()
        self._bytes: tuple[int, int] | None = None  # (done, total) when counted in bytes
        self._last_refresh = 0.0

    def print(self, delta: float, maximum: int = 0) -> None:
        """qemu_progress_print(delta, max): absolute percent when max is 0, else a delta."""
        with self.lock:
            if maximum == 0:
                current = _f32(delta)
            else:
                current = _f32(self.current + _f32(_f32(_f32(delta) / 100) * maximum))
            if current > 100:
                current = 100.0
            self.current = current
            if current > _f32(self.last_print + self.min_skip) or \
                    current < _f32(self.last_print - self.min_skip) or \
                    current == 100 or current == 0:
                self.last_print = current
                self._show(current)
            elif self.terminal and \
                    time.monotonic() - self._last_refresh >= self.REFRESH_SECONDS:
                self._show(current)

    def _show(self, percent: float) -> None:
        if not self.enabled:
            return
        line = "    (%3.2f/100%%)" % percent
        if self.terminal:
            self._last_refresh = time.monotonic()
            line += self._details() + "\x1b[K"  # erase what a longer line left behind
        self.cli.out(line + "\r")
        sys.stdout.flush()

    def _details(self) -> str:
        """Bytes done of the total, throughput and time left (terminal only)."""
        if self._bytes is None:
            return ""
        done, total = self._bytes
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = done / elapsed
        text = f"  {format_size(done)} of {format_size(total)}"
        if done > 0 and elapsed >= 0.5:
            text += f", {format_size(int(rate))}/s"
            if done < total:
                seconds = int((total - done) / rate)
                text += ", %d:%02d:%02d left" % (seconds // 3600, seconds // 60 % 60,
                                                 seconds % 60)
        return text

    def callback(self, done: int, total: int) -> None:
        """A qcow2lib progress(done_bytes, total_bytes) callback: the absolute percentage,
        reported once per new amount of work done (thread-safe, never backwards)."""
        if total <= 0 or done <= 0:
            return
        with self.lock:
            if done <= self._last_done:
                return
            self._last_done = done
            self._bytes = (done, total)
        self.print(100.0 * done / total, 0)

    def end(self) -> None:
        if self.enabled:
            self.cli.out("\n")
            sys.stdout.flush()


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def check_cache_mode(cli: Cli, mode: str, source: bool) -> bool:
    """bdrv_parse_cache_mode(): False (after the error) for an unknown mode."""
    if mode in CACHE_MODES:
        return True
    cli.error_report(f"Invalid {'source ' if source else ''}cache option: {mode}")
    return False


# --- convert ---------------------------------------------------------------------------------

SNAPSHOT_OPT_BASE = "snapshot."
MAX_COROUTINES = 16
MAX_BUF_SECTORS = 32768


def parse_strtol(text: str) -> int | None:
    """QEMU's qemu_strtol(text, NULL, 0): the whole string one C integer (0x.., 0.. octal)."""
    body = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if body[:1] in "+-" and body:
        sign = -1 if body[0] == "-" else 1
        body = body[1:]
    try:
        if body[:2].lower() == "0x":
            value = int(body[2:], 16) if body[2:] and body[2:].isalnum() else None
        elif body.startswith("0") and len(body) > 1:
            value = int(body[1:], 8)
        else:
            value = int(body, 10) if body.isdigit() else None
    except ValueError:
        return None
    if value is None or not body.isascii():
        return None
    return sign * value


def parse_snapshot_param(cli: Cli, text: str) -> dict[str, str] | None:
    """-l snapshot.id=ID,snapshot.name=NAME (QEMU's internal_snapshot_opts)."""
    result = {}
    bare = [token for token in text.replace(",,", "\0").split(",") if "=" not in token]
    for name, value, _ in split_option_list(text):
        if (name in bare and value == "on") or (f"no{name}" in bare and value == "off"):
            given = name if value == "on" else f"no{name}"
            cli.warn_report(f"short-form boolean option '{given}' deprecated")
            sys.stderr.write(f"Please use {name}={value} instead\n")
        if name not in ("snapshot.id", "snapshot.name"):
            cli.error_report(f"Invalid parameter '{name}'")
            cli.error_report(f"Failed in parsing snapshot param '{text}'")
            return None
        result[name] = value
    return result


def load_snapshot(source, snapshot_opts: dict | None, snapshot_name: str | None):
    """bdrv_snapshot_load_tmp(): a read-only view of an internal snapshot of `source`.

    Raises OpenFailure("Failed to load snapshot: ...") as qemu-img reports it.
    """
    from qcow2lib.snapshots import SnapshotView
    if source.format != "qcow2":
        raise OpenFailure(f"Failed to load snapshot: Block format '{source.format}' used by "
                          f"device '' does not support temporarily loading internal snapshots")
    try:
        if snapshot_opts is not None:
            return SnapshotView(source, id=snapshot_opts.get("snapshot.id"),
                                name=snapshot_opts.get("snapshot.name"))
        from qcow2lib import snapshots as snaps
        found = snaps.find_snapshot(source, id=snapshot_name)
        if found is None:
            found = snaps.find_snapshot(source, name=snapshot_name)
        if found is None:
            raise qcow2lib.InvalidArgumentError("Can't find snapshot")
        return SnapshotView(source, id=found.id, name=found.name)
    except Qcow2Error as exc:
        text = error_text(exc)
        if "find" in text.lower() or "no snapshot" in text.lower() or "not found" in text:
            text = "Can't find snapshot"
        raise OpenFailure(f"Failed to load snapshot: {text}") from exc


class ConvertStop(Exception):
    """Ends `convert` after an error was reported; `code` is the exit status."""

    def __init__(self, code: int = 1):
        super().__init__(code)
        self.code = code


def _create_convert_target(cli: Cli, filename: str, fmt: str, opts: "CreateOptions") -> None:
    """bdrv_create() of convert's target (no "Formatting" line, no backing file check)."""
    path = host_path(filename)
    try:
        arguments = _qcow2_arguments(opts, cli.secrets) if fmt == "qcow2" \
            else _raw_arguments(opts)
        size = _int64(opts.value("size"))
        size = (size + 511) // 512 * 512
        qcow2lib.create(path, size, **arguments)
    except CreateError as exc:
        raise CreateError(f"{filename}: error while converting {fmt}: {exc.message}",
                          exc.hint) from exc
    except ImageLockedError as exc:
        raise CreateError(f"{filename}: error while converting {fmt}: {error_text(exc)}",
                          f"Is another process using the image [{path}]?\n") from exc
    except Qcow2Error as exc:
        raise CreateError(f"{filename}: error while converting {fmt}: {error_text(exc)}") \
            from exc


def cmd_convert(cli: Cli, argv: list[str]) -> int:
    """`convert`: copy one or more images (concatenated) into a new or existing target."""
    fmt = out_fmt = out_baseimg = snapshot_name = backing_fmt = options = None
    snapshot_opts: dict | None = None
    cache, src_cache = "unsafe", "writeback"
    image_opts = skip_create = progress = tgt_image_opts = force_share = False
    explicit_sparse = bitmaps = skip_broken = salvage = compressed = copy_range = False
    quiet = has_zero_init = False
    min_sparse = 8
    num_coroutines = 8
    in_order = True
    getopt = GetoptLong(argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("force-share", False, "U"),
        LongOpt("target-image-opts", False, "target-image-opts"),
        LongOpt("salvage", False, "salvage"), LongOpt("target-is-zero", False, "target-is-zero"),
        LongOpt("bitmaps", False, "bitmaps"),
        LongOpt("skip-broken-bitmaps", False, "skip-broken-bitmaps")))
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = arg
        elif c == "O":
            out_fmt = arg
        elif c == "B":
            out_baseimg = arg
        elif c == "C":
            copy_range = True
        elif c == "c":
            compressed = True
        elif c == "F":
            backing_fmt = arg
        elif c == "o":
            if not valid_option_list(arg):
                cli.error_report(f"Invalid option list: {arg}")
                return 1
            options = arg if options is None else f"{options},{arg}"
        elif c == "l":
            if arg.startswith(SNAPSHOT_OPT_BASE):
                snapshot_opts = parse_snapshot_param(cli, arg)
                if snapshot_opts is None:
                    return 1
            else:
                snapshot_name = arg
        elif c == "S":
            value = cvtnum(cli, "buffer size for sparse output", arg)
            if value is None:
                return 1
            if value % 512 or value // 512 > MAX_BUF_SECTORS:
                cli.error_report("Invalid buffer size for sparse output specified. Valid sizes "
                                 f"are multiples of 512 up to {MAX_BUF_SECTORS * 512}. Select 0 "
                                 "to disable sparse detection (fully allocates output).")
                return 1
            min_sparse = value // 512
            explicit_sparse = True
        elif c == "p":
            progress = True
        elif c == "t":
            cache = arg
        elif c == "T":
            src_cache = arg
        elif c == "q":
            quiet = True
        elif c == "n":
            skip_create = True
        elif c == "m":
            value = parse_strtol(arg)
            if value is None or not 1 <= value <= MAX_COROUTINES:
                cli.error_report("Invalid number of coroutines. Allowed number of coroutines is "
                                 f"between 1 and {MAX_COROUTINES}")
                return 1
            num_coroutines = value
        elif c == "W":
            in_order = False
        elif c == "U":
            force_share = True
        elif c == "r":
            if cvtnum(cli, "rate limit", arg) is None:
                return 1
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "salvage":
            salvage = True
        elif c == "target-image-opts":
            tgt_image_opts = True
        elif c == "target-is-zero":
            has_zero_init = True
        elif c == "bitmaps":
            bitmaps = True
        elif c == "skip-broken-bitmaps":
            skip_broken = True
    if out_fmt is None and not tgt_image_opts:
        out_fmt = "raw"
    for bad, message in (
            (skip_broken and not bitmaps, "Use of --skip-broken-bitmaps requires --bitmaps"),
            (compressed and copy_range, "Cannot enable copy offloading when -c is used"),
            (explicit_sparse and copy_range, "Cannot enable copy offloading when -S is used"),
            (copy_range and salvage, "Cannot use copy offloading in salvaging mode"),
            (tgt_image_opts and not skip_create, "--target-image-opts requires use of -n flag"),
            (skip_create and options is not None,
             "-o has no effect when skipping image creation"),
            (has_zero_init and not skip_create, "--target-is-zero requires use of -n flag")):
        if bad:
            cli.error_report(message)
            return 1
    argv, optind = getopt.argv, getopt.optind
    src_num = len(argv) - optind - 1
    out_filename = argv[-1] if src_num >= 1 else None
    if options is not None and any(is_help for _, _, is_help in split_option_list(options)):
        if out_fmt is None:
            cli.error_report("Option help requires a format be specified")
            return 1
        return print_create_option_help(cli, out_filename, out_fmt)
    if src_num < 1:
        cli.error_report("Must specify image file name")
        return 1
    if not check_cache_mode(cli, src_cache, True):
        return 1
    meter = Progress(cli, progress and not quiet, 1.0)
    meter.print(0, 100)
    devices: list = []
    try:
        code = _convert(cli, argv[optind:optind + src_num], out_filename, devices, meter,
                        fmt=fmt, out_fmt=out_fmt, out_baseimg=out_baseimg,
                        backing_fmt=backing_fmt, options=options, snapshot_opts=snapshot_opts,
                        snapshot_name=snapshot_name, cache=cache, image_opts=image_opts,
                        skip_create=skip_create, tgt_image_opts=tgt_image_opts,
                        force_share=force_share, bitmaps=bitmaps, skip_broken=skip_broken,
                        compressed=compressed, copy_range=copy_range, has_zero_init=has_zero_init,
                        min_sparse=min_sparse, num_coroutines=num_coroutines,
                        in_order=in_order)
    except ConvertStop as stop:
        code = stop.code
    finally:
        for device in reversed(devices):
            try:
                device.close()
            except Qcow2Error:
                pass
    if code == 0:
        meter.print(100, 0)
    meter.end()
    return code


def _convert(cli: Cli, sources: list[str], out_filename: str, devices: list, meter: Progress,
             *, fmt, out_fmt, out_baseimg, backing_fmt, options, snapshot_opts, snapshot_name,
             cache, image_opts, skip_create, tgt_image_opts, force_share, bitmaps, skip_broken,
             compressed, copy_range, has_zero_init, min_sparse, num_coroutines,
             in_order) -> int:
    """img_convert() after its argument checks; opened devices are appended to `devices`
    (the caller closes them). Returns the exit status or raises ConvertStop."""
    def fail(message: str, hint: str = "") -> NoReturn:
        cli.error_report(message)
        sys.stderr.write(hint)
        raise ConvertStop(1)

    src_devices = []
    for name in sources:
        try:
            device = open_spec(cli, image_spec(name, image_opts, fmt, force_share), "r")
        except OpenFailure as exc:
            fail(exc.message, exc.hint)
        devices.append(device)
        src_devices.append(device)
    total_sectors = sum(virtual_size(device) // 512 for device in src_devices)
    if snapshot_opts is not None or snapshot_name is not None:
        if snapshot_opts is None and len(src_devices) > 1:
            fail("No support for concatenating multiple snapshot")
        try:
            view = load_snapshot(src_devices[0], snapshot_opts, snapshot_name)
        except OpenFailure as exc:
            fail(exc.message)
        src_devices[0] = view

    opts = None
    if not skip_create:
        if out_fmt not in FORMAT_CREATE_OPTS:
            fail(f"Unknown file format '{out_fmt}'")
        try:
            host_path(out_filename)
        except Qcow2Error as exc:
            fail(error_text(exc))
        opts = CreateOptions(merged_create_opts(out_fmt), cli.warn_report)
        try:
            for name, value, _ in split_option_list(options or ""):
                if name != "id":
                    opts.set(name, value)
        except CreateError as exc:
            fail(exc.message, exc.hint)
        opts.set_number("size", total_sectors * 512)
        if out_baseimg is not None:
            if "backing_file" not in opts.descs:
                fail(f"Backing file not supported for file format '{out_fmt}'")
            opts.set("backing_file", out_baseimg)
        if backing_fmt is not None:
            if "backing_fmt" not in opts.descs:
                fail(f"Backing file format not supported for file format '{out_fmt}'")
            opts.set("backing_fmt", backing_fmt)
    baseimg_param = opts.get("backing_file") if opts is not None else None
    if baseimg_param is not None:
        out_baseimg = baseimg_param
    has_backing = bool(out_baseimg)
    if has_zero_init and has_backing:
        cli.error_report("Cannot use --target-is-zero when the destination image has a "
                         "backing file")
        return 0  # qemu-img's exit status here is that of its last successful step
    if len(src_devices) > 1 and out_baseimg:
        fail("Having a backing file for the target makes no sense when concatenating "
             "multiple input images")
    if baseimg_param is not None and not opts.get("backing_fmt"):
        fail("Use of backing file requires explicit backing format")
    if compressed and opts is not None:
        if out_fmt != "qcow2":
            fail("Compression not supported for this file format")
        if opts.is_set("encryption") and opts.value("encryption") or opts.get("encrypt.format"):
            fail("Compression and encryption not supported at the same time")
        preallocation = opts.get("preallocation")
        if preallocation and preallocation != "off":
            fail("Compression and preallocation not supported at the same time")
    if bitmaps:
        if len(src_devices) > 1:
            fail("Copying bitmaps only possible with single source")
        source = src_devices[0]
        if source.format != "qcow2" or source.header.version < 3:
            fail("Source lacks bitmap support")
        for entry in reversed(source._bitmap_entries):  # (QEMU's list order)
            if entry.flags & BITMAP_IN_USE and not skip_broken:
                fail(f"Cannot copy inconsistent bitmap '{entry.name}'",
                     "Try --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete "
                     "it\n")

    passphrase = None
    if opts is not None:
        secret_ids = [opts.get(name) for name in opts.names() if name.endswith("key-secret")]
        try:
            _create_convert_target(cli, out_filename, out_fmt, opts)
        except CreateError as exc:
            fail(exc.message, exc.hint)
        if secret_ids and secret_ids[-1] in cli.secrets:
            passphrase = cli.secrets[secret_ids[-1]]
    if not check_cache_mode(cli, cache, False):
        raise ConvertStop(1)
    try:
        if skip_create:
            spec = image_spec(out_filename, tgt_image_opts, out_fmt)
        else:
            spec = ImageSpec(out_filename, out_filename, out_fmt)
        target = open_spec(cli, spec, "r+", passphrase=passphrase, cache=cache)
    except OpenFailure as exc:
        fail(exc.message, exc.hint)
    devices.append(target)
    if bitmaps and target.format != "qcow2":
        fail(f"Format driver '{target.format}' does not support bitmaps")
    if compressed and target.format != "qcow2":
        fail("Compression not supported for this file format")
    if skip_create and virtual_size(target) // 512 < total_sectors:
        fail("output file is smaller than input file")
    target_backing = target.backing if has_backing else None
    from qcow2lib.convert import ConvertError, convert
    try:
        convert(src_devices, target, compress=compressed, sparse_size=min_sparse * 512,
                target_is_zero=has_zero_init, target_backing=target_backing,
                parallel=num_coroutines, out_of_order=not in_order,
                progress=meter.callback if meter.enabled else None, copy_range=copy_range)
    except ConvertError as exc:
        fail(error_text(exc))
    except Qcow2Error as exc:
        fail(error_text(exc))
    if bitmaps:
        _convert_copy_bitmaps(cli, src_devices[0], target, skip_broken)
    return 0


def _convert_copy_bitmaps(cli: Cli, source, target, skip_broken: bool) -> None:
    """convert --bitmaps: each persistent bitmap of the source, with its granularity,
    state and bits, into the target (an inconsistent one skipped with a warning)."""
    from qcow2lib.ops import bitmap as bitmap_ops

    for entry in reversed(source._bitmap_entries):  # (QEMU's list order)
        if entry.flags & BITMAP_IN_USE:
            cli.warn_report(f"Skipping inconsistent bitmap '{entry.name}'")
    for entry in source._bitmap_entries:  # (the target's directory keeps the source's order)
        if entry.flags & BITMAP_IN_USE:
            continue
        try:
            bitmap_ops.add_bitmap(target, entry.name, 1 << entry.granularity_bits,
                                  enabled=bool(entry.flags & BITMAP_AUTO))
        except Qcow2Error as exc:
            cli.error_report(f"Failed to create bitmap {entry.name}: {error_text(exc)}")
            raise ConvertStop(1) from exc
        try:
            bitmap_ops.merge_bitmap(target, entry.name, source, entry.name)
        except Qcow2Error as exc:
            cli.error_report(f"Failed to populate bitmap {entry.name}: {error_text(exc)}")
            bitmap_ops.remove_bitmap(target, entry.name)
            raise ConvertStop(1) from exc


# --- map -------------------------------------------------------------------------------------

def cmd_map(cli: Cli, argv: list[str]) -> int:
    """`map`: the allocation map of an image and its chain (human or JSON)."""
    from qcow2lib.ops.mapping_report import write_map
    fmt = output = None
    image_opts = force_share = False
    start, max_length = 0, -1
    getopt = GetoptLong(argv, ":f:s:l:hU", (
        LongOpt("help", False, "h"), LongOpt("format", True, "f"),
        LongOpt("output", True, "output"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("force-share", False, "U"),
        LongOpt("start-offset", True, "s"), LongOpt("max-length", True, "l")))
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = getopt.optarg
        elif c == "U":
            force_share = True
        elif c == "output":
            output = getopt.optarg
        elif c == "s":
            value = cvtnum(cli, "start offset", getopt.optarg)
            if value is None:
                return 1
            start = value
        elif c == "l":
            value = cvtnum(cli, "max length", getopt.optarg)
            if value is None:
                return 1
            max_length = value
        elif c == "object":
            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if output not in (None, "json", "human"):
        cli.error_report("--output must be used with human or json as argument.")
        return 1
    try:
        device = open_spec(cli, image_spec(filename, image_opts, fmt, force_share))
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with device:
        try:
            length = virtual_size(device)
            if max_length != -1:
                length = min(start + max_length, length)
            error = write_map(device, cli.out, start, max(0, length - start), output or "human")
        except Qcow2Error as exc:
            cli.error_report(f"Could not read file metadata: {error_text(exc)}")
            return 1
    if error is not None:
        cli.error_report(error)
        return 1
    return 0


# --- compare ---------------------------------------------------------------------------------

def cmd_compare(cli: Cli, argv: list[str]) -> int:
    """`compare`: 0 identical, 1 different, 2 and more errors (qemu-img's code table)."""
    from qcow2lib.ops.compare import compare
    fmt1 = fmt2 = None
    cache = "writeback"
    progress = quiet = strict = image_opts = force_share = False
    getopt = GetoptLong(argv, ":hf:F:T:pqsU", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("force-share", False, "U")))
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt1 = getopt.optarg
        elif c == "F":
            fmt2 = getopt.optarg
        elif c == "T":
            cache = getopt.optarg
        elif c == "p":
            progress = True
        elif c == "q":
            quiet = True
        elif c == "s":
            strict = True
        elif c == "U":
            force_share = True
        elif c == "object":
            process_object(cli, getopt.optarg, code=2)
        elif c == "image-opts":
            image_opts = True
    if quiet:
        progress = False
    if getopt.optind != len(getopt.argv) - 2:
        cli.error_exit("Expecting two image file names")
    filename1, filename2 = getopt.argv[getopt.optind:]
    meter = Progress(cli, progress, 2.0)
    devices = []
    try:
        if not check_cache_mode(cli, cache, True):
            return 2
        for name, fmt in ((filename1, fmt1), (filename2, fmt2)):
            try:
                devices.append(open_spec(cli, image_spec(name, image_opts, fmt, force_share)))
            except OpenFailure as exc:
                report_failure(cli, exc)
                return 2
        meter.print(0, 100)
        sizes = [virtual_size(device) for device in devices]
        warning = "Warning: Image size mismatch!"
        warned = []

        def progress_callback(done: int, total: int) -> None:
            # qemu-img prints the size warning when its scan passes the smaller image's end
            if done > min(sizes) and sizes[0] != sizes[1] and not warned:
                warned.append(True)
                if not quiet:
                    cli.out(warning + "\n")
            meter.callback(done, total)

        code, text = compare(devices[0], devices[1], strict=strict, name_a=filename1,
                             name_b=filename2,
                             progress=progress_callback if meter.enabled else None)
        if warned and text.startswith(warning + "\n"):
            text = text[len(warning) + 1:]
        if code in (0, 1):
            if not quiet:
                cli.out(text + "\n")
        else:
            lines = text.split("\n")
            if not quiet:
                cli.out("".join(line + "\n" for line in lines[:-1]))
            cli.error_report(lines[-1])
        return code
    finally:
        for device in devices:
            device.close()
        meter.end()


# --- resize ----------------------------------------------------------------------------------

def cmd_resize(cli: Cli, argv: list[str]) -> int:
    """`resize`: set the virtual size ([+|-]size), shrinking only with --shrink."""
    from qcow2lib.ops.resize import ShrinkRefusedError, resize
    if len(argv) < 3:
        cli.error_exit("Not enough arguments")
    size_text = argv[-1]  # taken out first, so that "-1G" is not read as an option
    fmt = None
    quiet = image_opts = shrink = False
    prealloc = "off"
    getopt = GetoptLong(argv[:-1], ":f:hq", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"),
        LongOpt("preallocation", True, "preallocation"), LongOpt("shrink", False, "shrink")))
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = getopt.optarg
        elif c == "q":
            quiet = True
        elif c == "object":
            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
        elif c == "preallocation":
            if getopt.optarg not in PREALLOC_MODES:
                cli.error_report(f"Invalid preallocation mode '{getopt.optarg}'")
                return 1
            prealloc = getopt.optarg
        elif c == "shrink":
            shrink = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting image file name and size")
    filename = getopt.argv[getopt.optind]
    relative = {"+": 1, "-": -1}.get(size_text[:1], 0)
    if relative:
        size_text = size_text[1:]
    size_opts = CreateOptions((_SIZE_OPT,), cli.warn_report)
    try:
        size_opts.set("size", size_text)
    except CreateError as exc:
        report_failure(cli, exc)
        return 1
    n = _int64(size_opts.value("size"))
    try:
        image = open_spec(cli, image_spec(filename, image_opts, fmt), "r+")
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with image:
        current = virtual_size(image)
        total = current + n * relative if relative else n
        total = _int64(total & ((1 << 64) - 1))
        if total <= 0:
            cli.error_report("New image size must be positive")
            return 1
        if total <= current and prealloc != "off":
            cli.error_report("Preallocation can only be used for growing images")
            return 1
        try:
            resize(image, total, shrink=shrink, preallocation=prealloc)
        except ShrinkRefusedError as exc:
            cli.error_report(str(exc))
            cli.warn_report(exc.warning)
            return 1
        except Qcow2Error as exc:
            cli.error_report(error_text(exc))
            return 1
    if not quiet:
        cli.out("Image resized.\n")
    return 0


# --- measure ---------------------------------------------------------------------------------

def cmd_measure(cli: Cli, argv: list[str]) -> int:
    """`measure`: the size a new image of a format would need (for --size N or a source)."""
    from qcow2lib.ops.measure import measure, measure_human, measure_json
    fmt = filename = options = snapshot_name = None
    snapshot_opts: dict | None = None
    out_fmt = "raw"
    output = "human"
    force_share = image_opts = False
    img_size = None
    getopt = GetoptLong(argv, "hf:O:o:l:U", (
        LongOpt("help", False, "h"), LongOpt("image-opts", False, "image-opts"),
        LongOpt("object", True, "object"), LongOpt("output", True, "output"),
        LongOpt("size", True, "size"), LongOpt("force-share", False, "U")))
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in "?:":  # measure lets getopt print its own complaint, then shows the help
            sys.stderr.write(f"{argv[0]}: {getopt.error_message}\n")
            cli.help()
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = arg
        elif c == "O":
            out_fmt = arg
        elif c == "o":
            if not valid_option_list(arg):
                cli.error_report(f"Invalid option list: {arg}")
                return 1
            options = arg if options is None else f"{options},{arg}"
        elif c == "l":
            if arg.startswith(SNAPSHOT_OPT_BASE):
                snapshot_opts = parse_snapshot_param(cli, arg)
                if snapshot_opts is None:
                    return 1
            else:
                snapshot_name = arg
        elif c == "U":
            force_share = True
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "output":
            if arg not in ("json", "human"):
                cli.error_report("--output must be used with human or json as argument.")
                return 1
            output = arg
        elif c == "size":
            img_size = cvtnum(cli, "image size", arg)
            if img_size is None:
                return 1
    rest = getopt.argv[getopt.optind:]
    if len(rest) > 1:
        cli.error_report("At most one filename argument is allowed.")
        return 1
    filename = rest[0] if rest else None
    if filename is None and (image_opts or fmt is not None or snapshot_name is not None
                             or snapshot_opts is not None):
        cli.error_report("--image-opts, -f, and -l require a filename argument.")
        return 1
    if filename is not None and img_size is not None:
        cli.error_report("--size N cannot be used together with a filename.")
        return 1
    if filename is None and img_size is None:
        cli.error_report("Either --size N or one filename must be specified.")
        return 1
    devices = []
    try:
        source = None
        if filename is not None:
            try:
                source = open_spec(cli, image_spec(filename, image_opts, fmt, force_share))
                devices.append(source)
                if snapshot_opts is not None or snapshot_name is not None:
                    source = load_snapshot(source, snapshot_opts, snapshot_name)
            except OpenFailure as exc:
                report_failure(cli, exc)
                return 1
        if out_fmt not in FORMAT_CREATE_OPTS:
            cli.error_report(f"Unknown file format '{out_fmt}'")
            return 1
        opts = CreateOptions(merged_create_opts(out_fmt), cli.warn_report)
        try:
            for name, value, _ in split_option_list(options or ""):
                opts.set(name, value)
        except CreateError as exc:
            report_failure(cli, exc)
            cli.error_report(f"Invalid options for file format '{out_fmt}'")
            return 1
        given = {name: opts.get(name) for name in opts.names()}
        if out_fmt == "raw":  # QEMU's raw driver looks at the size only
            given = {name: value for name, value in given.items() if name == "size"}
        if given.get("encrypt.format") == "luks":  # QEMU builds a LUKS header to measure it
            secret_id = given.get("encrypt.key-secret")
            if secret_id is None:
                cli.error_report("Parameter 'encrypt.key-secret' is required for cipher")
                return 1
            if secret_id not in cli.secrets:
                cli.error_report(f"No secret with id '{secret_id}'")
                return 1
        try:
            info = measure(size=img_size, source=source, fmt=out_fmt, options=given)
        except Qcow2Error as exc:
            for line in error_text(exc).split("\n"):
                cli.error_report(line)
            return 1
    finally:
        for device in devices:
            device.close()
    cli.out(measure_json(info) if output == "json" else measure_human(info))
    return 0


# --- rebase ----------------------------------------------------------------------------------

def cmd_rebase(cli: Cli, argv: list[str]) -> int:
    """`rebase`: change the backing file, keeping the guest content unless -u."""
    from qcow2lib.ops.rebase import rebase
    fmt = out_basefmt = out_baseimg = None
    cache = src_cache = "writeback"
    unsafe = progress = quiet = image_opts = force_share = False
    getopt = GetoptLong(argv, ":hf:F:b:upt:T:qU", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("force-share", False, "U")))
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = arg
        elif c == "F":
            out_basefmt = arg
        elif c == "b":
            out_baseimg = arg
        elif c == "u":
            unsafe = True
        elif c == "p":
            progress = True
        elif c == "t":
            cache = arg
        elif c == "T":
            src_cache = arg
        elif c == "q":
            quiet = True
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "U":
            force_share = True
    if quiet:
        progress = False
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    if not unsafe and out_baseimg is None:
        cli.error_exit("Must specify backing file (-b) or use unsafe mode (-u)")
    filename = getopt.argv[getopt.optind]
    meter = Progress(cli, progress, 2.0)
    meter.print(0, 100)
    try:
        if not check_cache_mode(cli, cache, False) or not check_cache_mode(cli, src_cache, True):
            return 1
        try:
            spec = image_spec(filename, image_opts, fmt)
            if unsafe and spec.backing_secrets:  # -u opens no backing file to take them
                raise OpenFailure(f"Could not open '{filename}': Block format 'qcow2' does not "
                                  f"support the option 'backing.encrypt.key-secret'")
            open_spec(cli, spec, "r+", backing=not unsafe).close()
        except OpenFailure as exc:
            report_failure(cli, exc)
            return 1
        if out_basefmt is not None and out_basefmt not in FORMATS:
            cli.error_report(f"Invalid format name: '{out_basefmt}'")
            return 1
        try:
            if not unsafe and out_baseimg and spec.backing_secrets:
                # options for the backing file turn the image's name into a json: one,
                # against which a relative new backing name cannot be resolved
                fmt_used = spec.fmt or qcow2lib.probe_format(host_path(spec.path))
                try:
                    full_backing_filename(json_filename(spec, fmt_used), out_baseimg)
                except qcow2lib.InvalidArgumentError as exc:
                    cli.error_report(f"Could not resolve backing filename: {error_text(exc)}")
                    return 1
            rebase(host_path(spec.path), out_baseimg or None, out_basefmt, unsafe=unsafe,
                   progress=meter.callback if meter.enabled else None, fmt=spec.fmt,
                   force_share=force_share, passphrases=spec_passphrases(cli, spec))
        except Qcow2Error as exc:
            cli.error_report(error_text(exc))
            return 1
        meter.print(100, 0)
        return 0
    finally:
        meter.end()


# --- commit ----------------------------------------------------------------------------------

def cmd_commit(cli: Cli, argv: list[str]) -> int:
    """`commit`: write an overlay's data into its backing file (or into -b further down)."""
    from qcow2lib.ops.commit import commit
    fmt = base = None
    cache = "writeback"
    progress = quiet = drop = image_opts = False
    getopt = GetoptLong(argv, ":f:ht:b:dpqr:", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts")))
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "f":
            fmt = arg
        elif c == "t":
            cache = arg
        elif c == "b":
            base = arg
            drop = True  # -b implies -d
        elif c == "d":
            drop = True
        elif c == "p":
            progress = True
        elif c == "q":
            quiet = True
        elif c == "r":
            if cvtnum(cli, "rate limit", arg) is None:
                return 1
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
    if quiet:
        progress = False
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if not check_cache_mode(cli, cache, False):
        return 1
    try:
        spec = image_spec(filename, image_opts, fmt)
        open_spec(cli, spec, "r+").close()
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    meter = Progress(cli, progress, 1.0)
    meter.print(0, 100)
    try:
        commit(host_path(spec.path), base, drop=drop,
               progress=meter.callback if meter.enabled else None, fmt=spec.fmt,
               passphrases=spec_passphrases(cli, spec))
    except Qcow2Error as exc:
        meter.end()
        cli.error_report(error_text(exc))
        return 1
    meter.print(100, 0)
    meter.end()
    if not quiet:
        cli.out("Image committed.\n")
    return 0


# --- amend -----------------------------------------------------------------------------------

QCOW2_AMEND_OPTS = (
    _SIZE_OPT,
    OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "str", "File name of a base image"),
    OptDesc("backing_fmt", "str", "Image format of the base image"),
    OptDesc("data_file", "str", "File name of an external data file"),
    OptDesc("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates"),
    OptDesc("refcount_bits", "num", "Width of a reference count entry in bits"),
    OptDesc("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
    OptDesc("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
    OptDesc("encrypt.old-secret", "str", "Select all keyslots that match this password"),
    OptDesc("encrypt.new-secret", "str", "New secret to set in the matching keyslots. Empty "
                                         "string to erase"),
    OptDesc("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
)


def print_amend_option_help(cli: Cli, fmt: str) -> int:
    if fmt not in FORMATS:
        cli.error_report(f"Unknown file format '{fmt}'")
        return 1
    if fmt != "qcow2":
        cli.error_report(f"Format driver '{fmt}' does not support option amendment")
        return 1
    cli.out(f"Amend options for '{fmt}':\n{option_help_lines(QCOW2_AMEND_OPTS)}")
    return 0


def _luks_amend_options(cli: Cli, opts: CreateOptions) -> dict:
    """The encrypt.* amend options for qcow2lib.crypto.amend_luks (secrets resolved)."""
    state = opts.get("encrypt.state") if opts.is_set("encrypt.state") else None
    if state is None:
        raise CreateError("Parameter 'state' is missing")
    if state not in ("active", "inactive"):
        raise CreateError(f"Parameter 'state' does not accept value '{state}'")
    result: dict = {"state": state}
    if opts.is_set("encrypt.keyslot"):
        result["keyslot"] = opts.value("encrypt.keyslot")
    if opts.is_set("encrypt.iter-time"):
        result["iter-time"] = opts.value("encrypt.iter-time")
    for name in ("new-secret", "old-secret"):
        if not opts.is_set(f"encrypt.{name}"):
            continue
        secret_id = opts.get(f"encrypt.{name}")
        wanted = (state == "active") == (name == "new-secret")
        if wanted and secret_id not in cli.secrets:
            raise CreateError(f"No secret with id '{secret_id}'")
        result[name] = cli.secrets.get(secret_id, b"")
    return result


def cmd_amend(cli: Cli, argv: list[str]) -> int:
    """`amend`: change qcow2 options of an existing image (compat, refcounts, LUKS slots...)."""
    from qcow2lib.crypto import amend_luks
    from qcow2lib.ops.amend import amend
    fmt = options = None
    cache = "writeback"
    quiet = progress = image_opts = force = False
    getopt = GetoptLong(argv, ":ho:f:t:pq", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("force", False, "force")))
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "o":
            if not valid_option_list(arg):
                cli.error_report(f"Invalid option list: {arg}")
                return 1
            options = arg if options is None else f"{options},{arg}"
        elif c == "f":
            fmt = arg
        elif c == "t":
            cache = arg
        elif c == "p":
            progress = True
        elif c == "q":
            quiet = True
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "force":
            force = True
    if options is None:
        cli.error_exit("Must specify options (-o)")
    meter = Progress(cli, progress and not quiet, 1.0)
    try:
        return _amend(cli, getopt, options, fmt, cache, image_opts, force, meter,
                      amend, amend_luks)
    finally:
        meter.end()


def _amend(cli, getopt, options, fmt, cache, image_opts, force, meter, amend, amend_luks) -> int:
    argv, optind = getopt.argv, getopt.optind
    wants_help = any(is_help for _, _, is_help in split_option_list(options))
    if fmt is not None and wants_help:
        return print_amend_option_help(cli, fmt)
    if optind != len(argv) - 1:
        cli.error_report("Expecting one image file name")
        return 1
    if not check_cache_mode(cli, cache, False):
        return 1
    spec = image_spec(argv[optind], image_opts, fmt) if image_opts else \
        ImageSpec(argv[optind], argv[optind], fmt)
    try:
        image = open_spec(cli, spec, "r+")
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with image:
        image_fmt = image.format
        encrypted = getattr(image, "encrypted", False)
        luks = encrypted and image.header.crypt_method == 2
        passphrase = secret_value(cli, spec.key_secret) if spec.key_secret else None
    if wants_help:
        return print_amend_option_help(cli, image_fmt)
    if image_fmt != "qcow2":
        cli.error_report(f"Format driver '{image_fmt}' does not support option amendment")
        return 1
    opts = CreateOptions(QCOW2_AMEND_OPTS, cli.warn_report)
    try:
        for name, value, _ in split_option_list(options):
            opts.set(name, value)
    except CreateError as exc:
        hint = exc.hint
        try:
            everything = CreateOptions(QCOW2_AMEND_OPTS + merged_create_opts("qcow2"),
                                       lambda message: None)
            for name, value, _ in split_option_list(options):
                everything.set(name, value)
            hint += "This option is only supported for image creation\n"
        except CreateError:
            pass
        report_failure(cli, CreateError(exc.message, hint))
        return 1
    meter.print(0, 0)
    arguments: dict = {}
    for name in ("compat", "backing_file", "backing_fmt", "data_file"):
        if opts.is_set(name):
            arguments[name] = opts.get(name)
    for name in ("size", "refcount_bits", "lazy_refcounts", "data_file_raw"):
        if opts.is_set(name):
            arguments[name] = opts.value(name)
    try:
        code = _amend_image(cli, spec, opts, arguments, encrypted, luks, passphrase, force,
                            meter, amend, amend_luks)
    finally:
        meter.print(100, 0)  # qemu-img reports 100% whether the amendment worked or not
    return code


def _amend_image(cli, spec, opts, arguments, encrypted, luks, passphrase, force, meter,
                 amend, amend_luks) -> int:
    compat = arguments.get("compat")
    if compat is not None and compat not in ("0.10", "v2", "1.1", "v3"):
        cli.error_report(f"Unknown compatibility level {compat}")
        return 1
    bits = arguments.get("refcount_bits")
    if bits is not None and (bits <= 0 or bits > 64 or bits & (bits - 1)):
        cli.error_report("Refcount width must be a power of two and may not exceed 64 bits")
        return 1
    try:
        if any(name.startswith("encrypt.") for name in opts.names()):
            if not encrypted:
                raise CreateError("Can't amend encryption options - encryption not present")
            if not luks:
                raise CreateError("Only LUKS encryption options can be amended")
            luks_options = _luks_amend_options(cli, opts)
            with open_spec(cli, spec, "r+", passphrase=passphrase) as image:
                hdr = image.header
                amend_luks(lambda offset, length: image.file.pread(length, offset),
                           lambda offset, data: image.file.pwrite(data, offset),
                           hdr.crypto_offset, hdr.crypto_length, passphrase, luks_options,
                           force)
                image.file.flush()
        if arguments:
            amend(host_path(spec.path), fmt=spec.fmt,
                  progress=(lambda done, total: meter.print(100.0 * done / total, 0))
                  if meter.enabled else None, **arguments)
    except CreateError as exc:
        report_failure(cli, exc)
        return 1
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    except Qcow2Error as exc:
        for line in error_text(exc).split("\n")[:1]:
            cli.error_report(line)
        sys.stderr.write("".join(line + "\n" for line in error_text(exc).split("\n")[1:]))
        return 1
    return 0


# --- dd --------------------------------------------------------------------------------------

def cmd_dd(cli: Cli, argv: list[str]) -> int:
    """`dd`: copy (part of) an image into a new image, dd(1)-style operands."""
    fmt = None
    out_fmt = "raw"
    image_opts = force_share = False
    getopt = GetoptLong(argv, ":hf:O:U", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("force-share", False, "U")))
    while (c := getopt.next()) is not None:
        if c == "O":
            out_fmt = getopt.optarg
        elif c == "f":
            fmt = getopt.optarg
        elif c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "U":
            force_share = True
        elif c == "object":
            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
    block_size = 512
    count = skip = None
    in_name = out_name = None
    for operand in getopt.argv[getopt.optind:]:
        key, eq, value = operand.partition("=")
        if not eq:
            cli.error_report(f"unrecognized operand {operand}")
            return 1
        if key not in ("bs", "count", "if", "of", "skip"):
            cli.error_report(f"unrecognized operand {key}")
            return 1
        if key == "bs":
            try:
                parsed = parse_size(value, warn=cli.warn_report)
            except SizeError as exc:
                if not exc.out_of_range:
                    cli.error_report("Invalid bs specified. You may use k, M, G, T, P or E "
                                     "suffixes for")
                    cli.error_report("kilobytes, megabytes, gigabytes, terabytes, petabytes "
                                     "and exabytes.")
                    return 1
                parsed = INT64_MAX + 1
            if not 1 <= parsed <= (1 << 31) - 1:
                cli.error_report(f"Invalid bs specified. Must be between 1 and {(1 << 31) - 1}.")
                return 1
            block_size = parsed
        elif key == "count":
            count = cvtnum(cli, "count", value)
            if count is None:
                return 1
        elif key == "skip":
            skip = cvtnum(cli, "skip", value)
            if skip is None:
                return 1
        elif key == "if":
            in_name = value
        else:
            out_name = value
    if in_name is None or out_name is None:
        cli.error_report("Must specify both input and output files")
        return 1
    try:
        source = open_spec(cli, image_spec(in_name, image_opts, fmt, force_share))
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with source:
        if out_fmt not in FORMAT_CREATE_OPTS:
            cli.error_report("Unknown file format")
            return 1
        try:
            out_path = host_path(out_name)
        except Qcow2Error as exc:
            cli.error_report(error_text(exc))
            return 1
        size = virtual_size(source)
        if count is not None and count <= INT64_MAX // block_size and count * block_size < size:
            size = count * block_size
        beyond = skip is not None and (skip > INT64_MAX // block_size or size < block_size * skip)
        out_size = 0 if beyond else size - block_size * (skip or 0)
        opts = CreateOptions(merged_create_opts(out_fmt), cli.warn_report)
        opts.set_number("size", out_size)
        try:
            _create_dd_target(cli, out_name, out_fmt, opts)
        except CreateError as exc:
            report_failure(cli, exc)
            return 1
        try:
            target = open_spec(cli, ImageSpec(out_name, out_path, out_fmt), "r+")
        except OpenFailure as exc:
            report_failure(cli, exc)
            return 1
        with target:
            if beyond:
                cli.error_report(f"{in_name}: cannot skip to specified offset")
                in_pos = size
            else:
                in_pos = (skip or 0) * block_size
            out_pos = 0
            step = max(block_size, 0)
            while in_pos < size:
                n = min(step, size - in_pos)
                try:
                    inside = max(0, min(n, source.size - in_pos))  # a raw file's last sector
                    data = (source.read(in_pos, inside) if inside else b"").ljust(n, b"\0")
                except Qcow2Error as exc:
                    cli.error_report(f"error while reading from input image file: "
                                     f"{error_text(exc)}")
                    return 1
                in_pos += n
                try:
                    target.write(out_pos, data)
                except Qcow2Error as exc:
                    cli.error_report(f"error while writing to output image file: "
                                     f"{error_text(exc)}")
                    return 1
                out_pos += n
            target.flush()
    return 0


def _create_dd_target(cli: Cli, filename: str, fmt: str, opts: CreateOptions) -> None:
    try:
        _create_convert_target(cli, filename, fmt, opts)
    except CreateError as exc:
        message = exc.message.replace(f"error while converting {fmt}: ",
                                      "error while creating output image: ", 1)
        raise CreateError(message, exc.hint) from exc


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
            process_object(cli, getopt.optarg)
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
        try:
            spec = image_spec(filename, True, fmt, force_share)
        except OpenFailure as exc:
            report_failure(cli, exc)
            return 1
        filename, fmt, force_share = spec.path, spec.fmt, spec.force_share
    try:
        infos = image_info_list(filename, fmt, chain, force_share)
    except ImageOpenError as exc:
        message = str(exc)
        if image_opts and message.startswith(f"Could not open '{spec.path}': "):
            message = f"Could not open '{spec.name}': " + message[len(spec.path) + 19:]
        cli.error_report(message)
        sys.stderr.write(exc.hint)
        return 1
    except Qcow2Error as exc:
        cli.error_report(error_text(exc))
        return 1
    if image_opts and spec.key_secret is not None:
        infos[0]["filename"] = json_filename(spec, infos[0]["format"])
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
            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
        # -T src_cache: accepted and ignored (qimg has no cache modes)
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    if output not in (None, "json", "human"):
        cli.error_report("--output must be used with human or json as argument.")
        return 1
    try:
        spec = image_spec(filename, image_opts, fmt, force_share)
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    failure = _check_open_failure(cli, spec, repair)
    if failure is not None:
        report_failure(cli, failure)
        return 1
    report = check_path(spec.path, repair, spec.fmt, spec.force_share, prog=cli.prog)
    report.filename = spec.name
    messages = report.messages  # (millions of lines for a badly damaged image)
    for start in range(0, len(messages), 4096):
        sys.stderr.write("\n".join(messages[start:start + 4096]) + "\n")
    if not quiet:
        cli.out(format_check_json(report) if output == "json" else format_check_human(report))
    if report.error:
        cli.error_report(report.error)
    return report.exit_code


def _check_open_failure(cli: Cli, spec: ImageSpec, repair: str | None) -> OpenFailure | None:
    """qemu-img check opens the image (and its backing chain, its encryption) before it
    checks anything: the failure it reports there, else None.

    The check itself reads the metadata with its own tolerant code, so only what QEMU's
    open refuses before checking counts here: a lock another process holds, a backing
    chain that cannot be opened (or loops), an encrypted image without its key.
    Anything else is left for the check to report.
    """
    try:
        qcow2lib.open(host_path(spec.path), "r", fmt=spec.fmt, backing=False,
                      force_share=True).close()
    except Qcow2Error:
        return None  # the check reports what is wrong with the file itself
    try:
        # (qemu-img warns of a probed raw image it opens for writing, here to repair it)
        open_spec(cli, spec, "r+" if repair else "r", warn_probe=bool(repair)).close()
    except OpenFailure as exc:
        cause = exc.__cause__
        text = exc.message
        if isinstance(cause, (ImageLockedError, InvalidSecret, qcow2lib.BadSecretError)) \
                or "Could not open backing file" in text or "loop" in text.lower() \
                or "too deep" in text or "encrypt.key-secret" in text:
            return exc
    return None


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
            process_object(cli, getopt.optarg)
        elif c == "image-opts":
            image_opts = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    filename = getopt.argv[getopt.optind]
    try:
        spec = image_spec(filename, image_opts, None, force_share)
        img = open_spec(cli, spec, "r" if action == "l" else "r+")
    except OpenFailure as exc:
        report_failure(cli, exc)
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
                if img.format == "raw" and spec.fmt is None:  # QEMU reopens it, warning again
                    sys.stderr.write(RAW_PROBE_WARNING.format(host_path(spec.path)))
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


def cmd_bitmap(cli: Cli, argv: list[str]) -> int:
    """`bitmap`: add, remove, clear, enable, disable or merge persistent bitmaps, in the
    order given; each one done stays done when a later one fails (as in qemu-img)."""
    from qcow2lib.ops import bitmap as bitmaps

    fmt = src_fmt = src_filename = None
    image_opts = add = merge = False
    granularity = 0
    actions: list[tuple[str, str | None]] = []
    getopt = GetoptLong(argv, ":b:f:F:g:h", (
        LongOpt("help", False, "h"), LongOpt("object", True, "object"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("add", False, "add"),
        LongOpt("remove", False, "remove"), LongOpt("clear", False, "clear"),
        LongOpt("enable", False, "enable"), LongOpt("disable", False, "disable"),
        LongOpt("merge", True, "merge"), LongOpt("granularity", True, "g"),
        LongOpt("source-file", True, "b"), LongOpt("source-format", True, "F")))
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "b":
            src_filename = arg
        elif c == "f":
            fmt = arg
        elif c == "F":
            src_fmt = arg
        elif c == "g":
            value = cvtnum(cli, "granularity", arg)
            if value is None:
                return 1
            granularity = value
        elif c in ("add", "remove", "clear", "enable", "disable", "merge"):
            actions.append((c, arg))
            add = add or c == "add"
            merge = merge or c == "merge"
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
    problem = None
    if not actions:
        problem = "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
    elif granularity and not add:
        problem = "granularity only supported with --add"
    elif src_fmt and not src_filename:
        problem = "-F only supported with -b"
    elif src_filename and not merge:
        problem = "Merge bitmap source file only supported with --merge"
    elif getopt.optind != len(getopt.argv) - 2:
        problem = "Expecting filename and bitmap name"
    if problem:
        cli.error_report(problem)
        return 1
    filename, name = getopt.argv[getopt.optind:]
    source = None
    try:
        img = open_spec(cli, image_spec(filename, image_opts, fmt), "r+", backing=False)
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    try:
        if src_filename:
            try:
                source = open_spec(cli, image_spec(src_filename, False, src_fmt), "r",
                                   backing=False)
            except OpenFailure as exc:
                report_failure(cli, exc)
                return 1
        for action, source_name in actions:
            try:
                if img.format != "qcow2":
                    raise Qcow2Error(f"Dirty bitmap '{name}' not found" if action != "add" else
                                     f"Can't store persistent bitmaps to {filename}: "
                                     f"Operation not supported")
                if action == "add":  # (QEMU passes the granularity on as 32 bits)
                    bitmaps.add_bitmap(img, name, granularity & 0xFFFFFFFF if granularity
                                       else None)
                elif action == "remove":
                    bitmaps.remove_bitmap(img, name)
                elif action == "clear":
                    bitmaps.clear_bitmap(img, name)
                elif action in ("enable", "disable"):
                    bitmaps.set_bitmap_enabled(img, name, action == "enable")
                else:
                    bitmaps.merge_bitmap(img, name, source or img, source_name)
            except Qcow2Error as exc:
                cli.error_report(f"Operation {action} on bitmap {name} failed: "
                                 f"{error_text(exc)}")
                if "is inconsistent" in str(exc):
                    sys.stderr.write("Try block-dirty-bitmap-remove to delete this bitmap "
                                     "from disk\n")
                return 1
    finally:
        if source is not None:
            source.close()
        img.close()
    return 0


INT_MAX = (1 << 31) - 1


def cmd_bench(cli: Cli, argv: list[str]) -> int:
    """`bench`: time `count` reads (or writes, -w) of `-s` bytes each, `-d` of them in
    flight at once on as many threads, at offsets stepping by -S from -o (wrapping at the
    end of the image), with an optional flush every --flush-interval requests."""
    fmt = None
    quiet = image_opts = force_share = is_write = False
    drain_on_flush = True
    count, depth, offset, bufsize, step, pattern, flush_interval = 75000, 64, 0, 4096, 0, 0, 0
    cache = "writeback"

    def whole_number(text: str, limit: int, what: str) -> int | None:
        try:
            value = parse_number(text)
        except SizeError:
            value = None
        if value is None or value > limit:
            cli.error_report(f"Invalid {what} specified")
            return None
        return value

    getopt = GetoptLong(argv, ":hc:d:f:ni:o:qs:S:t:wU", (
        LongOpt("help", False, "h"), LongOpt("flush-interval", True, "flush-interval"),
        LongOpt("image-opts", False, "image-opts"), LongOpt("pattern", True, "pattern"),
        LongOpt("no-drain", False, "no-drain"), LongOpt("force-share", False, "U")))
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "c":
            if (count := whole_number(arg, INT_MAX, "request count")) is None:
                return 1
        elif c == "d":
            if (depth := whole_number(arg, INT_MAX, "queue depth")) is None:
                return 1
        elif c == "f":
            fmt = arg
        elif c == "n":
            continue  # native AIO: qcow2lib's threads serve every request
        elif c == "i":
            if arg not in ("threads", "native", "io_uring"):
                cli.error_report(f"Invalid aio option: {arg}")
                return 1
        elif c == "o":
            if (offset := cvtnum(cli, "offset", arg)) is None:
                return 1
        elif c == "q":
            quiet = True
        elif c == "s":
            if (bufsize := cvtnum(cli, "buffer size", arg, INT_MAX)) is None:
                return 1
        elif c == "S":
            if (step := cvtnum(cli, "step_size", arg, INT_MAX)) is None:
                return 1
        elif c == "t":
            if arg not in CACHE_MODES:
                cli.error_report("Invalid cache mode")
                return 1
            cache = arg
        elif c == "w":
            is_write = True
        elif c == "U":
            force_share = True
        elif c == "pattern":
            if (pattern := whole_number(arg, 0xFF, "pattern byte")) is None:
                return 1
        elif c == "flush-interval":
            if (flush_interval := whole_number(arg, INT_MAX, "flush interval")) is None:
                return 1
        elif c == "no-drain":
            drain_on_flush = False
        elif c == "image-opts":
            image_opts = True
    if getopt.optind != len(getopt.argv) - 1:
        cli.error_exit("Expecting one image file name")
    if not is_write and flush_interval:
        cli.error_report("--flush-interval is only available in write tests")
        return 1
    if flush_interval and flush_interval < depth:
        cli.error_report("Flush interval can't be smaller than depth")
        return 1
    try:
        spec = image_spec(getopt.argv[getopt.optind], image_opts, fmt, force_share)
        img = open_spec(cli, spec, "r+" if is_write else "r", warn_probe=not quiet,
                        cache=cache)
    except OpenFailure as exc:
        report_failure(cli, exc)
        return 1
    with img:
        step = step or bufsize
        cli.out(f"Sending {count} {'write' if is_write else 'read'} requests, {bufsize} bytes "
                f"each, {depth} in parallel (starting at offset {offset}, step size {step})\n")
        if flush_interval:
            cli.out(f"Sending flush every {flush_interval} requests\n")
        run = _BenchRun(img, count, depth, offset, bufsize, step, pattern, is_write,
                        flush_interval, drain_on_flush)
        start = time.monotonic()
        failure = run.run()
        elapsed = time.monotonic() - start
        if failure is not None:
            cli.error_report(f"Failed request: {failure}")
            return 1
        cli.out(f"Run completed in {elapsed:.3f} seconds.\n")
    return 0


class _BenchRun:
    """QEMU's bench_cb() on threads: `depth` requests in flight, each on its own buffer;
    at a flush point the queue drains (unless --no-drain) and a flush is sent."""

    def __init__(self, image, count, depth, offset, bufsize, step, pattern, is_write,
                 flush_interval, drain_on_flush):
        self.image, self.remaining, self.offset = image, count, offset
        self.bufsize, self.step, self.write = bufsize, step, is_write
        self.flush_interval, self.drain = flush_interval, drain_on_flush
        # More threads than two per CPU only contend for the GIL (I/O releases it).
        self.threads = max(1, min(depth, count, 2 * (os.cpu_count() or 1)))
        self.buffers = [bytearray([pattern]) * bufsize for _ in range(self.threads)]
        self.in_flight = 0
        self.flushing = False
        self.failure: str | None = None
        self.cond = threading.Condition()

    def run(self) -> str | None:
        workers = [threading.Thread(target=self._worker, args=(buffer,), daemon=True)
                   for buffer in self.buffers]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return self.failure

    def _next(self) -> int | None:
        """Under cond: the offset of the next request, None when all are issued."""
        while self.flushing and self.failure is None:
            self.cond.wait()
        if self.failure is not None or self.remaining <= self.in_flight:
            return None
        self.in_flight += 1
        offset = self.offset
        self.offset = (self.offset + self.step) % self.image.size
        return offset

    def _worker(self, buffer: bytearray) -> None:
        image, view = self.image, memoryview(buffer)
        while True:
            with self.cond:
                offset = self._next()
            if offset is None:
                return
            try:
                if self.write:
                    image.write(offset, view)
                else:
                    image.readinto(offset, view)
                error = None
            except Qcow2Error as exc:
                error = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
                    "Input/output error"
            with self.cond:
                left = self.remaining - self.in_flight
                self.remaining -= 1
                self.in_flight -= 1
                if error is not None:
                    self.failure = self.failure or error
                flush = self.flush_interval and left % self.flush_interval == 0 and \
                    (not self.in_flight or not self.drain)
                if flush and self.drain:
                    self.flushing = True
                self.cond.notify_all()
            if flush and self.failure is None:
                try:
                    image.flush()
                except Qcow2Error as exc:
                    with self.cond:
                        self.failure = self.failure or error_text(exc)
                with self.cond:
                    self.flushing = False
                    self.cond.notify_all()


# --- entry point -----------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Cli, list[str]], int]] = {
    "amend": cmd_amend,
    "bench": cmd_bench,
    "bitmap": cmd_bitmap,
    "convert": cmd_convert,
    "commit": cmd_commit,
    "compare": cmd_compare,
    "create": cmd_create,
    "dd": cmd_dd,
    "info": cmd_info,
    "map": cmd_map,
    "measure": cmd_measure,
    "rebase": cmd_rebase,
    "resize": cmd_resize,
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
    cli = Cli(prog)
    try:
        return run(cli, [prog, *args])
    except CliExit as exc:
        return exc.code
    except qcow2lib.Qcow2Error as exc:  # a library error no command turned into its own text
        cli.error_report(str(exc))
        return 1
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
