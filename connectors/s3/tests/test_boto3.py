"""kvtierd's S3 listener through boto3 (the reference S3 client), operation
by operation, on both bucket kinds where it makes sense: ``kv`` (kind
"blocks": small immutable KV blocks) for small objects, ``ckpt`` (kind
"objects") for large and multipart ones. Raw HTTP (s3kit.raw, signed by
botocore's own signer) only where no client sends such a request on
purpose. Each test uses keys of its own (s3kit.unique)."""

import concurrent.futures
import datetime
import hashlib
import random
import socket
import threading
import urllib.error
import urllib.request

import pytest
from botocore.exceptions import ClientError
from s3kit import (
    CHECKSUMS,
    VIRTUAL_DOMAIN,
    aws_chunked,
    code_of,
    md5_b64,
    quote_key,
    raw,
    send_raw_bytes,
    signed_headers,
    signing_clock,
    status_of,
    trailer_checksums,
    unique,
)

KiB = 1024
MiB = 1024 * 1024


def blob(n, seed=0):
    return random.Random(seed).randbytes(n)


@pytest.fixture(params=["kv", "ckpt"])
def bucket(request, s3):
    return getattr(s3, request.param)


def expect_error(code, status, fn, *args, **kwargs):
    with pytest.raises(ClientError) as e:
        fn(*args, **kwargs)
    assert code_of(e.value) == code, e.value.response
    assert status_of(e.value) == status, e.value.response
    return e.value


def assert_absent(c, bucket, key):
    expect_error("404", 404, c.head_object, Bucket=bucket, Key=key)


# ---------------------------------------------------------------- objects


def test_put_get_head_delete(s3, bucket):
    c = s3.client()
    key = unique("obj") + "/a"
    body = blob(100 * KiB, 1)
    etag = c.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
    head = c.head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] == len(body)
    assert head["ETag"] == etag
    assert isinstance(head["LastModified"], datetime.datetime)
    got = c.get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == body
    assert got["ETag"] == etag
    assert got["ContentLength"] == len(body)
    assert status_of_ok(c.delete_object(Bucket=bucket, Key=key)) == 204
    expect_error("NoSuchKey", 404, c.get_object, Bucket=bucket, Key=key)
    assert_absent(c, bucket, key)
    # Deleting what is not there succeeds, as on S3.
    assert status_of_ok(c.delete_object(Bucket=bucket, Key=key)) == 204


def status_of_ok(resp):
    return resp["ResponseMetadata"]["HTTPStatusCode"]


def test_empty_object(s3, bucket):
    """KVBM marks an offloaded block with an empty `{hash}.meta` object."""
    c = s3.client()
    key = unique("empty") + ".meta"
    c.put_object(Bucket=bucket, Key=key, Body=b"")
    assert c.head_object(Bucket=bucket, Key=key)["ContentLength"] == 0
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == b""


def test_overwrite(s3, bucket):
    """A plain PUT replaces the object, in the blocks bucket too (KVBM
    rewrites its lock objects in the bucket that holds the blocks)."""
    c = s3.client()
    key = unique("over")
    e1 = c.put_object(Bucket=bucket, Key=key, Body=b"first version")["ETag"]
    e2 = c.put_object(Bucket=bucket, Key=key, Body=b"second, longer version")["ETag"]
    assert e1 != e2
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == b"second, longer version"


@pytest.mark.moto_differs("moto does not verify Content-MD5 when a flexible checksum is sent too")
def test_content_md5(s3, bucket):
    c = s3.client()
    key = unique("md5")
    body = blob(10 * KiB, 2)
    c.put_object(Bucket=bucket, Key=key, Body=body, ContentMD5=md5_b64(body))
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    # A wrong digest: refused, and the object keeps its old bytes.
    expect_error("BadDigest", 400, c.put_object, Bucket=bucket, Key=key, Body=b"other", ContentMD5=md5_b64(b"else"))
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == body
    # ... and a new key is not created.
    fresh = unique("md5")
    expect_error("BadDigest", 400, c.put_object, Bucket=bucket, Key=fresh, Body=body, ContentMD5=md5_b64(b"else"))
    assert_absent(c, bucket, fresh)


ALGORITHMS = ["CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"]


def object_size(bucket, s3):
    # Over 1 MiB in ckpt so a trailer body has several aws-chunked chunks.
    return 2 * MiB + 12345 if bucket == s3.ckpt else 64 * KiB + 7


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flexible_checksum_in_header(s3, bucket, algorithm):
    """Over plain HTTP botocore sends x-amz-checksum-<alg> as a header."""
    c = s3.client()
    key = unique("ck-h")
    body = blob(object_size(bucket, s3), 3)
    c.put_object(Bucket=bucket, Key=key, Body=body, ChecksumAlgorithm=algorithm)
    got = c.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert got["Body"].read() == body  # botocore verifies a checksum the server returns


@pytest.mark.parametrize("algorithm", [None] + ALGORITHMS)
def test_flexible_checksum_in_trailer(s3, bucket, algorithm):
    """boto3's default over HTTPS (and NIXL's, aws-sdk-cpp's, always):
    Content-Encoding: aws-chunked, a trailing x-amz-checksum-<alg>, signed
    STREAMING-UNSIGNED-PAYLOAD-TRAILER. None: botocore's default
    algorithm (CRC32). The server stores the decoded bytes."""
    c = s3.client()
    key = unique("ck-t")
    body = blob(object_size(bucket, s3), 4)
    extra = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    with trailer_checksums():
        c.put_object(Bucket=bucket, Key=key, Body=body, **extra)
    assert c.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(body)
    assert c.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")["Body"].read() == body


@pytest.mark.moto_differs("moto does not verify x-amz-checksum-* headers")
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_wrong_checksum_in_header(s3, bucket, algorithm):
    c = s3.client()
    key = unique("ck-bad")
    body = blob(32 * KiB, 5)
    wrong = CHECKSUMS[algorithm](body + b"x")
    expect_error("BadDigest", 400, c.put_object, Bucket=bucket, Key=key, Body=body, **{f"Checksum{algorithm}": wrong})
    assert_absent(c, bucket, key)


def chunked_put_headers(s3, bucket, key, payload, algorithm, trailer_value, *, encoded_len=None):
    name = f"x-amz-checksum-{algorithm.lower()}"
    headers = {
        "Content-Encoding": "aws-chunked",
        "Content-Type": "binary/octet-stream",
        "x-amz-decoded-content-length": str(len(payload)),
        "x-amz-trailer": name,
    }
    if encoded_len is not None:
        headers["Content-Length"] = str(encoded_len)
    path = f"/{bucket}/{quote_key(key)}"
    return path, signed_headers(s3, "PUT", path, headers=headers, payload_hash="STREAMING-UNSIGNED-PAYLOAD-TRAILER")


@pytest.mark.moto_differs("moto does not verify trailing checksums")
@pytest.mark.parametrize("algorithm", ["CRC32", "CRC64NVME"])
def test_wrong_checksum_in_trailer(s3, bucket, algorithm):
    c = s3.client()
    key = unique("ck-tbad")
    payload = blob(200 * KiB, 6)
    wrong = CHECKSUMS[algorithm](payload + b"x")
    body = aws_chunked(payload, f"x-amz-checksum-{algorithm.lower()}", wrong)
    path, headers = chunked_put_headers(s3, bucket, key, payload, algorithm, wrong, encoded_len=len(body))
    r = raw(s3, "PUT", path, headers=headers, body=body)
    assert (r.status, r.code) == (400, "BadDigest"), r
    assert_absent(c, bucket, key)


def test_aws_chunked_as_nixl_sends_it(s3):
    """NIXL's OBJ plugin (aws-sdk-cpp 1.11) byte for byte: HTTP
    Transfer-Encoding: chunked and no Content-Length, Expect:
    100-continue, uppercase hex aws-chunked sizes, trailer
    `x-amz-checksum-crc64nvme:<b64>` with no space (connectors/s3/NOTES.md)."""
    c = s3.client()
    key = unique("nixl-wire")
    payload = blob(300 * KiB + 3, 7)
    value = CHECKSUMS["CRC64NVME"](payload)
    body = aws_chunked(payload, "x-amz-checksum-crc64nvme", value, chunk_bytes=64 * KiB, upper_hex=True)
    path, headers = chunked_put_headers(s3, s3.kv, key, payload, "CRC64NVME", value)
    headers["Transfer-Encoding"] = "chunked"
    headers["Expect"] = "100-continue"
    # HTTP chunks of a size unrelated to the aws-chunked ones.
    http_chunks = [body[i : i + 50000] for i in range(0, len(body), 50000)]
    r = raw(s3, "PUT", path, headers=headers, body=None, chunks=http_chunks)
    assert r.status == 200, r
    assert c.get_object(Bucket=s3.kv, Key=key)["Body"].read() == payload


@pytest.mark.moto_differs("moto does not verify x-amz-content-sha256")
def test_payload_hash_mismatch(s3, bucket):
    """A body that is not the one whose SHA-256 was signed."""
    c = s3.client()
    key = unique("sha")
    path = f"/{bucket}/{quote_key(key)}"
    signed_for = b"the body that was signed"
    headers = signed_headers(s3, "PUT", path, body=signed_for)
    r = raw(s3, "PUT", path, headers=headers, body=b"a different body, same size!"[: len(signed_for)])
    assert (r.status, r.code) == (400, "XAmzContentSHA256Mismatch"), r
    assert_absent(c, bucket, key)


# ------------------------------------------------------- conditional writes


def test_if_none_match(s3, bucket):
    c = s3.client()
    key = unique("inm")
    c.put_object(Bucket=bucket, Key=key, Body=b"one", IfNoneMatch="*")
    expect_error("PreconditionFailed", 412, c.put_object, Bucket=bucket, Key=key, Body=b"two", IfNoneMatch="*")
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == b"one"


def test_if_match(s3, bucket):
    c = s3.client()
    key = unique("im")
    e1 = c.put_object(Bucket=bucket, Key=key, Body=b"v1")["ETag"]
    e2 = c.put_object(Bucket=bucket, Key=key, Body=b"v2", IfMatch=e1)["ETag"]
    assert e2 != e1
    expect_error("PreconditionFailed", 412, c.put_object, Bucket=bucket, Key=key, Body=b"v3", IfMatch=e1)
    assert c.get_object(Bucket=bucket, Key=key)["Body"].read() == b"v2"
    # If-Match on a key that does not exist: NoSuchKey, as on S3.
    expect_error("NoSuchKey", 404, c.put_object, Bucket=bucket, Key=unique("im"), Body=b"x", IfMatch=e1)


def test_if_none_match_race(s3):
    """Eight clients race If-None-Match: * on one key, five times: exactly
    one wins each time, the others get 412 (or S3's 409
    ConditionalRequestConflict), and the object is the winner's."""
    writers = 8
    clients = [s3.client() for _ in range(writers)]
    for round_ in range(5):
        key = unique("race")
        barrier = threading.Barrier(writers, timeout=60)

        def attempt(i):
            body = b"writer %d round %d" % (i, round_)
            barrier.wait()
            try:
                clients[i].put_object(Bucket=s3.kv, Key=key, Body=body, IfNoneMatch="*")
                return i, None
            except ClientError as e:
                return i, (status_of(e), code_of(e))

        with concurrent.futures.ThreadPoolExecutor(writers) as pool:
            results = list(pool.map(attempt, range(writers)))
        winners = [i for i, err in results if err is None]
        losers = [err for _, err in results if err is not None]
        assert len(winners) == 1, results
        for err in losers:
            assert err in ((412, "PreconditionFailed"), (409, "ConditionalRequestConflict")), results
        got = clients[0].get_object(Bucket=s3.kv, Key=key)["Body"].read()
        assert got == b"writer %d round %d" % (winners[0], round_)


def read_response(sock):
    """One HTTP/1.1 response from `sock`: (status, lowercased headers, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        assert got, f"the connection closed before a whole response head: {buf!r}"
        buf += got
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    want = int(headers.get("content-length", "0"))
    while len(rest) < want:
        got = sock.recv(65536)
        assert got, "the connection closed inside a response body"
        rest += got
    return status, headers, rest[:want]


def test_error_before_the_body_leaves_the_connection_usable_or_closed(s3):
    """A failed condition is answered before the request's body is read.
    The client may still send that body, then its next request on the
    same connection (as urllib3 and aws-sdk do when nothing said the
    connection closes). The answer must say `Connection: close`, or the
    next request must be answered as itself, never a bare 400 from bytes
    of the old body read as a request."""
    c = s3.client()
    key = unique("early")
    c.put_object(Bucket=s3.kv, Key=key, Body=b"held")
    body = b"x" * 5000
    path = f"/{s3.kv}/{key}"
    put = signed_headers(s3, "PUT", path, body=body, headers={"If-None-Match": "*"})
    put["Content-Length"] = str(len(body))
    get = signed_headers(s3, "GET", path)
    for _ in range(3):
        with socket.create_connection((s3.host, s3.port), timeout=10) as sock:
            head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in put.items()) + "\r\n"
            sock.sendall(head.encode())
            status, headers, _ = read_response(sock)
            assert status == 412, (status, headers)
            if headers.get("connection", "").lower() == "close":
                continue
            # Kept alive: the body, then a GET on the same connection.
            sock.sendall(body)
            sock.sendall(f"GET {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in get.items()).encode() + b"\r\n")
            status, headers, got = read_response(sock)
            assert (status, got) == (200, b"held"), (status, headers, got[:200])


# ------------------------------------------------------------------- reads


@pytest.mark.parametrize(
    "range_, first, last",
    [
        ("bytes=0-0", 0, 0),
        ("bytes=10-19", 10, 19),
        ("bytes=9990-", 9990, 9999),
        ("bytes=-7", 9993, 9999),
        ("bytes=9995-20000", 9995, 9999),  # an end past the object is clipped
    ],
)
def test_range_get(s3, bucket, range_, first, last):
    c = s3.client()
    key = unique("range")
    body = blob(10000, 8)
    c.put_object(Bucket=bucket, Key=key, Body=body)
    got = c.get_object(Bucket=bucket, Key=key, Range=range_)
    assert status_of_ok(got) == 206
    assert got["ContentRange"] == f"bytes {first}-{last}/10000"
    assert got["ContentLength"] == last - first + 1
    assert got["Body"].read() == body[first : last + 1]


def test_range_past_the_end(s3, bucket):
    c = s3.client()
    key = unique("range")
    c.put_object(Bucket=bucket, Key=key, Body=blob(10000, 9))
    expect_error("InvalidRange", 416, c.get_object, Bucket=bucket, Key=key, Range="bytes=10000-10005")


def test_missing_key_and_bucket(s3):
    c = s3.client()
    expect_error("NoSuchKey", 404, c.get_object, Bucket=s3.kv, Key=unique("nope"))
    expect_error("404", 404, c.head_object, Bucket=s3.ckpt, Key=unique("nope"))
    expect_error("NoSuchBucket", 404, c.get_object, Bucket=unique("nobucket"), Key="k")
    expect_error("NoSuchBucket", 404, c.put_object, Bucket=unique("nobucket"), Key="k", Body=b"x")


def test_expect_100_continue(s3):
    """botocore (PutObject, UploadPart) and aws-sdk-cpp (NIXL) send
    `Expect: 100-continue` and wait for `100 Continue` before the body."""
    import socket

    key = unique("expect")
    body = b"z" * 4096
    path = f"/{s3.ckpt}/{key}"
    headers = signed_headers(s3, "PUT", path, body=body)
    headers["Content-Length"] = str(len(body))
    headers["Expect"] = "100-continue"
    head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    with socket.create_connection((s3.host, s3.port), timeout=10) as sock:
        sock.sendall(head.encode())
        got = b""
        while len(got) < len(interim):
            chunk = sock.recv(len(interim) - len(got))
            assert chunk, got
            got += chunk
        assert got == interim  # before the body is sent
        sock.sendall(body)
        # The final response's status line and headers (no half-close: the
        # server may close a connection whose client shut its side).
        final = b""
        while True:
            while final.startswith(interim):
                final = final[len(interim) :]
            if b"\r\n\r\n" in final:
                break
            chunk = sock.recv(65536)
            assert chunk, got + final
            final += chunk
    assert final.startswith(b"HTTP/1.1 200"), final
    assert s3.client().get_object(Bucket=s3.ckpt, Key=key)["Body"].read() == body


# ----------------------------------------------------------------- deletes


@pytest.mark.parametrize("quiet", [False, pytest.param(True, marks=pytest.mark.moto_differs("moto lists Deleted keys in quiet mode"))])
def test_delete_objects(s3, bucket, quiet):
    c = s3.client()
    prefix = unique("del")
    keys = [f"{prefix}/{i}" for i in range(5)] + [f"{prefix}/a&b<c>"]
    for k in keys:
        c.put_object(Bucket=bucket, Key=k, Body=k.encode())
    missing = f"{prefix}/never-written"
    r = c.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys + [missing]], "Quiet": quiet})
    assert r.get("Errors", []) == []
    deleted = sorted(d["Key"] for d in r.get("Deleted", []))
    # Quiet: only errors are reported; otherwise every key, missing ones too.
    assert deleted == ([] if quiet else sorted(keys + [missing]))
    for k in keys:
        assert_absent(c, bucket, k)


# ----------------------------------------------------------------- listing


def put_many(c, bucket, keys, body=b"x"):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: c.put_object(Bucket=bucket, Key=k, Body=body), keys))


def test_list_prefix_and_delimiter(s3):
    c = s3.client()
    p = unique("ls")
    keys = [f"{p}/a/1", f"{p}/a/2", f"{p}/b/1", f"{p}/c", f"{p}/d/e/f"]
    put_many(c, s3.kv, keys)
    r = c.list_objects_v2(Bucket=s3.kv, Prefix=f"{p}/", Delimiter="/")
    assert [o["Key"] for o in r.get("Contents", [])] == [f"{p}/c"]
    assert [cp["Prefix"] for cp in r["CommonPrefixes"]] == [f"{p}/a/", f"{p}/b/", f"{p}/d/"]
    assert r["KeyCount"] == 4  # keys plus common prefixes
    assert r["IsTruncated"] is False
    r = c.list_objects_v2(Bucket=s3.kv, Prefix=f"{p}/a/")
    assert [o["Key"] for o in r["Contents"]] == [f"{p}/a/1", f"{p}/a/2"]
    assert all(o["Size"] == 1 and o["ETag"].startswith('"') for o in r["Contents"])
    r = c.list_objects_v2(Bucket=s3.kv, Prefix=p)
    assert [o["Key"] for o in r["Contents"]] == sorted(keys)
    r = c.list_objects_v2(Bucket=s3.kv, Prefix=unique("nothing-here"))
    assert r["KeyCount"] == 0 and "Contents" not in r


def test_list_pagination(s3):
    """A few hundred keys in pages of 100 with ContinuationToken, then
    StartAfter. Order is UTF-8 byte order (non-ASCII keys sort last)."""
    c = s3.client()
    p = unique("page")
    keys = sorted([f"{p}/{i:04d}" for i in range(245)] + [f"{p}/é{i}" for i in range(3)] + [f"{p}/日{i}" for i in range(2)])
    put_many(c, s3.kv, keys)
    seen, token, pages = [], None, []
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = c.list_objects_v2(Bucket=s3.kv, Prefix=f"{p}/", MaxKeys=100, **kw)
        page = [o["Key"] for o in r.get("Contents", [])]
        assert r["KeyCount"] == len(page)
        pages.append(len(page))
        seen += page
        if not r["IsTruncated"]:
            assert "NextContinuationToken" not in r
            break
        token = r["NextContinuationToken"]
        assert len(pages) < 10, pages
    assert pages == [100, 100, 50]
    assert seen == keys
    r = c.list_objects_v2(Bucket=s3.kv, Prefix=f"{p}/", StartAfter=keys[120], MaxKeys=5)
    assert [o["Key"] for o in r["Contents"]] == keys[121:126]
    assert r["IsTruncated"] is True


# --------------------------------------------------------------- multipart


def upload_parts(c, bucket, key, upload_id, parts, order=None):
    """Uploads `parts` (a list of bytes) as parts 1..N, in `order` (indexes)."""
    etags = {}
    for i in order or range(len(parts)):
        r = c.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=i + 1, Body=parts[i])
        etags[i + 1] = r["ETag"]
    return etags


def test_multipart_upload(s3):
    """Parts of different sizes, the last one small, uploaded out of
    order; the object appears only when the upload is completed."""
    c = s3.client()
    key = unique("mpu") + "/shard.distcp"
    parts = [blob(5 * MiB, 10), blob(6 * MiB + 3, 11), blob(1000, 12)]
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    etags = upload_parts(c, s3.ckpt, key, upload_id, parts, order=[1, 2, 0])
    assert_absent(c, s3.ckpt, key)  # not visible before Complete
    r = c.complete_multipart_upload(
        Bucket=s3.ckpt,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]},
    )
    assert r["ETag"].startswith('"')
    whole = b"".join(parts)
    head = c.head_object(Bucket=s3.ckpt, Key=key)
    assert head["ContentLength"] == len(whole)
    assert head["ETag"] == r["ETag"]
    assert c.get_object(Bucket=s3.ckpt, Key=key)["Body"].read() == whole
    # A range across the first part boundary.
    a, b = 5 * MiB - 10, 5 * MiB + 9
    got = c.get_object(Bucket=s3.ckpt, Key=key, Range=f"bytes={a}-{b}")
    assert got["Body"].read() == whole[a : b + 1]


def test_multipart_etags_without_quotes(s3):
    """s3torchconnector (mountpoint-s3-client) lists part ETags without
    their quotes in CompleteMultipartUpload."""
    c = s3.client()
    key = unique("mpu-noquote")
    parts = [blob(5 * MiB, 13), blob(10, 14)]
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    etags = upload_parts(c, s3.ckpt, key, upload_id, parts)
    c.complete_multipart_upload(
        Bucket=s3.ckpt,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n].strip('"')} for n in (1, 2)]},
    )
    assert c.get_object(Bucket=s3.ckpt, Key=key)["Body"].read() == b"".join(parts)


def test_multipart_abort(s3):
    c = s3.client()
    key = unique("mpu-abort")
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    etags = upload_parts(c, s3.ckpt, key, upload_id, [blob(5 * MiB, 15)])
    assert status_of_ok(c.abort_multipart_upload(Bucket=s3.ckpt, Key=key, UploadId=upload_id)) == 204
    assert_absent(c, s3.ckpt, key)
    assert etags[1].startswith('"')


@pytest.mark.moto_differs("moto answers 500 to UploadPart on a finished upload")
@pytest.mark.parametrize("finish", ["complete", "abort"])
def test_multipart_upload_gone_when_finished(s3, finish):
    c = s3.client()
    key = unique("mpu-gone")
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    etags = upload_parts(c, s3.ckpt, key, upload_id, [blob(1000, 22)])
    if finish == "complete":
        c.complete_multipart_upload(
            Bucket=s3.ckpt, Key=key, UploadId=upload_id, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etags[1]}]}
        )
    else:
        c.abort_multipart_upload(Bucket=s3.ckpt, Key=key, UploadId=upload_id)
    expect_error("NoSuchUpload", 404, c.upload_part, Bucket=s3.ckpt, Key=key, UploadId=upload_id, PartNumber=2, Body=b"x")
    expect_error(
        "NoSuchUpload",
        404,
        c.complete_multipart_upload,
        Bucket=s3.ckpt,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etags[1]}]},
    )


def test_multipart_invalid_part(s3):
    c = s3.client()
    key = unique("mpu-invalid")
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    etags = upload_parts(c, s3.ckpt, key, upload_id, [blob(5 * MiB, 16)])
    never = '"' + hashlib.md5(b"never uploaded").hexdigest() + '"'
    for listed in (
        [{"PartNumber": 1, "ETag": etags[1]}, {"PartNumber": 2, "ETag": never}],  # a part never uploaded
        [{"PartNumber": 1, "ETag": never}],  # an uploaded part with another ETag
    ):
        expect_error(
            "InvalidPart",
            400,
            c.complete_multipart_upload,
            Bucket=s3.ckpt,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": listed},
        )
    assert_absent(c, s3.ckpt, key)


@pytest.mark.moto_differs("moto completes parts listed out of order")
def test_multipart_invalid_part_order(s3):
    c = s3.client()
    key = unique("mpu-order")
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    etags = upload_parts(c, s3.ckpt, key, upload_id, [blob(5 * MiB, 17), blob(5 * MiB, 18)])
    expect_error(
        "InvalidPartOrder",
        400,
        c.complete_multipart_upload,
        Bucket=s3.ckpt,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": etags[2]}, {"PartNumber": 1, "ETag": etags[1]}]},
    )
    assert_absent(c, s3.ckpt, key)


@pytest.mark.parametrize("part_number", [pytest.param(0, marks=pytest.mark.moto_differs("moto accepts part number 0")), 10001])
def test_multipart_part_number_out_of_range(s3, part_number):
    c = s3.client()
    key = unique("mpu-range")
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    expect_error(
        "InvalidArgument", 400, c.upload_part, Bucket=s3.ckpt, Key=key, UploadId=upload_id, PartNumber=part_number, Body=b"x"
    )
    c.abort_multipart_upload(Bucket=s3.ckpt, Key=key, UploadId=upload_id)


@pytest.mark.moto_differs("moto does not verify part checksums")
def test_multipart_wrong_part_checksum(s3):
    c = s3.client()
    key = unique("mpu-ck")
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    body = blob(64 * KiB, 19)
    expect_error(
        "BadDigest",
        400,
        c.upload_part,
        Bucket=s3.ckpt,
        Key=key,
        UploadId=upload_id,
        PartNumber=1,
        Body=body,
        ChecksumCRC32=CHECKSUMS["CRC32"](body + b"x"),
    )
    c.abort_multipart_upload(Bucket=s3.ckpt, Key=key, UploadId=upload_id)


# -------------------------------------------------------------------- copy


def test_copy_object(s3):
    """s3torchconnector's DCP writer renames `.metadata.tmp` to `.metadata`
    with CopyObject (x-amz-copy-source, each path segment percent-encoded)
    and DeleteObject: without CopyObject no DCP checkpoint can be saved."""
    c = s3.client()
    p = unique("copy")
    src, dst = f"{p}/step 1/.metadata.tmp", f"{p}/step 1/.metadata"
    body = blob(3000, 20)
    c.put_object(Bucket=s3.ckpt, Key=src, Body=body)
    r = c.copy_object(Bucket=s3.ckpt, Key=dst, CopySource={"Bucket": s3.ckpt, "Key": src})
    assert r["CopyObjectResult"]["ETag"].startswith('"')
    assert c.get_object(Bucket=s3.ckpt, Key=dst)["Body"].read() == body
    assert c.get_object(Bucket=s3.ckpt, Key=src)["Body"].read() == body
    expect_error("NoSuchKey", 404, c.copy_object, Bucket=s3.ckpt, Key=f"{p}/x", CopySource={"Bucket": s3.ckpt, "Key": f"{p}/none"})


# ----------------------------------------------------------------- buckets


def test_buckets(s3):
    c = s3.client()
    names = {b["Name"] for b in c.list_buckets()["Buckets"]}
    assert {s3.kv, s3.ckpt, s3.public} <= names
    assert status_of_ok(c.head_bucket(Bucket=s3.ckpt)) == 200
    expect_error("404", 404, c.head_bucket, Bucket=unique("nobucket"))


def test_create_bucket(s3):
    """create_buckets = "objects": CreateBucket makes a bucket of kind
    objects (KVBM's ensure_bucket_exists: HeadBucket, then CreateBucket)."""
    c = s3.client()
    name = unique("made")
    expect_error("404", 404, c.head_bucket, Bucket=name)
    c.create_bucket(Bucket=name)
    assert status_of_ok(c.head_bucket(Bucket=name)) == 200
    assert name in {b["Name"] for b in c.list_buckets()["Buckets"]}
    c.put_object(Bucket=name, Key="k", Body=b"in a new bucket")
    assert c.get_object(Bucket=name, Key="k")["Body"].read() == b"in a new bucket"
    expect_error("InvalidBucketName", 400, c.create_bucket, Bucket="n" * 64)  # names have 3 to 63 characters


@pytest.mark.moto_differs("needs a kvtierd of its own (create_buckets = off)")
def test_create_bucket_refused_when_off(own_kvtierd):
    from conftest import KVTIERD_S3_CONFIG

    server = own_kvtierd(KVTIERD_S3_CONFIG.replace('create_buckets = "objects"', 'create_buckets = "off"'))
    c = server.client()
    expect_error("AccessDenied", 403, c.create_bucket, Bucket=unique("refused"))
    expect_error("404", 404, c.head_bucket, Bucket=unique("refused"))


# -------------------------------------------------------------------- auth


@pytest.mark.moto_differs("moto does not check signatures")
def test_wrong_secret(s3):
    c = s3.client(secret_key="not-the-secret")
    expect_error("SignatureDoesNotMatch", 403, c.put_object, Bucket=s3.kv, Key=unique("auth"), Body=b"x")
    expect_error("SignatureDoesNotMatch", 403, c.list_objects_v2, Bucket=s3.kv)


@pytest.mark.moto_differs("moto does not check access keys")
def test_unknown_access_key(s3):
    c = s3.client(access_key="nobody-knows-me")
    expect_error("InvalidAccessKeyId", 403, c.get_object, Bucket=s3.kv, Key="k")


@pytest.mark.moto_differs("moto lets anonymous requests into every bucket")
def test_unsigned_refused_outside_public(s3):
    anon = s3.client(unsigned=True)
    key = unique("anon")
    s3.client().put_object(Bucket=s3.ckpt, Key=key, Body=b"private")
    expect_error("AccessDenied", 403, anon.get_object, Bucket=s3.ckpt, Key=key)
    expect_error("AccessDenied", 403, anon.put_object, Bucket=s3.ckpt, Key=unique("anon"), Body=b"x")
    expect_error("AccessDenied", 403, anon.list_objects_v2, Bucket=s3.ckpt)
    expect_error("AccessDenied", 403, anon.put_object, Bucket=s3.kv, Key=unique("anon"), Body=b"x")


def test_unsigned_allowed_in_public(s3):
    anon = s3.client(unsigned=True)
    key = unique("anon")
    anon.put_object(Bucket=s3.public, Key=key, Body=b"anyone")
    assert anon.get_object(Bucket=s3.public, Key=key)["Body"].read() == b"anyone"
    assert key in [o["Key"] for o in anon.list_objects_v2(Bucket=s3.public, Prefix=key)["Contents"]]
    assert s3.client().get_object(Bucket=s3.public, Key=key)["Body"].read() == b"anyone"


def test_presigned_get_and_put(s3):
    # SigV4 query authentication; without signature_version boto3 presigns
    # with SigV2 (AWSAccessKeyId, Signature, Expires).
    c = s3.client(signature_version="s3v4")
    key = unique("presign") + "/a b:c"
    put_url = c.generate_presigned_url("put_object", Params={"Bucket": s3.ckpt, "Key": key}, ExpiresIn=300)
    req = urllib.request.Request(
        put_url, data=b"presigned body", method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
    get_url = c.generate_presigned_url("get_object", Params={"Bucket": s3.ckpt, "Key": key}, ExpiresIn=300)
    with urllib.request.urlopen(get_url, timeout=10) as r:
        assert r.read() == b"presigned body"


@pytest.mark.moto_differs("moto does not check presigned URL expiry")
def test_presigned_expired(s3):
    c = s3.client(signature_version="s3v4")
    key = unique("presign")
    c.put_object(Bucket=s3.ckpt, Key=key, Body=b"x")
    # Signed an hour ago, valid for a minute.
    with signing_clock(-datetime.timedelta(hours=1)):
        url = c.generate_presigned_url("get_object", Params={"Bucket": s3.ckpt, "Key": key}, ExpiresIn=60)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 403
    assert b"<Code>AccessDenied</Code>" in e.value.read()


@pytest.mark.moto_differs("moto does not check the request time")
@pytest.mark.parametrize("minutes", [-20, 20])
def test_clock_skew_refused(s3, minutes):
    """max_clock_skew_s = 900: a request signed 20 minutes off is refused."""
    c = s3.client()
    with signing_clock(datetime.timedelta(minutes=minutes)):
        expect_error("RequestTimeTooSkewed", 403, c.put_object, Bucket=s3.kv, Key=unique("skew"), Body=b"x")


@pytest.mark.parametrize("minutes", [-10, 10])
def test_clock_skew_tolerated(s3, minutes):
    c = s3.client()
    key = unique("skew")
    with signing_clock(datetime.timedelta(minutes=minutes)):
        c.put_object(Bucket=s3.kv, Key=key, Body=b"x")
    assert c.get_object(Bucket=s3.kv, Key=key)["Body"].read() == b"x"


@pytest.mark.parametrize("region", ["us-west-2", "eu-central-1", "auto"])
def test_any_region(s3, region):
    c = s3.client(region=region)
    key = unique("region")
    c.put_object(Bucket=s3.kv, Key=key, Body=region.encode())
    assert c.get_object(Bucket=s3.kv, Key=key)["Body"].read() == region.encode()


# -------------------------------------------------------------------- keys


SPECIAL_KEYS = [
    "a/b/c",
    "kvbm/0/5:3xYzAbC:9qRsTuV",  # KVBM's {rank}/{position}:{hash}:{parent}
    "5:3xYzAbC:9qRsTuV.lock",
    "uni/ключ/日本語/é",
    "space here/plus+sign",
    "pct%41/amp&/eq=/q?/hash#",
    "tilde~/star*/paren()/comma,/semi;/at@",
    "trailing/slash/",
    "double//slash",
]


@pytest.mark.parametrize("suffix", SPECIAL_KEYS)
def test_special_keys(s3, suffix):
    c = s3.client()
    p = unique("key")
    key = f"{p}/{suffix}"
    c.put_object(Bucket=s3.kv, Key=key, Body=key.encode())
    assert c.get_object(Bucket=s3.kv, Key=key)["Body"].read() == key.encode()
    assert c.head_object(Bucket=s3.kv, Key=key)["ContentLength"] == len(key.encode())
    assert [o["Key"] for o in c.list_objects_v2(Bucket=s3.kv, Prefix=p)["Contents"]] == [key]
    r = c.delete_objects(Bucket=s3.kv, Delete={"Objects": [{"Key": key}]})
    assert [d["Key"] for d in r["Deleted"]] == [key]
    assert_absent(c, s3.kv, key)


def test_literal_colon_in_path(s3):
    """A client may send ':' unencoded in the path and sign the path as
    sent (S3 signs the URI path as it is on the wire, without
    normalizing or re-encoding it)."""
    key = unique("colon") + "/0:abc:def"
    path = f"/{s3.kv}/{key}"
    r = raw(s3, "PUT", path, headers=signed_headers(s3, "PUT", path, body=b"colon"), body=b"colon")
    assert r.status == 200, r
    assert s3.client().get_object(Bucket=s3.kv, Key=key)["Body"].read() == b"colon"


@pytest.mark.moto_differs("moto has no key length limit")
def test_key_length_limit(s3):
    c = s3.client()
    p = unique("long") + "/"
    at_limit = p + "k" * (1024 - len(p))
    c.put_object(Bucket=s3.kv, Key=at_limit, Body=b"x")
    assert c.get_object(Bucket=s3.kv, Key=at_limit)["Body"].read() == b"x"
    # 1025 bytes: the limit counts UTF-8 bytes, not characters.
    over = p + "k" * (1024 - len(p) - 1) + "é"
    assert len(over) == 1024 and len(over.encode()) == 1025
    expect_error("KeyTooLongError", 400, c.put_object, Bucket=s3.kv, Key=over, Body=b"x")


# ------------------------------------------------------------- addressing


def test_virtual_host_addressing(s3):
    c = s3.virtual_client()
    key = unique("vhost") + "/a:b"
    c.put_object(Bucket=s3.kv, Key=key, Body=b"virtual")
    assert c.get_object(Bucket=s3.kv, Key=key)["Body"].read() == b"virtual"
    assert c.head_object(Bucket=s3.kv, Key=key)["ContentLength"] == 7
    assert [o["Key"] for o in c.list_objects_v2(Bucket=s3.kv, Prefix=key)["Contents"]] == [key]
    assert c.sent_hosts and all(h == f"{s3.kv}.{VIRTUAL_DOMAIN}:{s3.port}" for h in c.sent_hosts), c.sent_hosts
    # The same object through path-style addressing.
    assert s3.client().get_object(Bucket=s3.kv, Key=key)["Body"].read() == b"virtual"


# --------------------------------------------------- unsupported operations


@pytest.mark.moto_differs("moto implements these operations")
@pytest.mark.parametrize(
    "call",
    [
        lambda c, b, k: c.put_object_acl(Bucket=b, Key=k, ACL="public-read"),
        lambda c, b, k: c.get_object_tagging(Bucket=b, Key=k),
        lambda c, b, k: c.put_object_tagging(Bucket=b, Key=k, Tagging={"TagSet": [{"Key": "a", "Value": "b"}]}),
        lambda c, b, k: c.put_bucket_versioning(Bucket=b, VersioningConfiguration={"Status": "Enabled"}),
        lambda c, b, k: c.get_bucket_lifecycle_configuration(Bucket=b),
    ],
    ids=["PutObjectAcl", "GetObjectTagging", "PutObjectTagging", "PutBucketVersioning", "GetBucketLifecycleConfiguration"],
)
def test_unsupported_operations(s3, call):
    c = s3.client()
    key = unique("unsup")
    c.put_object(Bucket=s3.ckpt, Key=key, Body=b"x")
    expect_error("NotImplemented", 501, call, c, s3.ckpt, key)


# ---------------------------------------------------------------- bad input


def test_content_length_longer_than_body(s3):
    """Content-Length says 1000, the client sends 10 bytes and closes its
    side: no object, and the server goes on serving."""
    key = unique("short")
    path = f"/{s3.kv}/{key}"
    body = b"0123456789"
    headers = signed_headers(s3, "PUT", path, body=body, payload_hash="UNSIGNED-PAYLOAD")
    headers["Content-Length"] = "1000"
    request = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    answer = send_raw_bytes(s3, request.encode() + body)
    # Either an error status or just a closed connection; never a success.
    assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]
    c = s3.client()
    assert_absent(c, s3.kv, key)
    c.put_object(Bucket=s3.kv, Key=key, Body=b"still serving")


@pytest.mark.moto_differs("moto answers 500")
def test_malformed_complete_xml(s3):
    c = s3.client()
    key = unique("mpu-xml")
    upload_id = c.create_multipart_upload(Bucket=s3.ckpt, Key=key)["UploadId"]
    upload_parts(c, s3.ckpt, key, upload_id, [blob(100, 21)])
    path = f"/{s3.ckpt}/{key}"
    query = f"uploadId={upload_id}"
    body = b"<CompleteMultipartUpload><Part><PartNumber>1</Part>"
    r = raw(s3, "POST", path, query=query, headers=signed_headers(s3, "POST", path, query=query, body=body), body=body)
    assert (r.status, r.code) == (400, "MalformedXML"), r
    assert_absent(c, s3.ckpt, key)


@pytest.mark.moto_differs("moto answers 500")
def test_malformed_delete_xml(s3):
    c = s3.client()
    key = unique("del-xml")
    c.put_object(Bucket=s3.kv, Key=key, Body=b"x")
    path = f"/{s3.kv}"
    body = b"<Delete><Object><Key>" + key.encode() + b"</Key></Delete>"
    headers = signed_headers(s3, "POST", path, query="delete=", headers={"Content-MD5": md5_b64(body)}, body=body)
    r = raw(s3, "POST", path, query="delete=", headers=headers, body=body)
    assert (r.status, r.code) == (400, "MalformedXML"), r
    assert c.get_object(Bucket=s3.kv, Key=key)["Body"].read() == b"x"
