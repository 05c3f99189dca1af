"""qimg: a drop-in replacement for `qemu-img` 7.2, built on qcow2lib.

Scripts and management tools drive qemu-img by its exact options, messages, exit codes
and output layout, so this package reproduces them: GNU getopt_long() argument handling
(permutation, abbreviations, error wording), QEMU's "-o name=value" option lists, its
messages prefixed with the program name taken from argv[0], and its JSON/human output
(including the hash-table key order of QEMU's JSON dicts). Every action is a qcow2lib
call; this package only parses arguments and prints. The engine never imports it.

Subcommands are listed in COMMANDS, each implemented by a module of this package that is
imported only when its command runs: scripts start qimg thousands of times, so start-up
time counts. A command's function takes (cli, argv) with argv[0] the command name and
returns the exit code.
"""

from __future__ import annotations

import _signal  # `signal` would import enum (start-up time)
import gc
import sys

import qcow2lib
from qcow2lib.cli.common import Cli, CliExit, DroppingStream
from qcow2lib.cli.gnu_getopt import GetoptLong, LongOpt


class Command:
    """Where a subcommand lives and how `--help` shows it."""

    __slots__ = ("module", "function", "synopsis")

    def __init__(self, module: str, function: str, synopsis: str | None):
        self.module = module  # its module in this package, imported when the command runs
        self.function = function  # function(cli: Cli, argv: list[str]) -> int in that module
        self.synopsis = synopsis  # its line under "Command syntax" in --help (None: unlisted)


# In the order qemu-img's help lists them.
COMMANDS: dict[str, Command] = {
    "amend": Command(
        "amend",
        "cmd_amend",
        "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] "
        "[--force] -o options filename",
    ),
    "bench": Command(
        "bench",
        "cmd_bench",
        "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] "
        "[-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] "
        "[-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename",
    ),
    "bitmap": Command(
        "bitmap",
        "cmd_bitmap",
        "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | "
        "--disable)... [-b source_file [-F source_fmt]] [-g granularity] "
        "[--object objectdef] [--image-opts | -f fmt] filename bitmap",
    ),
    "check": Command(
        "check",
        "cmd_check",
        "check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] "
        "[-r [leaks | all]] [-T src_cache] [-U] filename",
    ),
    "commit": Command(
        "commit",
        "cmd_commit",
        "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] "
        "[-b base] [-r rate_limit] [-d] [-p] filename",
    ),
    "compare": Command(
        "compare",
        "cmd_compare",
        "compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] "
        "[-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
    ),
    "convert": Command(
        "convert",
        "cmd_convert",
        "convert [--object objectdef] [--image-opts] [--target-image-opts] "
        "[--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] "
        "[-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] "
        "[-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] "
        "[-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] "
        "output_filename",
    ),
    "create": Command(
        "create",
        "cmd_create",
        "create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] "
        "[-u] [-o options] filename [size]",
    ),
    "dd": Command(
        "dd",
        "cmd_dd",
        "dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] "
        "[skip=blocks] if=input of=output",
    ),
    "info": Command(
        "info",
        "cmd_info",
        "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] "
        "[--backing-chain] [-U] filename",
    ),
    "map": Command(
        "map",
        "cmd_map",
        "map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] "
        "[--max-length=len] [--output=ofmt] [-U] filename",
    ),
    "measure": Command(
        "measure",
        "cmd_measure",
        "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | "
        "[--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]",
    ),
    "snapshot": Command(
        "snapshot",
        "cmd_snapshot",
        "snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | "
        "-c snapshot | -d snapshot] filename",
    ),
    "rebase": Command(
        "rebase",
        "cmd_rebase",
        "rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] "
        "[-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename",
    ),
    "resize": Command(
        "resize",
        "cmd_resize",
        "resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] "
        "[-q] [--shrink] filename [+ | -]size",
    ),
    # qimg's own commands: qemu-img's help does not list them (its text stays qemu-img's);
    # each has its own `--help`, and HELP_BOTTOM names them.
    "nbd": Command("nbd", "cmd_nbd", None),
    "vhost-user-blk": Command("vhost_user_blk", "cmd_vhost_user_blk", None),
    "mount": Command("mount", "cmd_mount", None),
    "umount": Command("mount", "cmd_umount", None),
}


def run(cli: Cli, argv: list[str]) -> int:
    """qemu-img's main(): global options, then dispatch to the subcommand."""
    if len(argv) < 2:
        cli.error_exit("Not enough arguments")
    getopt = GetoptLong(
        argv,
        "+:hVT:",
        (LongOpt("help", False, "h"), LongOpt("version", False, "V"), LongOpt("trace", True, "T")),
    )
    while (c := getopt.next()) is not None:
        if c in ":?":
            cli.option_error(getopt, c)
        elif c == "h":
            cli.help()
        elif c == "V":
            from qcow2lib.cli.help import VERSION_TEXT

            cli.out(VERSION_TEXT)
            return 0
        elif c == "T":
            cli.unsupported("-T/--trace")
    if getopt.optind >= len(getopt.argv):
        return 0
    command = getopt.argv[getopt.optind]
    entry = COMMANDS.get(command)
    if entry is None:
        cli.error_exit(f"Command not found: {command}")
    # (__import__, not importlib.import_module: the importlib package costs start-up time)
    module = __import__(f"{__name__}.{entry.module}", fromlist=(entry.function,))
    handler = getattr(module, entry.function)
    return handler(cli, getopt.argv[getopt.optind :])


def _print_notice(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run qimg with `argv` (default sys.argv[1:]); messages name `prog` (default argv[0])."""
    if argv is None:
        # As a program, die of Ctrl-C the way qemu-img does (it keeps SIGINT's default
        # action): no traceback, and the parent sees death by SIGINT (a shell: 130).
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    if prog is None:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "qimg"
        prog = prog.removesuffix(".py")  # `python -m qimg` and `python qimg.py` say "qimg"
    args = sys.argv[1:] if argv is None else list(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    if argv is None:
        sys.stdout, sys.stderr = (
            DroppingStream.around(sys.stdout),
            DroppingStream.around(sys.stderr),
        )
    cli = Cli(prog)
    # a driver's notices (an image found corrupt) go out when they happen, as QEMU's do
    qcow2lib.errors.set_notice_listener(_print_notice)
    try:
        return run(cli, [prog, *args])
    except CliExit as exc:
        return exc.code
    except qcow2lib.Qcow2Error as exc:  # a library error no command turned into its own text
        from qcow2lib.ops import error_text

        cli.error_report(error_text(exc))
        return 1
    finally:
        if cli.throttle_groups:  # dropped: main may run again in this process
            from qcow2lib.throttle import unregister_group

            for group in cli.throttle_groups:
                unregister_group(group)
        sys.stdout.flush()
        if argv is None:
            # As a program the process ends next, and the interpreter's exit would run a
            # garbage collection over every object qimg made: about 3 ms of a 25 ms `info`.
            # Frozen objects are left out of it. Nothing here needs it: no object of
            # qimg's has a finalizer (files and images are closed explicitly), and the
            # interpreter still flushes stdout and stderr and runs atexit handlers.
            gc.freeze()
