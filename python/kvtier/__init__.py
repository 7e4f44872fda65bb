"""kvtier: KV-cache offload tiers (host RAM, local SSD) for LLM inference engines.

- ``Store``: the block manager in this process (embedded), from a dict or TOML.
- ``Client``: a client of a local ``kvtierd`` (daemon mode); its
  ``checkpoint_*`` methods put, get, list and delete checkpoints (named sets
  of files, from memory or a directory).
- ``key_from_hash`` / ``keys_from_hashes`` / ``keys_from_tokens``: 16-byte
  block keys (``keys_from_hashes``: a request's engine hashes in one call;
  only bytes-like hashes, anything else is a ``TypeError``).
- ``dynamo_hashes``: NVIDIA Dynamo's KV-router block and sequence hashes of
  a token sequence (with an optional LoRA adapter and cache namespace).

``put`` and ``get`` take any C-contiguous buffer (numpy arrays of any dtype,
bytes, bytearray, memoryview, CPU tensors through ``.numpy()``) and read or
fill its bytes in place, with the interpreter released. ``Store.save_blocks``
and ``Store.load_blocks`` move blocks straight between an engine's KV tensors
and the tiers, one copy each way (``Store.has_host_tier()`` says whether
saves land in host memory or go through a staging buffer to the SSD).

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
    dynamo_hashes,
    key_from_hash,
    keys_from_hashes,
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
    "dynamo_hashes",
    "key_from_hash",
    "keys_from_hashes",
    "keys_from_tokens",
]
