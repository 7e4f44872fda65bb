"""A RemoteConnector plugin for LMCache 0.5.6's in-process engine, in pure
Python, written to learn the contract (see ../NOTES.md): a dict of bytes.

LMCache's DynamicConnectorAdapter builds it with keyword arguments
loop=, local_cpu_backend=, config= (no metadata: it is taken from the CPU
backend, as LMCache's own FSConnector does).
"""

from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

CALLS = []


class DummyRemoteConnector(RemoteConnector):
    def __init__(self, loop, local_cpu_backend, config):
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.store = {}
        CALLS.append(("init", type(loop).__name__, type(local_cpu_backend).__name__))

    async def exists(self, key):
        CALLS.append(("exists", key.to_string()))
        return key.to_string() in self.store

    def exists_sync(self, key):
        CALLS.append(("exists_sync", key.to_string()))
        return key.to_string() in self.store

    async def get(self, key):
        CALLS.append(("get", key.to_string()))
        data = self.store.get(key.to_string())
        if data is None:
            return None
        obj = self.local_cpu_backend.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt)
        if obj is None:
            return None
        view = obj.byte_array.cast("B")
        CALLS.append(("get-sizes", len(data), len(view), self.meta_shapes, self.meta_fmt))
        if len(data) != len(view):
            obj.ref_count_down()
            return None
        view[:] = data
        return obj

    async def put(self, key, memory_obj):
        CALLS.append(("put", key.to_string(), type(memory_obj).__name__, len(memory_obj.byte_array)))
        self.store[key.to_string()] = bytes(memory_obj.byte_array)

    async def list(self):
        return list(self.store)

    async def close(self):
        CALLS.append(("close",))
