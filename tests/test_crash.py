"""Crash consistency: power loss at every point of a workload leaves a sound image.

For each simulated crash state (see crashsim.py): `qemu-img check` reports no corruption
(leaks are allowed), the image opens for writing (a dirty lazy-refcounts image is
repaired), and every guest write completed before the last completed flush() reads back
exactly. CRASH_POINTS (environment) raises the number of crash points per workload for
a longer run: `CRASH_POINTS=100000 ./scripts/test tests/test_crash.py`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib import snapshots as snaps
from crashsim import Recorder, crash_states, write_state
from qemutools import QEMU_IMG, qemu_create, qemu_img, qemu_io

CRASH_POINTS = int(os.environ.get("CRASH_POINTS", "60"))
STATES_CHECKED: dict[str, int] = {}


class Workload:
    """Runs guest operations on an image, keeping a model and the flush points."""

    def __init__(self, image, recorder: Recorder, model: bytearray):
        self.image = image
        self.recorder = recorder
        self.model = model
        self.flushes: list[tuple[int, bytes]] = [(0, bytes(model))]  # (op index, model)
        self.guest_ops: list[tuple[int, int, int]] = []  # (op index at start, offset, length)
        self.snapshot_models: dict[str, bytes] = {}  # snapshot name -> content it was taken of
        self.snapshot_models_ever: dict[str, bytes] = dict(self.snapshot_models)  # deleted too

    def _note(self, offset: int, length: int) -> None:
        self.guest_ops.append((len(self.recorder.ops), offset, length))

    def write(self, offset: int, data: bytes) -> None:
        self._note(offset, len(data))
        self.image.write(offset, data)
        self.model[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self._note(offset, length)
        self.image.write_zeroes(offset, length, may_unmap)
        self.model[offset : offset + length] = bytes(length)

    def write_compressed(self, offset: int, data: bytes) -> None:
        self._note(offset, len(data))
        self.image.write_compressed(offset, data)
        self.model[offset : offset + len(data)] = data

    def discard(self, offset: int, length: int, backing: bytes | None) -> None:
        """Discard whole clusters; they then read as zeros (v3) or the backing (v2)."""
        self._note(offset, length)
        self.image.discard(offset, length)
        cs = self.image.cluster_size
        start = -(-offset // cs) * cs
        stop = min((offset + length) // cs * cs, len(self.model))
        if offset + length == len(self.model):
            stop = len(self.model)
        if start < stop:
            if self.image.compat == "0.10" and backing is not None:
                self.model[start:stop] = backing[start:stop]
            else:
                self.model[start:stop] = bytes(stop - start)

    def flush(self) -> None:
        self.image.flush()
        self.flushes.append((len(self.recorder.ops), bytes(self.model)))

    def snapshot(self, action: str, name: str) -> None:
        """Create, apply or delete an internal snapshot; each is durable when it returns."""
        if action == "create":
            snaps.create_snapshot(self.image, name)
            self.snapshot_models[name] = self.snapshot_models_ever[name] = bytes(self.model)
        elif action == "apply":
            self._note(0, len(self.model))  # the whole disk changes at once
            snaps.apply_snapshot(self.image, name)
            self.model[:] = self.snapshot_models[name]
        else:
            snaps.delete_snapshot(self.image, name)
            del self.snapshot_models[name]
        self.flushes.append((len(self.recorder.ops), bytes(self.model)))


def _random_ops(
    work: Workload,
    rng: random.Random,
    count: int,
    size: int,
    cluster: int,
    backing: bytes | None = None,
    compressed: bool = False,
    zeroes: bool = True,
    snapshots: bool = False,
) -> None:
    for step in range(count):
        choice = rng.random()
        if snapshots and step % 5 == 4:
            names = sorted(work.snapshot_models)
            action = rng.choice(["create", "apply", "delete"] if names else ["create"])
            work.snapshot(action, f"s{step}" if action == "create" else rng.choice(names))
            continue
        # Offsets biased to cluster and L2-table boundaries.
        base = rng.choice(
            [
                rng.randrange(size),
                rng.randrange(size // cluster) * cluster,
                rng.randrange(1, size // cluster) * cluster - rng.randrange(1, 700),
            ]
        )
        base = max(0, min(base, size - 1))
        length = min(
            size - base, rng.choice([1, 512, cluster, 3 * cluster + 77, rng.randrange(1, 5000)])
        )
        if compressed and choice < 0.3:
            start = rng.randrange(size // cluster) * cluster
            work.write_compressed(
                start,
                bytes([rng.randrange(1, 255)]) * (cluster // 2)
                + os.urandom(16)
                + bytes(cluster // 2 - 16),
            )
        elif zeroes and choice < 0.15:
            work.write_zeroes(base, length, may_unmap=rng.random() < 0.5)
        elif zeroes and choice < 0.25:
            work.discard(base, length, backing)
        else:
            work.write(base, rng.randbytes(length))
        if step % 4 == 3:
            work.flush()
    work.flush()


WORKLOADS = {
    # name: (create options, image size, op count, extra)
    "v3-4k-boundaries": (dict(cluster_size=4096), 6 << 20, 24, {}),
    "v2-4k": (dict(cluster_size=4096, compat="0.10"), 4 << 20, 20, {}),
    "reftable-growth-512-rc64": (
        dict(cluster_size=512, refcount_bits=64),
        3 << 20,
        24,
        {"big": True},
    ),
    "lazy-refcounts": (dict(cluster_size=4096, lazy_refcounts=True), 4 << 20, 20, {}),
    "extended-l2-16k": (dict(cluster_size=16384, extended_l2=True), 4 << 20, 20, {}),
    "compressed-zstd": (
        dict(cluster_size=4096, compression_type="zstd"),
        2 << 20,
        20,
        {"compressed": True},
    ),
    "backing-cow-v3": (dict(cluster_size=4096), 4 << 20, 20, {"backing": True}),
    "backing-cow-v2": (dict(cluster_size=4096, compat="0.10"), 4 << 20, 20, {"backing": True}),
    "snapshots-v3": (dict(cluster_size=4096), 2 << 20, 30, {"snapshots": True}),
    "snapshots-v2-512": (dict(cluster_size=512, compat="0.10"), 1 << 20, 25, {"snapshots": True}),
    "bitmaps-4k": (dict(cluster_size=4096), 4 << 20, 20, {"bitmaps": True}),
}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_crash_at_every_point(tmp_path: Path, name: str) -> None:
    options, size, count, extra = WORKLOADS[name]
    rng = random.Random(f"crash-{name}")
    image_path = tmp_path / "img.qcow2"
    backing_content = None
    if extra.get("backing"):
        base = tmp_path / "base.qcow2"
        qemu_create(
            base,
            size,
            options={
                "cluster_size": options["cluster_size"],
                "compat": options.get("compat", "1.1"),
            },
        )
        qemu_io(base, "write -P 0x61 0 1M", "write -P 0x62 2M 512k")
        backing_content = bytes(qcow2lib.open(str(base)).read(0, size))
        qcow2lib.create(
            str(image_path), size, backing_file="base.qcow2", backing_fmt="qcow2", **options
        )
    else:
        qcow2lib.create(str(image_path), size, **options)
    model = bytearray(backing_content or bytes(size))
    if extra.get("big"):  # grow past what the first refcount table can describe
        with qcow2lib.open(str(image_path), "r+") as image:
            image.write(0, os.urandom(size // 2))
            model[: size // 2] = image.read(0, size // 2)
    if extra.get("bitmaps"):  # persistent bitmaps, kept up to date by the writes
        qemu_img("bitmap", "--add", image_path, "b0")
        qemu_img("bitmap", "--add", "-g", "512", image_path, "fine")
    initial = {os.path.realpath(image_path): image_path.read_bytes()}

    with Recorder(set(initial)) as recorder:
        image = qcow2lib.open(str(image_path), "r+")
        work = Workload(image, recorder, model)
        _random_ops(
            work,
            rng,
            count,
            size,
            options["cluster_size"],
            backing_content,
            compressed=extra.get("compressed", False),
            zeroes=not extra.get("compressed", False),
            snapshots=extra.get("snapshots", False),
        )
        image.close()
    ops = recorder.ops
    assert any(op.kind == "flush" for op in ops)

    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    if backing_content is not None:
        shutil.copy(tmp_path / "base.qcow2", crash_dir / "base.qcow2")
    target = crash_dir / "img.qcow2"
    mapping = {os.path.realpath(image_path): target}
    points = set(rng.sample(range(len(ops) + 1), min(CRASH_POINTS, len(ops) + 1))) | {len(ops)}
    checked = 0
    for description, files, t in crash_states(initial, ops, rng, points, subsets=2):
        write_state(files, mapping)
        _verify_state(target, work, t, description, lazy=options.get("lazy_refcounts", False))
        checked += 1
    STATES_CHECKED[name] = checked
    print(f"{name}: {len(ops)} operations recorded, {checked} crash states checked")
    assert checked >= min(CRASH_POINTS, len(ops))


def _verify_state(target: Path, work: Workload, t: int, description: str, lazy: bool) -> None:
    if lazy:  # a dirty lazy-refcounts image is repaired when opened for writing
        qcow2lib.open(str(target), "r+").close()
    result = subprocess.run(
        [QEMU_IMG, "check", "--output=json", str(target)], capture_output=True, text=True
    )
    assert result.returncode in (0, 3), (
        f"{description}: qemu-img check exit {result.returncode}: {result.stdout}{result.stderr}"
    )
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0, f"{description}: {report}"
    # The last flush that completed before the crash, and the writes that may or may not
    # have landed after it (issued after that flush, before the crash).
    flush_index, durable_model = max((f for f in work.flushes if f[0] <= t), key=lambda f: f[0])
    uncertain = bytearray(len(durable_model))
    for start, offset, length in work.guest_ops:
        if flush_index <= start < t:
            uncertain[offset : offset + length] = b"\x01" * length
    with qcow2lib.open(str(target), "r+") as image:
        content = image.read(0, image.size)
        for snap in snaps.list_snapshots(image):  # each snapshot holds what it was taken of
            with snaps.SnapshotView(image, snap.name) as view:
                assert view.read(0, view.size) == work.snapshot_models_ever[snap.name], (
                    f"{description}: snapshot {snap.name} changed"
                )
        image.write(0, content[:512])  # the image still takes writes
    assert len(content) == len(durable_model)
    mismatch = [
        i
        for i in range(0, len(content), 512)
        if content[i : i + 512] != durable_model[i : i + 512] and not any(uncertain[i : i + 512])
    ]
    assert not mismatch, (
        f"{description}: data written before the last flush was lost at "
        f"offsets {[hex(m) for m in mismatch[:8]]}"
    )
