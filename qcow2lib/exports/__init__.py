"""Protocol layers that export a `BlockDevice` to other processes (NBD, vhost-user-blk)."""
