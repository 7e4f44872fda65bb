"""The S3 request sequence of NVIDIA Dynamo's KVBM G4 object tier
(kvbm-engine, `object/s3/client.rs` S3ObjectBlockClient and
`object/s3/lock.rs` S3LockManager, aws-sdk-rust), replayed with boto3
against kvtierd's blocks bucket. KvbmObjectTier below re-states that
protocol (read from kvbm-engine; see connectors/s3/NOTES.md), it does not
import it:

- keys: a block is `{rank}/{hash}`, its lock `{hash}.lock`, its
  offloaded-marker `{hash}.meta` (no rank), all in one bucket; `hash` is
  a PositionalLineageHash in Display form, `position:current[:parent]`
  with base58 fragments;
- offload of a block: HEAD `{hash}.meta` (exists: skip) -> PUT `{hash}.lock`
  with If-None-Match: * and a JSON body {instance_id, acquired_at,
  deadline} (412 PreconditionFailed: GET the lock with its ETag; ours:
  proceed; deadline passed or unparsable: PUT with If-Match: <etag>,
  412 = lost; else skip) -> PUT `{rank}/{hash}` (whole object) -> PUT
  `{hash}.meta` (empty) -> DELETE `{hash}.lock`;
- onboard: HEAD `{rank}/{hash}` (presence and size, 16 at a time), then
  GET `{rank}/{hash}`, whole object, no Range;
- errors are matched on the S3 error code: PreconditionFailed (412),
  NoSuchKey (GET), NotFound (the SDK's code for a bodyless 404 on HEAD).
- ensure_bucket_exists: HeadBucket, on failure CreateBucket.
"""

import concurrent.futures
import datetime
import json
import random
import threading
import uuid

import pytest
from botocore.exceptions import ClientError
from s3kit import code_of, raw, signed_headers, status_of, unique

B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58(n):
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = B58[r] + out
    return out or "1"


def lineage_hash(position, parent=None):
    """A key in PositionalLineageHash's Display form; the hash fragment is
    random, so runs against a long-lived server do not meet."""
    current = b58(uuid.uuid4().int >> 64)
    return f"{position}:{current}" + (f":{parent}" if parent else "")


def now():
    return datetime.datetime.now(datetime.timezone.utc)


class KvbmObjectTier:
    """One KVBM instance's view of the G4 tier (see the module docstring)."""

    def __init__(self, s3, bucket, instance_id, rank=0, lock_timeout_s=300):
        self.c = s3.client()
        self.bucket = bucket
        self.instance_id = instance_id
        self.rank = rank
        self.lock_timeout = datetime.timedelta(seconds=lock_timeout_s)

    # S3ObjectBlockClient
    def ensure_bucket_exists(self):
        try:
            self.c.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.c.create_bucket(Bucket=self.bucket)

    def block_key(self, h):
        return f"{self.rank}/{h}"

    def put_blocks(self, blocks):
        for h, data in blocks.items():
            self.c.put_object(Bucket=self.bucket, Key=self.block_key(h), Body=data)

    def has_blocks(self, hashes):
        def head(h):
            try:
                return h, self.c.head_object(Bucket=self.bucket, Key=self.block_key(h))["ContentLength"]
            except ClientError:
                return h, None

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return dict(pool.map(head, hashes))

    def get_blocks(self, hashes):
        return {h: self.c.get_object(Bucket=self.bucket, Key=self.block_key(h))["Body"].read() for h in hashes}

    def put_if_not_exists(self, key, body):
        try:
            self.c.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
            return True
        except ClientError as e:
            if code_of(e) == "PreconditionFailed":
                return False
            raise

    def put_if_match(self, key, body, etag):
        try:
            self.c.put_object(Bucket=self.bucket, Key=key, Body=body, IfMatch=etag)
            return True
        except ClientError as e:
            if code_of(e) == "PreconditionFailed":
                return False
            raise

    def get_with_etag(self, key):
        try:
            r = self.c.get_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if code_of(e) == "NoSuchKey":
                return None
            raise
        return r["Body"].read(), r.get("ETag")

    def has_object(self, key):
        try:
            self.c.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as e:
            if code_of(e) in ("404", "NotFound"):
                return False
            raise

    # S3LockManager
    def lock_body(self, timeout=None):
        t = now()
        return json.dumps(
            {
                "instance_id": self.instance_id,
                "acquired_at": t.isoformat(),
                "deadline": (t + (timeout if timeout is not None else self.lock_timeout)).isoformat(),
            }
        ).encode()

    def has_meta(self, h):
        return self.has_object(f"{h}.meta")

    def try_acquire_lock(self, h, *, between_read_and_write=None):
        key = f"{h}.lock"
        body = self.lock_body()
        if self.put_if_not_exists(key, body):
            return True
        got = self.get_with_etag(key)
        if got is None:
            return self.put_if_not_exists(key, body)
        data, etag = got
        if between_read_and_write:
            between_read_and_write()
        try:
            lock = json.loads(data)
            if lock["instance_id"] == self.instance_id:
                return True
            expired = now() > datetime.datetime.fromisoformat(lock["deadline"])
        except (ValueError, KeyError, TypeError):
            expired = True  # a malformed lock is taken over like an expired one
        if not expired:
            return False
        assert etag, "KVBM falls back to an unconditional overwrite without an ETag"
        return self.put_if_match(key, body, etag)

    def create_meta(self, h):
        self.c.put_object(Bucket=self.bucket, Key=f"{h}.meta", Body=b"")

    def release_lock(self, h):
        self.c.delete_object(Bucket=self.bucket, Key=f"{h}.lock")

    # The offload pipeline's use of both.
    def offload(self, blocks):
        """Returns the hashes this instance uploaded."""
        done = []
        for h, data in blocks.items():
            if self.has_meta(h):
                continue
            if not self.try_acquire_lock(h):
                continue
            self.put_blocks({h: data})
            self.create_meta(h)
            self.release_lock(h)
            done.append(h)
        return done


def chain(seed, n, size):
    """n blocks of `size` bytes with lineage hashes chained parent to child."""
    rng = random.Random(seed)
    out, parent = {}, None
    for i in range(n):
        h = lineage_hash(i, parent)
        out[h] = rng.randbytes(size)
        parent = h.split(":")[1]
    return out


def test_offload_then_onboard(s3):
    blocks = chain(1, 4, 64 * 1024)
    a = KvbmObjectTier(s3, s3.kv, "instance-a")
    assert a.offload(blocks) == list(blocks)
    for h in blocks:
        assert a.has_meta(h)
        assert not a.has_object(f"{h}.lock")  # released
        assert a.c.head_object(Bucket=s3.kv, Key=f"{h}.meta")["ContentLength"] == 0
    # Another instance sees the .meta markers and uploads nothing.
    b = KvbmObjectTier(s3, s3.kv, "instance-b")
    assert b.offload(blocks) == []
    # Onboarding, as a worker of the same rank.
    missing = lineage_hash(99)
    sizes = b.has_blocks(list(blocks) + [missing])
    assert sizes == {**{h: 64 * 1024 for h in blocks}, missing: None}
    assert b.get_blocks(list(blocks)) == blocks


def test_lock_held_by_another_instance(s3):
    h = chain(2, 1, 16).popitem()[0]
    a = KvbmObjectTier(s3, s3.kv, "instance-a")
    b = KvbmObjectTier(s3, s3.kv, "instance-b")
    assert a.try_acquire_lock(h)
    assert not b.try_acquire_lock(h)  # 412, then a live lock of A's
    assert a.try_acquire_lock(h)  # A finds its own lock
    a.release_lock(h)
    assert b.try_acquire_lock(h)
    data, _ = b.get_with_etag(f"{h}.lock")
    assert json.loads(data)["instance_id"] == "instance-b"


def test_expired_lock_takeover_is_atomic(s3):
    """Two instances find the same expired lock, both read its ETag, both
    PUT If-Match: <etag>: exactly one wins, the other gets 412
    PreconditionFailed (KVBM counts anything else, 409 included, as an
    error, not as a lost race)."""
    for round_ in range(5):
        h = chain(10 + round_, 1, 16).popitem()[0]
        stale = KvbmObjectTier(s3, s3.kv, "instance-a", lock_timeout_s=-60)
        assert stale.try_acquire_lock(h)
        b = KvbmObjectTier(s3, s3.kv, "instance-b")
        c = KvbmObjectTier(s3, s3.kv, "instance-c")
        both_read = threading.Barrier(2, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            won = list(pool.map(lambda t: t.try_acquire_lock(h, between_read_and_write=both_read.wait), (b, c)))
        assert sorted(won) == [False, True], won
        data, _ = b.get_with_etag(f"{h}.lock")
        assert json.loads(data)["instance_id"] == ("instance-b" if won[0] else "instance-c")


def test_malformed_lock_is_taken_over(s3):
    h = chain(3, 1, 16).popitem()[0]
    a = KvbmObjectTier(s3, s3.kv, "instance-a")
    a.c.put_object(Bucket=s3.kv, Key=f"{h}.lock", Body=b"{not json")
    assert a.try_acquire_lock(h)
    data, _ = a.get_with_etag(f"{h}.lock")
    assert json.loads(data)["instance_id"] == "instance-a"


def test_error_codes_kvbm_matches_on(s3):
    c = s3.client()
    h = lineage_hash(0)
    # GET of a missing block: NoSuchKey (not just 404).
    with pytest.raises(ClientError) as e:
        c.get_object(Bucket=s3.kv, Key=f"0/{h}")
    assert (status_of(e.value), code_of(e.value)) == (404, "NoSuchKey")
    # HEAD of a missing .meta: a 404 without a body (aws-sdk-rust reads it
    # as NotFound).
    path = f"/{s3.kv}/{h}.meta".replace(":", "%3A")
    r = raw(s3, "HEAD", path, headers=signed_headers(s3, "HEAD", path))
    assert r.status == 404 and r.body == b""
    # DELETE of a lock that is gone: 204, as on S3.
    assert c.delete_object(Bucket=s3.kv, Key=f"{h}.lock")["ResponseMetadata"]["HTTPStatusCode"] == 204
    # The conditional PUT that loses: 412 with code PreconditionFailed.
    c.put_object(Bucket=s3.kv, Key=f"{h}.lock", Body=b"{}", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=s3.kv, Key=f"{h}.lock", Body=b"{}", IfNoneMatch="*")
    assert (status_of(e.value), code_of(e.value)) == (412, "PreconditionFailed")


def test_ensure_bucket_exists(s3):
    """`DYN_KVBM_OBJECT_BUCKET` may name a bucket that does not exist yet
    (e.g. `kv-cache-{worker_id}`): KVBM creates it (create_buckets =
    "objects"), then uses it like any other."""
    tier = KvbmObjectTier(s3, unique("kv-cache-worker"), "instance-a")
    tier.ensure_bucket_exists()
    tier.ensure_bucket_exists()  # exists now: HeadBucket only
    blocks = chain(5, 2, 4096)
    assert tier.offload(blocks) == list(blocks)
    assert tier.get_blocks(list(blocks)) == blocks
