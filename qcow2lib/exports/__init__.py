"""Network exports of a `BlockDevice`: the NBD server (and, later, an NBD client and a
vhost-user-blk backend). The protocol layer knows sockets but never parses argv or prints."""
from .nbd import NBDExport, NBDServer, serve

__all__ = ["NBDExport", "NBDServer", "serve"]
