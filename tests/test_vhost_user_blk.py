"""vhost-user-blk export: a hand-written front-end (well-behaved and hostile) and a real
Linux guest under QEMU, both against qcow2 images checked with qemu-img afterwards."""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qcow2lib
from qcow2lib.exports import vhost_user_blk
from qcow2lib.exports.vhost_user_blk import SEG_MAX, VhostUserBlkServer
from qcow2lib.image import Qcow2Image
from guest import Guest, boot_guest
from qemutools import assert_clean, qemu_create, qemu_io, to_raw
from vhost_user_client import (
    DATA_ADDR,
    D_INDIRECT,
    D_NEXT,
    D_WRITE,
    F_EVENT_IDX,
    F_INDIRECT,
    F_VERSION_1,
    GET_CONFIG,
    GET_QUEUE_NUM,
    MEMORY_SIZE,
    QUEUE_SIZE,
    SET_CONFIG,
    SET_FEATURES,
    SET_MEM_TABLE,
    U64,
    USER_BASE,
    Frontend,
)

MIB = 1 << 20
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
BLK_F_RO, BLK_F_FLUSH, BLK_F_MQ, BLK_F_DISCARD, BLK_F_WRITE_ZEROES = 5, 9, 12, 13, 14


class Export:
    """An image opened with qcow2lib and served on a socket in tmp_path."""

    def __init__(
        self, image: Path, socket_path: Path, read_only: bool = False, device=None, **options
    ):
        self.image = image
        self.device = device or qcow2lib.open(str(image), "r" if read_only else "r+")
        self.server = VhostUserBlkServer(
            self.device, str(socket_path), read_only=read_only, serial="qimg-test-disk", **options
        )
        self.socket_path = str(socket_path)
        self.server.start()

    def close(self) -> None:
        self.server.shutdown()
        self.device.close()


@pytest.fixture
def export(tmp_path: Path):
    exports: list[Export] = []

    def start(image: Path, **options) -> Export:
        started = Export(image, tmp_path / f"vhost{len(exports)}.sock", **options)
        exports.append(started)
        return started

    yield start
    for started in exports:
        started.close()


def image_with_pattern(tmp_path: Path, size: str = "4M") -> Path:
    image = tmp_path / "disk.qcow2"
    qemu_create(image, size)
    qemu_io(image, "write -P 0x11 0 64k", "write -P 0x22 1M 64k", fmt="qcow2")
    return image


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- a hand-written front-end --


def test_negotiation_config_and_queue_count(tmp_path: Path, export) -> None:
    served = export(image_with_pattern(tmp_path), num_queues=3)
    client = Frontend(served.socket_path)
    try:
        offered = client.negotiate()
        for bit in (
            F_VERSION_1,
            F_INDIRECT,
            F_EVENT_IDX,
            BLK_F_FLUSH,
            BLK_F_MQ,
            BLK_F_DISCARD,
            BLK_F_WRITE_ZEROES,
        ):
            assert offered >> bit & 1, bit
        assert not offered >> BLK_F_RO & 1
        assert client.protocol == (1 << 0) | (1 << 3) | (1 << 9)  # MQ, REPLY_ACK, CONFIG
        assert client.call_u64(GET_QUEUE_NUM) == 3
        client.send(GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60))
        _, _, reply = client.receive()
        assert len(reply) == 12 + 60
        config = reply[12:]
        capacity, size_max, seg_max = struct.unpack_from("<QII", config)
        assert capacity == 4 * MIB // 512 and seg_max == SEG_MAX and size_max >= 4096
        assert struct.unpack_from("<I", config, 20)[0] == 512  # blk_size
        assert struct.unpack_from("<H", config, 34)[0] == 3  # num_queues
        max_discard, discard_segments = struct.unpack_from("<II", config, 36)
        max_zeroes, zeroes_segments, may_unmap = struct.unpack_from("<IIB", config, 48)
        assert max_discard and discard_segments and max_zeroes and zeroes_segments and may_unmap
        # a partial read of the configuration space, as QEMU asks for fewer bytes
        client.send(GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8))
        assert client.receive()[2][12:] == config[:8]
        # the configuration space is read-only: SET_CONFIG is refused through REPLY_ACK
        assert client.acked(SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\1") != 0
        # features never offered are refused
        assert client.acked(SET_FEATURES, U64.pack(1 << 60)) != 0
    finally:
        client.close()


@pytest.mark.parametrize("indirect", [False, True])
def test_requests_reach_the_image(tmp_path: Path, export, indirect: bool) -> None:
    image = image_with_pattern(tmp_path)
    served = export(image)
    client = Frontend(served.socket_path)
    try:
        client.setup()
        status, data, used = client.blk(T_IN, 0, in_length=4096, indirect=indirect)
        assert (status, data, used) == (S_OK, b"\x11" * 4096, 4097)
        status, _, used = client.blk(T_OUT, 256, out=b"\xab" * 8192, indirect=indirect)
        assert (status, used) == (S_OK, 1)
        assert client.blk(T_FLUSH, 0, indirect=indirect)[0] == S_OK
        status, ident, used = client.blk(T_GET_ID, 0, in_length=20, indirect=indirect)
        assert (status, ident, used) == (S_OK, b"qimg-test-disk".ljust(20, b"\0"), 21)
        # write zeroes with and without unmap, discard, over the pattern at 1 MiB
        zeroes = struct.pack("<QII", 2048, 32, 1) + struct.pack("<QII", 2048 + 64, 16, 0)
        assert client.blk(T_WRITE_ZEROES, 0, out=zeroes, indirect=indirect)[0] == S_OK
        # a whole cluster written, then discarded: it reads back as zeroes
        assert client.blk(T_OUT, 6144, out=b"\xcd" * 65536, indirect=indirect)[0] == S_OK
        discard = struct.pack("<QII", 6144, 128, 0)
        assert client.blk(T_DISCARD, 0, out=discard, indirect=indirect)[0] == S_OK
        # refused requests: unknown type, misaligned length, past the end, discard with unmap
        assert client.blk(99, 0, in_length=512, indirect=indirect)[0] == S_UNSUPP
        assert client.blk(T_OUT, 0, out=b"x" * 100, indirect=indirect)[0] == S_IOERR
        assert client.blk(T_IN, 8191, in_length=1024, indirect=indirect)[0] == S_IOERR
        assert client.blk(T_IN, 1 << 62, in_length=512, indirect=indirect)[0] == S_IOERR
        assert (
            client.blk(T_DISCARD, 0, out=struct.pack("<QII", 0, 8, 1), indirect=indirect)[0]
            == S_UNSUPP
        )
        assert (
            client.blk(T_WRITE_ZEROES, 0, out=struct.pack("<QII", 0, 8, 4), indirect=indirect)[0]
            == S_UNSUPP
        )
        status, data, _ = client.blk(T_IN, 256, in_length=8192, indirect=indirect)
        assert (status, data) == (S_OK, b"\xab" * 8192)
        assert client.stop_queue() == client.avail_idx
    finally:
        client.close()
    served.close()
    expected = bytearray(4 * MIB)
    expected[0:65536] = b"\x11" * 65536
    expected[MIB : MIB + 65536] = b"\x22" * 65536
    expected[MIB : MIB + 16384] = bytes(16384)
    expected[MIB + 32768 : MIB + 40960] = bytes(8192)
    expected[128 * 1024 : 128 * 1024 + 8192] = b"\xab" * 8192
    assert to_raw(image, tmp_path / "out.raw") == bytes(expected)
    assert_clean(image)


def test_read_only_export_refuses_writes(tmp_path: Path, export) -> None:
    image = image_with_pattern(tmp_path)
    before = file_digest(image)
    served = export(image, read_only=True)
    client = Frontend(served.socket_path)
    try:
        offered = client.negotiate()
        assert offered >> BLK_F_RO & 1
        assert not offered >> BLK_F_DISCARD & 1 and not offered >> BLK_F_WRITE_ZEROES & 1
        client.set_memory()
        client.start_queue()
        assert client.blk(T_OUT, 0, out=b"w" * 512)[0] == S_IOERR
        assert client.blk(T_WRITE_ZEROES, 0, out=struct.pack("<QII", 0, 8, 0))[0] == S_IOERR
        assert client.blk(T_DISCARD, 0, out=struct.pack("<QII", 0, 8, 0))[0] == S_IOERR
        assert client.blk(T_FLUSH, 0)[0] == S_OK
        assert client.blk(T_IN, 0, in_length=512)[:2] == (S_OK, b"\x11" * 512)
    finally:
        client.close()
    served.close()
    assert file_digest(image) == before


def test_scattered_buffers_in_several_batches(tmp_path: Path, export, monkeypatch) -> None:
    """A request of uneven buffers, moved through small batches, lands byte for byte."""
    monkeypatch.setattr(vhost_user_blk, "IO_CHUNK", 4096)
    image = image_with_pattern(tmp_path)
    served = export(image)
    client = Frontend(served.socket_path)
    lengths = [1536, 2560, 4608, 512]  # 9216 bytes, 18 sectors
    payload = bytes(random.Random(5).randrange(256) for _ in range(sum(lengths)))
    header, status = DATA_ADDR, DATA_ADDR + 0x100
    try:
        client.setup()
        for kind, data_addr in ((T_OUT, DATA_ADDR + 0x1000), (T_IN, DATA_ADDR + 0x8000)):
            client.memory[header : header + 16] = struct.pack("<IIQ", kind, 0, 40)
            client.put_descriptor(0, header, 16, D_NEXT, 1)
            addr, done = data_addr, 0
            for i, length in enumerate(lengths):
                if kind == T_OUT:
                    client.memory[addr : addr + length] = payload[done : done + length]
                client.put_descriptor(
                    i + 1, addr, length, D_NEXT | (D_WRITE if kind == T_IN else 0), i + 2
                )
                addr += length + 512  # gaps between the buffers
                done += length
            client.put_descriptor(len(lengths) + 1, status, 1, D_WRITE, 0)
            client.publish(0)
            assert client.wait_used(1) == [(0, 1 + (sum(lengths) if kind == T_IN else 0))]
            assert client.memory[status] == S_OK
        addr, read_back = DATA_ADDR + 0x8000, b""
        for length in lengths:
            read_back += client.memory[addr : addr + length]
            addr += length + 512
        assert read_back == payload
    finally:
        client.close()
    served.close()
    assert to_raw(image, tmp_path / "out.raw")[40 * 512 : 40 * 512 + len(payload)] == payload


REGION_STARTS = (0, 0x60000, 0xA0000)  # the memory table below: three regions that meet
# Guest buffers of one request, in order: three adjacent ones (one view), a small one, one
# ending where the first region ends followed by one starting the second (adjacent, yet two
# views), one straddling the second and third regions, a jump back into the first region,
# and a last one in the third.
SCATTERED = [
    (0x20000, 4096),
    (0x21000, 4096),
    (0x22000, 8192),
    (0x30000, 512),
    (0x60000 - 0x4000, 0x4000),
    (0x60000, 4096),
    (0xA0000 - 0x1000, 8192),
    (0x50000, 4096),
    (0xC0000, 4096 + 1536),
]


def three_region_memory(client: Frontend) -> None:
    """The client's memory given as regions that meet at REGION_STARTS, each mapped from
    its own offset in the memfd, as QEMU splits guest RAM."""
    ends = REGION_STARTS[1:] + (MEMORY_SIZE,)
    table = struct.pack("<II", len(REGION_STARTS), 0)
    for start, end in zip(REGION_STARTS, ends):
        table += struct.pack("<QQQQ", start, end - start, USER_BASE + start, start)
    fds = [client.memfd] * len(REGION_STARTS)
    assert client.acked(SET_MEM_TABLE, table, fds) == 0


def scattered_request(
    client: Frontend, kind: int, sector: int, in_order: bool, buffers=SCATTERED
) -> int:
    """One request over `buffers` through an indirect table, laid out in order (as Linux
    lays it out) or with its descriptors shuffled and linked by their next fields."""
    header, status, table = DATA_ADDR, DATA_ADDR + 0x100, DATA_ADDR + 0x1000
    client.memory[header : header + 16] = struct.pack("<IIQ", kind, 0, sector)
    data_flags = D_WRITE if kind == T_IN else 0
    chain = [(header, 16, 0)] + [(a, n, data_flags) for a, n in buffers] + [(status, 1, D_WRITE)]
    slots = list(range(1, len(chain)))
    if not in_order:
        random.Random(3).shuffle(slots)
    slots = [0] + slots  # an indirect chain starts at the table's first entry
    for position, (addr, length, flags) in enumerate(chain):
        last = position == len(chain) - 1
        client.put_descriptor(
            slots[position],
            addr,
            length,
            flags | (0 if last else D_NEXT),
            0 if last else slots[position + 1],
            table=table,
        )
    client.put_descriptor(0, table, 16 * len(chain), D_INDIRECT, 0)
    client.memory[status] = 0xFF
    return status


def mixed_image(tmp_path: Path) -> Path:
    """A qcow2 image with 4 KiB clusters over a backing file: data, zero, compressed,
    backing and unallocated clusters within the first 64 KiB."""
    base = tmp_path / "base.qcow2"
    qemu_create(base, "1M")
    qemu_io(base, "write -P 0x31 0 64k", fmt="qcow2")
    image = tmp_path / "mixed.qcow2"
    qemu_create(image, "1M", options={"cluster_size": "4096"}, backing=base, backing_fmt="qcow2")
    qemu_io(
        image,
        "write -P 0x42 0 12k",
        "write -z 12k 8k",
        "write -c -P 0x53 24k 4k",
        "write -P 0x64 36k 6k",
        "write -c -P 0x75 48k 4k",
        fmt="qcow2",
    )
    return image


@pytest.mark.parametrize("in_order", [True, False])
@pytest.mark.parametrize("kind", ["qcow2", "raw", "blkdebug"])
def test_scattered_request_across_regions(tmp_path: Path, export, kind: str, in_order) -> None:
    """Guest buffers merged, split at a region boundary and straddling it: reads land
    byte for byte as qemu-img reads the image (data, zero, compressed, backing and
    unallocated clusters; a raw file; through blkdebug, which reads through a buffer),
    writes reach the image as qemu-img reads it."""
    image = mixed_image(tmp_path)
    if kind == "raw":
        raw = tmp_path / "disk.raw"
        raw.write_bytes(random.Random(7).randbytes(MIB))
        image = raw
    before = to_raw(image, tmp_path / "before.raw")
    device = qcow2lib.open(f"blkdebug::{image}", "r+") if kind == "blkdebug" else None
    served = export(image, device=device)
    client = Frontend(served.socket_path)
    total = sum(length for _, length in SCATTERED)
    payload = random.Random(11).randbytes(total)
    try:
        client.negotiate()
        three_region_memory(client)
        client.start_queue()
        for kind_of_request in (T_IN, T_OUT):
            if kind_of_request == T_OUT:
                done = 0
                for addr, length in SCATTERED:
                    client.memory[addr : addr + length] = payload[done : done + length]
                    done += length
            sector = 0 if kind_of_request == T_IN else 200
            status = scattered_request(client, kind_of_request, sector, in_order)
            client.publish(0)
            written = total + 1 if kind_of_request == T_IN else 1
            assert client.wait_used(1) == [(0, written)]
            assert client.memory[status] == S_OK
            if kind_of_request == T_IN:
                read_back = b"".join(client.memory[a : a + n] for a, n in SCATTERED)
                assert read_back == before[:total]
    finally:
        client.close()
    served.close()
    after = to_raw(image, tmp_path / "after.raw")
    assert after[200 * 512 : 200 * 512 + total] == payload
    assert after[: 200 * 512] == before[: 200 * 512]
    assert after[200 * 512 + total :] == before[200 * 512 + total :]
    if kind != "raw":
        assert_clean(image)


@pytest.mark.parametrize("pages", ["contiguous", "scattered"])
def test_page_requests_on_an_allocated_image(tmp_path: Path, export, monkeypatch, pages) -> None:
    """Requests shaped as Linux sends them (a header, 4 KiB pages, a status byte, in an
    indirect table) over clusters lying in one host run: the write goes in place,
    straight from the guest's pages, whether they are neighbours in guest memory (one
    view) or scattered; reads and the image match qemu-img byte for byte."""
    image = tmp_path / "disk.qcow2"
    qemu_create(image, "4M")
    qemu_io(image, "write -P 0x5c 0 1M", fmt="qcow2")
    before = to_raw(image, tmp_path / "before.raw")
    in_place: list[bool] = []
    original = Qcow2Image._write_in_place

    def recording(self, offset, buffers, length):
        in_place.append(original(self, offset, buffers, length))
        return in_place[-1]

    monkeypatch.setattr(Qcow2Image, "_write_in_place", recording)
    rng = random.Random(13)
    free_pages = list(range(0x20000, 0xF0000, 4096))
    if pages == "scattered":
        rng.shuffle(free_pages)
    written = [(addr, 4096) for addr in free_pages[:32]]  # 128 KiB over three clusters
    read_into = [(addr, 4096) for addr in free_pages[32:64]]
    payload = rng.randbytes(32 * 4096)
    sector = (60 * 1024) // 512
    served = export(image)
    client = Frontend(served.socket_path)
    try:
        client.setup()
        for i, (addr, _) in enumerate(written):
            client.memory[addr : addr + 4096] = payload[4096 * i : 4096 * (i + 1)]
        for kind, buffers, used in ((T_OUT, written, 1), (T_IN, read_into, len(payload) + 1)):
            status = scattered_request(client, kind, sector, True, buffers)
            client.publish(0)
            assert client.wait_used(1) == [(0, used)]
            assert client.memory[status] == S_OK
        read_back = b"".join(client.memory[a : a + n] for a, n in read_into)
        assert read_back == payload
    finally:
        client.close()
    served.close()
    assert in_place == [True]
    expected = before[: sector * 512] + payload + before[sector * 512 + len(payload) :]
    assert to_raw(image, tmp_path / "after.raw") == expected
    assert_clean(image)


def test_bad_server_arguments_are_named(tmp_path: Path) -> None:
    image = image_with_pattern(tmp_path)
    (tmp_path / "plain-file").write_text("not a socket")
    with qcow2lib.open(str(image)) as device:
        with pytest.raises(qcow2lib.InvalidArgumentError, match="num_queues 0"):
            VhostUserBlkServer(device, str(tmp_path / "s"), num_queues=0)
        with pytest.raises(qcow2lib.InvalidArgumentError, match="workers 0"):
            VhostUserBlkServer(device, str(tmp_path / "s"), workers=0)
        for path in (tmp_path / "plain-file", tmp_path / ("x" * 120), tmp_path / "missing" / "s"):
            server = VhostUserBlkServer(device, str(path))
            with pytest.raises(qcow2lib.InvalidArgumentError, match="cannot listen on socket"):
                server.start()
            server.shutdown()
        assert (tmp_path / "plain-file").read_text() == "not a socket"
        server = VhostUserBlkServer(device, str(tmp_path / "s"))
        server.start()
        with pytest.raises(qcow2lib.InvalidArgumentError, match="already started"):
            server.start()
        server.shutdown()
        with pytest.raises(qcow2lib.InvalidArgumentError, match="already started"):
            server.start()


class GatedDevice:
    """Wraps a device so that a read of sector 0 waits until another request has been
    completed on the used ring: the server must run requests concurrently and complete
    them out of order."""

    def __init__(self, device):
        self.device = device
        self.released = lambda: True
        self.entered = threading.Event()  # a read of sector 0 has begun

    def __getattr__(self, name):
        return getattr(self.device, name)

    def _gate(self, offset: int) -> None:
        if offset == 0:
            self.entered.set()
        deadline = time.monotonic() + 10
        while offset == 0 and not self.released():
            assert time.monotonic() < deadline, "the other request never completed"
            time.sleep(0.01)

    def readinto(self, offset: int, buffer) -> int:
        self._gate(offset)
        return self.device.readinto(offset, buffer)

    def readv(self, offset: int, views, length=None) -> int:
        self._gate(offset)
        return self.device.readv(offset, views, length)


def gated_export(tmp_path: Path, export):
    """The pattern image behind a GatedDevice (its first request waits until a later one
    has completed), served with two workers: (device, server, connected front-end)."""
    image = image_with_pattern(tmp_path)
    gated = GatedDevice(qcow2lib.open(str(image), "r+"))
    served = export(image, device=gated, workers=2)
    client = Frontend(served.socket_path)
    gated.released = lambda: client.used_idx() == 1
    return gated, served, client


def test_requests_run_concurrently_and_complete_out_of_order(tmp_path: Path, export) -> None:
    _, _, client = gated_export(tmp_path, export)
    try:
        client.setup()
        first = client.blk_chain(T_IN, 0, in_length=512, first=0, data_addr=DATA_ADDR)
        second = client.blk_chain(T_IN, 2048, in_length=512, first=4, data_addr=DATA_ADDR + 0x1000)
        client.publish(first)
        client.publish(second)
        used = client.wait_used(2)
        assert used == [(second, 513), (first, 513)]
        assert client.blk_result(T_IN, b"", 512) == (S_OK, b"\x11" * 512)
        assert client.blk_result(T_IN, b"", 512, DATA_ADDR + 0x1000) == (S_OK, b"\x22" * 512)
    finally:
        client.close()


def test_a_stuck_request_does_not_hold_up_later_ones(tmp_path: Path, export) -> None:
    """The ring's thread serves requests itself; while it is stuck in one, the rescuer
    takes what the driver queues next off the ring and serves it on a worker. Once the
    device is idle again, the rescuer stops polling."""
    gated, served, client = gated_export(tmp_path, export)
    try:
        client.setup()
        first = client.blk_chain(T_IN, 0, in_length=512, first=0, data_addr=DATA_ADDR)
        client.publish(first)
        assert gated.entered.wait(5)  # the ring thread is now inside the first request
        second = client.blk_chain(T_IN, 2048, in_length=512, first=4, data_addr=DATA_ADDR + 0x1000)
        client.publish(second)
        assert client.wait_used(2) == [(second, 513), (first, 513)]
        assert client.blk_result(T_IN, b"", 512) == (S_OK, b"\x11" * 512)
        assert client.blk_result(T_IN, b"", 512, DATA_ADDR + 0x1000) == (S_OK, b"\x22" * 512)
        rescuer = served.server._connection.rescuer
        deadline = time.monotonic() + 5
        while not rescuer.idle and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rescuer.idle
    finally:
        client.close()


def test_event_idx_suppresses_kicks_and_calls(tmp_path: Path, export) -> None:
    served = export(image_with_pattern(tmp_path))
    client = Frontend(served.socket_path)
    try:
        client.negotiate(event_idx=True)
        client.set_memory()
        client.start_queue()
        # used_event = 1: the driver wants a call only once the second request completes
        struct.pack_into("<H", client.memory, 0x1000 + 4 + 2 * QUEUE_SIZE, 1)
        assert client.blk(T_IN, 0, in_length=512)[0] == S_OK
        assert not select.select([client.call], [], [], 0.2)[0]  # no call for the first
        assert client.blk(T_IN, 0, in_length=512)[0] == S_OK
        # the device asks to be kicked at the next entry: avail_event == avail index
        assert struct.unpack_from("<H", client.memory, 0x2000 + 4 + 8 * QUEUE_SIZE)[0] == 2
    finally:
        client.close()


STATUS_ADDR = DATA_ADDR + 0x100
FAR = MEMORY_SIZE + 0x1000  # past guest memory
# Chains of (addr, length, flags) whose request fails with IOERR (or, with no status byte
# in memory, completes with length 0) while the queue goes on.
FAILING_REQUESTS = {
    "outside_memory": [(DATA_ADDR, 16, 0), (FAR, 4096, 0), (STATUS_ADDR, 1, D_WRITE)],
    "length_overflows": [
        (DATA_ADDR, 16, 0),
        (DATA_ADDR + 0x200, 0xFFFFFE00, 0),
        (STATUS_ADDR, 1, D_WRITE),
    ],
    "address_wraps": [(DATA_ADDR, 16, 0), ((1 << 64) - 256, 512, 0), (STATUS_ADDR, 1, D_WRITE)],
    "status_outside": [
        (DATA_ADDR, 16, 0),
        (DATA_ADDR + 0x200, 512, 0),
        ((1 << 64) - 1, 1, D_WRITE),
    ],
    "header_outside": [(FAR, 16, 0), (DATA_ADDR + 0x200, 512, 0), (STATUS_ADDR, 1, D_WRITE)],
    "pages_straddle_memory_end": [
        (DATA_ADDR, 16, 0),
        (DATA_ADDR + 0x200, 4096, 0),
        (MEMORY_SIZE - 2048, 4096, 0),
        (STATUS_ADDR, 1, D_WRITE),
    ],
}


def put_in_order(client: Frontend, chain, table: int | None = None) -> None:
    """Lay `chain` out as descriptors 0, 1, ... linked in order: in the descriptor table,
    or in an indirect table at `table` that descriptor 0 points at (as Linux does)."""
    where = {} if table is None else {"table": table}
    for index, (addr, length, flags) in enumerate(chain):
        last = index == len(chain) - 1
        next_index = 0 if last else index + 1
        client.put_descriptor(
            index, addr, length, flags | (0 if last else D_NEXT), next_index, **where
        )
    if table is not None:
        client.put_descriptor(0, table, 16 * len(chain), D_INDIRECT, 0)


@pytest.mark.parametrize("kind", [T_IN, T_OUT])
@pytest.mark.parametrize("case", sorted(FAILING_REQUESTS))
def test_hostile_in_order_table(tmp_path: Path, export, case: str, kind: int) -> None:
    """The same broken buffers in an in-order indirect table, whose addresses are checked
    all at once: the request fails, nothing outside guest memory is touched, the image is
    unchanged, and the next request is served."""
    image = image_with_pattern(tmp_path)
    before = to_raw(image, tmp_path / "before.raw")
    served = export(image)
    client = Frontend(served.socket_path)
    client.memory[DATA_ADDR : DATA_ADDR + 16] = struct.pack("<IIQ", kind, 0, 0)
    client.memory[STATUS_ADDR] = 0xFF
    chain = [
        (addr, length, flags | (D_WRITE if kind == T_IN and index else 0))
        for index, (addr, length, flags) in enumerate(FAILING_REQUESTS[case])
    ]
    try:
        client.setup()
        put_in_order(client, chain, table=DATA_ADDR + 0x4000)
        client.publish(0)
        status_missing = case == "status_outside"
        assert client.wait_used(1, timeout=5) == [(0, 0 if status_missing else 1)]
        if not status_missing:
            assert client.memory[STATUS_ADDR] == S_IOERR
        assert client.blk(T_IN, 0, in_length=512, indirect=True)[:2] == (S_OK, b"\x11" * 512)
    finally:
        client.close()
    served.close()
    assert to_raw(image, tmp_path / "after.raw") == before
    assert_clean(image)


@pytest.mark.parametrize(
    "case",
    [
        "header_outside",
        "pages_straddle_memory_end",
        "outside_memory",
        "length_overflows",
        "address_wraps",
        "status_outside",
        "loop",
        "too_long",
        "head_past_queue",
        "next_past_queue",
        "indirect_loop",
        "nested_indirect",
        "indirect_outside",
        "readable_after_writable",
        "avail_index_jump",
    ],
)
def test_hostile_frontend(tmp_path: Path, export, case: str) -> None:
    """Broken descriptors fail that request (IOERR) or stop the queue, never the server,
    and never write to the image."""
    image = image_with_pattern(tmp_path)
    before = to_raw(image, tmp_path / "before.raw")
    served = export(image)
    client = Frontend(served.socket_path)
    header = struct.pack("<IIQ", T_OUT, 0, 0)
    client.memory[DATA_ADDR : DATA_ADDR + 16] = header
    client.memory[DATA_ADDR + 0x100] = 0xFF  # status byte
    status_addr = DATA_ADDR + 0x100
    far = MEMORY_SIZE + 0x1000
    try:
        client.setup()
        put = client.put_descriptor
        request_fails = case in FAILING_REQUESTS
        if request_fails:
            put_in_order(client, FAILING_REQUESTS[case])
        else:
            request_fails = False
            if case == "loop":
                put(0, DATA_ADDR, 16, D_NEXT, 1)
                put(1, DATA_ADDR + 0x200, 512, D_NEXT, 0)
            elif case == "too_long":
                for i in range(QUEUE_SIZE):
                    put(i, DATA_ADDR + 0x200, 512, D_NEXT, (i + 1) % QUEUE_SIZE)
            elif case == "head_past_queue":
                client.publish(QUEUE_SIZE + 3)
            elif case == "next_past_queue":
                put(0, DATA_ADDR, 16, D_NEXT, 1000)
            elif case in ("indirect_loop", "nested_indirect", "indirect_outside"):
                table = DATA_ADDR + 0x4000
                put(0, table if case != "indirect_outside" else far, 48, D_INDIRECT, 0)
                put(0, DATA_ADDR, 16, D_NEXT, 1, table=table)
                if case == "indirect_loop":
                    put(1, DATA_ADDR + 0x200, 512, D_NEXT, 0, table=table)
                else:
                    put(1, table, 32, D_INDIRECT, 0, table=table)
            elif case == "readable_after_writable":
                put(0, DATA_ADDR, 16, D_NEXT, 1)
                put(1, status_addr, 1, D_WRITE | D_NEXT, 2)
                put(2, DATA_ADDR + 0x200, 512, 0, 0)
            elif case == "avail_index_jump":
                client.avail_idx = 1000
        if case != "head_past_queue":
            client.publish(0)
        used = client.wait_used(1, timeout=0.5 if not request_fails else 5)
        if request_fails:
            # the request completes with an I/O error (or, without a status byte, length 0)
            assert used == [(0, 0 if case == "status_outside" else 1)]
            if case != "status_outside":
                assert client.memory[status_addr] == S_IOERR
        else:
            # the queue stopped: no completion, the error eventfd was signalled
            assert used == []
            assert client.memory[status_addr] == 0xFF
            assert select.select([client.err], [], [], 2)[0]
        # the connection still answers, and the queue can be stopped and restarted
        client.stop_queue()
        client.start_queue(base=client.avail_idx)
        client.used_seen = client.used_idx()
        struct.pack_into("<H", client.memory, 0x1000 + 2, client.avail_idx)
        assert client.blk(T_IN, 0, in_length=512)[:2] == (S_OK, b"\x11" * 512)
    finally:
        client.close()
    # a fresh front-end is served by the same server
    again = Frontend(served.socket_path)
    try:
        again.setup()
        assert again.blk(T_IN, 2048, in_length=512)[:2] == (S_OK, b"\x22" * 512)
    finally:
        again.close()
    served.close()
    assert to_raw(image, tmp_path / "after.raw") == before
    assert_clean(image)


@pytest.mark.parametrize(
    "message",
    [
        "bad_version",
        "huge_size",
        "unknown_request",
        "mem_table_without_fd",
        "region_past_fd_end",
        "region_wraps",
        "vring_index",
        "short_payload",
        "kick_before_memory",
    ],
)
def test_malformed_messages(tmp_path: Path, export, message: str) -> None:
    """Broken framing drops the connection; a bad request is refused; the server goes on."""
    served = export(image_with_pattern(tmp_path))
    client = Frontend(served.socket_path)
    try:
        client.negotiate()
        if message == "bad_version":
            client.send(1, flags=2)
            with pytest.raises(ConnectionError):
                client.receive()
        elif message == "huge_size":
            client.sock.sendall(struct.pack("<III", 5, 1, 1 << 30))
            with pytest.raises(ConnectionError):
                client.receive()
        elif message == "unknown_request":
            assert client.acked(99) != 0
        elif message == "mem_table_without_fd":
            table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MEMORY_SIZE, 0, 0)
            assert client.acked(5, table) != 0
        elif message in ("region_past_fd_end", "region_wraps"):
            size, guest = (
                (2 * MEMORY_SIZE, 0)
                if message == "region_past_fd_end"
                else (MEMORY_SIZE, (1 << 64) - 4096)
            )
            table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", guest, size, USER_BASE, 0)
            assert client.acked(SET_MEM_TABLE, table, [client.memfd]) != 0
        elif message == "kick_before_memory":
            assert client.acked(12, U64.pack(0), [client.kick]) != 0
        elif message == "vring_index":
            assert client.acked(8, struct.pack("<II", 200, 16)) != 0
        elif message == "short_payload":
            assert client.acked(9, b"\0" * 8) != 0
        if message not in ("bad_version", "huge_size"):
            assert client.call_u64(GET_QUEUE_NUM) == 1
    finally:
        client.close()
    again = Frontend(served.socket_path)
    try:
        again.setup()
        assert again.blk(T_IN, 0, in_length=512)[:2] == (S_OK, b"\x11" * 512)
    finally:
        again.close()


def memfd_mappings(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(f"/memfd:{name} " in line for line in maps)


def test_memory_table_replaced_and_everything_released(tmp_path: Path, export) -> None:
    """A new memory table while the ring runs: the ring moves to it, the old mapping is
    unmapped; after the front-end leaves no mapping or file descriptor remains."""
    served = export(image_with_pattern(tmp_path))
    fds_before = len(os.listdir("/proc/self/fd"))
    client = Frontend(served.socket_path)
    try:
        client.setup()
        assert client.blk(T_IN, 0, in_length=512)[:2] == (S_OK, b"\x11" * 512)
        assert memfd_mappings("guest-ram") == 2  # the test's own mapping and the server's
        # the same memory described as two regions (the second half at its fd offset)
        half = MEMORY_SIZE // 2
        table = (
            struct.pack("<II", 2, 0)
            + struct.pack("<QQQQ", 0, half, USER_BASE, 0)
            + struct.pack("<QQQQ", half, half, USER_BASE + half, half)
        )
        assert client.acked(SET_MEM_TABLE, table, [client.memfd, client.memfd]) == 0
        assert memfd_mappings("guest-ram") == 3  # the old one went, two new ones
        status, data, _ = client.blk(T_IN, 2048, in_length=512)
        assert (status, data) == (S_OK, b"\x22" * 512)
        # a buffer in the second region is reached through it
        client.blk_chain(T_IN, 0, in_length=512, data_addr=half + 0x1000)
        client.publish(0)
        assert client.wait_used(1) == [(0, 513)]
        assert client.blk_result(T_IN, b"", 512, half + 0x1000) == (S_OK, b"\x11" * 512)
    finally:
        client.close()
    deadline = time.monotonic() + 5
    while (
        memfd_mappings("guest-ram") or len(os.listdir("/proc/self/fd")) != fds_before
    ) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert memfd_mappings("guest-ram") == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_shutdown_with_a_frontend_connected(tmp_path: Path) -> None:
    image = image_with_pattern(tmp_path)
    socket_path = tmp_path / "s.sock"
    with qcow2lib.open(str(image), "r+") as device:
        server = VhostUserBlkServer(device, str(socket_path))
        server.start()
        client = Frontend(str(socket_path))
        try:
            client.setup()
            assert client.blk(T_OUT, 0, out=b"\x77" * 4096)[0] == S_OK
            started = time.monotonic()
            server.shutdown()
            assert time.monotonic() - started < 5 and server.wait(0)
            with pytest.raises((ConnectionError, OSError)):
                client.call_u64(GET_QUEUE_NUM)
        finally:
            client.close()
        assert not socket_path.exists()
    assert qcow2lib.open(str(image)).read(0, 4096) == b"\x77" * 4096
    assert_clean(image)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_a_signal_while_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """A signal that arrives while the server starts (here: just after its thread did)
    waits until serve() can shut the server down, instead of raising out of start()
    with the server still running (CI once caught a SIGINT there under load)."""
    assert threading.current_thread() is threading.main_thread()
    image = image_with_pattern(tmp_path)
    socket_path = tmp_path / "s.sock"
    started = VhostUserBlkServer.start

    def start_then_signal(server: VhostUserBlkServer) -> None:
        started(server)
        signal.raise_signal(signum)

    monkeypatch.setattr(VhostUserBlkServer, "start", start_then_signal)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with qcow2lib.open(str(image), "r+") as device:
        vhost_user_blk.serve(device, str(socket_path))
    assert not socket_path.exists()
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_cleanly_on_a_signal(tmp_path: Path, signum: int) -> None:
    image = image_with_pattern(tmp_path)
    socket_path = tmp_path / "s.sock"
    program = (
        "import logging, sys, qcow2lib\n"
        "from qcow2lib.exports.vhost_user_blk import serve\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "with qcow2lib.open(sys.argv[1], 'r+') as device:\n"
        "    serve(device, sys.argv[2])\n"
        "print('clean exit')\n"
    )
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-c", program, str(image), str(socket_path)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # the socket file appears at bind(), accepts after listen()
            try:
                client = Frontend(str(socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.05)
        try:
            client.setup()
            assert client.blk(T_OUT, 8, out=b"\x66" * 512)[0] == S_OK
            process.send_signal(signum)
            out, err = process.communicate(timeout=20)
        finally:
            client.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0 and out == "clean exit\n", err
    assert err.count("front-end 1 connected") == 1
    assert not socket_path.exists()
    assert qcow2lib.open(str(image)).read(4096, 512) == b"\x66" * 512
    assert_clean(image)


# -- a real Linux guest under QEMU --

DISK_MIB = 16
PATTERN_TEXT = b"qcow2lib vhost-user-blk known pattern\n"
MD5_LINE = re.compile(r"^MD5 (\d+) ([0-9a-f]{32})", re.M)


def vhost_disk_args(socket_path: str, num_queues: int = 1) -> list[str]:
    return [
        "-chardev",
        f"socket,id=vub,path={socket_path},reconnect=1",
        "-device",
        f"vhost-user-blk-pci,chardev=vub,num-queues={num_queues}",
    ]


def known_pattern(length: int) -> bytes:
    return (PATTERN_TEXT * (length // len(PATTERN_TEXT) + 1))[:length]


def checksum_script() -> str:
    return (
        f'for r in $(seq 0 {DISK_MIB - 1}); do echo "MD5 $r $(dd if=/dev/vda bs=1M skip=$r '
        f'count=1 iflag=direct 2>/dev/null | md5sum)"; done\n'
    )


def workload_script(seed: int, cpus: int = 1) -> str:
    """Known pattern written and read back, sequential O_DIRECT writes, concurrent random
    4 KiB writes (spread over the CPUs), a discard, sync, then a checksum per MiB."""
    rng = random.Random(seed)
    writers = []
    for i in range(24):
        block = rng.randrange(DISK_MIB * 256)
        pin = f"taskset -c {i % cpus} " if cpus > 1 else ""
        writers.append(
            f"{pin}dd if=/dev/urandom of=/dev/vda bs=4096 seek={block} count=1 "
            f"oflag=direct 2>/dev/null &"
        )
    text = PATTERN_TEXT.decode().rstrip("\n")
    return "\n".join(
        [
            'echo "SIZE $(cat /sys/block/vda/size) SERIAL $(cat /sys/block/vda/serial) '
            'SEGMENTS $(cat /sys/block/vda/queue/max_segments)"',
            f'yes "{text}" | head -c 1048576 | dd of=/dev/vda bs=65536 seek=16 iflag=fullblock '
            f"conv=fsync 2>/dev/null",
            'echo "PATTERN $(dd if=/dev/vda bs=65536 skip=16 count=16 iflag=direct 2>/dev/null '
            '| md5sum)"',
            "dd if=/dev/urandom of=/dev/vda bs=1M seek=8 count=3 oflag=direct 2>/dev/null",
            *writers,
            "wait",
            "blkdiscard -o 3145728 -l 1048576 /dev/vda && echo DISCARDED",
            "sync",
            checksum_script(),
        ]
    )


def guest_checksums(output: str) -> dict[int, str]:
    found = {int(region): digest for region, digest in MD5_LINE.findall(output)}
    assert sorted(found) == list(range(DISK_MIB)), output[-3000:]
    return found


def assert_image_matches(image: Path, checksums: dict[int, str], tmp_path: Path) -> None:
    """What the guest read is what qemu-img and qcow2lib read from the image now."""
    raw = to_raw(image, tmp_path / "final.raw")
    with qcow2lib.open(str(image)) as device:
        for region, digest in checksums.items():
            expected = hashlib.md5(raw[region * MIB : (region + 1) * MIB]).hexdigest()
            ours = hashlib.md5(device.read(region * MIB, MIB)).hexdigest()
            assert digest == expected == ours, f"region {region} MiB"
    assert_clean(image)


def backed_image(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base.qcow2"
    qemu_create(base, f"{DISK_MIB}M")
    qemu_io(base, "write -P 0x5a 4M 4M", "write -P 0x3c 12M 2M", fmt="qcow2")
    overlay = tmp_path / "overlay.qcow2"
    qemu_create(overlay, f"{DISK_MIB}M", backing=str(base), backing_fmt="qcow2")
    return base, overlay


def test_guest_on_qcow2_with_backing_file(tmp_path: Path, export) -> None:
    base, overlay = backed_image(tmp_path)
    base_digest = file_digest(base)
    served = export(overlay)
    output = boot_guest(
        vhost_disk_args(served.socket_path), workload_script(1), 90, workdir=tmp_path
    )
    # the guest takes our seg_max: its 1 MiB reads of 4 KiB pages are one request each
    assert f"SIZE {DISK_MIB * 2048} SERIAL qimg-test-disk SEGMENTS {SEG_MAX}" in output
    pattern_md5 = hashlib.md5(known_pattern(MIB)).hexdigest()
    assert f"PATTERN {pattern_md5}" in output and "DISCARDED" in output
    checksums = guest_checksums(output)
    assert checksums[1] == pattern_md5
    served.close()
    assert_image_matches(overlay, checksums, tmp_path)
    assert file_digest(base) == base_digest


def test_guest_sees_read_only_disk(tmp_path: Path, export) -> None:
    _, overlay = backed_image(tmp_path)
    before = file_digest(overlay)
    served = export(overlay, read_only=True)
    script = "\n".join(
        [
            'echo "RO $(blockdev --getro /dev/vda)"',
            "echo data | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null",
            'echo "WRITE-RC $?"',
            checksum_script(),
        ]
    )
    output = boot_guest(vhost_disk_args(served.socket_path), script, 90, workdir=tmp_path)
    assert "RO 1" in output
    assert re.search(r"^WRITE-RC [1-9]", output, re.M), output[-2000:]
    checksums = guest_checksums(output)
    assert checksums[4] == hashlib.md5(b"\x5a" * MIB).hexdigest()
    assert checksums[0] == hashlib.md5(bytes(MIB)).hexdigest()
    served.close()
    assert file_digest(overlay) == before
    assert_image_matches(overlay, checksums, tmp_path)


def test_guest_two_queues_and_reboot(tmp_path: Path, export) -> None:
    """Two vCPUs drive two queues; the guest reboots (the rings are stopped and set up
    again on the same connection) and the second boot reads what the first wrote."""
    image = tmp_path / "disk.qcow2"
    qemu_create(image, f"{DISK_MIB}M")
    served = export(image, num_queues=2)
    script = "\n".join(
        [
            "marker=$(dd if=/dev/vda bs=512 skip=100 count=1 iflag=direct 2>/dev/null | head -c 6)",
            'if [ "$marker" = BOOTED ]; then',
            "echo SECOND-BOOT",
            checksum_script(),
            "else",
            "echo FIRST-BOOT",
            'echo "QUEUES $(ls /sys/block/vda/mq | wc -l)"',
            workload_script(2, cpus=2),
            "printf BOOTED | dd of=/dev/vda bs=512 seek=100 conv=sync,fsync 2>/dev/null",
            "sync",
            "reboot -f",
            "fi",
        ]
    )
    output = boot_guest(
        vhost_disk_args(served.socket_path, 2),
        script,
        150,
        workdir=tmp_path,
        smp=2,
        allow_reboot=True,
    )
    first, second = output.split("SECOND-BOOT")
    assert "FIRST-BOOT" in first and "QUEUES 2" in first
    before_reboot = guest_checksums(first)
    after_reboot = guest_checksums(second)
    assert {r: d for r, d in before_reboot.items() if r} == {
        r: d for r, d in after_reboot.items() if r
    }
    served.close()
    assert served.server.connections == 1
    assert all(served.server.completed_per_queue), served.server.completed_per_queue
    assert_image_matches(image, after_reboot, tmp_path)


def test_guest_reconnects_after_qemu_is_killed(tmp_path: Path, export) -> None:
    """QEMU killed mid-run: the server drops that front-end, keeps listening, and a new
    QEMU on the same socket reads what the first one's guest had synced."""
    image = tmp_path / "disk.qcow2"
    qemu_create(image, f"{DISK_MIB}M")
    served = export(image)
    doomed = Guest(
        vhost_disk_args(served.socket_path),
        workload_script(3) + "echo READY-TO-DIE\nsleep 600\n",
        tmp_path,
        name="first",
    )
    try:
        first_output = doomed.wait_for("READY-TO-DIE", 90)
    finally:
        doomed.kill()
    written = guest_checksums(first_output)
    output = boot_guest(
        vhost_disk_args(served.socket_path), checksum_script(), 90, workdir=tmp_path
    )
    assert guest_checksums(output) == written
    served.close()
    assert served.server.connections == 2
    assert_image_matches(image, written, tmp_path)


def test_qemu_reconnects_to_a_restarted_server(tmp_path: Path, export) -> None:
    """The server goes away while the guest is idle; QEMU (reconnect=1) connects to the
    next server on the same socket, sets the rings up again, and the guest carries on."""
    image = tmp_path / "disk.qcow2"
    qemu_create(image, f"{DISK_MIB}M")
    first = export(image)
    script = "\n".join(
        [
            workload_script(4),
            "echo PHASE-ONE-DONE",
            "sleep 8",
            "dd if=/dev/urandom of=/dev/vda bs=1M seek=12 count=2 oflag=direct 2>/dev/null",
            "echo PHASE-TWO",
            checksum_script(),
        ]
    )
    guest = Guest(vhost_disk_args(first.socket_path), script, tmp_path)
    try:
        guest.wait_for("PHASE-ONE-DONE", 90)
        first.server.shutdown()
        second = VhostUserBlkServer(first.device, first.socket_path, serial="qimg-test-disk")
        second.start()
        try:
            output = guest.wait(90)
        finally:
            second.shutdown()
    finally:
        guest.kill()
    assert guest.process.returncode == 0, output[-3000:]
    assert second.connections == 1
    phase_one, phase_two = output.split("PHASE-TWO")
    before, after = guest_checksums(phase_one), guest_checksums(phase_two)
    assert {r: before[r] for r in before if r not in (12, 13)} == {
        r: after[r] for r in after if r not in (12, 13)
    }
    first.close()
    assert_image_matches(image, after, tmp_path)
