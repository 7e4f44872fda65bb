"""kvtier: KV-cache offload tiers (host RAM, local SSD) for LLM inference engines.

- ``Store``: the block manager in this process (embedded), from a dict or TOML.
- ``Client``: a client of a local ``kvtierd`` (daemon mode); its
  ``checkpoint_*`` methods put, get, list and delete checkpoints (named sets
  of files, from memory or a directory).
- ``key_from_hash`` / ``keys_from_tokens``: 16-byte block keys.

``put`` and ``get`` take any C-contiguous buffer (numpy arrays of any dtype,
bytes, bytearray, memoryview, CPU tensors through ``.numpy()``) and read or
fill its bytes in place, with the interpreter released.

Errors are ``KvTierError`` subclasses named for their kind:
``InvalidArgumentError`` (nothing changed), ``NotFoundError`` (no such
checkpoint, or a chunk of one in no tier), ``AlreadyExistsError`` (checkpoint
names are immutable), ``NoSpaceError``, ``TooLargeError`` (a request over
the daemon's size limit; an ``InvalidArgumentError``), ``ThrottledError``
(back off and retry; the connection is fine), ``UnavailableError`` (the
daemon is unreachable or stopping), ``PermissionDeniedError``, ...
"""

from ._kvtier import (
    AlreadyExistsError,
    BlockSizeError,
    ChecksumError,
    Client,
    InvalidArgumentError,
    KvTierError,
    NoSpaceError,
    NotFoundError,
    PermissionDeniedError,
    Store,
    ThrottledError,
    TooLargeError,
    UnavailableError,
    UnknownNamespaceError,
    __version__,
    key_from_hash,
    keys_from_tokens,
)

__all__ = [
    "AlreadyExistsError",
    "BlockSizeError",
    "ChecksumError",
    "Client",
    "InvalidArgumentError",
    "KvTierError",
    "NoSpaceError",
    "NotFoundError",
    "PermissionDeniedError",
    "Store",
    "ThrottledError",
    "TooLargeError",
    "UnavailableError",
    "UnknownNamespaceError",
    "__version__",
    "key_from_hash",
    "keys_from_tokens",
]
