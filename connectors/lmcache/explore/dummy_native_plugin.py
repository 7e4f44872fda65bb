"""A pure-Python object with the `native_plugin` protocol of LMCache 0.5.6.

Written from scratch to learn the contract that LMCache's
NativeConnectorL2Adapter expects (see ../NOTES.md), not to be used. A worker
thread completes every submitted batch in FIFO order, as a real connector's
I/O threads would; the eventfd is raised once per completion and reset by
drain_completions(), which the adapter calls when poll() reports it readable.
"""

import os
import queue
import threading


class DummyNativeConnector:
    def __init__(self, fail_sets=False, log_path=None):
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._store = {}
        self._lock = threading.Lock()
        self._next_id = 1
        self._done = []
        self._fail_sets = fail_sets
        self._log_path = log_path
        self._queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, daemon=True)
        self._worker.start()

    def _log(self, msg):
        if self._log_path:
            with open(self._log_path, "a") as f:
                f.write(msg + "\n")

    # --- the protocol -----------------------------------------------------

    def event_fd(self):
        return self._efd

    def submit_batch_set(self, keys, bufs):
        return self._submit("set", keys, bufs)

    def submit_batch_get(self, keys, bufs):
        return self._submit("get", keys, bufs)

    def submit_batch_exists(self, keys):
        return self._submit("exists", keys, None)

    def submit_batch_delete(self, keys):
        return self._submit("delete", keys, None)

    def drain_completions(self):
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        with self._lock:
            done, self._done = self._done, []
        return done

    def close(self):
        self._queue.put(None)
        self._worker.join()
        os.close(self._efd)

    # --- internals ----------------------------------------------------------

    def _submit(self, op, keys, bufs):
        with self._lock:
            fid = self._next_id
            self._next_id += 1
        # What the adapter hands us, recorded for the notes.
        if bufs is not None:
            b = bufs[0]
            self._log(
                f"{op}: keys[0]={keys[0]!r} ({type(keys[0]).__name__}), "
                f"buf type={type(b).__name__} format={b.format} "
                f"itemsize={b.itemsize} nbytes={b.nbytes} readonly={b.readonly} "
                f"thread={threading.current_thread().name}"
            )
        else:
            self._log(f"{op}: keys={keys!r} thread={threading.current_thread().name}")
        self._queue.put((fid, op, list(keys), bufs))
        return fid

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            fid, op, keys, bufs = item
            if op == "set":
                if self._fail_sets:
                    result = (fid, False, "dummy: sets fail", None)
                else:
                    for k, b in zip(keys, bufs):
                        self._store[k] = bytes(b)
                    result = (fid, True, "", None)
            elif op == "get":
                found = []
                for k, b in zip(keys, bufs):
                    v = self._store.get(k)
                    if v is not None and len(v) == b.nbytes:
                        # The adapter's views have format "<B" (ctypes),
                        # which slice assignment refuses; "B" it takes.
                        b.cast("B")[:] = v
                        found.append(True)
                    else:
                        found.append(False)
                result = (fid, all(found), "" if all(found) else "miss", found)
            elif op == "exists":
                result = (fid, True, "", [k in self._store for k in keys])
            else:  # delete
                result = (fid, True, "", [self._store.pop(k, None) is not None for k in keys])
            with self._lock:
                self._done.append(result)
            os.eventfd_write(self._efd, 1)
