"""`vhost-user-blk`: serve an image to a QEMU guest as its virtio-blk disk, in the foreground."""

from __future__ import annotations

import sys
from contextlib import ExitStack

from qcow2lib import Qcow2Error
from qcow2lib.cli.common import Cli
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt
from qcow2lib.cli.images import OpenFailure, image_spec, open_spec
from qcow2lib.cli.nbd import log_to_stderr
from qcow2lib.cli.secrets import process_object
from qcow2lib.exports.stop_signals import hold_stop_signals, stop_on_signals
from qcow2lib.ops import error_text

VHOST_USER_BLK_HELP = """\
Usage: {prog} vhost-user-blk [OPTIONS] --socket PATH IMAGE
Serve a disk image as a vhost-user-blk back-end on a Unix socket, in the foreground, to
one QEMU at a time (it may disconnect and reconnect), until SIGINT or SIGTERM; the image
is then flushed and closed cleanly. QEMU's side (guest RAM must be shared memory):

  -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem
  -chardev socket,id=disk0,path=PATH -device vhost-user-blk-pci,chardev=disk0

Options:
  -k, --socket=PATH         the Unix socket to listen on (required)
  --object type,id=ID,...   define a secret, e.g. the passphrase of an encrypted image:
                            --object secret,id=sec0,file=PATH with --image-opts
                            driver=qcow2,file.filename=IMAGE,encrypt.key-secret=sec0
  --image-opts              treat IMAGE as a full set of image options
  -f, --format=FORMAT       set image format (raw, qcow2)
  -r, --read-only           a read-only disk (the guest sees VIRTIO_BLK_F_RO)
  --num-queues=N            number of request queues, 1 to 64 (default 1); give QEMU's
                            vhost-user-blk-pci the same num-queues

Connections and failures are logged on stderr. Exit status: 0 after a clean stop, 1 when
the image, the options or the socket are not usable (one message says why).
"""


def cmd_vhost_user_blk(cli: Cli, argv: list[str]) -> int:
    """`vhost-user-blk`: serve IMAGE on a vhost-user socket until a signal stops it."""
    from qcow2lib.exports.vhost_user_blk import VhostUserBlkServer

    fmt = socket_path = None
    image_opts = read_only = False
    num_queues = 1
    getopt = GetoptLong(
        argv,
        "hf:rk:",
        (
            LongOpt("help", False, "h"),
            LongOpt("format", True, "f"),
            LongOpt("read-only", False, "r"),
            LongOpt("socket", True, "k"),
            LongOpt("num-queues", True, "num-queues"),
            LongOpt("object", True, "object"),
            LongOpt("image-opts", False, "image-opts"),
        ),
    )
    while (c := getopt.next()) is not None:
        arg = getopt.optarg
        if c == "?":
            cli.error_report(getopt.error_message)
            cli.error_report(f"Try `{cli.prog} vhost-user-blk --help' for more information.")
            return 1
        if c == "h":
            cli.out(VHOST_USER_BLK_HELP.format(prog=cli.prog))
            return 0
        if c == "f":
            fmt = arg
        elif c == "r":
            read_only = True
        elif c == "k":
            socket_path = arg
        elif c == "num-queues":
            num_queues = int(arg) if arg.isascii() and arg.isdigit() else 0
            if not 1 <= num_queues <= 64:
                cli.error_report(f"Invalid num-queues '{arg}': a number from 1 to 64 is expected")
                return 1
        elif c == "object":
            process_object(cli, arg)
        elif c == "image-opts":
            image_opts = True
    if len(getopt.argv) - getopt.optind != 1:
        cli.error_report("Invalid number of arguments")
        sys.stderr.write(f"Try `{cli.prog} vhost-user-blk --help' for more information.\n")
        return 1
    if socket_path is None:
        cli.error_report("--socket PATH is required")
        return 1
    if image_opts and fmt is not None:
        cli.error_report("--image-opts and -f are mutually exclusive")
        return 1
    filename = getopt.argv[getopt.optind]
    with ExitStack() as cleanup:
        hold_stop_signals(cleanup)
        try:
            device = open_spec(
                cli, image_spec(filename, image_opts, fmt), "r" if read_only else "r+"
            )
        except OpenFailure as exc:
            cli.error_report(exc.message)
            sys.stderr.write(exc.hint)
            return 1
        except Qcow2Error as exc:  # e.g. a key-secret naming no --object
            cli.error_report(f"Could not open '{filename}': {error_text(exc)}")
            return 1
        cleanup.callback(device.close)
        server = VhostUserBlkServer(device, socket_path, read_only=read_only, num_queues=num_queues)
        log_to_stderr(cli)
        try:
            server.start()
        except Qcow2Error as exc:
            cli.error_report(
                f"Failed to bind socket to {socket_path}: {error_text(exc).rsplit(': ', 1)[-1]}"
            )
            return 1
        cleanup.callback(server.shutdown)
        with stop_on_signals(server.shutdown):
            server.wait()
    return 0
