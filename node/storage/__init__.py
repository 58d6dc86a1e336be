"""Stage 1b: the files. Durable, atomic, and named by the node, never by a peer."""

from node.storage.layout import Storage

__all__ = ["Storage"]
