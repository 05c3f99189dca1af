#!/usr/bin/env python3
"""Speed and memory of qcow2lib/qimg against the reference tools, side by side.

    python3 bench/bench.py [--quick] [--cpu] [--size-mib N] [--rounds R] [--only NAME...]
                           [--markdown FILE] [--dir DIR] [--fs-source DIR]

Every case runs through qcow2lib/qimg and through the reference (qemu-img, qemu-nbd,
pyqcow, dissect.hypervisor) in the same run on the same files, ours and theirs taking
turns to go first, `--rounds` times. The table gives the median time of each side,
ours/theirs (below 1.0: we are faster), the peak RSS of each side's process (os.wait4),
the target from issue 13 and whether it is met. Cases: startup, snapshot, convert,
checkmap, randio, read, readwhy, open, exports, guest. Nothing here is a test: timings depend
on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import CASES, QEMU_IMG, Config, Fixtures  # noqa: E402
import measure  # noqa: E402
from measure import format_markdown, format_text, run_case, table_rows  # noqa: E402


def machine() -> str:
    """One line naming what the numbers were measured on."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run(
        [QEMU_IMG, "--version"], capture_output=True, text=True
    ).stdout.splitlines()[:1]
    load = " ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python "
        f"{platform.python_version()}, {qemu[0] if qemu else 'qemu-img ?'}, "
        f"load average at start {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, 1 round: checks that the suite works (~2 min)",
    )
    parser.add_argument("--size-mib", type=int, help="size of the data images (1024)")
    parser.add_argument("--rounds", type=int, help="runs of each side per row (3)")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=[case.name for case in CASES],
        help="run only these cases",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="command rows report CPU time (user+sys) and the minimum over the rounds",
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the table here")
    parser.add_argument("--dir", help="where the scratch images go (a temporary directory)")
    parser.add_argument(
        "--fs-source",
        help="tree copied into the ext4 image (/usr/share; /usr/share/zoneinfo with --quick)",
    )
    args = parser.parse_args()
    measure.CPU_TIME = args.cpu
    size_mib = args.size_mib or (64 if args.quick else 1024)
    rounds = args.rounds or (1 if args.quick else 3)
    fs_source = Path(args.fs_source or ("/usr/share/zoneinfo" if args.quick else "/usr/share"))
    selected = [case for case in CASES if not args.only or case.name in args.only]

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}\n"
        f"data images {size_mib} MiB, {rounds} round(s), ext4 image of {fs_source}"
        + ("; command rows: CPU time (user+sys), minimum of the rounds" if args.cpu else "")
    )
    log(header)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcow2lib-bench-", dir=args.dir) as tmp:
        config = Config(
            directory=Path(tmp),
            size=size_mib << 20,
            io_count=2000 if args.quick else 20000,
            fs_source=fs_source,
            snapshots=8 if args.quick else 50,
        )
        fixtures = Fixtures(config)
        for case in selected:
            log(f"[{case.name}] {case.title}")
            rows += run_case(case, fixtures, rounds, log)
    lines = table_rows(rows)
    print(header)
    print(format_text(lines))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.markdown:
        Path(args.markdown).write_text(f"{header}\n\n{format_markdown(lines)}\n")


if __name__ == "__main__":
    main()
