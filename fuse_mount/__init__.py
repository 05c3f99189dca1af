"""Mount a disk image with FUSE: the guest disk (and its internal snapshots) as files.

    python -m fuse_mount disk.qcow2 /mnt/disk [--rw]

gives /mnt/disk/disk (the guest disk, read-write with --rw) and, for qcow2 images with
internal snapshots, /mnt/disk/snapshots/<name> (read-only). Everything goes through the
engine's BlockDevice interface; FUSE calls arrive on several threads, which the engine
allows.
"""
from .mount import DiskFilesystem, mount

__all__ = ["DiskFilesystem", "mount"]
