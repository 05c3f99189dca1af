"""qimg bench next to qemu-img bench: the same report (but the time), the same errors and
exit codes, and for write runs the same resulting image."""

from __future__ import annotations

import re

import pytest

from qemutools import qemu_create, qemu_img, qemu_io
from test_cli_create_info import Twins, twins  # noqa: F401 (fixture)


def _mask_time(text: str) -> str:
    return re.sub(r"completed in \d+\.\d{3} seconds", "completed in <t> seconds", text)


@pytest.fixture
def bench_twins(twins: Twins) -> Twins:
    def build():
        qemu_create("img", "8M", options={"cluster_size": "4k"})
        qemu_io("img", "write -P 3 0 2M")
        qemu_img("create", "-q", "-f", "raw", "r.raw", "1M")

    twins.setup_copied(build)
    return twins


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "500", "img"],
        ["-c", "300", "-d", "1", "-s", "64k", "-S", "96k", "-o", "1M", "img"],
        ["-c", "0x100", "-d", "8", "-i", "threads", "-t", "none", "img"],
        ["-c", "50", "-f", "raw", "r.raw"],
        ["-c", "10", "-U", "-q", "img"],
    ],
)
def test_read_runs_report_like_qemu_img(bench_twins, args):
    bench_twins.assert_same("bench", *args, mask=_mask_time)


@pytest.mark.parametrize(
    "args",
    [
        ["-w", "-c", "700", "-s", "6k", "--pattern", "0x5a", "img"],
        ["-w", "-c", "400", "-d", "4", "-S", "12k", "--flush-interval", "16", "img"],
        ["-w", "-c", "400", "-d", "4", "--flush-interval", "16", "--no-drain", "-o", "7M", "img"],
    ],
)
def test_write_runs_leave_the_same_image(bench_twins, args):
    bench_twins.assert_same("bench", *args, mask=_mask_time)
    qemu_img("check", bench_twins.qimg_dir / "img")
    result = qemu_img(
        "compare", bench_twins.qemu_dir / "img", bench_twins.qimg_dir / "img", check=False
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["-c", "-1", "img"],
        ["-c", "abc", "img"],
        ["-d", "3000000000", "img"],
        ["--pattern", "256", "-w", "img"],
        ["-s", "3G", "img"],
        ["-S", "x", "img"],
        ["-o", "-5", "img"],
        ["-t", "bogus", "img"],
        ["-i", "posix", "img"],
        ["--flush-interval", "10", "img"],
        ["-w", "--flush-interval", "10", "img"],
        ["img", "img"],
        [],
        ["-c", "2", "-s", "1M", "-o", "7M", "img"],
        ["--bogus", "img"],
        ["-c"],
        ["-c", "5", "missing.qcow2"],
    ],
)
def test_errors_like_qemu_img(bench_twins, args):
    bench_twins.assert_same("bench", *args, mask=_mask_time)


@pytest.mark.parametrize("write", [False, True])
def test_bench_of_an_empty_image_fails_its_requests(twins: Twins, write: bool) -> None:  # noqa: F811
    """Every request to an image of 0 bytes lies outside it and fails, as a request past
    the end fails in qemu-img (qemu-img itself dies of SIGFPE here: its next offset is
    taken modulo the size)."""
    twins.setup(lambda d: qemu_img("create", "-f", "raw", "empty.raw", "0"))
    result = twins.qimg("bench", "-c", "3", *(["-w"] if write else []), "-f", "raw", "empty.raw")
    assert (result.returncode, result.stderr) == (
        1,
        "qemu-img: Failed request: Input/output error\n",
    )
    assert result.stdout.startswith("Sending 3 ")
