import os
from collections.abc import Buffer, Iterable, Mapping, Sequence
from typing import Any, TypedDict

__version__: str

class KvTierError(Exception): ...
class InvalidArgumentError(KvTierError): ...
class BlockSizeError(InvalidArgumentError): ...
class UnknownNamespaceError(KvTierError): ...
class NoSpaceError(KvTierError): ...
class ThrottledError(KvTierError): ...
class TooLargeError(InvalidArgumentError): ...
class PermissionDeniedError(KvTierError): ...
class ChecksumError(KvTierError): ...
class UnavailableError(KvTierError): ...

class NotFoundError(KvTierError):
    """No such checkpoint, or a chunk of one that no tier holds."""

class AlreadyExistsError(KvTierError):
    """A checkpoint of that name exists: names are immutable; nothing changed."""

class CheckpointInfo(TypedDict):
    """What checkpoint_put and checkpoint_get return."""

    name: str
    files: int
    bytes: int
    chunks: int

class CheckpointSummary(CheckpointInfo):
    """One entry of checkpoint_list."""

    created_unix_ms: int

Namespace = Mapping[str, Any]
"""model_id, revision, layout{num_layers, kv_heads, head_dim, block_tokens, kind, dtype}, tp_rank, tp_size, salt, lora"""

class Store:
    def __init__(self, config: Mapping[str, Any] | None = None, *, toml: str | None = None) -> None: ...
    def register_namespace(self, namespace_: Namespace) -> bytes: ...
    def block_bytes(self, ns: bytes) -> int: ...
    def lookup(self, ns: bytes, keys_: Sequence[bytes]) -> tuple[int, list[str]]: ...
    def put(self, ns: bytes, keys_: Sequence[bytes], data: Buffer) -> dict[str, int]: ...
    def get(self, ns: bytes, keys_: Sequence[bytes], out: Buffer) -> tuple[int, int | None]: ...
    def delete(self, ns: bytes, keys_: Sequence[bytes]) -> int: ...
    def list_keys(self, ns: bytes, after: bytes | None = None, max: int = 4096) -> tuple[list[bytes], bool]: ...
    def flush(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def has_host_tier(self) -> bool:
        """Whether saves land in a host tier; without one (SSD-only) they go
        through a reused staging buffer to the disk."""
    def save_blocks(
        self,
        ns: bytes,
        keys: Sequence[bytes],
        layers: Sequence[tuple[int, int, int]],
        layer_block_bytes: int,
        block_ids: Sequence[int],
        device: str = "cpu",
    ) -> dict[str, int]:
        """Stores block ids `block_ids` of the KV tensors under `keys`, each
        copied once from the tensors into the tier. `layers`: (address of
        block 0, bytes between blocks, number of blocks) per layer; a block
        is every layer's `layer_block_bytes` in layer order. Returns
        {"stored", "present", "not_admitted"}; bad input raises
        InvalidArgumentError / BlockSizeError and stores nothing."""
    def load_blocks(
        self,
        ns: bytes,
        keys: Sequence[bytes],
        layers: Sequence[tuple[int, int, int]],
        layer_block_bytes: int,
        block_ids: Sequence[int],
        device: str = "cpu",
    ) -> tuple[int, int | None]:
        """Loads the leading present blocks of `keys` straight into block ids
        `block_ids` of the KV tensors. Returns (loaded, failed_index or
        None), as get does: a block failing verification is never written."""

class Client:
    def __init__(
        self,
        endpoint: str = "http://127.0.0.1:50051",
        *,
        token: str | None = None,
        ca_file: str | None = None,
        tls_domain: str | None = None,
    ) -> None: ...
    def register_namespace(self, namespace_: Namespace) -> bytes: ...
    def lookup(self, ns: bytes, keys_: Sequence[bytes]) -> tuple[int, list[str]]: ...
    def put(self, ns: bytes, keys_: Sequence[bytes], data: Buffer) -> dict[str, int]: ...
    def get(self, ns: bytes, keys_: Sequence[bytes], out: Buffer) -> tuple[int, int | None]: ...
    def delete(self, ns: bytes, keys_: Sequence[bytes]) -> int: ...
    def list_keys(self, ns: bytes, after: bytes | None = None, max: int = 4096) -> tuple[list[bytes], bool]: ...
    def stats(self) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...
    def checkpoint_put(
        self,
        name: str,
        files: Mapping[str, Buffer] | str | os.PathLike[str],
        *,
        group: str = "default",
        chunk_mib: int = 32,
    ) -> CheckpointInfo:
        """Writes checkpoint `name` from {path in the checkpoint: buffer} (read
        in place) or from every regular file under a directory. Raises
        AlreadyExistsError if the name exists, InvalidArgumentError for a bad
        name, path, group or chunk_mib (1 to 256); either way nothing changes."""
    def checkpoint_get(
        self, name: str, dest: str | os.PathLike[str], *, group: str = "default", chunk_mib: int = 32
    ) -> CheckpointInfo:
        """Restores checkpoint `name` under `dest`: files appear whole and
        verified, or not at all. NotFoundError if it does not exist."""
    def checkpoint_list(self, *, group: str = "default", chunk_mib: int = 32) -> list[CheckpointSummary]: ...
    def checkpoint_delete(self, name: str, *, group: str = "default", chunk_mib: int = 32) -> bool:
        """Deletes checkpoint `name`; answers whether it existed."""

def key_from_hash(ns: bytes, engine_hash: bytes) -> bytes: ...
def keys_from_hashes(ns: bytes, hashes: Iterable[bytes | bytearray | memoryview]) -> list[bytes]:
    """`[key_from_hash(ns, h) for h in hashes]` in one call; a hash that is
    not bytes-like raises TypeError naming its index and type."""
def keys_from_tokens(namespace_: Namespace, tokens: Sequence[int]) -> list[bytes]: ...
def dynamo_hashes(
    tokens: Iterable[int], block_size: int, lora_name: str | None = None, cache_namespace: str | None = None
) -> tuple[list[int], list[int]]:
    """(block hashes, sequence hashes) of every full block of `tokens`, as
    NVIDIA Dynamo 1.6.1's KV router computes them (`compute_block_hash_for_seq`
    gives the first list). An empty name counts as none. ValueError for a
    block_size of 0 or a token id outside 0..=2**32-1."""
