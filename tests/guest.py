"""Boot a tiny Linux guest under QEMU to drive a virtio-blk disk from the inside.

The initramfs is built at test time from what the machine has installed: busybox-static,
the Debian kernel in /boot and its virtio modules (decompressed here when the kernel
ships them as .ko.xz or .ko.zst). Nothing binary is kept in the repository.

    output = boot_guest(["-drive", f"file=nbd:unix:{sock},if=virtio,format=raw"],
                        "dd if=/dev/vda bs=1M count=1 | md5sum", timeout=90)

The guest's /init loads the modules, waits for /dev/vda, runs the script with busybox sh
and powers off; `output` is everything the serial console printed. QEMU runs under TCG
(KVM only when QIMG_TEST_KVM=1) with its RAM in a shared memfd, as vhost-user needs.
"""

from __future__ import annotations

import lzma
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
QEMU_SYSTEM = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
MODULE_ORDER = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
]
MEMORY_MB = 256
DONE_MARKER = "GUEST-SCRIPT-DONE"

INIT_TEMPLATE = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /modules/$m.ko || echo "GUEST-INSMOD-FAILED $m"; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
[ -b /dev/vda ] || echo "GUEST-NO-DISK"
sh /script.sh
echo "{done} rc=$?"
sync
poweroff -f
"""


def kernel_release() -> str:
    """The newest /boot/vmlinuz-* that has its modules installed."""
    for kernel in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        release = kernel.name[len("vmlinuz-") :]
        if (Path("/lib/modules") / release / "kernel").is_dir():
            return release
    raise FileNotFoundError("no /boot/vmlinuz-* with modules in /lib/modules")


def kernel_path() -> Path:
    return Path("/boot") / f"vmlinuz-{kernel_release()}"


# The magic numbers of the compressions a bzImage's payload comes in.
_XZ_MAGIC, _ZSTD_MAGIC, _GZIP_MAGIC = b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x1f\x8b\x08\x00"


def _decompress_payload(magic: bytes, data: bytes) -> bytes:
    """`data` (a stream that starts with `magic`, trailing bytes ignored) decompressed."""
    if magic == _XZ_MAGIC:
        return lzma.LZMADecompressor().decompress(data)
    if magic == _ZSTD_MAGIC:
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError as error:
            raise ValueError(str(error)) from error
    return zlib.decompressobj(31).decompress(data)


_XEN_ELFNOTE_PHYS32_ENTRY = 18
_unpacked_kernel: Path | None = None


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether a vmlinux ELF carries the PVH entry note that lets QEMU boot it directly."""
    if elf[:5] != b"\x7fELF\x02":
        return False
    phoff, phentsize, phnum = (
        int.from_bytes(elf[32:40], "little"),
        int.from_bytes(elf[54:56], "little"),
        int.from_bytes(elf[56:58], "little"),
    )
    for index in range(phnum):
        header = elf[phoff + index * phentsize : phoff + (index + 1) * phentsize]
        if int.from_bytes(header[0:4], "little") != 4:  # PT_NOTE
            continue
        offset, size = (
            int.from_bytes(header[8:16], "little"),
            int.from_bytes(header[32:40], "little"),
        )
        position, end = offset, offset + size
        while position + 12 <= end:
            name_size, desc_size, note_type = (
                int.from_bytes(elf[position + i : position + i + 4], "little") for i in (0, 4, 8)
            )
            name = elf[position + 12 : position + 12 + name_size].rstrip(b"\0")
            if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            position += 12 + -(-name_size // 4) * 4 + -(-desc_size // 4) * 4
    return False


def boot_kernel(workdir: Path) -> Path:
    """The kernel QEMU boots: the installed one, unpacked on the host into `workdir` when it
    can enter through PVH. Under TCG the guest's own decompression of the bzImage takes
    most of a boot (about 10 of 13 s); the unpacked vmlinux starts at once. The first
    unpacking in a process is linked into later work directories."""
    global _unpacked_kernel
    target = Path(workdir) / "vmlinux"
    if _unpacked_kernel is not None and _unpacked_kernel.exists():
        try:
            os.link(_unpacked_kernel, target)
            return target
        except OSError:
            pass
    bzimage = kernel_path().read_bytes()
    for magic in (_XZ_MAGIC, _ZSTD_MAGIC, _GZIP_MAGIC):
        start = bzimage.find(magic)
        if start < 0:
            continue
        try:
            elf = _decompress_payload(magic, bzimage[start:])
        except (lzma.LZMAError, zlib.error, ValueError):  # the magic matched by chance
            continue
        if _has_pvh_entry(elf):
            target.write_bytes(elf)
            _unpacked_kernel = target
            return target
    return kernel_path()


def module_bytes(name: str, release: str) -> bytes:
    """A module's .ko contents, decompressed when the kernel ships it compressed."""
    root = Path("/lib/modules") / release / "kernel" / "drivers"
    for suffix in (".ko", ".ko.xz", ".ko.zst"):
        found = sorted(root.rglob(name + suffix))
        if not found:
            continue
        data = found[0].read_bytes()
        if suffix == ".ko.xz":
            return lzma.decompress(data)
        if suffix == ".ko.zst":
            import zstandard

            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
        return data
    raise FileNotFoundError(f"kernel module {name} not found under {root}")


class CpioWriter:
    """A newc ("070701") cpio archive, the format the kernel unpacks as initramfs."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.inode = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self.inode,
            mode,
            0,
            0,
            2 if stat.S_ISDIR(mode) else 1,
            0,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        ]
        self.inode += 1
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        self.parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, stat.S_IFREG | (0o755 if executable else 0o644), data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        archive = b"".join(self.parts)
        return archive + b"\0" * (-len(archive) % 512)


def build_initramfs(path: Path, script: str) -> Path:
    """Write an initramfs that runs `script` against /dev/vda, then powers off."""
    release = kernel_release()
    cpio = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys", "tmp", "modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), executable=True)
    for name in MODULE_ORDER:
        cpio.file(f"modules/{name}.ko", module_bytes(name, release))
    cpio.file(
        "init",
        INIT_TEMPLATE.format(modules=" ".join(MODULE_ORDER), done=DONE_MARKER).encode(),
        executable=True,
    )
    cpio.file("script.sh", script.encode())
    path.write_bytes(cpio.finish())
    return path


def qemu_command(
    disk_args: list[str],
    initrd: Path,
    *,
    smp: int = 1,
    allow_reboot: bool = False,
    kernel: Path | None = None,
) -> list[str]:
    accel = "kvm" if os.environ.get("QIMG_TEST_KVM") == "1" else "tcg"
    command = [
        QEMU_SYSTEM,
        "-nodefaults",
        "-display",
        "none",
        "-accel",
        accel,
        "-m",
        str(MEMORY_MB),
        "-smp",
        str(smp),
        "-object",
        f"memory-backend-memfd,id=mem,size={MEMORY_MB}M,share=on",
        "-numa",
        "node,memdev=mem",
        "-kernel",
        str(kernel or kernel_path()),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-serial",
        "stdio",
    ]
    if not allow_reboot:
        command.append("-no-reboot")
    return command + list(disk_args)


class Guest:
    """A running QEMU: its console output is collected as it arrives."""

    def __init__(
        self,
        disk_args: list[str],
        script: str,
        workdir: Path,
        *,
        smp: int = 1,
        allow_reboot: bool = False,
        name: str = "guest",
    ):
        initrd = build_initramfs(Path(workdir) / f"{name}-initramfs.cpio", script)
        self.command = qemu_command(
            disk_args,
            initrd,
            smp=smp,
            allow_reboot=allow_reboot,
            kernel=boot_kernel(Path(workdir)),
        )
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._chunks: list[bytes] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.process.stdout.read1(4096), b""):
            with self._changed:
                self._chunks.append(chunk)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return b"".join(self._chunks).decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for(self, text: str, timeout: float) -> str:
        """Wait until the console printed `text`; fail with the output so far if not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while text not in b"".join(self._chunks).decode("utf-8", "replace"):
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    self.kill()
                    raise AssertionError(
                        f"guest did not print {text!r} within {timeout} s:\n{self.output[-4000:]}"
                    )
                self._changed.wait(min(left, 0.5))
        return self.output

    def wait(self, timeout: float) -> str:
        """Wait for QEMU to exit (the guest powered off); kill it after `timeout`."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"guest still running after {timeout} s "
                f"({shlex.join(self.command)}):\n{self.output[-4000:]}"
            ) from None
        self._reader.join(5)
        return self.output

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self._reader.join(5)


def boot_guest(
    disk_args: list[str],
    script: str,
    timeout: float = 90,
    *,
    workdir: Path | None = None,
    smp: int = 1,
    allow_reboot: bool = False,
) -> str:
    """Boot, run `script` in the guest, wait for power-off; return the console output.
    The initramfs goes to `workdir` (a temporary directory when None). Raises
    AssertionError when QEMU fails or the guest does not finish in time."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="qimg-guest-") as scratch:
            return boot_guest(
                disk_args,
                script,
                timeout,
                workdir=Path(scratch),
                smp=smp,
                allow_reboot=allow_reboot,
            )
    guest = Guest(disk_args, script, workdir, smp=smp, allow_reboot=allow_reboot)
    output = guest.wait(timeout)
    if guest.process.returncode != 0 or DONE_MARKER not in output:
        raise AssertionError(
            f"guest failed (QEMU exit {guest.process.returncode}):\n{output[-4000:]}"
        )
    return output
