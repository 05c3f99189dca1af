"""Exports of a `BlockDevice` to other processes: the NBD server (`exports.nbd`) and the
vhost-user-blk backend (`exports.vhost_user_blk`). The protocol layer knows sockets but
never parses argv or prints; import the protocol's module, so a command loads only its own."""
