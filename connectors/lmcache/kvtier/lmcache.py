"""kvtier for LMCache.

As the second level (L2) of LMCache's multiprocess server, through its
``native_plugin`` adapter::

    lmcache server ... --l2-adapter '{"type": "native_plugin",
        "module_path": "kvtier.lmcache", "class_name": "KvTierL2",
        "adapter_params": {"chunk_bytes": 33554432, "endpoint": "http://127.0.0.1:50051"},
        "max_capacity_gb": 0}'

``KvTierL2(chunk_bytes=..., endpoint=... | store={...} | disk_dir=...)`` is
kvtier's Rust object (``kvtier._kvtier.LmcacheL2``): its batched calls
return at once, run on kvtier's threads without the interpreter, and signal
completion on an eventfd, the protocol LMCache's ``NativeConnectorL2Adapter``
drives. Model, KV rank, object group and cache salt of LMCache's object keys
name the kvtier namespace, so another model or tenant never matches; the
chunk hash is the key. ``chunk_bytes`` is LMCache's full chunk in bytes
(chunk size x bytes of KV per token); a shorter last chunk is stored padded
and read back only into a buffer of its own length.

As a remote-storage plugin of in-process LMCache (``LMCacheConnectorV1``)::

    remote_storage_plugins: ["kvtier"]
    extra_config:
      remote_storage_plugin.kvtier.module_path: kvtier.lmcache
      remote_storage_plugin.kvtier.class_name: KvTierConnectorAdapter
      remote_storage_plugin.kvtier.endpoint: http://127.0.0.1:50051

``KvTierConnectorAdapter`` (and the bare ``KvTierConnector``) live in
``kvtier._lmcache_remote``, which imports lmcache and torch: this module
loads it only when one of the two names is asked for, so the multiprocess
server's L2 (and anyone importing this module) does not pay for it.
"""

from kvtier._kvtier import LmcacheL2 as KvTierL2

__all__ = ["KvTierL2"]

_PLUGIN_CLASSES = ("KvTierConnectorAdapter", "KvTierConnector")


def __getattr__(name):
    if name in _PLUGIN_CLASSES:
        from kvtier import _lmcache_remote

        return getattr(_lmcache_remote, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PLUGIN_CLASSES])
