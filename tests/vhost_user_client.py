"""A small vhost-user front-end and virtio driver written by hand, for tests.

It plays QEMU and the guest at once: a memfd is the guest's memory, the test lays out a
split virtqueue in it, and can send well-formed requests or deliberately broken ones
(descriptors outside memory, loops, chains longer than the queue) to a back-end.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
DESC = struct.Struct("<QIHH")
USED = struct.Struct("<II")
BLK_HEADER = struct.Struct("<IIQ")

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG, SET_CONFIG = 24, 25
NEED_REPLY = 1 << 3
F_INDIRECT, F_EVENT_IDX, F_VERSION_1 = 28, 29, 32
D_NEXT, D_WRITE, D_INDIRECT = 1, 2, 4

MEMORY_SIZE = 1 << 20
USER_BASE = 0x7F00_0000_0000  # where "QEMU" pretends the memory is mapped
QUEUE_SIZE = 16
DESC_ADDR, AVAIL_ADDR, USED_ADDR = 0x0, 0x1000, 0x2000
DATA_ADDR = 0x10000


class Frontend:
    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.memfd = os.memfd_create("guest-ram")
        os.ftruncate(self.memfd, MEMORY_SIZE)
        self.memory = mmap.mmap(self.memfd, MEMORY_SIZE)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.used_seen = 0
        self.protocol = 0

    def close(self) -> None:
        self.sock.close()
        for fd in (self.memfd, self.kick, self.call, self.err):
            os.close(fd)
        self.memory.close()

    # -- messages --
    def send(self, request: int, payload: bytes = b"", fds: list[int] = (), flags: int = 1) -> None:
        data = HEADER.pack(request, flags, len(payload)) + payload
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            )
        else:
            self.sock.sendall(data)

    def receive(self) -> tuple[int, int, bytes]:
        header = self._exact(HEADER.size)
        request, flags, size = HEADER.unpack(header)
        return request, flags, self._exact(size)

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("back-end closed the connection")
            data += chunk
        return data

    def call_u64(self, request: int) -> int:
        self.send(request)
        return U64.unpack(self.receive()[2])[0]

    def acked(self, request: int, payload: bytes = b"", fds: list[int] = ()) -> int:
        """Send with NEED_REPLY; the REPLY_ACK status (0 is success)."""
        self.send(request, payload, fds, flags=1 | NEED_REPLY)
        return U64.unpack(self.receive()[2])[0]

    # -- setting up one queue the way QEMU does --
    def negotiate(self, event_idx: bool = False) -> int:
        """Accept every feature offered (EVENT_IDX only when asked); return the offer."""
        offered = self.call_u64(GET_FEATURES)
        self.protocol = self.call_u64(GET_PROTOCOL_FEATURES)
        self.send(SET_PROTOCOL_FEATURES, U64.pack(self.protocol))
        self.send(SET_OWNER)
        wanted = offered if event_idx else offered & ~(1 << F_EVENT_IDX)
        assert self.acked(SET_FEATURES, U64.pack(wanted)) == 0
        return offered

    def set_memory(self) -> None:
        table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, MEMORY_SIZE, USER_BASE, 0)
        assert self.acked(SET_MEM_TABLE, table, [self.memfd]) == 0

    def start_queue(self, index: int = 0, size: int = QUEUE_SIZE, base: int = 0) -> None:
        self.send(SET_VRING_NUM, struct.pack("<II", index, size))
        self.send(SET_VRING_BASE, struct.pack("<II", index, base))
        self.send(
            SET_VRING_ADDR,
            struct.pack(
                "<IIQQQQ",
                index,
                0,
                USER_BASE + DESC_ADDR,
                USER_BASE + USED_ADDR,
                USER_BASE + AVAIL_ADDR,
                0,
            ),
        )
        self.send(SET_VRING_CALL, U64.pack(index), [self.call])
        self.send(SET_VRING_ERR, U64.pack(index), [self.err])
        self.send(SET_VRING_KICK, U64.pack(index), [self.kick])
        assert self.acked(SET_VRING_ENABLE, struct.pack("<II", index, 1)) == 0

    def setup(self) -> None:
        self.negotiate()
        self.set_memory()
        self.start_queue()

    def stop_queue(self, index: int = 0) -> int:
        self.send(GET_VRING_BASE, struct.pack("<II", index, 0))
        return struct.unpack("<II", self.receive()[2])[1]

    # -- the driver side of the ring --
    def put_descriptor(
        self,
        index: int,
        addr: int,
        length: int,
        flags: int,
        next_index: int,
        table: int = DESC_ADDR,
    ) -> None:
        DESC.pack_into(self.memory, table + 16 * index, addr, length, flags, next_index)

    def publish(self, head: int) -> None:
        struct.pack_into(
            "<H", self.memory, AVAIL_ADDR + 4 + 2 * (self.avail_idx % QUEUE_SIZE), head
        )
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.memory, AVAIL_ADDR + 2, self.avail_idx)
        os.eventfd_write(self.kick, 1)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.memory, USED_ADDR + 2)[0]

    def wait_used(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, int]]:
        """The next `count` used elements (head, written), or fewer on timeout."""
        deadline = time.monotonic() + timeout
        while (self.used_idx() - self.used_seen) & 0xFFFF < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if select.select([self.call], [], [], min(left, 0.05))[0]:
                os.eventfd_read(self.call)
        elements = []
        while self.used_seen != self.used_idx():
            slot = USED_ADDR + 4 + 8 * (self.used_seen % QUEUE_SIZE)
            elements.append(USED.unpack_from(self.memory, slot))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return elements

    # -- virtio-blk requests, laid out at DATA_ADDR --
    def blk_chain(
        self,
        kind: int,
        sector: int,
        out: bytes = b"",
        in_length: int = 0,
        first: int = 0,
        data_addr: int = DATA_ADDR,
        indirect: bool = False,
    ) -> int:
        """Write a request's buffers and descriptors (header, data, status); return the head."""
        header_addr = data_addr
        out_addr = header_addr + 16
        in_addr = out_addr + len(out)
        status_addr = in_addr + in_length
        self.memory[header_addr : header_addr + 16] = BLK_HEADER.pack(kind, 0, sector)
        self.memory[out_addr : out_addr + len(out)] = out
        self.memory[status_addr] = 0xFF
        buffers = [(header_addr, 16, 0)]
        if out:
            buffers.append((out_addr, len(out), 0))
        if in_length:
            buffers.append((in_addr, in_length, D_WRITE))
        buffers.append((status_addr, 1, D_WRITE))
        if indirect:
            table = data_addr + 0x8000
            for i, (addr, length, flags) in enumerate(buffers):
                last = i == len(buffers) - 1
                DESC.pack_into(
                    self.memory,
                    table + 16 * i,
                    addr,
                    length,
                    flags | (0 if last else D_NEXT),
                    i + 1 if not last else 0,
                )
            self.put_descriptor(first, table, 16 * len(buffers), D_INDIRECT, 0)
            return first
        for i, (addr, length, flags) in enumerate(buffers):
            last = i == len(buffers) - 1
            index = (first + i) % QUEUE_SIZE
            self.put_descriptor(
                index, addr, length, flags | (0 if last else D_NEXT), (index + 1) % QUEUE_SIZE
            )
        return first

    def blk_result(
        self, kind: int, out: bytes, in_length: int, data_addr: int = DATA_ADDR
    ) -> tuple[int, bytes]:
        in_addr = data_addr + 16 + len(out)
        return self.memory[in_addr + in_length], self.memory[in_addr : in_addr + in_length]

    def blk(
        self,
        kind: int,
        sector: int,
        out: bytes = b"",
        in_length: int = 0,
        indirect: bool = False,
        timeout: float = 5.0,
    ) -> tuple[int, bytes, int]:
        """Run one request to completion: (status, data read, used length)."""
        head = self.blk_chain(kind, sector, out, in_length, indirect=indirect)
        self.publish(head)
        used = self.wait_used(1, timeout)
        assert used and used[0][0] == head, f"no completion for head {head}: {used}"
        status, data = self.blk_result(kind, out, in_length)
        return status, data, used[0][1]
