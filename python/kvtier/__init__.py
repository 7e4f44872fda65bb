"""kvtier: KV-cache offload tiers (host RAM, local SSD) for LLM inference engines.

- ``Store``: the block manager in this process (embedded), from a dict or TOML.
- ``Client``: a client of a local ``kvtierd`` (daemon mode).
- ``key_from_hash`` / ``keys_from_tokens``: 16-byte block keys.

``put`` and ``get`` take any C-contiguous buffer (numpy arrays of any dtype,
bytes, bytearray, memoryview, CPU tensors through ``.numpy()``) and read or
fill its bytes in place, with the interpreter released.
"""

from ._kvtier import (
    BlockSizeError,
    ChecksumError,
    Client,
    InvalidArgumentError,
    KvTierError,
    NoSpaceError,
    Store,
    ThrottledError,
    UnavailableError,
    UnknownNamespaceError,
    __version__,
    key_from_hash,
    keys_from_tokens,
)

__all__ = [
    "BlockSizeError",
    "ChecksumError",
    "Client",
    "InvalidArgumentError",
    "KvTierError",
    "NoSpaceError",
    "Store",
    "ThrottledError",
    "UnavailableError",
    "UnknownNamespaceError",
    "__version__",
    "key_from_hash",
    "keys_from_tokens",
]
