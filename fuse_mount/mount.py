"""The FUSE filesystem over BlockDevices, and the `python -m fuse_mount` command."""
from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
import threading
import time

import mfusepy

import qcow2lib
from qcow2lib.blockdev import BlockDevice

DISK_NAME = "disk"
SNAPSHOT_DIR = "snapshots"


class DiskFilesystem(mfusepy.Operations):
    """/disk is the guest disk; /snapshots/<name> are read-only views of internal snapshots."""

    use_ns = True

    def __init__(self, device: BlockDevice):
        self.device = device
        self.snapshots: dict[str, BlockDevice] = {}
        self._snapshot_lock = threading.Lock()
        self.mounted_at = time.time_ns()

    # -- helpers --
    def _snapshot_names(self) -> list[str]:
        if self.device.format != "qcow2":
            return []
        from qcow2lib.snapshots import list_snapshots
        return [snap.name for snap in list_snapshots(self.device)]

    def _device_for(self, path: str) -> BlockDevice:
        if path == "/" + DISK_NAME:
            return self.device
        prefix = f"/{SNAPSHOT_DIR}/"
        if path.startswith(prefix) and path[len(prefix):] in self._snapshot_names():
            name = path[len(prefix):]
            with self._snapshot_lock:
                if name not in self.snapshots:
                    from qcow2lib.snapshots import SnapshotView
                    self.snapshots[name] = SnapshotView(self.device, name)
                return self.snapshots[name]
        raise mfusepy.FuseOSError(errno.ENOENT)

    def _file_attrs(self, size: int, writable: bool) -> dict:
        mode = stat.S_IFREG | (0o644 if writable else 0o444)
        return {"st_mode": mode, "st_nlink": 1, "st_size": size, "st_uid": os.getuid(),
                "st_gid": os.getgid(), "st_atime": self.mounted_at, "st_mtime": self.mounted_at,
                "st_ctime": self.mounted_at, "st_blksize": 65536,
                "st_blocks": (size + 511) // 512}

    # -- FUSE operations --
    def getattr(self, path: str, fh=None) -> dict:
        if path in ("/", f"/{SNAPSHOT_DIR}"):
            if path != "/" and not self._snapshot_names():
                raise mfusepy.FuseOSError(errno.ENOENT)
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2, "st_uid": os.getuid(),
                    "st_gid": os.getgid(), "st_atime": self.mounted_at,
                    "st_mtime": self.mounted_at, "st_ctime": self.mounted_at}
        device = self._device_for(path)
        return self._file_attrs(device.size, not device.read_only)

    def readdir(self, path: str, fh):
        if path == "/":
            entries = [".", "..", DISK_NAME]
            if self._snapshot_names():
                entries.append(SNAPSHOT_DIR)
            return entries
        if path == f"/{SNAPSHOT_DIR}":
            return [".", "..", *self._snapshot_names()]
        raise mfusepy.FuseOSError(errno.ENOTDIR)

    def open(self, path: str, flags: int) -> int:
        device = self._device_for(path)
        if flags & (os.O_WRONLY | os.O_RDWR) and device.read_only:
            raise mfusepy.FuseOSError(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh) -> bytes:
        device = self._device_for(path)
        size = max(0, min(size, device.size - offset))
        return device.read(offset, size) if size else b""

    def write(self, path: str, data: bytes, offset: int, fh) -> int:
        device = self._device_for(path)
        if device.read_only:
            raise mfusepy.FuseOSError(errno.EROFS)
        if offset + len(data) > device.size:
            raise mfusepy.FuseOSError(errno.ENOSPC)
        device.write(offset, data)
        return len(data)

    def truncate(self, path: str, length: int, fh=None) -> None:
        device = self._device_for(path)
        if length != device.size:  # the disk's size is the image's, not the file's to change
            raise mfusepy.FuseOSError(errno.EPERM)

    def flush(self, path: str, fh) -> None:
        self.fsync(path, False, fh)

    def fsync(self, path: str, datasync, fh) -> None:
        device = self._device_for(path)
        if not device.read_only:
            device.flush()

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 65536, "f_frsize": 512, "f_blocks": self.device.size // 512,
                "f_bfree": 0, "f_bavail": 0, "f_namemax": 255}

    def destroy(self, path: str) -> None:
        for view in self.snapshots.values():
            view.close()
        self.device.flush()


def mount(device: BlockDevice, mountpoint: str, foreground: bool = True) -> None:
    """Serve `device` at `mountpoint` until unmounted (fusermount3 -u)."""
    mfusepy.FUSE(DiskFilesystem(device), mountpoint, foreground=foreground, nothreads=False,
                 ro=device.read_only, fsname="qcow2lib")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuse_mount", description=__doc__)
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    parser.add_argument("-f", "--format", default=None, help="image format (default: probe)")
    parser.add_argument("--rw", action="store_true", help="mount the disk read-write")
    parser.add_argument("--passphrase-env", metavar="VAR",
                        help="environment variable holding the passphrase of an encrypted image")
    args = parser.parse_args(argv)
    passphrase = os.environ.get(args.passphrase_env) if args.passphrase_env else None
    try:
        device = qcow2lib.open(args.image, "r+" if args.rw else "r", fmt=args.format,
                               passphrase=passphrase)
    except qcow2lib.Qcow2Error as exc:
        print(f"fuse_mount: {exc}", file=sys.stderr)
        return 1
    try:
        mount(device, args.mountpoint)
    finally:
        device.close()
    return 0
