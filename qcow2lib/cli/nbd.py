"""`nbd`: serve an image over NBD in the foreground, with qemu-nbd's options and messages."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import (
    CACHE_MODES,
    OpenFailure,
    image_spec,
    load_snapshot,
    open_spec,
    parse_snapshot_param,
)
from qcow2lib.cli.secrets import process_object
from qcow2lib.exports.stop_signals import hold_stop_signals, stop_on_signals
from qcow2lib.ops import error_text

NBD_HELP = """\
Usage: {prog} nbd [OPTIONS] IMAGE
Serve a disk image over NBD in the foreground, until the last client leaves (unless
--persistent) or SIGINT/SIGTERM; the image is then flushed and closed cleanly.

Connection properties:
  -k, --socket=PATH         listen on this Unix socket (instead of TCP)
  -b, --bind=IFACE          TCP: interface to bind to (default `0.0.0.0')
  -p, --port=PORT           TCP: port to listen on (default `10809'; 0: any free port)
  -e, --shared=NUM          device can be shared by NUM clients (default `1'; 0: any)
  -t, --persistent          don't exit on the last connection
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description

Block device options:
  --object type,id=ID,...   define a secret, e.g. the passphrase of an encrypted image:
                            --object secret,id=sec0,file=PATH with --image-opts
                            driver=qcow2,file.filename=IMAGE,encrypt.key-secret=sec0
  --image-opts              treat IMAGE as a full set of image options
  -f, --format=FORMAT       set image format (raw, qcow2)
  -r, --read-only           export read-only
  -l, --load-snapshot=SNAPSHOT_PARAM
                            export an internal snapshot of IMAGE, read-only;
                            SNAPSHOT_PARAM is 'snapshot.id=[ID],snapshot.name=[NAME]'
                            or '[ID_OR_NAME]'
      --snapshot=NAME       the same as -l NAME. NOTE: qemu-nbd's -s/--snapshot takes
                            no argument and means a temporary overlay over IMAGE; this
                            one names an internal snapshot to export
      --cache=MODE          cache mode: 'none', 'writeback' (default), 'writethrough',
                            'directsync' and 'unsafe'
      --discard=MODE        client discards: 'ignore' (default) or 'unmap'
      --detect-zeroes=MODE  turn writes of zeros into zero writes: 'off' (default),
                            'on' or 'unmap' (needs --discard=unmap)
  -U, --force-share         open the image without taking its locks

Each client's disconnection is logged on stderr. Exit status: 0 after a clean stop,
1 when the image, the options or the socket are not usable (one message says why).
"""

SNAPSHOT_PARAM_PREFIX = "snapshot."
MAX_NBD_STRING = 4096


def cmd_nbd(cli: Cli, argv: list[str]) -> int:
    """`nbd`: export IMAGE over NBD until the last client is gone or a signal stops it."""
    from qcow2lib.exports.nbd import DEFAULT_PORT, NBDServer
    from qcow2lib.exports.write_policy import WritePolicyDevice

    fmt = socket_path = host = port_text = snapshot = None
    export_name = description = ""
    image_opts = read_only = persistent = force_share = False
    shared, cache, discard, detect_zeroes = 1, "writeback", "ignore", "off"
    getopt = GetoptLong(
        argv,
        "hf:rtx:D:e:l:k:b:p:U",
        (
            LongOpt("help", False, "h"),
            LongOpt("format", True, "f"),
            LongOpt("read-only", False, "r"),
            LongOpt("persistent", False, "t"),
            LongOpt("export-name", True, "x"),
            LongOpt("description", True, "D"),
            LongOpt("shared", True, "e"),
            LongOpt("load-snapshot", True, "l"),
            LongOpt("snapshot", True, "snapshot"),
            LongOpt("socket", True, "k"),
            LongOpt("bind", True, "b"),
            LongOpt("port", True, "p"),
            LongOpt("cache", True, "cache"),
            LongOpt("discard", True, "discard"),
            LongOpt("detect-zeroes", True, "detect-zeroes"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
            LongOpt("force-share", False, "U"),
        ),
    )

    def usage_error(message: str) -> int:
        cli.error_report(message)
        cli.error_report(f"Try `{cli.prog} nbd --help' for more information.")
        return 1

    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c == "?":
            return usage_error(getopt.error_message)
        if c == "h":
            cli.out(NBD_HELP.format(prog=cli.prog))
            return 0
        if c == "f":
            fmt = arg
        elif c == "r":
            read_only = True
        elif c == "t":
            persistent = True
        elif c == "x":
            export_name = arg
        elif c == "D":
            description = arg
        elif c == "e":
            try:
                shared = int(arg, 0)
            except ValueError:
                shared = -1
            if shared < 0:
                cli.error_report(f"Invalid shared device number '{arg}'")
                return 1
        elif c in ("l", "snapshot"):
            snapshot = arg
        elif c == "k":
            socket_path = arg
        elif c == "b":
            host = arg
        elif c == "p":
            port_text = arg
        elif c == "cache":
            if arg not in CACHE_MODES:
                cli.error_report(f"Invalid cache mode `{arg}'")
                return 1
            cache = arg
        elif c == "discard":
            if arg not in ("ignore", "off", "unmap", "on"):
                cli.error_report(f"Invalid discard mode `{arg}'")
                return 1
            discard = "unmap" if arg in ("unmap", "on") else "ignore"
        elif c == "detect-zeroes":
            if arg not in ("off", "on", "unmap"):
                cli.error_report(
                    f"Failed to parse detect_zeroes mode: invalid parameter value: {arg}"
                )
                return 1
            detect_zeroes = arg
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
        elif c == "U":
            force_share = True
    if len(getopt.argv) - getopt.optind != 1:
        cli.error_report("Invalid number of arguments")
        sys.stderr.write(f"Try `{cli.prog} nbd --help' for more information.\n")
        return 1
    if image_opts and fmt is not None:
        cli.error_report("--image-opts and -f are mutually exclusive")
        return 1
    if detect_zeroes == "unmap" and discard != "unmap":
        cli.error_report(
            "setting detect-zeroes to unmap is not allowed without setting "
            "discard operation to unmap"
        )
        return 1
    for what, text in (("export name", export_name), ("export description", description)):
        if len(text.encode("utf-8", "surrogateescape")) > MAX_NBD_STRING or "\0" in text:
            cli.error_report(f"{what} '{text}' too long")
            return 1
    if socket_path is not None and (host is not None or port_text is not None):
        cli.error_report("-k/--socket cannot be used with -b/--bind or -p/--port")
        return 1
    port = None
    if socket_path is None:
        host = "0.0.0.0" if host is None else host
        port = DEFAULT_PORT
        if port_text is not None:
            port = int(port_text) if port_text.isascii() and port_text.isdigit() else -1
            if not 0 <= port <= 65535:
                cli.error_report(
                    f"Invalid port '{port_text}': a number from 0 to 65535 is expected"
                )
                return 1
    snapshot_opts = None
    if snapshot is not None and snapshot.startswith(SNAPSHOT_PARAM_PREFIX):
        snapshot_opts = parse_snapshot_param(cli, snapshot)
        if snapshot_opts is None:
            return 1
    filename = getopt.argv[getopt.optind]

    with ExitStack() as cleanup:
        hold_stop_signals(cleanup)
        try:
            spec = image_spec(filename, image_opts, fmt, force_share)
            writable = not read_only and snapshot is None
            device = open_spec(cli, spec, "r+" if writable else "r", cache=cache)
            cleanup.callback(device.close)
            if snapshot is not None:
                view = load_snapshot(device, snapshot_opts, None if snapshot_opts else snapshot)
                cleanup.callback(view.close)
                device = view
        except OpenFailure as exc:
            message = exc.message  # qemu-nbd names the image once, not twice as qemu-img
            prefix = f"Could not open '{filename}': "
            if message.startswith(prefix):
                message = f"Failed to blk_new_open '{filename}': {message[len(prefix) :]}"
            cli.error_report(message)
            sys.stderr.write(exc.hint)
            return 1
        except Qcow2Error as exc:  # e.g. a key-secret naming no --object
            cli.error_report(f"Failed to blk_new_open '{filename}': {error_text(exc)}")
            return 1
        if writable:
            device = WritePolicyDevice(device, discard=discard, detect_zeroes=detect_zeroes)
        try:
            server = NBDServer(
                device,
                unix_path=socket_path,
                host=host,
                port=port,
                read_only=not writable,
                export_name=export_name,
                description=description,
                persistent=persistent,
                shared=shared,
            )
            server.start()
        except Qcow2Error as exc:
            reason = error_text(exc).rsplit(": ", 1)[-1]  # the system's words, not ours
            where = socket_path if socket_path is not None else f"{host}:{port}"
            cli.error_report(f"Failed to bind socket to {where}: {reason}")
            return 1
        log_to_stderr(cli)
        with stop_on_signals(server.shutdown):
            server.serve_forever()
    return 0


def log_to_stderr(cli: Cli) -> None:
    """The exports' log lines (one per connection, failures) go to stderr as `prog: ...`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{cli.prog}: %(message)s"))
    logger = logging.getLogger("qcow2lib.exports")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
