"""Mount a disk image with FUSE: the guest disk, its snapshots and partitions as files.

    python -m fuse_mount disk.qcow2 /mnt/disk [--rw] [--foreground]
    python -m fuse_mount --unmount /mnt/disk

See `python -m fuse_mount --help` for the tree. `command.main` / `command.umount_main`
are the commands, `command.mount_image` / `command.unmount` the same for callers with
their own option parsing, `filesystem.DiskFilesystem` the filesystem over a BlockDevice.
"""

from .command import main, mount_image, umount_main, unmount
from .filesystem import DiskFilesystem

__all__ = ["DiskFilesystem", "main", "mount_image", "umount_main", "unmount"]
